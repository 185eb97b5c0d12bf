"""ONNX files from other exporters and opsets, loaded into the equivalent PyTorch models.

tests/golden/make_onnx_exporters.py wrote the files in tests/golden/onnx_exporters/ with tf2onnx (Keras 2
models, opsets 9 and 13) and torch.onnx.export (opsets 9, 11, 13; external data, Constant-node weights,
float16 initializers behind Cast nodes, a Linear applied twice and tied weights), and recorded
onnxruntime's output for one random input in io.npz. Each file is loaded into a freshly initialized twin
and must reproduce that output to 1e-5 (float32); the files that PyTorch cannot express are refused with
the reason and the fix, and nothing is written. Needs torch, numpy and onnx; onnxruntime only re-checks
the recorded outputs.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import refused, snapshot
from golden.onnx_exporter_models import Mixed, Shared
from weightport.errors import LayoutError, LoadError, SourceError

pytest.importorskip("onnx")

GOLDEN = Path(__file__).parent / "golden" / "onnx_exporters"
TOL = 1e-5
F = 3  # input features of every model


def recorded(name: str) -> tuple[torch.Tensor, np.ndarray]:
    with np.load(GOLDEN / "io.npz", allow_pickle=False) as io:
        return torch.from_numpy(io[f"{name}/x"]), io[f"{name}/y"]


def max_err(out: torch.Tensor, expected: np.ndarray) -> float:
    error = float(np.abs(out.detach().numpy() - expected).max())
    print(f"maxerr {error:.2e}")  # pytest -s shows them
    return error


# --- the PyTorch twins of the Keras models (batch first, as Keras) ---------------------------------------


class LstmDense(nn.Module):
    """Keras LSTM(4, return_sequences=True) -> Dense(2): the Dense runs on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(F, 4, batch_first=True)
        self.dense = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.lstm(x)[0])


class BiGruLstm(nn.Module):
    """Keras Bidirectional(GRU(4, return_sequences=True)) -> LSTM(3) -> Dense(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(F, 4, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(8, 3, batch_first=True)
        self.dense = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.lstm(self.gru(x)[0])[0][:, -1])


class BiLstm(nn.Module):
    """Keras Bidirectional(LSTM(4)): the last forward state beside the backward state after the sweep."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(F, 4, bidirectional=True, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_n = self.lstm(x)[1][0]
        return torch.cat([h_n[0], h_n[1]], dim=1)


class Conv1dDense(nn.Module):
    """Keras Conv1D(4, 3, padding="same", activation="relu") -> Flatten -> Dense(2), channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(F, 4, 3, padding=1)
        self.dense = nn.Linear(5 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # Flatten sees (time, channels)
        return self.dense(h.flatten(1))


# --- the torch.onnx.export models (as in make_onnx_exporters.py) ----------------------------------------


CASES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "tf_lstm_dense": (LstmDense, ["lstm[0]", "dense"]),
    "tf_bigru_lstm": (BiGruLstm, ["gru[0]", "lstm[0]", "dense"]),
    "tf_bigru_lstm_op9": (BiGruLstm, ["gru[0]", "lstm[0]", "dense"]),
    "tf_bilstm": (BiLstm, ["lstm[0]"]),
    "tf_conv1d": (Conv1dDense, ["conv", "dense"]),
    "torch_op9": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_op11": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_op13": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_external": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_constants": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_float16": (Mixed, ["conv", "gru[0]", "lstm[0]", "fc"]),
    "torch_shared": (Shared, ["embed", "fc", "head"]),
}


SHOWN_FLATTEN = {"tf_conv1d"}


def fresh(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(1)
    return build().eval()


@pytest.mark.parametrize("name", list(CASES))
def test_exported_file_loads_into_its_twin(name: str) -> None:
    build, pairs = CASES[name]
    x, expected = recorded(name)
    model = fresh(build)
    # tf_conv1d's Dense reads a flattened channels-last map: only the forward pass shows the twin flattens so
    inputs = (x,) if name in SHOWN_FLATTEN else None
    with torch.no_grad():
        assert max_err(model(x), expected) > 1e-2  # nothing matches before loading
        report = weightport.load(model, GOLDEN / f"{name}.onnx", example_inputs=inputs)
        assert max_err(model(x), expected) < TOL
    assert sorted(p.module_path for p in report.pairings) == sorted(pairs)
    assert not report.ignored


@pytest.mark.parametrize("name", list(CASES))
def test_recorded_outputs_are_onnxruntimes(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    x, expected = recorded(name)
    session = ort.InferenceSession(str(GOLDEN / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(y - expected).max() < TOL


def test_float16_weights_are_read_exactly() -> None:
    """Both float16 encodings (raw bytes, int32_data) widen to the same float32 values as the float32 file."""
    a, b = fresh(Mixed), fresh(Mixed)
    weightport.load(a, GOLDEN / "torch_float16.onnx")
    weightport.load(b, GOLDEN / "torch_op13.onnx")
    want, got = weightport.to_numpy(b), weightport.to_numpy(a)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_tied_and_reused_weights_fill_each_module_once() -> None:
    model = fresh(Shared)
    report = weightport.load(model, GOLDEN / "torch_shared.onnx")
    assert [p.module_path for p in report.pairings].count("fc") == 1
    assert model.head.weight is model.embed.weight


def test_external_data_is_read_from_the_models_folder_only(tmp_path: Path) -> None:
    shutil.copy(GOLDEN / "torch_external.onnx", tmp_path)
    model = fresh(Mixed)
    before = snapshot(model)
    with pytest.raises(SourceError, match=r"keeps its data in 'torch_external.onnx.data', which is not in"):
        weightport.load(model, tmp_path / "torch_external.onnx")
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("name", "build", "match"),
    [
        (
            "tf_simplernn",
            lambda: nn.RNN(F, 4, batch_first=True),
            r"'weight_ih_l0'.*Fix: for each, the graph has no ONNX RNN node: Loop node 'model/simple_rnn/while_loop' "
            r"runs the recurrence.*Load the Keras weights file instead",
        ),
        (
            "tf_gru_reset_before",
            lambda: nn.GRU(F, 4, batch_first=True),
            r"'weight_ih_l0'.*Fix: for each, the graph has no ONNX GRU node: Loop node 'model/gru/while_loop' "
            r"runs the recurrence.*GRU\(reset_after=False\) computes what no PyTorch GRU does",
        ),
    ],
)
def test_recurrence_left_in_a_loop_is_refused(name: str, build: Callable[[], Any], match: str) -> None:
    """tf2onnx rewrites only Keras LSTM and GRU(reset_after=True) into ONNX nodes; the rest stays a Loop."""
    model = fresh(build)
    before = snapshot(model)
    with pytest.raises(LoadError, match=match):
        weightport.load(model, GOLDEN / f"{name}.onnx")
    assert snapshot(model) == before


# --- the rules behind those files, where they must not apply -------------------------------------------


def _save(path: Path, nodes: list, inits: dict[str, np.ndarray], x_shape: list[int]) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize(("last", "fused"), [(4, True), (2, False)])
def test_bias_after_a_reshape_only_when_it_keeps_the_outputs(
    tmp_path: Path, rng: np.random.Generator, last: int, fused: bool
) -> None:
    """MatMul -> Reshape -> Add is Linear's bias only if the Reshape keeps the output axis."""
    from onnx import helper

    inits = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(last).astype(np.float32),
        "shape": np.array([-1, 5, last], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Add", ["r", "b"], ["y"]),
    ]
    path = _save(tmp_path / "m.onnx", nodes, inits, [10, 3])
    lin = nn.Linear(3, 4)
    if fused:
        weightport.load(lin, path)
        assert np.array_equal(lin.bias.detach().numpy(), inits["b"])
    else:
        with pytest.raises(LoadError, match=r"'b': expected a tensor the layout can place"):
            weightport.load(lin, path)


def test_a_narrowing_cast_is_not_followed(tmp_path: Path, rng: np.random.Generator) -> None:
    """float32 -> float16 rounds: the weight is then computed by the graph, not stored."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["w"], ["w16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["x", "w32"], ["y"], name="fc"),
    ]
    path = _save(tmp_path / "m.onnx", nodes, {"w": rng.standard_normal((3, 4)).astype(np.float32)}, [2, 3])
    with pytest.raises(LoadError, match=r"'w': expected a tensor the layout can place"):
        weightport.load(nn.Linear(3, 4, bias=False), path)


class _DenseNormDense(nn.Module):
    """The twin of the tf_layernorm and tf_dense_relu_bn files (a ReLU before the norm for the second)."""

    def __init__(self, norm: nn.Module, relu: bool) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2, self.relu = nn.Linear(F, 4), norm, nn.Linear(4, 2), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h.relu() if self.relu else h
        if isinstance(self.norm, nn.BatchNorm1d):  # over the features of each step: (B, 4, T)
            return self.fc2(self.norm(h.transpose(1, 2)).transpose(1, 2))
        return self.fc2(self.norm(h))


def test_tf2onnx_layer_normalization_is_refused_saying_what_the_graph_computes() -> None:
    """tf2onnx writes a Keras LayerNormalization as a BatchNormalization over moments the graph computes, then
    Mul and Add by gamma and beta: refused as such (it blamed do_constant_folding=False)."""
    error = refused(
        fresh(lambda: _DenseNormDense(nn.LayerNorm(4, eps=1e-3), relu=False)),
        GOLDEN / "tf_layernorm.onnx",
        r"\(BatchNormalization\): normalizes with a mean and variance the graph computes from its input.*"
        r"tf2onnx writes a Keras LayerNormalization so",
    )
    assert "do_constant_folding" not in str(error)


@pytest.mark.parametrize("strict", [True, False])
def test_tf2onnx_batchnorm_after_an_activation_is_not_taken_as_folded(strict: bool) -> None:
    """tf2onnx writes a BatchNormalization after an activation as Mul and Add: the model's BatchNorm after
    the Linear reads as folded into it or as that arithmetic; refused, strict=False too (it loaded 2.2 off)."""
    refused(
        fresh(lambda: _DenseNormDense(nn.BatchNorm1d(4, eps=1e-3), relu=True)),
        GOLDEN / "tf_dense_relu_bn.onnx",
        r"'norm' would be taken as a BatchNorm the exporter folded into 'fc1'.*Two readings",
        strict=strict,
    )


@pytest.mark.parametrize("unsqueezed", [True, False])
def test_a_conv_over_a_unit_axis_is_a_conv1d_only_after_an_unsqueeze(
    tmp_path: Path, rng: np.random.Generator, unsqueezed: bool
) -> None:
    from onnx import helper

    inits = {
        "w": rng.standard_normal((4, 2, 1, 3)).astype(np.float32),
        "axes": np.array([2], np.int64),
        "b": rng.standard_normal((4, 1)).astype(np.float32),  # per channel on (N, C, L)
    }
    if unsqueezed:
        nodes = [
            helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
            helper.make_node("Conv", ["u", "w"], ["c"], name="conv", pads=[0, 1, 0, 1]),
            helper.make_node("Squeeze", ["c", "axes"], ["s"]),
            helper.make_node("Add", ["s", "b"], ["y"]),
        ]
        path = _save(tmp_path / "m.onnx", nodes, inits, [2, 2, 6])
        conv: nn.Module = nn.Conv1d(2, 4, 3, padding=1)
        weightport.load(conv, path)
        assert np.array_equal(conv.weight.detach().numpy(), inits["w"][:, :, 0])
        assert np.array_equal(conv.bias.detach().numpy(), inits["b"][:, 0])
        x = rng.standard_normal((2, 2, 6)).astype(np.float32)
        ort = pytest.importorskip("onnxruntime")
        (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert max_err(conv(torch.from_numpy(x)), y) < TOL
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[0, 1, 0, 1])]
        path = _save(tmp_path / "m.onnx", nodes, {"w": inits["w"]}, [2, 2, 1, 6])
        with pytest.raises(LayoutError, match=r"the model has no nn.Conv2d"):
            weightport.load(nn.Conv1d(2, 4, 3, padding=1), path)
        conv = nn.Conv2d(2, 4, (1, 3), padding=(0, 1), bias=False)
        weightport.load(conv, path)


class _PadsInForward(nn.Module):
    """timm's Conv2dSame in small: the forward pads (right and bottom only), then a padding=0 conv."""

    def __init__(self, pad: tuple[int, ...] = (0, 1, 0, 1)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=0)
        self.head = nn.Conv2d(4, 4, 1)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.nn.functional.pad(x, self.pad)))


def test_a_pad_the_optimizer_merged_into_a_conv_loads_where_the_forward_shows_it(
    tmp_path: Path,
) -> None:
    """dynamo=True's optimizer merges the forward's own zero Pad into the Conv's pads (begin 0, end 1), which no
    PyTorch Conv pads by: without example_inputs= refused, the fix naming both ways out; the forward pass shows
    the model's F.pad, and with it the file loads exactly (onnxruntime's outputs), as the export that keeps the
    Pad node does; a model padding the other side is refused."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    source = _PadsInForward().eval()
    x = torch.randn(1, 3, 16, 16)
    paths = {}
    for optimize in (True, False):
        paths[optimize] = tmp_path / f"optimize-{optimize}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                source, (x,), str(paths[optimize]), dynamo=True, optimize=optimize, verbose=False
            )
    refused(
        _PadsInForward(), paths[True], r"pads begin \(0, 0\), end \(1, 1\).*example_inputs=.*optimize=False"
    )
    refused(
        _PadsInForward(pad=(1, 0, 1, 0)), paths[True], r"pads begin \(0, 0\), end \(1, 1\)", example_inputs=x
    )
    for path, options in ((paths[False], {}), (paths[True], {"example_inputs": x})):
        model = _PadsInForward().eval()
        weightport.load(model, path, **options)  # the forward pass shows the pad the optimizer merged
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert max_err(model(x), expected) <= TOL


class _SameStride2(nn.Module):
    """tf_conv1d_same_stride2's twin: Keras's 'same' for 5 steps, kernel 4, stride 2 pads 1 before and 2
    after, which the forward does with F.pad before a padding=0 conv (``pad``: the amounts it uses)."""

    def __init__(self, pad: tuple[int, int] = (1, 2)) -> None:
        super().__init__()
        self.conv, self.pad = nn.Conv1d(F, 4, 4, stride=2), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(x.transpose(1, 2), self.pad)).mean(-1)


def test_tf2onnx_same_stride_2_loads_where_the_forward_pads_as_it() -> None:
    """tf2onnx writes the uneven padding of a strided 'same' conv as the Conv's pads (begin 1, end 2), which no
    PyTorch conv pads by itself: refused without example_inputs=; with it, a model that pads so in forward
    gives onnxruntime's outputs, and one that pads the other way round is refused."""
    inputs, expected = recorded("tf_conv1d_same_stride2")
    path = GOLDEN / "tf_conv1d_same_stride2.onnx"
    refused(fresh(_SameStride2), path, r"pads begin \(1,\), end \(2,\).*example_inputs=")
    refused(
        fresh(lambda: _SameStride2((2, 1))), path, r"pads begin \(1,\), end \(2,\)", example_inputs=inputs
    )
    model = fresh(_SameStride2).eval()
    weightport.load(model, path, example_inputs=inputs)
    with torch.no_grad():
        assert max_err(model(inputs), expected) <= TOL


class Conv1dDenseChannelsFirst(Conv1dDense):
    """tf_conv1d's twin flattening its (channels, time) map as PyTorch does: the Dense's columns reordered."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.relu(self.conv(x.transpose(1, 2))).flatten(1))


def test_tf2onnx_flatten_loads_into_either_twin_as_its_forward_flattens() -> None:
    """tf2onnx's Conv1D -> Flatten -> Dense (Transpose to channels last, Reshape, MatMul): a twin that flattens
    channels-first loaded it as it was, silently wrong; the forward pass now reorders its columns, each twin
    giving the recorded outputs, and without example_inputs= the load is refused with both readings."""
    x, expected = recorded("tf_conv1d")
    for build in (Conv1dDense, Conv1dDenseChannelsFirst):
        model = fresh(build)
        weightport.load(model, GOLDEN / "tf_conv1d.onnx", example_inputs=(x,))
        with torch.no_grad():
            assert max_err(model(x), expected) < TOL
        refused(
            fresh(build), GOLDEN / "tf_conv1d.onnx", r"reads a flattened channels-last map.*example_inputs="
        )
