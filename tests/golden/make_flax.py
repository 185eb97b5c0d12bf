"""Regenerate tests/golden/flax/ from real Flax: a linen LSTM's params and its outputs.

Run from the repository root: ``JAX_PLATFORMS=cpu python tests/golden/make_flax.py``.
Writes ``lstm.msgpack`` (``flax.serialization.to_bytes`` of the variables of
``nn.RNN(nn.LSTMCell(4))``, biases made non-zero) and ``lstm_io.npz`` (input ``x``
of shape (2, 5, 3), Flax's outputs ``y`` and final carry ``c``, ``h``).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

HERE = Path(__file__).parent / "flax"
SEED = 20240613


def _perturb(tree: dict, rng: np.random.Generator) -> dict:
    """Every leaf plus small noise (so biases are non-zero), keeping the tree's key order."""
    return {
        key: _perturb(value, rng)
        if isinstance(value, dict)
        else np.asarray(value) + rng.normal(0.0, 0.2, np.shape(value)).astype(np.float32)
        for key, value in tree.items()
    }


def main() -> None:
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    model = nn.RNN(nn.LSTMCell(4), return_carry=True)
    variables = _perturb(model.init(jax.random.PRNGKey(SEED), x), rng)
    (c, h), y = model.apply(variables, x)
    HERE.mkdir(exist_ok=True)
    (HERE / "lstm.msgpack").write_bytes(serialization.to_bytes(variables))
    np.savez(HERE / "lstm_io.npz", x=x, y=np.asarray(y), c=np.asarray(c), h=np.asarray(h))
    print(f"wrote {HERE / 'lstm.msgpack'} and {HERE / 'lstm_io.npz'}")


if __name__ == "__main__":
    main()
