"""The progress bar: shown when asked, or for big loads on a terminal; silent otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import weightport
from weightport import progress


def _arrays() -> dict[str, np.ndarray]:
    return {"weight": np.ones((4, 3), np.float32), "bias": np.zeros(4, np.float32)}


def test_bar_when_asked(capsys) -> None:  # type: ignore[no-untyped-def]
    weightport.load(nn.Linear(3, 4), _arrays(), progress=True)
    err = capsys.readouterr().err
    assert "loading the given mapping" in err and "B/s" in err


def test_silent_by_default_for_small_loads(capsys) -> None:  # type: ignore[no-untyped-def]
    weightport.load(nn.Linear(3, 4), _arrays())
    assert capsys.readouterr().err == ""


def test_silent_when_not_a_terminal_even_if_big(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress, "THRESHOLD_BYTES", 1)
    weightport.load(nn.Linear(3, 4), _arrays())
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("asked", "nbytes", "tty", "shown"),
    [
        (None, 10**9, True, True),
        (None, 10**9, False, False),
        (None, 10, True, False),
        (False, 10**9, True, False),
        (True, 10, False, True),
    ],
)
def test_wanted(monkeypatch, asked, nbytes, tty, shown) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty, raising=False)
    assert progress.wanted(asked, nbytes) is shown
