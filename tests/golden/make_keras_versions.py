"""Regenerate tests/golden/keras_versions/<keras version>/ with whichever Keras is installed.

Run from the repository root with the Python of a virtualenv that has one Keras version:
``python tests/golden/make_keras_versions.py [OUTDIR]`` (OUTDIR defaults to
tests/golden/keras_versions). Works with Keras 3 (any backend: ``KERAS_BACKEND`` if set, else
TensorFlow where installed, else JAX) and with the Keras 2 of TensorFlow 2.12-2.15 (``tf.keras``).
The files go to ``OUTDIR/<keras.__version__>/``.

Two small models, seeded random weights, non-zero biases, positive moving variances:

- ``seq``: ``Sequential``: int tokens (6 steps) -> Embedding(7, 4) -> Conv1D(3, 2) ->
  BatchNormalization -> LSTM(3, seq) -> GRU(3, seq, reset_after=True) -> Bidirectional(LSTM(2))
  -> LayerNormalization -> Dense(2).
- ``fn``: functional, user-named layers: Input((5, 3)) -> SimpleRNN(4, relu, seq) 'rnn_in' ->
  Bidirectional(GRU(2, seq)) 'bi' -> GRU(3) -> Dense(4) 'hidden' -> Dropout -> Dense(2) 'out'.

For each model, every file this Keras writes, byte for byte as Keras wrote it but gzipped
(HDF5 is mostly padding: 30 KB files gzip to 3 KB; tests gunzip them under their own name):

- ``<model>.weights.h5.gz``: ``model.save_weights("<model>.weights.h5")`` (Keras 2.12-2.15 write
  the new layout under that name, as Keras 3 does);
- ``<model>.keras.gz``: ``model.save("<model>.keras")`` (Keras 2.13+ writes the zip; Keras 2.12 an
  HDF5 full-model file under that name); ``<model>.v3.keras.gz``: Keras 2.12's opt-in zip
  (``save_format="keras_v3"``);
- ``<model>.model.h5.gz``: ``model.save("<model>.model.h5")``, the legacy full-model HDF5;
- ``<model>.legacy_weights.h5.gz``: Keras 2 ``save_weights("<model>.legacy_weights.h5")``;
- ``<model>.io.npz``: the input ``x`` (batch 2) and Keras's own output ``y`` on it.

A save that this Keras cannot do (Keras 3.0 cannot write a Bidirectional layer to a legacy
``.h5``: both cells have one name) is reported and skipped, and so is a file with the same bytes
as one already kept; ``files.txt`` lists what was written.
tests/test_keras_versions.py loads each file with weightport into the equivalent PyTorch model.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "tensorflow" if importlib.util.find_spec("tensorflow") else "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # Keras 2.12-2.15's `keras` package is tf.keras itself

KERAS3 = int(keras.__version__.split(".")[0]) >= 3
SEED = 20240917


def build_seq() -> keras.Model:
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            L.Embedding(7, 4),
            L.Conv1D(3, 2),
            L.BatchNormalization(),
            L.LSTM(3, return_sequences=True),
            L.GRU(3, return_sequences=True, reset_after=True),
            L.Bidirectional(L.LSTM(2)),
            L.LayerNormalization(),
            L.Dense(2),
        ]
    )


def build_fn() -> keras.Model:
    L = keras.layers
    inp = keras.Input((5, 3))
    x = L.SimpleRNN(4, activation="relu", return_sequences=True, name="rnn_in")(inp)
    x = L.Bidirectional(L.GRU(2, return_sequences=True, reset_after=True), name="bi")(x)
    x = L.GRU(3, reset_after=True)(x)
    x = L.Dropout(0.5, seed=1)(L.Dense(4, name="hidden")(x))  # a layer without weights
    return keras.Model(inp, L.Dense(2, name="out")(x))


def variable_name(w: object) -> str:
    return str(getattr(w, "path", None) or getattr(w, "name", ""))


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    values = []
    for w in model.weights:
        shape = tuple(int(d) for d in w.shape)
        low, high = (0.5, 1.5) if "moving_variance" in variable_name(w) else (-0.6, 0.6)
        values.append(rng.uniform(low, high, shape).astype(np.float32))
    model.set_weights(values)


def inputs(name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "seq":
        return rng.integers(0, 7, (2, 6)).astype(np.int32)
    return rng.standard_normal((2, 5, 3)).astype(np.float32)


def saves(model: keras.Model, stem: str, tmp: Path) -> dict[str, Path]:
    """Each file this Keras can write for the model, by its golden name (without .gz)."""
    out: dict[str, Path] = {}
    todo = [
        (f"{stem}.keras", lambda p: model.save(p)),
        (f"{stem}.weights.h5", lambda p: model.save_weights(p)),
    ]
    if keras.__version__.startswith("2.12."):  # the new format is opt-in in 2.12; .keras gets HDF5
        todo.append((f"{stem}.v3.keras", lambda p: model.save(p, save_format="keras_v3")))
    todo.append((f"{stem}.model.h5", lambda p: model.save(p)))
    if not KERAS3:
        todo.append((f"{stem}.legacy_weights.h5", lambda p: model.save_weights(p)))
    for name, save in todo:
        path = tmp / name
        try:
            save(str(path))
        except Exception as e:  # a format this version cannot write for this model
            print(f"  {name}: not written ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        out[name] = path
    return out


def main(outdir: Path) -> None:
    here = outdir / keras.__version__
    here.mkdir(parents=True, exist_ok=True)
    backend = keras.backend.backend() if hasattr(keras.backend, "backend") else "tensorflow"
    print(f"keras {keras.__version__} ({backend}) -> {here}")
    rng = np.random.default_rng(SEED)
    written: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for stem, build in (("seq", build_seq), ("fn", build_fn)):
            keras.utils.set_random_seed(SEED)
            model = build()
            randomize(model, rng)
            x = inputs(stem, rng)
            y = np.asarray(model(x, training=False), dtype=np.float32)
            np.savez_compressed(here / f"{stem}.io.npz", x=x, y=y)
            written.append(f"{stem}.io.npz")
            seen: dict[bytes, str] = {}
            for name, path in saves(model, stem, Path(tmp)).items():
                data = path.read_bytes()
                if data in seen:  # Keras 2.12's m.keras is the legacy m.model.h5, byte for byte
                    print(f"  {name}: not kept (the same bytes as {seen[data]})")
                    continue
                seen[data] = name
                (here / f"{name}.gz").write_bytes(gzip.compress(data, 9, mtime=0))
                written.append(f"{name}.gz")
    (here / "files.txt").write_text(
        f"keras {keras.__version__}, backend {backend}\n" + "".join(f"{n}\n" for n in written)
    )
    for name in written:
        print(f"  {name}: {(here / name).stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "keras_versions")
