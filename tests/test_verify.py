"""weightport.verify: truthy within tolerance, errors per output, raise_if_failed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport import VerifyError


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


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_wrapped_modules_against_the_reference(wrap: str) -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    wrapped = torch.compile(lstm, backend="eager") if wrap == "compile" else nn.DataParallel(lstm)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    report = weightport.verify(wrapped, x)
    assert report and [o.name for o in report.outputs] == ["output", "h_n", "c_n"]
    assert "the NumPy reference" in str(report)
