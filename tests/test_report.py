"""The load report: a few lines from ``summary()``, a ``print(report)`` that stays short for big models
(rows grouped by their names' numbers, then cut with a count), and every row from ``table()``."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import weightport
from weightport.report import MAX_ROWS


def arrays_of(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in module.state_dict().items()}


def test_a_small_report_prints_every_row_as_before() -> None:
    report = weightport.load(nn.Linear(2, 1), {"weight": np.ones((1, 2)), "bias": np.zeros(1)})
    assert str(report) == report.table()
    assert str(report).splitlines() == [
        "Loaded 2 tensors (12 bytes) into Linear from the given mapping (layout torch).",
        "target  shape   dtype    from     transform  source",
        "weight  (1, 2)  float32  float64  as is      the given mapping 'weight'",
        "bias    (1,)    float32  float64  as is      the given mapping 'bias'",
    ]


def test_summary_says_tensors_bytes_time_layout_and_counts(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    arrays = arrays_of(model)
    del arrays["2.bias"]
    path = tmp_path / "mlp.npz"
    np.savez(path, **arrays, stray=np.zeros(3))
    report = weightport.load(model, path, strict=False)
    lines = report.summary().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Loaded 3 tensors (96 bytes) into Sequential from 'mlp.npz' in ")
    assert lines[0].endswith(" s (layout torch).")
    assert float(lines[0].split(" in ")[1].split(" s ")[0]) == round(report.seconds, 2)
    assert report.seconds > 0
    assert lines[1] == "Ignored 1, missing 1, not checked 0, notes on forward 0."
    dry = weightport.load(model, path, strict=False, dry_run=True)
    assert dry.summary().startswith("Would load 3 tensors")


def test_a_hundred_tensor_model_prints_short_and_table_gives_every_row() -> None:
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)])
    report = weightport.load(model, arrays_of(model))
    assert len(report.rows) == 100
    printed = str(report).splitlines()
    assert len(printed) == 4  # the header line, the column names, two grouped rows
    assert re.split(r"\s\s+", printed[2]) == [
        "{0..49}.weight (50 tensors)",
        "(8, 8)",
        "float32",
        "float32",
        "as is",
        "the given mapping '{0..49}.weight'",
    ]
    assert re.split(r"\s\s+", printed[3]) == [
        "{0..49}.bias (50 tensors)",
        "(8,)",
        "float32",
        "float32",
        "as is",
        "the given mapping '{0..49}.bias'",
    ]
    table = report.table().splitlines()
    assert len(table) == 102  # the header line, the column names, a row per tensor
    assert table[2].startswith("0.weight ") and table[-1].startswith("49.bias ")


def test_a_bidirectional_lstm_groups_its_layers_and_directions() -> None:
    model = nn.Sequential(
        nn.LSTM(3, 8, num_layers=4, bidirectional=True), *[nn.Linear(16, 16) for _ in range(4)]
    )
    report = weightport.load(model, arrays_of(model))
    targets = [line.split("  ")[0] for line in str(report).splitlines()[2:]]
    assert targets == [
        "0.weight_ih_l0{,_reverse} (2 tensors)",
        "0.weight_hh_l{0..3}{,_reverse} (8 tensors)",
        "0.bias_ih_l{0..3}{,_reverse} (8 tensors)",
        "0.bias_hh_l{0..3}{,_reverse} (8 tensors)",
        "0.weight_ih_l{1..3}{,_reverse} (6 tensors)",
        "{1..4}.weight (4 tensors)",
        "{1..4}.bias (4 tensors)",
    ]


def test_rows_that_do_not_group_are_cut_with_a_count() -> None:
    sizes = list(range(2, 2 + 40))
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])  # every shape differs
    arrays = arrays_of(model)
    arrays["stray.0"] = np.zeros(1, np.float32)
    arrays["stray.1"] = np.zeros(1, np.float32)
    report = weightport.load(model, arrays, strict=False)
    printed = str(report).splitlines()
    assert len(printed) < MAX_ROWS + 6
    shown = len(printed) - 5  # header, column names, "... and", Ignored, the pointer to table()
    assert printed[-3] == f"... and {len(report.rows) - shown} more tensors"
    assert printed[-2] == "Ignored: stray.{0,1}"
    assert printed[-1] == "(report.table() shows every row)"
    assert "Ignored: stray.0, stray.1" in report.table()
    assert len(report.table().splitlines()) == 2 + len(report.rows) + 1


def test_the_public_attributes_stay() -> None:
    rnn = nn.GRU(3, 4)
    arrays = {k: v.astype(np.float64) for k, v in arrays_of(rnn).items()}
    report = weightport.load(rnn, arrays)
    assert report.written == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert report.cast[0] == "weight_ih_l0: float64 -> float32"
    assert (report.module, report.layout, report.ignored, report.missing, report.unchecked, report.notes) == (
        "GRU",
        "torch",
        [],
        [],
        [],
        [],
    )
    assert report.nbytes == sum(p.numel() * 4 for p in rnn.parameters())
    assert torch.equal(rnn.weight_ih_l0, torch.from_numpy(arrays["weight_ih_l0"]).float())
