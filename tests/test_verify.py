"""weightport.verify: truthy within tolerance, errors per output, raise_if_failed, against= an ONNX file."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport import MissingDependencyError, SourceError, VerifyError


def test_verify_against_reference_and_expected() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    report = weightport.verify(lstm, x)
    assert report and [o.name for o in report.outputs] == ["output", "h_n", "c_n"]
    assert "the NumPy reference" in str(report)
    out, (h, c) = lstm(torch.from_numpy(x))
    expected = (out.detach().numpy(), (h.detach().numpy(), c.detach().numpy()))
    assert weightport.verify(lstm, x, expected).raise_if_failed()


def test_verify_reports_the_error_and_raises() -> None:
    lin = nn.Linear(3, 2)
    x = np.ones((1, 3), np.float32)
    wrong = lin(torch.from_numpy(x)).detach().numpy() + 1e-3
    report = weightport.verify(lin, x, wrong)
    assert not report
    assert report.outputs[0].max_abs == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(VerifyError, match="FAIL"):
        report.raise_if_failed()


def test_verify_shape_mismatch_fails() -> None:
    lin = nn.Linear(3, 2)
    report = weightport.verify(lin, np.ones((1, 3)), np.ones((1, 3)))
    assert not report and "shape" in str(report)


def test_initial_states_are_passed() -> None:
    gru = nn.GRU(3, 4)
    x = np.ones((5, 1, 3), np.float32)
    h0 = np.full((1, 1, 4), 0.5, np.float32)
    assert weightport.verify(gru, (x, h0))


def test_the_initial_state_reaches_both_the_module_and_the_reference() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(3, 4)
    x = np.random.default_rng(3).standard_normal((5, 1, 3)).astype(np.float32)
    h0 = np.full((1, 1, 4), 0.5, np.float32)
    with torch.no_grad():
        with_state = [t.numpy() for t in gru(torch.from_numpy(x), torch.from_numpy(h0))]
        from_zeros = [t.numpy() for t in gru(torch.from_numpy(x))]
    assert np.abs(with_state[1] - from_zeros[1]).max() > 1e-3  # the state matters to this module
    assert weightport.verify(gru, (x, h0), tuple(with_state))
    assert not weightport.verify(gru, (x, h0), tuple(from_zeros))  # dropping h0 would pass this
    reference = weightport.reference.forward(gru, x, h0)
    assert np.abs(reference[1] - with_state[1]).max() < 1e-5


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_wrapped_modules_against_the_reference(wrap: str) -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    wrapped = torch.compile(lstm, backend="eager") if wrap == "compile" else nn.DataParallel(lstm)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    report = weightport.verify(wrapped, x)
    assert report and [o.name for o in report.outputs] == ["output", "h_n", "c_n"]
    assert "the NumPy reference" in str(report)


def export_onnx(
    model: nn.Module, args: tuple[torch.Tensor | tuple[torch.Tensor, ...], ...], path: Path
) -> Path:
    """``torch.onnx.export`` with the legacy exporter, its notices silenced (export noise, not results)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size", UserWarning)
        torch.onnx.export(model.eval(), args, str(path), opset_version=17, dynamo=False)
    return path


def random_biases(model: nn.Module) -> nn.Module:
    """Non-zero biases, so a bias the exported graph dropped or moved shows up in the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.uniform_(-1, 1)
    return model


class Head(nn.Module):
    """An LSTM's output sequence alone: one ONNX output where the LSTM itself has three."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def onnx_cases() -> list[tuple[str, nn.Module, tuple[Any, ...]]]:
    torch.manual_seed(0)
    x2 = torch.randn(4, 3)
    seq = torch.randn(2, 5, 3)
    state = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    image = torch.randn(2, 2, 6, 6)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    return [
        ("mlp", random_biases(mlp), (x2,)),
        ("lstm", random_biases(nn.LSTM(3, 4, batch_first=True)), (seq, state)),
        ("conv", random_biases(conv), (image,)),
    ]


@pytest.mark.parametrize("case", range(3), ids=["mlp", "lstm", "conv"])
def test_verify_against_onnx_passes_and_fails_on_a_changed_weight(tmp_path: Path, case: int) -> None:
    pytest.importorskip("onnxruntime")
    name, model, args = onnx_cases()[case]
    path = export_onnx(model, args, tmp_path / f"{name}.onnx")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tuple(tuple(a.numpy() for a in x) if isinstance(x, tuple) else x.numpy() for x in args)
    report = weightport.verify(model, inputs, against=path).raise_if_failed()
    assert str(report).startswith(f"verify against '{name}.onnx' run by onnxruntime: OK")
    count = 3 if name == "lstm" else 1
    assert len(report.outputs) == count and all(o.max_abs < 1e-5 for o in report.outputs)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    with torch.no_grad():
        next(model.parameters())[0].add_(0.5)  # a first-layer weight: it reaches every output
    failed = weightport.verify(model, inputs, against=str(path))
    assert not failed and not failed.outputs[0].ok
    with pytest.raises(VerifyError, match=rf"verify against '{name}.onnx' run by onnxruntime: FAILED"):
        failed.raise_if_failed()


def test_verify_against_onnx_casts_to_the_graph_input_type(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    mlp = random_biases(nn.Sequential(nn.Linear(3, 4), nn.Tanh()))
    path = export_onnx(mlp, (torch.randn(2, 3),), tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3))  # float64, into a float32 module and graph
    assert weightport.verify(mlp, x, against=path)


def test_verify_against_onnx_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    lstm = random_biases(nn.LSTM(3, 4, batch_first=True))
    x = torch.randn(2, 5, 3)
    path = export_onnx(lstm, (x,), tmp_path / "lstm.onnx")
    xs = x.numpy()

    with pytest.raises(SourceError, match=r"both expected= and against=; pass one of them"):
        weightport.verify(lstm, xs, lstm(x)[0].detach().numpy(), against=path)
    with pytest.raises(SourceError, match=r"'lstm\.h5': against= runs \.onnx files only"):
        weightport.verify(lstm, xs, against=tmp_path / "lstm.h5")
    with pytest.raises(SourceError, match=r"'lstm\.onnx' takes 1 input \(input\) but 2 arrays were given"):
        weightport.verify(lstm, (xs, np.zeros((1, 2, 4), np.float32)), against=path)

    head = export_onnx(Head(lstm), (x,), tmp_path / "head.onnx")
    with pytest.raises(
        VerifyError, match=r"returned 3 outputs \(flattened in order\) but 'head\.onnx' has 1 output \("
    ):
        weightport.verify(lstm, xs, against=head)

    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(SourceError, match=r"'broken\.onnx': onnxruntime cannot open it") as opened:
        weightport.verify(lstm, xs, against=tmp_path / "broken.onnx")
    assert "INVALID_PROTOBUF" in str(opened.value.__cause__)

    with pytest.raises(
        SourceError, match=r"onnxruntime could not run 'lstm\.onnx' on input float32 \[2, 6, 3\]"
    ):
        weightport.verify(lstm, np.zeros((2, 6, 3), np.float32), against=path)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        MissingDependencyError, match=r"'lstm\.onnx' needs onnxruntime: pip install onnxruntime"
    ):
        weightport.verify(lstm, xs, against=path)


class Fields(nn.Module):
    """Returns a mapping of tensors, as transformers' models return a ModelOutput (None fields left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        hidden = self.fc(x)
        return {"last_hidden_state": hidden, "attentions": None, "pooler_output": hidden.mean(0)}


def test_a_mapping_of_outputs_is_compared_by_field() -> None:
    module = Fields()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    hidden, pooled = out["last_hidden_state"].numpy(), out["pooler_output"].numpy()
    whole = weightport.verify(module, x, out)  # crashed: the mapping became a 0-d object array
    assert whole and [o.name for o in whole.outputs] == ["last_hidden_state", "pooler_output"]
    named = weightport.verify(module, x, {"pooler_output": pooled})
    assert named and [o.name for o in named.outputs] == ["pooler_output"]
    leading = weightport.verify(module, x, hidden)  # the leading field, as the CLI's output_0 gives it
    assert leading and [o.name for o in leading.outputs] == ["last_hidden_state"]
    assert not weightport.verify(module, x, {"pooler_output": pooled + 1})
    with pytest.raises(weightport.WeightportError, match="an output of type object is not an array"):
        weightport.verify(module, x, object())
