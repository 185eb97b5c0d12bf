"""Files and names saved by other frameworks' conventions, each read as that framework wrote it or refused
naming what it is, with a fix that works.

- An ``.npy`` / ``.npz`` member of ml_dtypes' float8_e5m2 (np.save writes descr ``'<f1'``, a type NumPy has
  not) is refused as an ml_dtypes array whose type is lost, not as a corrupt file.
- A TensorFlow checkpoint or SavedModel is refused as one, with the restore that loads it.
- ``layout='keras'`` on arrays Keras did not file says what the layout reads, up front.
- Flax names joined by ``.`` load with ``layout='flax'``; names are told Flax's, Keras's or PyTorch's (joined
  by ``/``) by their leaves, and the fix each hint gives loads them.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re
import warnings
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


# --- Flax names joined by '.', and other frameworks' names told apart by their leaves -------------------------


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(self.ln(self.fc1(x)))


def _flax_convnet() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A linen twin of :class:`_ConvNet`: its perturbed variables, an NHWC input and Flax's output."""
    pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    from _flax import flax_outputs

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x: Any) -> Any:
            x = linen.Conv(6, (3, 3), padding=1, name="conv")(x)
            x = linen.relu(linen.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x))
            x = linen.Dense(8, name="fc1")(x.mean(axis=(1, 2)))
            return linen.Dense(4, name="fc2")(linen.LayerNorm(epsilon=1e-5, name="ln")(x))

    x = np.random.default_rng(3).standard_normal((2, 5, 5, 3)).astype(np.float32)
    variables, expected = flax_outputs(Net(), x, seed=4)
    variables["batch_stats"]["bn"]["var"] = np.abs(variables["batch_stats"]["bn"]["var"]) + 0.5
    expected = np.asarray(Net().apply(variables, x))
    return variables, x, expected


def _torch_run(module: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _flat(variables: dict[str, Any], sep: str) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    return {k: np.asarray(v) for k, v in flatten_dict(variables, sep=sep).items()}


@pytest.mark.parametrize("as_file", [True, False])
def test_flax_names_joined_by_dots_load_with_layout_flax(tmp_path: Path, as_file: bool) -> None:
    variables, x, expected = _flax_convnet()
    arrays = _flat(variables, ".")
    assert "params.conv.kernel" in arrays and "batch_stats.bn.mean" in arrays
    source: Any = arrays
    if as_file:
        np.savez(tmp_path / "dotted.npz", **arrays)
        source = tmp_path / "dotted.npz"
    # without layout=, the names are told Flax's by their leaves (it was: unknown names, mapping=)
    error = refused(
        _ConvNet(), source, r"found Flax's names in .*\. Fix: pass layout='flax'", weightport.LoadError
    )
    assert str(error).index("(layout)") < str(error).index("kernel'") and "drop layout" not in str(error)
    module = _ConvNet()
    with warnings.catch_warnings():  # params carry no settings (epsilons, padding): noted, not checked
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(module, source, layout="flax")
    assert np.abs(_torch_run(module, x) - expected).max() < 1e-5
    # the same with the params alone (no batch_stats: the module's running statistics stay as they are)
    params = _flat({"params": variables["params"]}, ".")
    module = _ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        report = weightport.load(
            module, {k.removeprefix("params."): v for k, v in params.items()}, layout="flax", strict=False
        )
    assert sorted(report.missing) == ["bn.running_mean", "bn.running_var"]
    assert np.array_equal(module.fc1.weight.detach().numpy(), arrays["params.fc1.kernel"].T)
    assert np.array_equal(module.ln.weight.detach().numpy(), arrays["params.ln.scale"])


def test_flax_dotted_names_under_layout_keras_are_told_flax_not_pytorch() -> None:
    variables, x, expected = _flax_convnet()
    arrays = {**_flat(variables["params"], "."), **_flat(variables["batch_stats"], ".")}  # collections merged
    # its biases are the model's own names; it was told "drop layout='keras'", which loaded the biases alone
    error = refused(
        _ConvNet(),
        arrays,
        r"expected names in the 'keras' layout, found Flax's names .*Fix: pass layout='flax'",
        layout="keras",
    )
    assert "PyTorch state-dict names in" not in str(error)
    module = _ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(module, arrays, layout="flax")
    assert np.abs(_torch_run(module, x) - expected).max() < 1e-5


def test_torch_names_joined_by_slashes_are_told_to_join_with_dots(rng: np.random.Generator) -> None:
    reference = _ConvNet().eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    for name, array in state.items():
        if array.dtype == np.float32:
            state[name] = (
                rng.uniform(0.5, 1.5, array.shape)
                if "running_var" in name
                else rng.standard_normal(array.shape)
            ).astype(np.float32)
    arrays = {k.replace(".", "/"): v for k, v in state.items()}
    error = refused(
        _ConvNet(),
        arrays,
        r"found PyTorch's names joined by '/' in the given mapping \('conv/weight'\)\. Fix: join them with '\.'",
    )
    assert "layout='flax'" not in str(error)
    module = _ConvNet()  # the fix, as written
    weightport.load(module, {name.replace("/", "."): array for name, array in arrays.items()})
    assert all(np.array_equal(t.numpy(), state[k]) for k, t in module.state_dict().items())
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    assert np.array_equal(_torch_run(module, x), _torch_run(reference, x))


def test_keras_names_in_a_dict_are_told_keras_not_flax() -> None:
    keras = pytest.importorskip("keras")
    normed = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, name="d1"), keras.layers.LayerNormalization(name="ln")]
    )
    arrays = {
        f"{layer.name}/{w.name}": np.asarray(w.numpy()) for layer in normed.layers for w in layer.weights
    }
    assert "ln/gamma" in arrays

    class DenseNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d1, self.ln = torch.nn.Linear(4, 5), torch.nn.LayerNorm(5, eps=1e-3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.d1(x))

    for layout in (None, "flax"):  # Keras's gamma and beta are no Flax names: layout='flax' was not the fix
        error = refused(
            DenseNorm(),
            arrays,
            r"found Keras's names .*Fix: layout='keras' reads Keras's own files",
            layout=layout,
        )
        assert "pass layout='flax'" not in str(error)
    module = DenseNorm()  # the fix: the live model
    weightport.load(module, normed)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(module(torch.from_numpy(x)).numpy() - np.asarray(normed(x))).max() < 1e-5


class _NamedLikeFlax(torch.nn.Module):
    """A PyTorch module whose own parameters end in Flax's leaves (``kernel``, ``scale``)."""

    def __init__(self, dense: str, norm: str) -> None:
        super().__init__()
        self.add_module(dense, torch.nn.Module())
        self.add_module(norm, torch.nn.Module())
        self.get_submodule(dense).kernel = torch.nn.Parameter(torch.randn(4, 4))
        self.get_submodule(norm).scale = torch.nn.Parameter(torch.randn(4))
        self.names = (dense, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, norm = (self.get_submodule(name) for name in self.names)
        return (x * norm.scale) @ dense.kernel


def test_names_ending_in_the_models_own_leaves_are_not_told_flax(tmp_path: Path) -> None:
    """A module of the user's own with parameters named kernel and scale, saved and loaded into one whose
    layers are named otherwise: the refusal asks for the rename, which loads it (it said 'pass
    layout='flax'', which then failed to pair anything)."""
    saved = _NamedLikeFlax("proj", "norm")
    np.savez(tmp_path / "w.npz", **{k: v.detach().numpy() for k, v in saved.state_dict().items()})
    model = _NamedLikeFlax("fc", "ln")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(model, tmp_path / "w.npz")
    assert "layout='flax'" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weightport.load(model, tmp_path / "w.npz", mapping={"proj.kernel": "fc.kernel", "norm.scale": "ln.scale"})
    x = torch.randn(2, 4)
    assert torch.equal(model(x), saved(x))
