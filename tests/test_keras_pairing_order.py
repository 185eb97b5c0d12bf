"""Pairing that no proof settles, held against the settings checks first: layers of one kind and shape in
parallel branches could swap, so a load asks for ``mapping=``; but where every module that could take a
layer differs from it in a setting (a bias, an eps), no mapping cures that, and the refusal says so first,
in the same message. Where only some candidates differ, they are no candidates: one assignment left is the
proof (the only one the checks would let load). Each checked against Keras's own outputs. Also: a Flax
dict's ``weight_g``/``weight_v`` fill a parametrization's ``original0``/``original1`` only where it is
torch's weight norm (``layouts.torch.weight_normed``, the one home of that fact).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import weightport
from weightport.errors import LayoutError, LoadError

INCURABLE = r"no mapping= would cure"


def _randomized(model: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        value = rng.uniform(-0.6, 0.6, tuple(w.shape))
        if "variance" in w.path:
            value = np.abs(value) + 0.5
        weights.append(value.astype(np.float32))
    model.set_weights(weights)
    return model


def _twin_convs(keras: Any, biases: tuple[bool, bool]) -> Any:
    """Two convs of one shape reading the same input, summed: parallel branches, so no order tells them apart."""
    x = keras.Input((6, 5, 3))
    left = keras.layers.Conv2D(4, 3, padding="same", use_bias=biases[0], name="left")(x)
    right = keras.layers.Conv2D(4, 3, padding="same", use_bias=biases[1], name="right")(x)
    return _randomized(keras.Model(x, keras.layers.Add()([left, right])), 1)


class TwinConvs(nn.Module):
    def __init__(self, biases: tuple[bool, bool]) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 4, 3, padding=1, bias=biases[0])
        self.q = nn.Conv2d(3, 4, 3, padding=1, bias=biases[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p(x) + self.q(x)


class TwinNorms(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.p = nn.BatchNorm2d(3, eps=eps)
        self.q = nn.BatchNorm2d(3, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p(x) + self.q(x)


def _same_outputs(keras_model: Any, module: nn.Module) -> None:
    x = np.random.default_rng(5).standard_normal((2, 6, 5, 3)).astype(np.float32)
    expected = np.asarray(keras_model(x, training=False))
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _sources(model: Any, tmp_path: Path) -> list[Any]:
    model.save(tmp_path / "m.keras")
    return [model, tmp_path / "m.keras"]


def test_a_bias_every_candidate_lacks_is_said_with_the_mapping_request(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    model = _twin_convs(keras, (True, True))
    for source in _sources(model, tmp_path):
        twin = TwinConvs((False, False))
        before = {k: v.clone() for k, v in twin.state_dict().items()}
        with pytest.raises(LayoutError) as caught:
            weightport.load(twin, source)
        said = str(caught.value)
        # the difference first, said to be past any mapping's reach, then the ambiguity with its fix
        assert said.index(INCURABLE) < said.index("cannot prove which module each Keras layer fills")
        assert "expected bias=True (Keras use_bias=True), found bias=False" in said
        assert "'left'" in said.split("Besides")[0] and "'right'" in said.split("Besides")[0]
        assert "Fix: pass example_inputs=" in said or "Fix: pass mapping=" in said
        assert all(torch.equal(v, before[k]) for k, v in twin.state_dict().items())
    # built with the biases: the mapping is all that is left to ask for, and with it the load is exact
    with pytest.raises(LayoutError, match="cannot prove which module") as caught:
        weightport.load(TwinConvs((True, True)), model)
    assert INCURABLE not in str(caught.value)
    twin = TwinConvs((True, True))
    weightport.load(twin, model, mapping={"left": "p", "right": "q"})
    _same_outputs(model, twin)


def test_an_eps_every_candidate_differs_in_is_said_with_the_mapping_request(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    x = keras.Input((6, 5, 3))
    left = keras.layers.BatchNormalization(name="left")(x)  # Keras's epsilon: 1e-3
    right = keras.layers.BatchNormalization(name="right")(x)
    model = _randomized(keras.Model(x, keras.layers.Add()([left, right])), 2)
    for source in _sources(model, tmp_path):
        with pytest.raises(LayoutError) as caught:
            weightport.load(TwinNorms(1e-5), source)
        said = str(caught.value)
        assert said.index(INCURABLE) < said.index("cannot prove which module each Keras layer fills")
        assert "expected eps=0.001 (Keras epsilon), found eps=1e-05" in said
    twin = TwinNorms(1e-3)
    weightport.load(twin, model, mapping={"left": "p", "right": "q"})
    _same_outputs(model, twin)


@pytest.mark.parametrize("p_bias", [False, True])
def test_candidates_whose_settings_differ_are_none_and_one_assignment_left_is_the_proof(
    tmp_path: Path, p_bias: bool
) -> None:
    """'left' has a bias and 'right' none; the module with a bias is the only one 'left' can fill, whichever
    of the two it is: the pairing follows it, and the outputs are Keras's."""
    keras = pytest.importorskip("keras")
    model = _twin_convs(keras, (True, False))
    for source in _sources(model, tmp_path):
        twin = TwinConvs((p_bias, not p_bias))
        report = weightport.load(twin, source)
        placed = {p.source_layer: (p.module_path, p.how) for p in report.pairings}
        how = "by a unique kind, shape and settings"
        assert placed == {"left": ("p" if p_bias else "q", how), "right": ("q" if p_bias else "p", how)}
        _same_outputs(model, twin)


# ---- Flax: weight_g / weight_v into a parametrization ----------------------------------------------------


class _TwoOriginals(nn.Module):
    """A parametrization of two tensors that is not weight norm: weight = g * v."""

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g * v

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(w.shape[0], 1, 1), w


class _Normed(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.body = nn.Module()
        conv = nn.Conv1d(3, 4, 5)
        if custom:
            parametrize.register_parametrization(conv, "weight", _TwoOriginals())
        else:
            conv = weight_norm(conv)
        self.body.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.conv(x)  # type: ignore[no-any-return]


def _flax_weight_normed() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "params": {
            "body": {
                "conv": {
                    "weight_g": rng.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32),
                    "weight_v": rng.standard_normal((4, 3, 5)).astype(np.float32),
                    "bias": rng.standard_normal(4).astype(np.float32),
                }
            }
        }
    }


def test_flax_weight_g_and_v_fill_torch_weight_norm_exactly() -> None:
    arrays = _flax_weight_normed()
    conv = arrays["params"]["body"]["conv"]
    module = _Normed(custom=False)
    weightport.load(module, arrays, layout="flax")
    state = module.body.conv.parametrizations.weight
    assert np.array_equal(state.original0.detach().numpy(), conv["weight_g"])
    assert np.array_equal(state.original1.detach().numpy(), conv["weight_v"])
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 3, 9)).astype(np.float32))
    v = torch.from_numpy(conv["weight_v"])
    weight = torch.from_numpy(conv["weight_g"]) * v / v.norm(dim=(1, 2), keepdim=True)
    expected = torch.nn.functional.conv1d(x, weight, torch.from_numpy(conv["bias"]))
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)


def test_flax_weight_g_and_v_are_refused_by_a_parametrization_of_two_originals_that_is_not_weight_norm() -> (
    None
):
    module = _Normed(custom=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(LoadError, match=r"params/body/conv/weight_g"):
        weightport.load(module, _flax_weight_normed(), layout="flax")
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
