"""Files and names saved by other frameworks' conventions, each read as that framework wrote it or refused
naming what it is, with a fix that works.

- An ``.npy`` / ``.npz`` member of ml_dtypes' float8_e5m2 (np.save writes descr ``'<f1'``, a type NumPy has
  not) is refused as an ml_dtypes array whose type is lost, not as a corrupt file.
- A TensorFlow checkpoint or SavedModel is refused as one, with the restore that loads it.
- ``layout='keras'`` on arrays Keras did not file says what the layout reads, up front.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import weightport
from conftest import refused

# --- np.save of ml_dtypes' float8_e5m2 ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_float8_e5m2_saved_by_numpy_is_refused_as_a_lost_ml_dtype(tmp_path: Path, suffix: str) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2)
    if suffix == ".npz":
        path = tmp_path / "fc.npz"
        np.savez(path, weight=weight, bias=rng.standard_normal(2).astype(np.float32))
        source: Path = path
        where = "'fc.npz' member 'weight'"
    else:
        (tmp_path / "fc").mkdir()
        np.save(tmp_path / "fc" / "weight.npy", weight)
        np.save(tmp_path / "fc" / "bias.npy", rng.standard_normal(2).astype(np.float32))
        source = tmp_path / "fc"
        where = "'fc/weight.npy'"
    error = refused(
        torch.nn.Linear(2, 2),
        source,
        "holds dtype '<f1', a 1-byte float NumPy has no type for: np.save writes "
        r"an ml_dtypes array .* losing its type\. Fix: save it as float32",
        weightport.SourceError,
    )
    assert where in str(error) and "corrupt" not in str(error)
    # the fix works: the same values saved as float32 load exactly
    np.savez(tmp_path / "fixed.npz", weight=weight.astype(np.float32), bias=np.zeros(2, np.float32))
    module = torch.nn.Linear(2, 2)
    weightport.load(module, tmp_path / "fixed.npz")
    assert np.array_equal(module.weight.detach().numpy(), weight.astype(np.float32))


# --- TensorFlow checkpoints and SavedModels ---------------------------------------------------------------


class _TwoDense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d1, self.d2 = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d2(self.d1(x))


def _keras_two_dense(seed: int) -> Any:
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, name="d1"), keras.layers.Dense(3, name="d2")]
    )
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def _follow_restore(message: str, keras_model: Any) -> None:
    """Run the ``tf.train.Checkpoint(...).read(...).assert_existing_objects_matched()`` a refusal gives,
    on ``keras_model`` as its ``m``."""
    import tensorflow as tf

    call = re.search(
        r"(tf\.train\.Checkpoint\((?:model=)?m\)\.read\('[^']+'\)\.assert_existing_objects_matched\(\))",
        message,
    )
    assert call is not None, message
    eval(call[1], {"tf": tf, "m": keras_model})  # the refusal's own fix, run as written


def _matches_keras(module: torch.nn.Module, keras_model: Any) -> None:
    x = np.random.default_rng(9).standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert np.abs(got - np.asarray(keras_model(x))).max() < 1e-5


def test_a_tensorflow_checkpoint_is_refused_as_one_and_its_fix_loads_it(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    saved = _keras_two_dense(seed=1)
    prefix = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt" / "model"))
    data = next(p for p in (tmp_path / "ckpt").iterdir() if ".data-" in p.name)
    for given in (tmp_path / "ckpt", Path(prefix), Path(prefix + ".index"), data):
        error = refused(
            _TwoDense(),
            given,
            r"a TensorFlow checkpoint \(prefix '.*ckpt/model': model\.index",
            weightport.SourceError,
        )
        assert "weightport does not read" in str(error) and "m.save_weights('m.weights.h5')" in str(error)
        # the fix, as the message words it: restore into the Keras model built in code, pass that model
        restored, module = _keras_two_dense(seed=2), _TwoDense()
        _follow_restore(str(error), restored)
        weightport.load(module, restored)
        _matches_keras(module, saved)


def test_a_checkpoint_managers_folder_names_its_latest_checkpoint(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    saved = _keras_two_dense(seed=1)
    checkpoint = tf.train.Checkpoint(model=saved)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path / "run"), max_to_keep=20)
    for step in range(11):  # ckpt-1 .. ckpt-11: the latest is not the last by text
        if step == 10:
            saved.set_weights([w + 1 for w in saved.get_weights()])
        manager.save()
    assert manager.latest_checkpoint.endswith("ckpt-11")
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoint"):
        error = refused(
            _TwoDense(), given, r"TensorFlow checkpoint \(prefix '.*run/ckpt-11'", weightport.SourceError
        )
        restored, module = _keras_two_dense(seed=2), _TwoDense()
        _follow_restore(str(error), restored)
        weightport.load(module, restored)
        _matches_keras(module, saved)


def test_a_saved_model_is_refused_as_one_and_its_fix_loads_it(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    saved = _keras_two_dense(seed=3)
    tf.saved_model.save(saved, str(tmp_path / "exported"))
    folder = tmp_path / "exported"
    for given in (
        folder,
        folder / "variables",
        folder / "saved_model.pb",
        folder / "variables" / "variables.index",
    ):
        error = refused(
            _TwoDense(),
            given,
            r"a TensorFlow SavedModel \('.*exported': saved_model\.pb",
            weightport.SourceError,
        )
        restored, module = _keras_two_dense(seed=4), _TwoDense()
        _follow_restore(str(error), restored)
        weightport.load(module, restored)
        _matches_keras(module, saved)
    # a file beside a SavedModel that TensorFlow did not write is no SavedModel
    (folder / "notes.txt").write_text("hi")
    refused(_TwoDense(), folder / "notes.txt", "not a format weightport reads", weightport.SourceError)


# --- layout='keras' on arrays Keras did not file -----------------------------------------------------------


@pytest.mark.parametrize("as_file", [True, False])
def test_keras_layout_on_arrays_named_by_layer_says_what_it_reads(tmp_path: Path, as_file: bool) -> None:
    keras_model = _keras_two_dense(seed=5)
    arrays = {
        f"{layer.name}/{w.name}": np.asarray(w.numpy()) for layer in keras_model.layers for w in layer.weights
    }
    assert sorted(arrays) == ["d1/bias", "d1/kernel", "d2/bias", "d2/kernel"]
    source: Any = arrays
    if as_file:
        np.savez(tmp_path / "named.npz", **arrays)
        source = tmp_path / "named.npz"
    fix = r"Fix: pass the live Keras model, weightport\.load\(module, keras_model\), or save it with keras_model\.save_weights\('model\.weights\.h5'\) and load that file\."
    for mapping in (None, {"d1": "d1", "d2": "d2"}):  # mapping= cannot pair layers the source does not record
        refused(
            _TwoDense(),
            source,
            "layout='keras' reads the layers Keras itself records .*found no Keras layer "
            r"in its names \('d1/kernel', 'd1/bias', \.\.\.\)\. " + fix,
            weightport.LayoutError,
            layout="keras",
            mapping=mapping,
        )
    # both ways out load exactly
    module = _TwoDense()
    weightport.load(module, keras_model)
    _matches_keras(module, keras_model)
    keras_model.save_weights(tmp_path / "model.weights.h5")
    module = _TwoDense()
    with pytest.warns(weightport.UncheckedConfigWarning, match="activation"):  # a weights file records none
        weightport.load(module, tmp_path / "model.weights.h5")
    _matches_keras(module, keras_model)
