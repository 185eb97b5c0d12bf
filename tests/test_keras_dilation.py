"""A dilated Keras ``Conv1D(padding="same")``: the padding that reproduces it is the dilated kernel's.

``same`` pads ``dilation * (kernel - 1)`` in all, half before: for kernel 3 and dilation 2 that is 2 on
each side, where the undilated kernel would need 1. Real Keras computes the expected output.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot

keras = pytest.importorskip("keras")


class Channels(nn.Module):
    """Keras's channels-last (batch, steps, channels) around a Conv1d."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, dilation=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


@pytest.fixture(scope="module")
def dilated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    inputs = keras.Input((9, 2))
    model = keras.Model(inputs, keras.layers.Conv1D(4, 3, padding="same", dilation_rate=2)(inputs))
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.standard_normal(weight.shape).astype("float32"))
    path = tmp_path_factory.mktemp("dilated") / "m.keras"
    model.save(path)
    x = rng.standard_normal((1, 9, 2)).astype("float32")
    return path, x, np.asarray(model(x))


def test_the_dilated_kernels_padding_reproduces_keras(dilated: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, x, expected = dilated
    module = Channels(padding=2)
    weightport.load(module, path)
    with torch.no_grad():
        out = module(torch.from_numpy(x)).numpy()
    assert out.shape == expected.shape and np.abs(out - expected).max() < 1e-5


@pytest.mark.parametrize("padding", [1, 3])
def test_a_padding_that_gives_other_outputs_is_refused(
    dilated: tuple[Path, np.ndarray, np.ndarray], padding: int
) -> None:
    module = Channels(padding)
    before = snapshot(module)
    with pytest.raises(weightport.WeightportError, match=r"\(\(2, 2\),\)"):
        weightport.load(module, dilated[0])
    assert snapshot(module) == before
