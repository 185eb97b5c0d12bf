"""A weights-only Keras file records no layer classes: where a layer's variables look like another class's,
its key (Keras 3 ``.weights.h5``) or default name (tf_keras ``save_weights``) tells. A class weightport does not
port (PReLU, Attention's scale) is never taken for a look-alike, and its refusal says that dropping it changes
the outputs; an EinsumDense loads only where its equation is recorded (its ``'abc,dc->abd'`` kernel is stored
``(out, in)``: read as a Dense's it would load transposed); a Conv2DTranspose is not taken for a Conv2D.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

import weightport  # noqa: E402


def weights_only(framework: Any, model: Any, tmp_path: Path, rng: np.random.Generator) -> Path:
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
    path = tmp_path / ("m.weights.h5" if framework is keras else "legacy.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_weights(path)
    return path


@pytest.mark.parametrize("framework", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_a_square_einsum_dense_is_not_taken_for_a_dense(framework: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layers = framework.layers
    model = framework.Sequential(
        [framework.Input((4, 6)), layers.EinsumDense("abc,dc->abd", output_shape=(None, 6), bias_axes="d")]
    )
    path = weights_only(framework, model, tmp_path, rng)
    module = torch.nn.Linear(6, 6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(weightport.LoadError, match="einsum_dense"):
        weightport.load(module, path)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    # what the refusal's fix says: the kernel as it is stored is this layer's (out, in) weight
    kernel, bias = model.get_weights()
    weightport.load(module, {"weight": kernel, "bias": bias})
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.from_numpy(x)).numpy(), np.asarray(model(x)), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("framework", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_prelu_is_not_taken_for_a_conv_or_a_dense(framework: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = framework.Sequential([framework.Input((5, 5, 3)), framework.layers.PReLU()])
    path = weights_only(framework, model, tmp_path, rng)
    with pytest.raises(weightport.LoadError, match="p_re_lu") as caught:
        weightport.load(torch.nn.Sequential(torch.nn.Conv1d(5, 3, 5)), path)
    assert "Conv1D" not in str(caught.value)


def test_a_legacy_conv2d_transpose_fills_a_conv_transpose(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    layers = tf_keras.layers
    model = tf_keras.Sequential([tf_keras.Input((5, 5, 3)), layers.Conv2DTranspose(4, 3, strides=2)])
    path = weights_only(tf_keras, model, tmp_path, rng)
    module = torch.nn.ConvTranspose2d(3, 4, 3, stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # weights only: no settings
        weightport.load(module, path)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_layer_of_no_rule_whose_weights_change_the_outputs_says_so(suffix: str, tmp_path: Path) -> None:
    """Attention(use_scale=True) learns a scale: skipping it with strict=False changes the outputs, so the
    fix says to port it rather than 'skip it: the module has a value for every tensor without it'."""
    query, value = keras.Input((4, 6)), keras.Input((5, 6))
    attention = keras.layers.Attention(use_scale=True)
    model = keras.Model([query, value], keras.layers.Dense(3)(attention([query, value])))
    attention.scale.assign(3.0)
    path = tmp_path / f"m{suffix}"
    model.save(path) if suffix == ".keras" else model.save_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        with pytest.raises(weightport.LoadError) as caught:
            weightport.load(torch.nn.Linear(6, 3), path)
    (problem,) = [p for p in caught.value.problems if "attention" in p.name]
    assert problem.fix.startswith("weightport has no rule for Keras Attention ('"), problem.fix
    assert "strict=False would drop it" in problem.fix and "without it" not in problem.fix


def test_a_legacy_weights_only_normalization_is_reported_with_its_values(tmp_path: Path) -> None:
    """tf_keras's save_weights records no classes; a Normalization's mean/variance/count (Keras's own
    variable names) are set aside with the values to apply, as from a full-model file (EfficientNetB0's)."""
    rng = np.random.default_rng(3)
    norm = tf_keras.layers.Normalization()
    model = tf_keras.Sequential([tf_keras.Input((4,)), norm, tf_keras.layers.Dense(2)])
    norm.adapt(rng.uniform(0, 5, (64, 4)).astype(np.float32))
    path = tmp_path / "legacy.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_weights(path)
    mean, variance = (np.asarray(v).reshape(-1) for v in norm.get_weights()[:2])
    module = torch.nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        report = weightport.load(module, path)
    said = " ".join(report.ignored)
    assert f"Keras Normalization 'normalization' (mean [{mean[0]:.6g}" in said, said
    assert (
        "compute (x - mean) / sqrt(variance) where the Keras model applies it" in said
    )  # no wiring recorded
    x = rng.uniform(0, 5, (3, 4)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy((x - mean) / np.sqrt(variance))).numpy()
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("equation", "bias_axes"),
    [("ab,bc->ac", "c"), ("abc,cd->abd", "d"), ("abc,dc->abd", "d"), ("abc,dc->abd", None)],
)
def test_an_einsum_dense_that_is_a_dense_gives_keras_outputs(
    equation: str, bias_axes: str | None, tmp_path: Path
) -> None:
    """Where the configuration records the equation (.keras, the live layer, tf_keras's full-model .h5), an
    EinsumDense that contracts the last axis loads into nn.Linear, its kernel read (in, out) or (out, in) as
    the equation says; the square case is the one shapes could not tell."""
    rng = np.random.default_rng(5)
    rank = len(equation.split(",")[0])
    shape = (6,) if rank == 2 else (4, 6)
    out = (None, 6) if rank == 3 else 6
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    for framework in (keras, tf_keras):
        layer = framework.layers.EinsumDense(equation, output_shape=out, bias_axes=bias_axes)
        model = framework.Sequential([framework.Input(shape), layer])
        model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
        path = tmp_path / ("m.keras" if framework is keras else "full.h5")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(path)
        for source in (model, path):
            module = torch.nn.Linear(6, 6, bias=bias_axes is not None)
            weightport.load(module, source)
            with torch.no_grad():
                got = module(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_an_einsum_dense_no_linear_computes_is_refused(tmp_path: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((4, 6)),
            keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3), bias_axes="de"),
        ]
    )
    model.save(tmp_path / "m.keras")
    with pytest.raises(weightport.LoadError, match="its configuration says how its weights read"):
        weightport.load(torch.nn.Linear(6, 6), tmp_path / "m.keras")


def test_a_dense_a_user_named_after_an_unported_class_still_loads(tmp_path: Path) -> None:
    """Only the default names of classes whose variables look like a ported class's (EinsumDense, PReLU)
    stop the guess: a Dense named 'attention' by its user loads from tf_keras's weights-only file."""
    rng = np.random.default_rng(6)
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3, name="attention")])
    path = weights_only(tf_keras, model, tmp_path, rng)
    module = torch.nn.Linear(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(module, path)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.from_numpy(x)).numpy(), model.predict(x, verbose=0), atol=1e-5
        )
