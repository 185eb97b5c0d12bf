"""Notes that change what forward must do (an activation Keras applies after a Dense, an LSTM Keras runs
backwards) are ForwardNoteWarnings, kept in the report, and repeated by weightport.verify beside a failure;
a forward that does what they say verifies."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from weightport.errors import ForwardNoteWarning, UncheckedConfigWarning, VerifyError  # noqa: E402


def saved(tmp_path: Path, *layers: Any, shape: tuple[int, ...]) -> tuple[Path, Any]:
    model = keras.Sequential([keras.Input(shape), *layers])
    rng = np.random.default_rng(3)
    model.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights])
    model.save(tmp_path / "m.keras")
    return tmp_path / "m.keras", model


def load_noted(module: nn.Module, path: Path) -> tuple[weightport.LoadReport, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = weightport.load(module, path)
    assert all(issubclass(w.category, ForwardNoteWarning) for w in caught), [str(w.message) for w in caught]
    return report, [str(w.message) for w in caught]


def test_softmax_after_a_dense_warns_and_verify_repeats_it_beside_the_failure(tmp_path: Path) -> None:
    path, model = saved(tmp_path, keras.layers.Dense(3, activation="softmax", name="out"), shape=(4,))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    linear = nn.Linear(4, 3)
    report, messages = load_noted(linear, path)
    (message,) = messages
    assert "the model's forward must also do this around the modules" in message
    assert (
        "the module <- Keras Dense 'out': Keras applies activation='softmax' after it: apply it in forward as "
        "F.softmax(y, dim=-1) on the module's output y" in message
    )
    assert report.notes == [
        "the module <- Keras Dense 'out': Keras applies activation='softmax' after it: apply it in forward as "
        "F.softmax(y, dim=-1) on the module's output y (nn.Softmax() without dim= takes dim 0 of a 1-D or 3-D "
        "tensor and dim 1 otherwise)"
    ]
    assert "Notes (what forward must do" in str(report) and report.summary().endswith("notes on forward 1.")

    bare = weightport.verify(linear, x, expected)  # forward without the softmax: the outputs differ
    assert not bare
    printed = str(bare)
    assert "the outputs differ; the load noted what forward must do, which may be why:" in printed
    assert "note: the module <- Keras Dense 'out': Keras applies activation='softmax'" in printed
    with pytest.raises(VerifyError, match=r"(?s)activation='softmax'.*Fix: do in forward what the notes say"):
        bare.raise_if_failed()

    done = weightport.verify(nn.Sequential(linear, nn.Softmax(-1)), x, expected)  # the note, followed
    assert done and "note:" not in str(done)


def test_go_backwards_warns_and_flipping_the_input_verifies(tmp_path: Path) -> None:
    path, model = saved(tmp_path, keras.layers.LSTM(4, go_backwards=True, name="rnn"), shape=(6, 3))
    x = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
    expected = np.asarray(model(x))
    lstm = nn.LSTM(3, 4, batch_first=True)
    _, (message,) = load_noted(lstm, path)
    assert (
        "the module (layer 0) <- Keras LSTM 'rnn': Keras runs it backwards (go_backwards=True): flip the input in time"
        in message
    )

    class Last(nn.Module):
        def __init__(self, flip: bool) -> None:
            super().__init__()
            self.lstm, self.flip = lstm, flip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x.flip(1) if self.flip else x)[0][:, -1]

    unflipped = weightport.verify(Last(flip=False), x, expected)
    assert not unflipped and "note: the module (layer 0) <- Keras LSTM 'rnn': Keras runs it backwards" in str(
        unflipped
    )
    assert weightport.verify(Last(flip=True), x, expected, atol=1e-5)


def test_a_later_load_without_notes_replaces_them(tmp_path: Path) -> None:
    path, _ = saved(tmp_path, keras.layers.Dense(3, activation="relu"), shape=(4,))
    linear = nn.Linear(4, 3)
    load_noted(linear, path)
    weightport.load(linear, {"weight": np.zeros((3, 4), np.float32), "bias": np.ones(3, np.float32)})
    check = weightport.verify(linear, np.ones((1, 4), np.float32), np.zeros((1, 3), np.float32))
    assert not check and "note:" not in str(check)


def test_one_filter_on_unchecked_config_warnings_covers_the_notes(tmp_path: Path) -> None:
    path, _ = saved(tmp_path, keras.layers.Dense(3, activation="tanh"), shape=(4,))
    assert issubclass(ForwardNoteWarning, UncheckedConfigWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        weightport.load(nn.Linear(4, 3), path)
    with pytest.warns(ForwardNoteWarning, match="activation='tanh'"):
        weightport.load(nn.Linear(4, 3), path, dry_run=True)  # a dry run says it too
