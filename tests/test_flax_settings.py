"""Flax settings a params file cannot show, against Flax's own outputs: each is named in the report's
unchecked notes (a recurrent layer's direction, ``nn.Bidirectional``'s ``merge_fn``, a norm's axes, a
``DenseGeneral``'s ``axis``, an attention's heads in separate Linears), checked where the module declares
it (``num_heads``), and a kernel that holds several layers is refused for what it is.

Each case perturbs every param (non-zero biases), runs the Flax module (``module.apply``), saves msgpack,
loads it, and compares a twin that does what the note says within 1e-5; a refusal changes nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

import weightport
from _flax import flax_outputs, save_msgpack
from conftest import snapshot
from weightport import UncheckedConfigWarning
from weightport.errors import UnsupportedConfigError

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

TOL = 1e-5


def _flax(model: nn.Module, *inputs: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    return flax_outputs(model, *inputs, seed=0, noise=1)


_save = save_msgpack


def _load(module: tnn.Module, path: Path, **kwargs: Any) -> str:
    """Load, and return the unchecked notes' text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(module, path, **kwargs)
    return " ".join(str(w.message) for w in caught if issubclass(w.category, UncheckedConfigWarning))


def _close(got: torch.Tensor, expected: np.ndarray) -> None:
    got_np = got.detach().numpy()
    assert got_np.shape == expected.shape
    error = float(np.abs(got_np - expected).max() / max(1.0, float(np.abs(expected).max())))
    assert error <= TOL, error


def _refused(module: tnn.Module, path: Path, *words: str) -> str:
    before = snapshot(module)
    with pytest.raises(UnsupportedConfigError) as caught:
        weightport.load(module, path)
    assert snapshot(module) == before
    text = str(caught.value)
    for word in words:
        assert word in text, text
    return text


def _x(*shape: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- recurrent layers: direction and merge_fn ----------------------------------------------------------

CELLS: dict[str, tuple[Callable[[int], nn.Module], type[tnn.Module]]] = {
    "LSTM": (lambda h: nn.LSTMCell(h), tnn.LSTM),
    "GRU": (lambda h: nn.GRUCell(h), tnn.GRU),
    "RNN": (lambda h: nn.SimpleCell(h), tnn.RNN),
}


class _Twin(tnn.Module):
    def __init__(self, rnn: tnn.Module, flip_in: bool = False, flip_out: bool = False) -> None:
        super().__init__()
        self.rnn, self.flip_in, self.flip_out = rnn, flip_in, flip_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rnn(x.flip(1) if self.flip_in else x)[0]
        return y.flip(1) if self.flip_out else y


@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_a_reversed_rnn_is_named_unchecked_and_its_flipped_twin_matches(
    kind: str, keep_order: bool, tmp_path: Path
) -> None:
    make, torch_class = CELLS[kind]
    hidden = 5  # a (5, 5) hidden kernel: square, where no shape tells a direction

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.RNN(make(hidden), reverse=True, keep_order=keep_order, name="rnn")(x)

    x = _x(2, 7, 5)
    variables, expected = _flax(Model(), x)
    path = _save(variables, tmp_path)
    module = _Twin(torch_class(5, hidden, batch_first=True), flip_in=True, flip_out=keep_order)
    notes = _load(module, path)
    assert "Flax recurrent layers' direction (rnn[0])" in notes, notes
    assert "nn.RNN(reverse=True) runs the sequence backwards: flip the input's time axis" in notes
    assert "unless keep_order=True" in notes
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), expected)


def test_a_forward_rnn_still_loads_exactly(tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.RNN(nn.LSTMCell(6), name="rnn")(x)

    x = _x(2, 7, 5)
    variables, expected = _flax(Model(), x)
    module = _Twin(tnn.LSTM(5, 6, batch_first=True))
    _load(module, _save(variables, tmp_path))
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), expected)


def _swapped(a: Any, b: Any) -> Any:
    return jnp.concatenate([b, a], -1)


@pytest.mark.parametrize("merge", ["default", "swapped"])
def test_a_bidirectional_merge_fn_is_named_unchecked(merge: str, tmp_path: Path) -> None:
    hidden = 5

    class Model(nn.Module):
        def setup(self) -> None:
            kwargs = {"merge_fn": _swapped} if merge == "swapped" else {}
            self.rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(hidden)), nn.RNN(nn.GRUCell(hidden)), **kwargs)

        def __call__(self, x: Any) -> Any:
            return self.rnn(x)

    x = _x(2, 7, 5)
    variables, expected = _flax(Model(), x)
    module = tnn.Sequential()
    module.rnn = tnn.GRU(5, hidden, batch_first=True, bidirectional=True)
    notes = _load(module, _save(variables, tmp_path))
    assert (
        "Flax nn.Bidirectional's merge_fn (rnn[0]): PyTorch concatenates the forward then the backward"
        in notes
    )
    with torch.no_grad():
        y = module.rnn(torch.from_numpy(x))[0]
    if merge == "swapped":  # the twin the note asks for: the halves merged as the Flax merge_fn does
        y = torch.cat([y[..., hidden:], y[..., :hidden]], -1)
    _close(y, expected)


# --- norms: reduction_axes and feature_axes ------------------------------------------------------------


class _NormOver(tnn.Module):
    """A norm whose parameters are nn.LayerNorm(C)'s / nn.RMSNorm(C)'s, over the last ``axes`` axes."""

    def __init__(self, norm: tnn.Module, axes: int) -> None:
        super().__init__()
        self.norm, self.axes = norm, axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[-self.axes :]
        if isinstance(self.norm, tnn.LayerNorm):
            return F.layer_norm(x, shape, eps=self.norm.eps) * self.norm.weight + self.norm.bias
        return F.rms_norm(x, shape, eps=self.norm.eps) * self.norm.weight


@pytest.mark.parametrize("reduction_axes", [-1, (-2, -1)], ids=["default", "two-axes"])
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_a_norms_axes_are_named_unchecked(norm: str, reduction_axes: Any, tmp_path: Path) -> None:
    flax_class = getattr(nn, norm)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return flax_class(reduction_axes=reduction_axes, feature_axes=-1, name="norm")(x)

    x = _x(3, 8, 8) * 2 + 1  # (8, 8): the scale (8,) fits either axis
    variables, expected = _flax(Model(), x)
    axes = 1 if reduction_axes == -1 else 2
    module = _NormOver(getattr(tnn, norm)(8, eps=1e-6), axes)
    notes = _load(module, _save(variables, tmp_path))
    assert (
        f"Flax {norm}'s reduction_axes and feature_axes (-1, the defaults) must both be the module's last 1"
        in notes
    )
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), expected)


# --- attention into separate Linears: the heads --------------------------------------------------------


class _Projections(tnn.Module):
    """Flax's attention as four Linears, split into ``heads`` heads; the head count held under ``attribute``."""

    def __init__(self, sizes: tuple[int, int, int, int, int], heads: int, attribute: str | None) -> None:
        super().__init__()
        d_q, d_kv, flax_heads, head_dim, d_out = sizes
        width = flax_heads * head_dim
        self.split = heads
        if attribute is not None:
            setattr(self, attribute, heads)
        self.query, self.key, self.value = (
            tnn.Linear(d_q, width),
            tnn.Linear(d_kv, width),
            tnn.Linear(d_kv, width),
        )
        self.out = tnn.Linear(width, d_out)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.split, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.query(q)), heads(self.key(kv)), heads(self.value(kv)))
        return self.out(o.transpose(1, 2).flatten(2))


SIZES = {"square": (8, 8, 2, 4, 8), "other": (6, 7, 2, 4, 5)}


def _attention(
    sizes: tuple[int, int, int, int, int], tmp_path: Path
) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    d_q, d_kv, heads, head_dim, d_out = sizes

    class Model(nn.Module):
        @nn.compact
        def __call__(self, q: Any, kv: Any) -> Any:
            attention = nn.MultiHeadDotProductAttention(
                num_heads=heads, qkv_features=heads * head_dim, out_features=d_out, name="attn"
            )
            return attention(q, kv)

    q, kv = _x(2, 5, d_q, seed=3), _x(2, 3, d_kv, seed=4)
    variables, expected = _flax(Model(), q, kv)
    return _save(variables, tmp_path), expected, q, kv


def _wrapped(attention: tnn.Module) -> tnn.Module:
    model = tnn.Module()
    model.attn = attention
    return model


@pytest.mark.parametrize("attribute", ["num_heads", "num_attention_heads", "n_head"])
@pytest.mark.parametrize("sizes", sorted(SIZES))
def test_separate_linears_whose_module_declares_other_heads_are_refused(
    sizes: str, attribute: str, tmp_path: Path
) -> None:
    path, expected, q, kv = _attention(SIZES[sizes], tmp_path)
    _refused(
        _wrapped(_Projections(SIZES[sizes], 4, attribute)),
        path,
        "Flax attention 'attn' splits its projections into 2 heads of 4",
        "but 'attn', which holds 'attn.",
        f"has {attribute}=4: the weights fit, the outputs would not",
        f"Fix: build 'attn' with {attribute}=2",
    )
    module = _wrapped(_Projections(SIZES[sizes], 2, attribute))
    notes = _load(module, path)
    assert "heads of" not in notes, notes  # checked: nothing left unchecked about them
    with torch.no_grad():
        _close(module.attn(torch.from_numpy(q), torch.from_numpy(kv)), expected)


def test_a_declared_head_size_is_checked_too(tmp_path: Path) -> None:
    path, _, _, _ = _attention(SIZES["square"], tmp_path)
    module = _Projections(SIZES["square"], 2, None)
    module.attention_head_size = 2  # transformers' name; Flax's heads are 4 wide
    _refused(
        _wrapped(module), path, "has attention_head_size=2", "Fix: build 'attn' with attention_head_size=4"
    )


@pytest.mark.parametrize("sizes", sorted(SIZES))
def test_separate_linears_of_no_declared_heads_name_the_files_heads(sizes: str, tmp_path: Path) -> None:
    path, expected, q, kv = _attention(SIZES[sizes], tmp_path)
    for split in (2, 4):  # the twin's own split is invisible: the note names the file's
        module = _wrapped(_Projections(SIZES[sizes], split, None))
        notes = _load(module, path)
        assert "the file's attention 'attn' has 2 heads of 4" in notes, notes
        assert "split the projections so (features (..., 8) -> (2, 4))" in notes
        assert all(f"'attn.{p}'" in notes for p in ("query", "key", "value", "out"))
    module = _wrapped(_Projections(SIZES[sizes], 2, None))
    _load(module, path)
    with torch.no_grad():
        _close(module.attn(torch.from_numpy(q), torch.from_numpy(kv)), expected)


# --- DenseGeneral: axis and the order of its axes ------------------------------------------------------


class _Apply(tnn.Module):
    def __init__(self, linear: tnn.Linear, prepare: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.linear, self.prepare = linear, prepare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.prepare(x))


def test_a_dense_general_with_one_input_axis_names_its_axis(tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.DenseGeneral(6, axis=-2)(x)  # kernel (6, 6): square, a Dense's shape

    x = _x(3, 6, 6)
    variables, expected = _flax(Model(), x)
    module = _Apply(tnn.Linear(6, 6), lambda t: t.movedim(-2, -1))
    notes = _load(module, _save(variables, tmp_path))
    assert (
        "'linear': Flax DenseGeneral 'DenseGeneral_0' contracts one input axis of 6, the last unless its axis="
        in notes
    )
    assert "x.movedim(axis, -1)" in notes
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), expected)


@pytest.mark.parametrize("shape", [(3, 6, 6), (3, 4, 6)], ids=["square", "other"])
def test_a_dense_general_over_several_axes_names_their_order(shape: tuple[int, ...], tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.DenseGeneral((2, 3), axis=(-2, -1))(x)  # kernel (a, b, 2, 3), bias (2, 3)

    x = _x(*shape)
    variables, expected = _flax(Model(), x)
    a, b = shape[1:]
    module = _Apply(tnn.Linear(a * b, 6), lambda t: t.flatten(-2))
    notes = _load(module, _save(variables, tmp_path))
    assert f"contracts the input axes ({a}, {b})" in notes and f"x.flatten(-2) of (..., {a}, {b})" in notes, (
        notes
    )
    assert "its outputs (2, 3) come flattened in that order" in notes
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), expected.reshape(3, 6))


# --- kernels that hold several layers ------------------------------------------------------------------


def test_a_dense_general_with_batch_dims_is_refused_for_what_it_is(tmp_path: Path) -> None:
    for name, words in (
        (
            None,
            ("'DenseGeneral_0' has kernel (3, 6, 4) and bias (3, 4): a DenseGeneral with batch_dims=(0,)",),
        ),
        (
            "proj",
            ("reads two ways", "3 layers stacked along axis 0", "or a DenseGeneral with batch_dims=(0,)"),
        ),
    ):

        class Model(nn.Module):
            layer: str | None

            @nn.compact
            def __call__(self, x: Any) -> Any:
                return nn.DenseGeneral(4, batch_dims=(0,), name=self.layer)(x)

        variables, _ = _flax(Model(name), _x(3, 5, 6))
        text = _refused(
            tnn.Sequential(tnn.Linear(6, 4)),
            _save(variables, tmp_path),
            *words,
            "torch.einsum('b...i,bio->b...o'",
        )
        assert name or "nn.scan" not in text, text


class _Block(nn.Module):
    bias: bool

    @nn.compact
    def __call__(self, h: Any, _: Any) -> Any:
        return nn.tanh(nn.Dense(4, use_bias=self.bias)(h)), None


@pytest.mark.parametrize("lift", ["scan", "vmap"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_stacked_dense_is_refused_as_stacked_not_read_as_a_conv(
    lift: str, bias: bool, tmp_path: Path
) -> None:
    """kernel (4, 4, 4): a Conv1d's kernel (k, in, out) of the same shape; with a bias (4, 4), a
    DenseGeneral's (in, (4, 4)) too. The name Dense_0 says it is neither."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            if lift == "scan":
                block = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
                return block(bias)(x, None)[0]
            block = nn.vmap(
                _Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, None)
            )
            return block(bias)(x, None)[0]

    variables, _ = _flax(Model(), _x(4, 4) if lift == "scan" else _x(4, 2, 4))
    path = _save(variables, tmp_path)
    words = [
        "Dense_0' has kernel (4, 4, 4)",
        "4 layers stacked along axis 0 (by nn.scan or nn.vmap",
        "unstack",
    ]
    for twin in (
        tnn.Sequential(*[tnn.Linear(4, 4, bias=bias) for _ in range(4)]),
        tnn.Sequential(tnn.Conv1d(4, 4, 4, bias=bias)),
        tnn.Sequential(tnn.Linear(4, 16, bias=bias)),
    ):
        _refused(twin, path, *words)
