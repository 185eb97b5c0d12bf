"""Keras ``LayerScale`` (keras.applications ConvNeXt's ``x * gamma``) into the one vector parameter a PyTorch
module keeps for it (torchvision's ``layer_scale`` ``(C, 1, 1)``, timm's ``gamma`` ``(C,)``), against Keras's
own outputs; a bare vector named otherwise (an added bias) is never taken for one; export goes back.
Whole ConvNeXt models: tests/test_keras_applications.py.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
convnext = pytest.importorskip("keras.src.applications.convnext")

import weightport  # noqa: E402
from weightport.errors import LayoutError, UncheckedConfigWarning  # noqa: E402
from weightport.layouts.keras import save_weights_h5  # noqa: E402


class Scaled(nn.Module):
    """A vector that multiplies, named as a layer scale (``gamma``) or otherwise; kept as ``shape``."""

    def __init__(self, dim: int, name: str = "gamma", shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(torch.ones(shape or (dim,))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * getattr(self, self.name).reshape(-1)


class Shifted(nn.Module):
    """A vector that is added, named so (``bias``): not a layer scale, whatever its shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def keras_model(rng: np.random.Generator) -> Any:
    """Dense, LayerScale, Dense, LayerScale: two scales of one size, told apart by order only."""
    inputs = keras.Input((5, 3))
    x = keras.layers.Dense(4)(inputs)
    x = convnext.LayerScale(0.1, 4)(x)
    x = keras.layers.Dense(4)(x)
    outputs = convnext.LayerScale(0.1, 4)(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([rng.uniform(-1.5, 1.5, tuple(w.shape)).astype(np.float32) for w in model.weights])
    return model


def torch_model(name: str = "gamma", shape: tuple[int, ...] | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), Scaled(4, name, shape), nn.Linear(4, 4), Scaled(4, name, shape))


@pytest.mark.parametrize("name", ["gamma", "layer_scale", "ls_scale"])
def test_a_layer_scale_is_one_vector_named_for_what_it_does(name: str) -> None:
    from weightport.layouts.keras.scale import scale_parameter

    assert scale_parameter(Scaled(4, name, (4, 1, 1))) == name
    assert scale_parameter(Shifted(4)) is None  # named otherwise
    assert scale_parameter(Scaled(1, name)) is None  # not a vector: a scalar factor
    two = Scaled(4, name)
    two.register_buffer("count", torch.zeros(()))
    assert scale_parameter(two) is None  # more than the vector
    assert scale_parameter(nn.RMSNorm(4)) is None  # a norm's one weight: named otherwise


@pytest.mark.parametrize("shape", [None, (4, 1)], ids=["(C,)", "(C, 1)"])
def test_layer_scales_give_keras_outputs_from_every_source(
    shape: tuple[int, ...] | None, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    model = keras_model(rng)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        model.save(tmp_path / "m.h5")  # Keras 3's legacy .h5 names the unnamed weight 'variable'
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    expected = np.asarray(model(x))
    for source in (model, tmp_path / "m.keras", tmp_path / "m.weights.h5", tmp_path / "m.h5"):
        module = torch_model(shape=shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)  # a .weights.h5 records no settings
            report = weightport.load(module, source)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        scales = {p.module_path: p.how for p in report.pairings if p.source_kind == "LayerScale"}
        assert set(scales) == {"1", "3"} and all("by recorded order" in h for h in scales.values()), scales


def test_a_vector_named_otherwise_is_not_taken_for_a_layer_scale(tmp_path: Path) -> None:
    model = keras_model(np.random.default_rng(1))
    module = nn.Sequential(nn.Linear(3, 4), Shifted(4), nn.Linear(4, 4), Shifted(4))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(LayoutError) as caught:
        weightport.load(module, model)
    text = str(caught.value)
    assert "2 Keras LayerScale layers" in text and "the model has no layer-scale module" in text, text
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_export_of_layer_scales_is_what_keras_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    module = torch_model(shape=(4, 1))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.uniform(-1.5, 1.5, tuple(p.shape)).astype(np.float32)))
    model = keras_model(rng)
    save_weights_h5(module, tmp_path / "back.weights.h5")
    model.load_weights(tmp_path / "back.weights.h5")
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)
