"""Files a runtime rewrote for its own kernels are refused whole, saying so: onnxruntime's fused contrib
operators (a Linear's bias moved into BiasGelu, a BatchNorm into FusedConv) and quantized weights. Read as
standard operators, the bare MatMul of a BiasGelu would load as a Linear without its bias."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport.errors import UnsupportedConfigError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}}
        )
    return path


def _optimized(path: Path, level: str) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(path.with_name(f"opt_{level}.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(options.optimized_model_filepath)


@pytest.mark.parametrize(
    ("build", "x", "op"),
    [(_Mlp, torch.randn(2, 5, 16), "BiasGelu"), (_ConvNet, torch.randn(2, 3, 8, 8), "FusedConv")],
)
def test_onnxruntimes_fused_operators_are_refused_with_the_file_to_load(
    tmp_path: Path, build: type[nn.Module], x: torch.Tensor, op: str
) -> None:
    path = _optimized(_export(build(), x, tmp_path / "m.onnx"), "ORT_ENABLE_EXTENDED")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert op in ops  # the optimizer fused it
    model = build().eval()
    before = snapshot(model)
    for strict in (True, False):  # never skipped: the bare MatMul would take no bias
        with pytest.raises(UnsupportedConfigError, match=rf"com\.microsoft\.{op} x1.*ORT_ENABLE_EXTENDED"):
            weightport.load(model, path, strict=strict)
        assert snapshot(model) == before
    basic = _optimized(tmp_path / "m.onnx", "ORT_ENABLE_BASIC")  # the fix the message gives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # a folded BatchNorm's statistics
        weightport.load(model, basic, example_inputs=x)
    (expected,) = ort.InferenceSession(str(basic), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    torch.testing.assert_close(model(x), torch.from_numpy(expected), atol=1e-5, rtol=1e-4)


def test_quantized_weights_are_refused_as_quantized(tmp_path: Path) -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")
    path = _export(_ConvNet(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    quantized = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_dynamic(str(path), str(quantized), weight_type=quantization.QuantType.QInt8)
    model = _ConvNet()
    before = snapshot(model)
    with pytest.raises(UnsupportedConfigError, match=r"'q\.onnx' is quantized.*(ConvInteger|MatMulInteger)"):
        weightport.load(model, quantized)
    assert snapshot(model) == before
