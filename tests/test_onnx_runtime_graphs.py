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


def test_onnxruntimes_quantized_contrib_operators_are_refused_as_quantized(tmp_path: Path) -> None:
    """DynamicQuantizeLSTM (int8 weights) and MatMulNBits (4-bit blocks) are onnxruntime's own quantized
    operators: refused as quantized, not as an optimizer's fused graph (whose fix, a less optimized save,
    would not help)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    lstm = _export(nn.LSTM(8, 8), torch.randn(5, 2, 8), tmp_path / "lstm.onnx")
    lstm_q = tmp_path / "lstm_q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_dynamic(
            str(lstm), str(lstm_q), op_types_to_quantize=["LSTM"], weight_type=quantization.QuantType.QInt8
        )
        fc = _export(nn.Linear(32, 32), torch.randn(1, 3, 32), tmp_path / "fc.onnx")  # 3-D: a MatMul
        quantizer = nbits.MatMulNBitsQuantizer(
            onnx.load(str(fc)),
            block_size=32,
            is_symmetric=True,
        )
        quantizer.process()
    fc_q = tmp_path / "fc_q.onnx"
    quantizer.model.save_model_to_file(str(fc_q))
    for model, path, op in (
        (nn.LSTM(8, 8), lstm_q, "DynamicQuantizeLSTM"),
        (nn.Linear(32, 32), fc_q, "MatMulNBits"),
    ):
        before = snapshot(model)
        for strict in (True, False):
            with pytest.raises(UnsupportedConfigError, match=rf"is quantized.*com\.microsoft\.{op} x1") as e:
                weightport.load(model, path, strict=strict)
            assert "ORT_ENABLE_BASIC" not in str(e.value)
            assert snapshot(model) == before
