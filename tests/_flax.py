"""Helpers the Flax tests share: randomized variables, Flax's own outputs on them, a .msgpack of them.

Imported by tests that have already skipped where Flax is missing (``pytest.importorskip("flax")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def perturbed(
    tree: Mapping[Any, Any], rng: np.random.Generator, scale: float = 0.3, positive: tuple[str, ...] = ()
) -> dict[Any, Any]:
    """Every leaf plus normal noise of ``scale`` (biases become non-zero), in the tree's own key order;
    leaves under ``positive`` keys made > 0 (variances)."""
    out: dict[Any, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = perturbed(value, rng, scale, positive)
        else:
            array = np.asarray(value) + rng.normal(0.0, scale, np.shape(value)).astype(np.float32)
            out[key] = np.abs(array) + 0.5 if key in positive else array
    return out


def flax_outputs(
    model: Any, *inputs: np.ndarray, seed: int = 0, noise: int | None = None, scale: float = 0.3
) -> tuple[dict[str, Any], np.ndarray]:
    """``model``'s variables (initialized with ``seed``, perturbed from ``noise``, default ``seed``) and
    Flax's output for ``inputs``."""
    import flax
    import jax

    variables = perturbed(
        flax.core.unfreeze(model.init(jax.random.PRNGKey(seed), *inputs)),
        np.random.default_rng(seed if noise is None else noise),
        scale,
    )
    return variables, np.asarray(model.apply(variables, *inputs))


def save_msgpack(variables: Mapping[str, Any], folder: Path) -> Path:
    """``variables`` as ``flax.serialization.to_bytes`` writes them, in ``folder/model.msgpack``."""
    from flax import serialization

    path = folder / "model.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    return path
