"""Shared helpers: module state snapshots for the all-or-nothing checks, a refusal that leaves the module
unchanged, and running a PyTorch module on a channels-last array (as Keras feeds it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import weightport
from _vision import allow_torchvision_import
from weightport.tensors import numpy_of

allow_torchvision_import()  # transformers and timm import torchvision wherever it is installed


def refused(
    module: torch.nn.Module, source: Any, match: str, error: type[Exception] | None = None, **kwargs: Any
) -> Exception:
    """Load ``source`` into ``module``, expect ``error`` (any WeightportError by default) matching ``match``,
    and the module left bit for bit as it was; the error, for more checks."""
    before = snapshot(module)
    with pytest.raises(error or weightport.WeightportError, match=match) as caught:
        weightport.load(module, source, **kwargs)
    assert snapshot(module) == before, "a refused load wrote to the module"
    return caught.value


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


def nchw(run: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
    """``run`` on a channels-last array, through channels-first PyTorch, back to channels last (3-D or 4-D)."""
    t = torch.from_numpy(x)
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.transpose(1, 2)
    with torch.no_grad():
        y = run(t)
    return (y.permute(0, 2, 3, 1) if y.ndim == 4 else y.transpose(1, 2)).numpy()
