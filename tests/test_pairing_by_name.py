"""A source layer whose own name is a module's path pairs with that module, whatever order the model
declares its modules in (declaring ``head`` before ``body`` is common); checked against each framework's
own outputs. Order within kind still pairs the layers no name matches."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport import UncheckedConfigWarning
from weightport.layouts.pairing import SourceLayer, pair_layers

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class HeadFirst(nn.Module):
    """Declares ``head`` before ``body``; calls ``body`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 8)
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_names_outrank_order_and_order_fills_the_rest() -> None:
    model = nn.Sequential()
    model.add_module("b", nn.Linear(2, 2))
    model.add_module("a", nn.Linear(2, 2))
    model.add_module("c", nn.Linear(2, 2))
    layers = [SourceLayer("a", "Linear"), SourceLayer("x", "Linear"), SourceLayer("b", "Linear")]
    pairs = pair_layers(model, layers, None, framework="Test")
    assert [(p.source.name, p.slot.label, p.how) for p in pairs] == [
        ("a", "a", "by name"),
        ("x", "c", "by a unique kind and shape"),
        ("b", "b", "by name"),
    ]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_back_into_a_model_that_declares_layers_out_of_call_order(
    tmp_path: Path, dynamo: bool
) -> None:
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    source = HeadFirst().eval()
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracing notes
        torch.onnx.export(source, (x,), str(tmp_path / "m.onnx"), dynamo=dynamo, input_names=["x"])
    fresh = HeadFirst()
    report = weightport.load(fresh, tmp_path / "m.onnx")
    assert {(p.module_path, p.how) for p in report.pairings} == {("head", "by name"), ("body", "by name")}
    assert torch.allclose(fresh(x), source(x), atol=1e-6)


def test_keras_layers_named_as_the_modules(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    x = keras.Input((8,))
    out = keras.layers.Dense(8, name="head")(keras.layers.Dense(8, activation="relu", name="body")(x))
    model = keras.Model(x, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    inputs = rng.standard_normal((2, 8)).astype(np.float32)
    expected = np.asarray(model(inputs))
    for name in ("m.keras", "m.weights.h5"):
        (model.save if name.endswith(".keras") else model.save_weights)(tmp_path / name)
        fresh = HeadFirst()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)  # a weights-only file
            weightport.load(fresh, tmp_path / name)
        got = fresh(torch.from_numpy(inputs)).detach().numpy()
        assert np.abs(got - expected).max() < 1e-5, name


def test_flax_layers_named_as_the_modules(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    fnn = pytest.importorskip("flax.linen")
    serialization = pytest.importorskip("flax.serialization")

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            return fnn.Dense(8, name="head")(fnn.relu(fnn.Dense(8, name="body")(x)))

    inputs = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    variables = Net().init(jax.random.PRNGKey(0), inputs)
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map(
        lambda a: rng.uniform(-0.5, 0.5, a.shape).astype(np.float32), variables
    )
    (tmp_path / "m.msgpack").write_bytes(serialization.to_bytes(variables))
    fresh = HeadFirst()
    weightport.load(fresh, tmp_path / "m.msgpack")
    expected = np.asarray(Net().apply(variables, inputs))
    assert np.abs(fresh(torch.from_numpy(inputs)).detach().numpy() - expected).max() < 1e-5
