"""Progress over the whole load: a bar while checking (dry runs too) and one while writing, in the
bytes the report counts (a tied tensor once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.cli import main

tqdm = pytest.importorskip("tqdm")


class Recorder:
    """Stands in for tqdm: keeps each bar's description, total and the bytes it was advanced by."""

    bars: ClassVar[list[Recorder]] = []

    def __init__(self, *, total: int, desc: str, **_: Any) -> None:
        self.total, self.desc, self.n, self.targets = total, desc, 0, []
        Recorder.bars.append(self)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.targets.append(text)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[Recorder]:
    Recorder.bars = []
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    return Recorder.bars


def test_a_load_checks_then_writes_each_to_the_reports_bytes(bars: list[Recorder]) -> None:
    report = weightport.load(nn.LSTM(3, 4), weightport.to_numpy(nn.LSTM(3, 4)), progress=True)
    assert [b.desc for b in bars] == [
        "loading the given mapping: checking",
        "loading the given mapping: writing",
    ]
    assert all(b.total == b.n == report.nbytes == 576 for b in bars)


def test_a_dry_run_shows_the_check(bars: list[Recorder]) -> None:
    report = weightport.load(
        nn.Linear(3, 4), weightport.to_numpy(nn.Linear(3, 4)), progress=True, dry_run=True
    )
    assert [b.desc.rsplit(": ", 1)[1] for b in bars] == ["checking"]
    assert bars[0].n == bars[0].total == report.nbytes


def test_a_tied_tensor_counts_once(bars: list[Recorder]) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    arrays = {"embed.weight": np.ones((5, 3), np.float32), "out.weight": np.ones((5, 3), np.float32)}
    report = weightport.load(Tied(), arrays, progress=True)
    assert report.nbytes == 60 and [(b.total, b.n) for b in bars] == [(60, 60), (60, 60)]


def test_the_command_line_shows_them_for_a_dry_run(
    tmp_path: Path, bars: list[Recorder], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "models.py").write_text("import torch\ndef lstm():\n    return torch.nn.LSTM(3, 4)\n")
    weightport.save(torch.nn.LSTM(3, 4), tmp_path / "lstm.npz")
    monkeypatch.chdir(tmp_path)
    assert main(["load", "models.py:lstm", "lstm.npz", "--dry-run", "--progress"]) == 0
    assert [(b.desc, b.n) for b in bars] == [("loading 'lstm.npz': checking", 576)]
    assert "Would load 4 tensors (576 bytes)" in capsys.readouterr().out
    assert main(["load", "models.py:lstm", "lstm.npz", "--no-progress"]) == 0
    assert len(bars) == 1
