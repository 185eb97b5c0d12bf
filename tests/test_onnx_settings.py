"""ONNX node settings checked against the module: ConvTranspose, an RNN's batch_first, and stacked RNN nodes.

Every file comes from torch.onnx.export (both exporters) or is built with onnx.helper; every loaded twin is
compared with onnxruntime's run of the file itself.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import LayoutError, UnsupportedConfigError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# Hand-built graphs whose outputs are a node's own (an RNN node's Y: sequence, directions, batch, hidden): the
# load's run of the graph cannot pair them with the module's outputs and says so; tests/test_onnx_graph_check.py
# tests that run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outputs were not compared:weightport.errors.UncheckedConfigWarning"
)
helper, numpy_helper = onnx.helper, onnx.numpy_helper


def randomized(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def exported(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> Path:
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), opset_version=17, dynamo=dynamo)
    return path


def runtime(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def first(out: torch.Tensor | tuple[torch.Tensor, ...]) -> np.ndarray:
    return (out[0] if isinstance(out, tuple) else out).detach().numpy()


# --- ConvTranspose ----------------------------------------------------------------------------------------


def conv_t(**kw: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(4, 6, 3, **kw)


@pytest.mark.parametrize("dynamo", [False, True])
def test_conv_transpose_twin_loads_exactly(tmp_path: Path, dynamo: bool) -> None:
    settings = {"stride": 2, "padding": 1, "output_padding": 1, "dilation": 2, "groups": 2}
    x = torch.randn(2, 4, 5, 5)
    path = exported(randomized(conv_t(**settings), 1), x, tmp_path / "t.onnx", dynamo)
    twin = randomized(conv_t(**settings), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(twin, path)
    assert relative_error(first(twin(x)), runtime(path, x.numpy())) < 1e-5


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize(
    ("source", "twin", "match"),
    [
        # the same output shape: only the settings tell them apart
        (
            {"dilation": 2, "padding": 1},
            conv_t(),
            r"(?s)dilations=2 but the module has dilation=1.*pads 1 \(cropped",
        ),
        ({"stride": 2}, conv_t(), r"strides=2 but the module has stride=1.*Fix: build the ConvTranspose2d"),
        (
            {"stride": 2, "output_padding": 1},
            conv_t(stride=2),
            r"output_padding=1 but the module has output_padding=0",
        ),
        # a weight (4, 6 / 2, 3, 3): the shape of an ungrouped ConvTranspose2d(4, 3, 3)'s
        ({"groups": 2}, nn.ConvTranspose2d(4, 3, 3, bias=False), r"group=2 but the module has groups=1"),
    ],
)
def test_conv_transpose_settings_that_differ_are_refused(
    tmp_path: Path, dynamo: bool, source: dict, twin: nn.Module, match: str
) -> None:
    x = torch.randn(2, 4, 5, 5)
    path = exported(randomized(conv_t(**source), 1), x, tmp_path / "t.onnx", dynamo)
    model = twin
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(LayoutError, match=match):
        weightport.load(model, path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_conv_transpose_output_shape_and_uneven_pads_are_refused(tmp_path: Path) -> None:
    for attrs, match in (
        ({"output_shape": [11, 11], "strides": [2, 2]}, r"output_shape=\[11, 11\] fixes the output's length"),
        ({"pads": [0, 0, 1, 1], "strides": [2, 2]}, r"pads begin 0, end 1: PyTorch's ConvTranspose crops"),
    ):
        w = numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32), "w"
        )
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 5, 5])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=[w],
        )  # fmt: skip
        path = tmp_path / "t.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        with pytest.raises(UnsupportedConfigError, match=match):
            weightport.load(nn.ConvTranspose2d(4, 4, 3, stride=2, bias=False), path)


# --- batch_first ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_batch_first_is_read_from_the_graph(
    tmp_path: Path, dynamo: bool, kind: str, batch_first: bool
) -> None:
    x = torch.randn(3, 3, 4)  # batch == steps: the shapes cannot tell
    make = getattr(nn, kind)
    path = exported(randomized(make(4, 5, batch_first=batch_first), 1), x, tmp_path / "r.onnx", dynamo)
    twin = randomized(make(4, 5, batch_first=batch_first), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(twin, path)
    assert relative_error(first(twin(x)), runtime(path, x.numpy())) < 1e-5
    other = make(4, 5, batch_first=not batch_first)
    with pytest.raises(LayoutError, match=rf"but the model was built with batch_first={not batch_first}.*Fix: build "
                       rf"it with batch_first={batch_first}; or.*pass mapping="):  # fmt: skip
        weightport.load(other, path)


# --- stacked recurrent nodes ------------------------------------------------------------------------------

H = 4


def _lstm_node(i: int, x: str, rng: np.random.Generator) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    arrays = {f"W{i}": (1, 4 * H, H), f"R{i}": (1, 4 * H, H), f"B{i}": (1, 8 * H)}
    tensors = [
        numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n)
        for n, s in arrays.items()
    ]
    return helper.make_node("LSTM", [x, *arrays], [f"y{i}"], hidden_size=H), tensors


def stacked_file(path: Path, between: str = "", parallel: bool = False) -> Path:
    """Two LSTM nodes; the second reads the first's Y regrouped as the exporters do (or through ``between``, or
    the graph's input beside the first)."""
    rng = np.random.default_rng(0)
    first_node, inits = _lstm_node(0, "x", rng)
    nodes = [first_node, helper.make_node("Transpose", ["y0"], ["t0"], perm=[0, 2, 1, 3])]
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", ["t0", "shape"], ["h0"]))
    read = "h0"
    if between:
        nodes.append(helper.make_node(between, ["h0"], ["h0b"]))
        read = "h0b"
    second, more = _lstm_node(1, "x" if parallel else read, rng)
    nodes.append(second)
    out = "y1"
    if parallel:
        nodes.append(helper.make_node("Add", ["y1", "y0"], ["sum"]))
        out = "sum"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 5, H])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)], initializer=inits + more,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def test_chained_nodes_fill_a_two_layer_lstm(tmp_path: Path) -> None:
    path = stacked_file(tmp_path / "s.onnx")
    x = np.random.default_rng(1).standard_normal((5, 5, H)).astype(np.float32)
    model = randomized(nn.LSTM(H, H, num_layers=2), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(model, path)
    got = first(model(torch.from_numpy(x)))
    assert relative_error(got, runtime(path, x)[:, 0]) < 1e-5


@pytest.mark.parametrize(
    ("between", "parallel", "match"),
    [
        (
            "Relu",
            False,
            r"node 'LSTM#\d+' \(LSTM\): fills layer 1 of the model .* its X is made by node 'Relu#\d+'",
        ),
        (
            "",
            True,
            r"its X is the graph's input 'x', which node 'LSTM#0' reads too \(they run side by side\)",
        ),
    ],
)
def test_nodes_that_are_not_chained_do_not_fill_one_stack(
    tmp_path: Path, between: str, parallel: bool, match: str
) -> None:
    path = stacked_file(tmp_path / "s.onnx", between, parallel)
    with pytest.raises(LayoutError, match=match):
        weightport.load(nn.LSTM(H, H, num_layers=2), path)


@pytest.mark.parametrize("dynamo", [False, True])
def test_exported_stacks_load_exactly(tmp_path: Path, dynamo: bool) -> None:
    x = torch.randn(3, 3, 4)
    source = nn.GRU(4, 5, num_layers=3, bidirectional=True, batch_first=True)
    path = exported(randomized(source, 1), x, tmp_path / "g.onnx", dynamo)
    twin = randomized(nn.GRU(4, 5, num_layers=3, bidirectional=True, batch_first=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(twin, path)
    assert relative_error(first(twin(x)), runtime(path, x.numpy())) < 1e-5


def test_one_node_for_two_layers_says_so(tmp_path: Path) -> None:
    x = torch.randn(3, 2, 4)
    path = exported(randomized(nn.LSTM(4, 4), 1), x, tmp_path / "one.onnx", dynamo=False)
    with pytest.raises(LayoutError, match=r"the file has 1 LSTM node and the model has 2 layers\. Fix: build it "
                       r"with num_layers=1"):  # fmt: skip
        weightport.load(nn.LSTM(4, 4, num_layers=2), path)
