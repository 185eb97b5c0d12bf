"""A Linear node reading a flattened channels-last map (tf2onnx's graph of a Keras Conv -> Flatten -> Dense:
``Transpose(perm=[0, 2, 3, 1])``, ``Reshape``, ``MatMul``): its input columns run (positions, channels). A
PyTorch model that flattens its NCHW map loaded it as it was, silently wrong (11 off at a scale of 12);
now the forward pass on example_inputs= decides the order, both readings loading exactly (onnxruntime's
outputs), and without it the load is refused with both readings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightport
from conftest import refused

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

C, K, SIDE, OUT = 4, 3, 6, 8  # conv channels, kernel, input side; the map is (C, 4, 4): 64 columns
ROWS = C * (SIDE - K + 1) ** 2


def _tf2onnx_like(path: Path, rng: np.random.Generator, out: int = OUT) -> Path:
    """The graph tf2onnx writes for Keras Conv2D -> ReLU -> MaxPool-free Flatten -> Dense on an NHWC input."""
    conv_w = rng.standard_normal((C, C, K, K)).astype(np.float32)
    conv_b = rng.standard_normal(C).astype(np.float32)
    dense_w = rng.standard_normal((ROWS, out)).astype(np.float32)  # Keras kernel (in, out), rows (h, w, c)
    dense_b = rng.standard_normal(out).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv/kernel", "conv/bias"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Transpose", ["relu"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"]),
        helper.make_node("Add", ["mm", "dense/bias"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(conv_w, "conv/kernel"),
        numpy_helper.from_array(conv_b, "conv/bias"),
        numpy_helper.from_array(dense_w, "dense/kernel"),
        numpy_helper.from_array(dense_b, "dense/bias"),
        numpy_helper.from_array(np.array([-1, ROWS], np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "flatten_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, SIDE, SIDE, C])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class FlatHead(nn.Module):
    """The PyTorch twin, NHWC input; ``channels_last``: it flattens as the graph does (permuted first)."""

    def __init__(self, channels_last: bool = False, out: int = OUT) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, K)
        self.head = nn.Linear(ROWS, out)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.head((y.permute(0, 2, 3, 1) if self.channels_last else y).flatten(1))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return np.asarray(out)


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    path = _tf2onnx_like(tmp_path_factory.mktemp("flatten") / "flatten_head.onnx", rng)
    x = rng.standard_normal((1, SIDE, SIDE, C)).astype(np.float32)
    return path, x, _run(path, x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["torch-flatten", "permuted-flatten"])
def test_the_forward_pass_decides_the_column_order(
    graph: tuple[Path, np.ndarray, np.ndarray], channels_last: bool
) -> None:
    path, x, expected = graph
    model = FlatHead(channels_last).eval()
    report = weightport.load(model, path, example_inputs=(torch.from_numpy(x),))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    head = next(row for row in report.rows if row.target == "head.weight")
    assert ("columns reordered" in head.origin) != channels_last


@pytest.mark.parametrize("channels_last", [False, True], ids=["torch-flatten", "permuted-flatten"])
def test_a_square_head_is_reordered_not_transposed(channels_last: bool, tmp_path: Path) -> None:
    """A head as wide as the flattened map (64 -> 64): its weight would load transposed or reordered the wrong
    way with no shape to show it; each twin gives onnxruntime's outputs."""
    rng = np.random.default_rng(6)
    path = _tf2onnx_like(tmp_path / "square.onnx", rng, out=ROWS)
    x = rng.standard_normal((1, SIDE, SIDE, C)).astype(np.float32)
    expected = _run(path, x)
    model = FlatHead(channels_last, out=ROWS).eval()
    weightport.load(model, path, example_inputs=(torch.from_numpy(x),))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_without_example_inputs_both_readings_are_refused(graph: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = graph
    refused(
        FlatHead(),
        path,
        r"node 'MatMul.*' \(MatMul\) reads a flattened channels-last map.*\(channels, positions\).*"
        r"Fix: pass example_inputs=",
    )


def test_a_torch_export_that_permutes_before_flattening_loads_into_a_channels_first_twin(
    tmp_path: Path,
) -> None:
    """torch.onnx.export of the permuting model writes the same Transpose -> Reshape -> Gemm: loaded into the
    model that flattens NCHW, the columns are reordered and the outputs are the file's."""
    torch.manual_seed(0)
    source = FlatHead(channels_last=True).eval()
    x = torch.randn(2, SIDE, SIDE, C)
    path = tmp_path / "permuted.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (x,), str(path), dynamo=False)
    expected = _run(path, x.numpy())
    for channels_last in (False, True):
        model = FlatHead(channels_last).eval()
        weightport.load(model, path, example_inputs=(x,))
        with torch.no_grad():
            np.testing.assert_allclose(model(x).numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
