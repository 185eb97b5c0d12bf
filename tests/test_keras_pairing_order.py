"""Pairing that no proof settles, held against the settings checks first: layers of one kind and shape in
parallel branches could swap, so a load asks for ``mapping=``; but where every module that could take a
layer differs from it in a setting (a bias, an eps), no mapping cures that, and the refusal says so first,
in the same message. Where only some candidates differ, that proves nothing (the forward code around a
module may pad or slice what its own settings do not), so the load is refused asking for ``mapping=``, and a
padding is never said to be past a mapping's reach. Each checked against Keras's own outputs. Also: a Flax
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
import torch.nn.functional as F
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


def _same_s2_odd(keras: Any) -> tuple[Any, type[nn.Module], tuple[int, ...]]:
    """'a': Conv2D 3x3 stride 2 'same' on 7x7 (TF pads (1, 1) there); 'b': ZeroPadding2D(1) + a 'valid' one.
    The twin: p with padding=1 for 'a', q with padding=0 after F.pad(1) for 'b'; the settings checks flag
    q for 'a' and p for 'b' (padding), yet the forward pass makes both right."""
    x = keras.Input((7, 7, 3))
    a = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="a")(x)
    b = keras.layers.Conv2D(4, 3, strides=2, name="b")(keras.layers.ZeroPadding2D(1, name="zp")(x))

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.q = nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.p(x), self.q(F.pad(x, (1, 1, 1, 1)))], 1)

    return keras.Model(x, keras.layers.Concatenate()([a, b])), Twin, (2, 7, 7, 3)


def _causal_chomp(keras: Any) -> tuple[Any, type[nn.Module], tuple[int, ...]]:
    """'a': Conv1D 'causal'; 'b': ZeroPadding1D(2) + a 'valid' one. The twin: p with padding=2 and the last
    two steps chomped (a TCN's Chomp1d) for 'a', q after F.pad(2) for 'b'."""
    x = keras.Input((10, 3))
    a = keras.layers.Conv1D(4, 3, padding="causal", name="a")(x)
    b = keras.layers.Conv1D(4, 3, name="b")(keras.layers.ZeroPadding1D(2, name="zp")(x))

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv1d(3, 4, 3, padding=2)
            self.q = nn.Conv1d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(1, 2)
            return torch.cat([self.p(x)[..., :-2], self.q(F.pad(x, (2, 2)))], 2).transpose(1, 2)

    return keras.Model(x, keras.layers.Concatenate(axis=1)([a, b])), Twin, (2, 10, 3)


def _dilation_1x1(keras: Any) -> tuple[Any, type[nn.Module], tuple[int, ...]]:
    """'a': a 1x1 Conv2D with dilation_rate=2, 'b' one without; the twin has the dilation on the other
    module: over a kernel of 1 a dilation changes nothing, so either pairing computes the same."""
    x = keras.Input((6, 5, 3))
    a = keras.layers.Conv2D(4, 1, dilation_rate=2, name="a")(x)
    b = keras.layers.Conv2D(4, 1, name="b")(x)

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(3, 4, 1)
            self.q = nn.Conv2d(3, 4, 1, dilation=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.p(x), self.q(x)], 1)

    return keras.Model(x, keras.layers.Concatenate()([a, b])), Twin, (2, 6, 5, 3)


@pytest.mark.parametrize("case", [_same_s2_odd, _causal_chomp, _dilation_1x1])
def test_candidates_whose_settings_differ_prove_nothing_and_the_load_asks_for_a_mapping(
    tmp_path: Path, case: Any
) -> None:
    """Each module the settings checks flag for one layer is the right one for the other, once the forward
    pass pads or slices around it: pairing by those checks would cross them (outputs off by 3 to 6). So
    the load is refused, asking for mapping=, with nothing written, and no padding is said to be past a
    mapping's reach."""
    keras = pytest.importorskip("keras")
    model, twin_class, shape = case(keras)
    model = _randomized(model, 1)
    model.save(tmp_path / "m.keras")
    for source in [model, tmp_path / "m.keras"]:
        twin = twin_class()
        before = {k: v.clone() for k, v in twin.state_dict().items()}
        with pytest.raises(LayoutError, match="cannot prove which module each Keras layer fills") as caught:
            weightport.load(twin, source)
        said = str(caught.value)
        assert "Fix: pass mapping=" in said or "Fix: pass example_inputs=" in said
        assert INCURABLE not in said
        assert all(torch.equal(v, before[k]) for k, v in twin.state_dict().items())
    # the crossed pairing the checks pointed to: each module in the other's place, loaded by hand, is wrong
    crossed = twin_class()
    state = {name: torch.from_numpy(np.asarray(w)) for name, w in _torch_arrays(model).items()}
    with torch.no_grad():
        for module, layer in ((crossed.p, "b"), (crossed.q, "a")):
            module.weight.copy_(state[f"{layer}.weight"])
            module.bias.copy_(state[f"{layer}.bias"])
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    with torch.no_grad():
        t = torch.from_numpy(x)
        got = crossed.eval()(t.permute(0, 3, 1, 2) if t.ndim == 4 else t)
        got = got.permute(0, 2, 3, 1) if got.ndim == 4 else got
    assert np.abs(got.numpy() - expected).max() > 0.1


class _TwinChomped(nn.Module):
    """Two TCN-style causal convs in parallel: padding=2 on both sides, the last two steps chomped."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv1d(3, 4, 3, padding=2)
        self.q = nn.Conv1d(3, 4, 3, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        return (self.p(x)[..., :-2] + self.q(x)[..., :-2]).transpose(1, 2)


def test_a_padding_every_candidate_differs_in_is_not_said_past_a_mapping_but_a_stride_is() -> None:
    """Modules built with padding=2 for Keras's 'causal' differ from both layers alike, but a chomp in the
    forward makes up for it: the refusal only asks for mapping=. Convs of 3x3 built with stride 1 for
    Keras's 2 differ in what no forward code around such a kernel makes up for: said first."""
    keras = pytest.importorskip("keras")
    x = keras.Input((10, 3))
    left = keras.layers.Conv1D(4, 3, padding="causal", name="left")(x)
    right = keras.layers.Conv1D(4, 3, padding="causal", name="right")(x)
    causal = _randomized(keras.Model(x, keras.layers.Add()([left, right])), 3)
    with pytest.raises(LayoutError, match="cannot prove which module each Keras layer fills") as caught:
        weightport.load(_TwinChomped(), causal)
    assert INCURABLE not in str(caught.value)
    assert "padding" not in str(caught.value)

    x = keras.Input((6, 5, 3))
    left = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="left")(x)
    right = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="right")(x)
    strided = _randomized(keras.Model(x, keras.layers.Add()([left, right])), 4)
    with pytest.raises(LayoutError) as caught:
        weightport.load(TwinConvs((True, True)), strided)
    said = str(caught.value)
    assert said.index(INCURABLE) < said.index("cannot prove which module each Keras layer fills")
    assert "expected stride=(2, 2) (Keras strides), found stride=(1, 1)" in said


def _torch_arrays(model: Any) -> dict[str, np.ndarray]:
    """The Keras convs' kernels in PyTorch's layout (out, in, *k), by layer name."""
    out = {}
    for name in ("a", "b"):
        kernel, bias = model.get_layer(name).get_weights()
        out[f"{name}.weight"] = np.ascontiguousarray(np.moveaxis(kernel, (-1, -2), (0, 1)))
        out[f"{name}.bias"] = bias
    return out


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
