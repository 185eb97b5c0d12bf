"""Regenerate tests/golden/keras/: a tiny Keras model saved as Keras does, and Keras's outputs.

Run from the repository root: ``python tests/golden/make_keras.py``. Needs keras 3 with the
TensorFlow backend. The model is ``Input((5, 3)) -> LSTM(4, return_sequences=True) -> GRU(2)``
with seeded random weights and non-zero biases (LSTM for the transposes, GRU for the gate
reorder and the split bias). Files:

- ``model.weights.h5`` (``model.save_weights``) and ``model.keras`` (``model.save``);
- ``io.npz``: the input ``x`` (batch 2, 5 steps) and Keras's output ``y`` (2, 2).

tests/test_keras_files.py loads each file into the equivalent PyTorch model and compares
against ``y`` with only torch and h5py installed. (A legacy Keras 2 ``.h5`` is not kept here:
HDF5's overhead would take the folder past 50 KB; tests/test_keras.py checks legacy files
written by tf_keras, and tests/test_keras_files.py a legacy file built with h5py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras

HERE = Path(__file__).parent / "keras"


def build() -> keras.Model:
    layers = keras.layers
    return keras.Sequential([keras.Input((5, 3)), layers.LSTM(4, return_sequences=True), layers.GRU(2)])


def main() -> None:
    HERE.mkdir(exist_ok=True)
    rng = np.random.default_rng(20240602)
    model = build()
    values = [rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights]
    model.set_weights(values)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    y = np.asarray(model(x, training=False))
    model.save_weights(HERE / "model.weights.h5")
    model.save(HERE / "model.keras")
    np.savez(HERE / "io.npz", x=x, y=y)
    for path in sorted(HERE.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
