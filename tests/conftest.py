"""Shared helpers: module state snapshots for the all-or-nothing checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _vision import allow_torchvision_import
from weightport.tensors import numpy_of

allow_torchvision_import()  # transformers and timm import torchvision wherever it is installed


def snapshot(module: torch.nn.Module) -> dict[str, tuple[bytes, str, tuple[int, ...], int]]:
    """Bytes, dtype, shape and identity of every state-dict tensor."""
    return {
        name: (numpy_of(t, copy=True).tobytes(), str(t.dtype), tuple(t.shape), id(t))
        for name, t in module.state_dict(keep_vars=True).items()
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_state(module: torch.nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays (float64, as NumPy makes them) for every float tensor of ``module``."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            out[name] = rng.uniform(-1, 1, tuple(tensor.shape))
        else:
            out[name] = numpy_of(tensor, copy=True)
    return out
