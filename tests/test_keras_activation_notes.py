"""Keras activations whose defaults PyTorch's do not share (:mod:`weightport.layouts.keras.activations`):
the note names the PyTorch call that gives Keras's outputs, and following it does, where the twin built
with PyTorch's defaults does not. Each table entry is checked against ``keras.activations`` itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from weightport.errors import ForwardNoteWarning, UncheckedConfigWarning  # noqa: E402
from weightport.layouts.keras.activations import ACTIVATIONS, layer_note, torch_call  # noqa: E402

TOL = 1e-5
L = keras.layers


def inputs(*shape: int, scales: tuple[float, ...] = (0.5, 3.0)) -> np.ndarray:
    """Values of every size Keras's formulas treat apart: negative, around 0 and +-1, and large."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(shape) * s for s in scales]).astype(np.float32)
    x.reshape(-1)[:7] = [-1.0, 1.0, 0.0, -3.0, 3.0, 6.5, -60.0 if max(scales) > 10 else -6.5]
    return x


def run(call: str, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a note's PyTorch call on ``x`` (named ``x`` or ``y`` in the note)."""
    return eval(call, {"torch": torch, "F": F, "nn": nn, "x": x, "y": x})  # type: ignore[no-any-return]


def loaded(module: nn.Module, path: Path) -> list[str]:
    """Load, and return the notes the ForwardNoteWarning gave (the only warning allowed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = weightport.load(module, path)
    assert all(issubclass(w.category, ForwardNoteWarning) for w in caught), [str(w.message) for w in caught]
    return report.notes


def between(mid: Callable[[Any], Any], tmp_path: Path, shape: tuple[int, ...] = (4,)) -> tuple[Path, Any]:
    """Dense -> ``mid`` -> Dense, saved as .keras; with weights big enough to reach every activation's range."""
    i = keras.Input(shape)
    model = keras.Model(i, L.Dense(3, name="b")(mid(L.Dense(6, name="a")(i))))
    for w in model.weights:
        w.assign(np.random.default_rng(1).standard_normal(tuple(w.shape)).astype(np.float32) * 2)
    model.save(tmp_path / "m.keras")
    return tmp_path / "m.keras", model


class Twin(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], size: int = 4) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(size, 6), act, nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))  # type: ignore[operator]


def diff(module: nn.Module, model: Any, x: np.ndarray) -> float:
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    return float(np.abs(got - np.asarray(model(x))).max())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_call_in_the_table_computes_keras_activation(name: str) -> None:
    x = inputs(4, 8, scales=(0.5, 3.0, 30.0))
    expected = np.asarray(keras.activations.get(name)(keras.ops.convert_to_tensor(x)))
    got = run(torch_call(name, "x") or "", torch.from_numpy(x)).numpy()
    scale = float(np.abs(expected).max()) if name == "exponential" else 1.0  # exp(60): relative to its size
    assert np.abs(got - expected).max() < TOL * scale, name


def test_the_defaults_that_differ_from_pytorchs_are_said() -> None:
    """Where the module built by PyTorch's defaults computes otherwise, the table says so (and the Activation
    layer gets a note); where it computes the same, no note."""
    x = torch.from_numpy(inputs(2, 3, 4, scales=(3.0,)))
    leaky = run(torch_call("leaky_relu") or "", x)
    assert float((nn.LeakyReLU()(x) - leaky).abs().max()) > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch warns of the implicit dim it picks
        implicit = nn.Softmax()(x)
    assert float((implicit - run(torch_call("softmax") or "", x)).abs().max()) > 0.1
    assert {n for n in ACTIVATIONS if layer_note(n) is not None} == {
        "leaky_relu",
        "softmax",
        "log_softmax",
        "exponential",
        "sparse_plus",
        "sparse_sigmoid",
        "squareplus",
    }
    assert "0.2 * x + 0.5" in (layer_note("hard_sigmoid", "2.15.0") or "")  # tf.keras 2's hard_sigmoid
    assert torch_call("hard_sigmoid", keras_version="3.6.0") == "F.hardsigmoid(y)"


@pytest.mark.parametrize("name", sorted(set(ACTIVATIONS) - {"linear", "glu"}))
def test_following_a_dense_activation_note_gives_keras_outputs(name: str, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    i = keras.Input((4,))
    dense = L.Dense(6, activation=name, name="a")
    model = keras.Model(i, L.Dense(3, name="b")(dense(i)))
    for w in model.weights:
        w.assign(np.random.default_rng(1).standard_normal(tuple(w.shape)).astype(np.float32) * 2)
    model.save(path)
    call = torch_call(name, "y") or ""
    module = Twin(lambda y: run(call, y))
    (note,) = loaded(module, path)
    assert (
        f"after it: apply it in forward as {call} on the module's output y" in note
    )  # swish is saved as silu
    x = inputs(5, 4) / (10 if name == "exponential" else 1)  # exp of a large output is beyond 1e-5 in float32
    assert diff(module, model, x) < TOL


def test_a_dense_leaky_relu_followed_gives_keras_outputs_and_pytorchs_default_does_not(
    tmp_path: Path,
) -> None:
    i = keras.Input((4,))
    model = keras.Model(i, L.Dense(3, name="b")(L.Dense(6, activation="leaky_relu", name="a")(i)))
    model.save(tmp_path / "m.keras")
    (note,) = loaded(naive := Twin(nn.LeakyReLU()), tmp_path / "m.keras")
    assert note.endswith(
        "apply it in forward as F.leaky_relu(y, 0.2) on the module's output y (Keras's slope 0.2; "
        "nn.LeakyReLU()'s default slope is 0.01)"
    )
    x = inputs(5, 4)
    assert diff(naive, model, x) > 0.01
    naive.act = nn.LeakyReLU(0.2)  # the note, followed
    assert diff(naive, model, x) < TOL


def test_a_conv_softmax_is_over_the_channels_dim_1(tmp_path: Path) -> None:
    """Keras's axis -1 of a channels-last map is PyTorch's dim 1: the note says dim=1."""
    i = keras.Input((7, 3))
    model = keras.Model(i, L.Conv1D(5, 2, activation="softmax", name="c")(i))
    model.save(tmp_path / "m.keras")
    conv = nn.Conv1d(3, 5, 2)
    (note,) = loaded(conv, tmp_path / "m.keras")
    assert "apply it in forward as F.softmax(y, dim=1) on the module's output y" in note
    x = inputs(2, 7, 3)
    expected = np.asarray(model(x))
    with torch.no_grad():
        y = conv(torch.from_numpy(x).transpose(1, 2))
        followed = F.softmax(y, dim=1).transpose(1, 2).numpy()
        naive = F.softmax(y, dim=-1).transpose(1, 2).numpy()
    assert np.abs(followed - expected).max() < TOL
    assert np.abs(naive - expected).max() > 0.01


@pytest.mark.parametrize("name", ["leaky_relu", "softmax", "log_softmax", "squareplus"])
def test_an_activation_layer_gets_a_note_and_following_it_gives_keras_outputs(
    name: str, tmp_path: Path
) -> None:
    path, model = between(lambda h: L.Activation(name, name="act")(h), tmp_path, shape=(5, 4))
    call = torch_call(name, "x") or ""
    module = Twin(lambda x: run(call, x))
    (note,) = loaded(module, path)
    assert f"Keras Activation 'act' (activation='{name}') on the output of Keras 'a' (module 'a')" in note
    assert f": compute {call} (" in note
    x = inputs(2, 5, 4)
    assert diff(module, model, x) < TOL
    naive = {"leaky_relu": nn.LeakyReLU(), "softmax": nn.Softmax(), "log_softmax": nn.LogSoftmax()}
    if name in naive:  # PyTorch's module with its defaults: another slope, or dim 0 of a 3-D tensor
        module.act = naive[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the implicit dim, which PyTorch warns of
            assert diff(module, model, x) > 0.01


@pytest.mark.parametrize("name", ["relu", "elu", "gelu", "hard_silu", "selu", "relu6", "mish"])
def test_an_activation_layer_pytorchs_default_module_computes_gets_no_note(name: str, tmp_path: Path) -> None:
    path, model = between(lambda h: L.Activation(name, name="act")(h), tmp_path)
    modules = {"relu": nn.ReLU(), "elu": nn.ELU(), "gelu": nn.GELU(), "hard_silu": nn.Hardswish()}
    modules.update(selu=nn.SELU(), relu6=nn.ReLU6(), mish=nn.Mish())
    module = Twin(modules[name])
    assert loaded(module, path) == []
    assert diff(module, model, inputs(5, 4)) < TOL


@pytest.mark.parametrize(("cap", "build"), [(6.0, "nn.ReLU6()"), (2.5, "nn.Hardtanh(0.0, 2.5)")])
def test_a_relu_with_max_value_alone_gets_a_note(cap: float, build: str, tmp_path: Path) -> None:
    path, model = between(lambda h: L.ReLU(max_value=cap, name="r")(h), tmp_path)
    module = Twin(nn.ReLU())
    (note,) = loaded(module, path)
    assert f"inside the model: build {build}" in note and note.endswith("a plain nn.ReLU does not cap"), note
    x = inputs(5, 4)
    assert diff(module, model, x) > 0.01
    module.act = eval(build, {"nn": nn})
    assert diff(module, model, x) < TOL


def test_a_weights_only_file_lists_its_weightless_layers_settings_as_unchecked(tmp_path: Path) -> None:
    i = keras.Input((4,))
    h = L.ELU(name="e")(
        L.LeakyReLU(name="lr")(L.Dense(6, name="a")(i))
    )  # named: a .weights.h5 numbers per class
    model = keras.Model(
        i, L.Dense(3, name="b")(L.ReLU(6.0, name="r")(L.Activation("leaky_relu", name="f")(h)))
    )
    model.save_weights(tmp_path / "m.weights.h5")
    module = Twin(nn.Sequential(nn.LeakyReLU(0.3), nn.ELU(), nn.LeakyReLU(0.2), nn.ReLU6()))
    with pytest.warns(UncheckedConfigWarning) as caught:
        report = weightport.load(module, tmp_path / "m.weights.h5")
    message = " ".join(str(w.message) for w in caught if w.category is UncheckedConfigWarning)
    said = " ".join(report.unchecked)
    for text in (
        "Keras LeakyReLU 'leaky_re_lu' (no weights, so nothing pairs it): negative_slope (Keras's default 0.3",
        "Keras ELU 'elu' (no weights, so nothing pairs it): alpha (Keras's default 1: nn.ELU())",
        "Keras ReLU 're_lu' (no weights, so nothing pairs it): negative_slope, threshold, max_value",
        "Keras Activation 'activation' (no weights, so nothing pairs it): activation (Keras's 'leaky_relu'",
    ):
        assert text in said, said
        assert text in message
    assert diff(module, model, inputs(5, 4)) < TOL  # the twin built as the unchecked settings say
