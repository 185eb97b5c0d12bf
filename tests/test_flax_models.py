"""Flax layers beyond Dense and Conv (issue 12), against real Flax outputs: attention and DenseGeneral,
ConvTranspose, GroupNorm and depthwise Conv; each kind's refusal for what PyTorch cannot express.

Each case builds the layer in Flax (JAX on the CPU), perturbs its params (non-zero biases), runs it, saves
the variables as msgpack, loads them into the PyTorch twin and compares outputs within 1e-5 (relative to
the output's scale); a refusal leaves the module bit for bit as it was.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

import weightport
from _flax import flax_outputs, perturbed, save_msgpack
from conftest import snapshot
from weightport import UncheckedConfigWarning, WeightportError
from weightport.errors import UnsupportedConfigError
from weightport.layouts import flax as flax_layout

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402

TOL = 1e-5


def _perturb(tree: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return perturbed(tree, rng, 0.1)


def _flax(model: nn.Module, *inputs: np.ndarray, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Perturbed variables and Flax's output for ``inputs``."""
    return flax_outputs(model, *inputs, seed=seed, scale=0.1)


_save = save_msgpack


def _load(module: tnn.Module, source: Any, **kwargs: Any) -> weightport.LoadReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, source, layout="flax", **kwargs)


def _refused(module: tnn.Module, source: Any, error: type[Exception], match: str) -> None:
    before = snapshot(module)
    with pytest.raises(error, match=match):
        _load(module, source)
    assert snapshot(module) == before


def _close(got: torch.Tensor | np.ndarray, expected: np.ndarray) -> None:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == expected.shape
    error = float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))
    assert error <= TOL, error


# --- attention and DenseGeneral ------------------------------------------------------------------------

E, HEADS = 32, 4
Q = np.random.default_rng(5).normal(size=(2, 5, E)).astype(np.float32)
KV = np.random.default_rng(6).normal(size=(2, 3, E)).astype(np.float32)
KV7 = np.random.default_rng(7).normal(size=(2, 3, 7)).astype(np.float32)


class FlaxAttention(nn.Module):
    heads: int = HEADS
    qkv: int | None = None
    out: int | None = None
    normalize_qk: bool = False

    @nn.compact
    def __call__(self, q: Any, kv: Any) -> Any:
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.qkv,
            out_features=self.out,
            normalize_qk=self.normalize_qk,
            name="attn",
        )
        return attn(q, kv)


class TorchAttention(tnn.Module):
    def __init__(self, embed: int, heads: int, **kwargs: Any) -> None:
        super().__init__()
        self.attn = tnn.MultiheadAttention(embed, heads, batch_first=True, **kwargs)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv, need_weights=False)[0]


class SeparateAttention(tnn.Module):
    """Flax's attention written with one Linear per DenseGeneral, of any size."""

    def __init__(self, d_q: int, d_kv: int, heads: int, head_dim: int, d_out: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = tnn.Linear(d_q, heads * head_dim)
        self.key = tnn.Linear(d_kv, heads * head_dim)
        self.value = tnn.Linear(d_kv, heads * head_dim)
        self.out = tnn.Linear(heads * head_dim, d_out)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(q)), split(self.key(kv)), split(self.value(kv)))
        return self.out(out.transpose(1, 2).flatten(2))


def _torch_out(module: tnn.Module, *inputs: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return module(*(torch.from_numpy(x) for x in inputs))


def test_flax_attention_into_multihead_attention(tmp_path: Path) -> None:
    variables, expected = _flax(FlaxAttention(), Q, KV)
    assert variables["params"]["attn"]["query"]["kernel"].shape == (E, HEADS, E // HEADS)
    module = TorchAttention(E, HEADS)
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, Q, KV), expected)
    assert [(p.source_layer, p.module_path, p.how) for p in report.pairings] == [("attn", "attn", "by name")]
    assert len(report.written) == len(module.state_dict())


def test_flax_attention_at_the_root_pairs_by_kind_and_shape(tmp_path: Path) -> None:
    attention = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    variables, expected = _flax(attention, Q, KV)
    module = tnn.MultiheadAttention(E, HEADS, batch_first=True)
    _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, Q, KV, KV)[0], expected)


def test_flax_attention_with_other_key_and_value_sizes_into_kdim_vdim(tmp_path: Path) -> None:
    variables, expected = _flax(FlaxAttention(), Q, KV7)
    module = TorchAttention(E, HEADS, kdim=7, vdim=7)
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, Q, KV7), expected)
    assert "attn.k_proj_weight" in report.written
    _refused(TorchAttention(E, HEADS), _save(variables, tmp_path), WeightportError, r"kdim=7, vdim=7")


@pytest.mark.parametrize("sizes", [(E, E, HEADS, E // HEADS, E), (6, 7, 4, 2, 6)], ids=["square", "other"])
def test_flax_attention_into_separate_linears_of_any_size(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    d_q, d_kv, heads, head_dim, d_out = sizes
    q, kv = Q[..., :d_q], np.concatenate([KV, KV], -1)[..., :d_kv]
    variables, expected = _flax(FlaxAttention(heads, heads * head_dim, d_out), q, kv)
    module = SeparateAttention(d_q, d_kv, heads, head_dim, d_out)
    wrapper = tnn.Module()
    wrapper.attn = module
    report = _load(wrapper, _save(variables, tmp_path))
    _close(_torch_out(module, q, kv), expected)
    assert {p.source_kind for p in report.pairings} == {"DenseGeneral"}
    assert {p.how for p in report.pairings} == {"by name"}


def test_flax_attention_nn_multihead_attention_cannot_express_is_refused(tmp_path: Path) -> None:
    # queries 6 wide, 4 heads x 2 = 8 features, output 6: nn.MultiheadAttention has one width for all three
    variables, _ = _flax(FlaxAttention(HEADS, 8, 6), Q[..., :6], KV[..., :6])
    _refused(
        TorchAttention(6, 2),
        _save(variables, tmp_path),
        UnsupportedConfigError,
        r"query input 6, 4 heads x 2 = 8 features, output 6",
    )
    # the same weights' shapes, other heads: only the outputs would differ
    variables, _ = _flax(FlaxAttention(), Q, KV)
    _refused(
        TorchAttention(E, 2),
        _save(variables, tmp_path),
        UnsupportedConfigError,
        r"into 4 heads of 8, the module into num_heads=2",
    )
    variables, _ = _flax(FlaxAttention(normalize_qk=True), Q, KV)
    _refused(
        TorchAttention(E, HEADS), _save(variables, tmp_path), UnsupportedConfigError, r"normalize_qk=True"
    )


class FlaxDenseGeneral(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        y = nn.DenseGeneral(features=(4, 3))(x)  # kernel (6, 4, 3), bias (4, 3)
        return nn.DenseGeneral(features=5, axis=(-2, -1))(y)  # kernel (4, 3, 5), bias (5,)


class TorchDenseGeneral(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = tnn.Linear(6, 12)
        self.second = tnn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_flax_dense_general_is_a_matmul_after_a_reshape(tmp_path: Path) -> None:
    x = Q[:, 0, :6]
    variables, expected = _flax(FlaxDenseGeneral(), x)
    module = TorchDenseGeneral()
    report = _load(module, _save(variables, tmp_path), example_inputs=(torch.from_numpy(x),))
    _close(_torch_out(module, x), expected)
    assert [p.source_kind for p in report.pairings] == ["DenseGeneral", "DenseGeneral"]
    # (4, 3, 5) reshapes to a (4, 15) matrix too, but its bias (5,) says the features are the last axis
    wrong = TorchDenseGeneral()
    wrong.second = tnn.Linear(4, 15)
    before = snapshot(wrong)
    with pytest.raises(
        WeightportError, match=r"DenseGeneral 'DenseGeneral_1' has kernel \(4, 3, 5\) and bias"
    ):
        _load(
            wrong, _save(variables, tmp_path), mapping={"DenseGeneral_0": "first", "DenseGeneral_1": "second"}
        )
    assert snapshot(wrong) == before


# --- ConvTranspose, GroupNorm, depthwise Conv ----------------------------------------------------------

IMAGE = np.random.default_rng(8).normal(size=(2, 6, 5, 4)).astype(np.float32)  # channels last


def _channels_first(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def _image(dims: int) -> np.ndarray:
    return IMAGE[:, :, 0] if dims == 1 else IMAGE


CONV_TRANSPOSE_CASES = [  # dims, kernel, stride, padding, transpose_kernel, features
    (2, 3, 2, "VALID", False, 5),
    (2, 4, 2, "SAME", False, 5),
    (2, 3, 2, [(1, 2), (1, 2)], True, 5),
    (2, 3, 1, "SAME", False, 4),  # as many inputs as outputs: read as transpose_kernel=False
    (1, 2, 3, "SAME", True, 5),
    (1, 5, 2, [(2, 2)], False, 5),
]


@pytest.mark.parametrize(
    "case", CONV_TRANSPOSE_CASES, ids=lambda c: f"{c[0]}d-k{c[1]}s{c[2]}-{c[3]}-tk{c[4]}"
)
def test_flax_conv_transpose_into_conv_transpose(tmp_path: Path, case: tuple[Any, ...]) -> None:
    dims, k, s, padding, transpose_kernel, features = case
    x = _image(dims)
    flax_model = nn.ConvTranspose(
        features, (k,) * dims, strides=(s,) * dims, padding=padding, transpose_kernel=transpose_kernel
    )
    variables, expected = _flax(flax_model, x)
    pad, extra = flax_layout.torch_padding((k,) * dims, (s,) * dims, padding)
    cls = tnn.ConvTranspose1d if dims == 1 else tnn.ConvTranspose2d
    module = cls(4, features, k, stride=s, padding=pad, output_padding=extra)
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, _channels_first(x)), _channels_first(expected))
    assert report.pairings[0].source_kind == "ConvTranspose"
    if not transpose_kernel:  # export writes Flax's default form, which loads back bit for bit
        exported = flax_layout.export(module)
        assert np.array_equal(exported[f"params/ConvTranspose{dims}d/kernel"], variables["params"]["kernel"])


def test_flax_conv_and_conv_transpose_by_their_flax_names(tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.ConvTranspose(3, (4, 4), strides=(2, 2))(nn.Conv(6, (3, 3))(x))

    variables, expected = _flax(Model(), IMAGE)
    module = tnn.Sequential(tnn.Conv2d(4, 6, 3, padding=1), tnn.ConvTranspose2d(6, 3, 4, stride=2, padding=1))
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, _channels_first(IMAGE)), _channels_first(expected))
    assert [(p.source_layer, p.source_kind) for p in report.pairings] == [
        ("Conv_0", "Conv (2-D)"),
        ("ConvTranspose_0", "ConvTranspose"),
    ]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 2, "SAME"), (3, 1, [(1, 2)]), (2, 3, [(2, 2)]), (3, 2, "CIRCULAR")]
)
def test_flax_conv_transpose_padding_pytorch_cannot_express_is_refused(
    kernel: int, stride: int, padding: Any
) -> None:
    """Each is checked against Flax: no padding/output_padding of PyTorch's gives Flax's output."""
    x = IMAGE[:, :, 0]
    flax_model = nn.ConvTranspose(5, (kernel,), strides=(stride,), padding=padding)
    variables, expected = _flax(flax_model, x)
    weight = torch.from_numpy(np.ascontiguousarray(variables["params"]["kernel"][::-1].transpose(1, 2, 0)))
    for pad in range(kernel):
        for extra in range(stride):
            module = tnn.ConvTranspose1d(4, 5, kernel, stride=stride, padding=pad, output_padding=extra)
            with torch.no_grad():
                module.weight.copy_(weight)
                module.bias.copy_(torch.from_numpy(variables["params"]["bias"]))
            out = _torch_out(module, _channels_first(x)).numpy()
            assert (
                out.shape != _channels_first(expected).shape
                or np.abs(out - _channels_first(expected)).max() > 1e-3
            )
    with pytest.raises(UnsupportedConfigError, match="PyTorch"):
        flax_layout.torch_padding((kernel,), (stride,), padding)


def test_flax_conv_transpose_into_grouped_module_is_refused(tmp_path: Path) -> None:
    variables, _ = _flax(nn.ConvTranspose(4, (3, 3)), IMAGE)
    _refused(tnn.ConvTranspose2d(4, 4, 3, groups=2), _save(variables, tmp_path), WeightportError, "groups=2")
    with pytest.raises(UnsupportedConfigError, match="no feature groups"):
        flax_layout.export(tnn.ConvTranspose2d(4, 4, 3, groups=2))


def test_flax_group_norm_into_group_norm(tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.GroupNorm(num_groups=3)(nn.Conv(6, (3, 3))(x))

    variables, expected = _flax(Model(), IMAGE)
    module = tnn.Sequential(tnn.Conv2d(4, 6, 3, padding=1), tnn.GroupNorm(3, 6, eps=1e-6))
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, _channels_first(IMAGE)), _channels_first(expected))
    assert report.pairings[1].source_kind == "GroupNorm"
    assert any("num_groups" in note for note in report.unchecked)
    exported = flax_layout.export(module, names={"0": "Conv_0", "1": "GroupNorm_0"})
    assert np.array_equal(exported["params/GroupNorm_0/scale"], variables["params"]["GroupNorm_0"]["scale"])
    # an nn.GroupNorm without affine params has no place for Flax's scale and bias
    _refused(
        tnn.Sequential(tnn.Conv2d(4, 6, 3, padding=1), tnn.GroupNorm(3, 6, eps=1e-6, affine=False)),
        _save(variables, tmp_path),
        WeightportError,
        "GroupNorm_0",
    )


@pytest.mark.parametrize("groups", [3, 6], ids=["grouped", "depthwise"])
def test_flax_grouped_conv_into_conv_groups(tmp_path: Path, groups: int) -> None:
    x = np.concatenate([IMAGE, IMAGE[..., :2]], -1)  # 6 channels
    variables, expected = _flax(nn.Conv(6, (3, 3), feature_group_count=groups), x)
    assert variables["params"]["kernel"].shape == (3, 3, 6 // groups, 6)
    module = tnn.Conv2d(6, 6, 3, padding=1, groups=groups)
    _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, _channels_first(x)), _channels_first(expected))
    other = 2 if groups == 3 else 3  # the same sizes in other groups: the kernel's shape differs
    _refused(
        tnn.Conv2d(6, 6, 3, padding=1, groups=other), _save(variables, tmp_path), WeightportError, "weight"
    )


def test_flax_layer_norm_is_not_read_as_a_group_norm(tmp_path: Path) -> None:
    """Their params are alike (scale, bias per channel); Flax's name LayerNorm_0 says which it computes."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.LayerNorm()(nn.Conv(6, (3, 3))(x))

    variables, _ = _flax(Model(), IMAGE)
    module = tnn.Sequential(tnn.Conv2d(4, 6, 3, padding=1), tnn.GroupNorm(3, 6))
    _refused(module, _save(variables, tmp_path), WeightportError, "LayerNorm_0")


def test_nnx_multi_head_attention_into_multihead_attention() -> None:
    from flax import nnx

    attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=E, rngs=nnx.Rngs(0), decode=False)
    state = _perturb(nnx.state(attention, nnx.Param).to_pure_dict(), np.random.default_rng(9))
    nnx.update(attention, state)
    expected = np.asarray(attention(Q, KV))
    module = tnn.MultiheadAttention(E, HEADS, batch_first=True)
    report = _load(module, state)
    _close(_torch_out(module, Q, KV, KV)[0], expected)
    assert report.pairings[0].source_kind == "MultiHeadDotProductAttention"


def test_dense_general_named_by_its_author_is_told_from_a_conv_by_the_module(tmp_path: Path) -> None:
    """kernel (4, 3, 5) and bias (5,) are a 1-D Conv's params too; the module's Linear at 'proj' says which."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.DenseGeneral(5, axis=(-2, -1), name="proj")(x)

    x = Q[:, :4, :3]
    variables, expected = _flax(Model(), x)
    module = tnn.Module()
    module.proj = tnn.Linear(12, 5)
    report = _load(module, _save(variables, tmp_path))
    _close(_torch_out(module.proj, x.reshape(2, 12)), expected)
    assert report.pairings[0].source_kind == "DenseGeneral"


@pytest.mark.parametrize("extra", ["add_zero_attn", "add_bias_kv"])
def test_flax_attention_into_module_attending_an_extra_position_is_refused(
    tmp_path: Path, extra: str
) -> None:
    variables, _ = _flax(FlaxAttention(), Q, KV)
    _refused(
        TorchAttention(E, HEADS, **{extra: True}), _save(variables, tmp_path), UnsupportedConfigError, extra
    )


def test_flax_attention_without_biases(tmp_path: Path) -> None:
    class Model(nn.Module):
        @nn.compact
        def __call__(self, q: Any, kv: Any) -> Any:
            return nn.MultiHeadDotProductAttention(num_heads=HEADS, use_bias=False, name="attn")(q, kv)

    variables, expected = _flax(Model(), Q, KV)
    module = TorchAttention(E, HEADS, bias=False)
    _load(module, _save(variables, tmp_path))
    _close(_torch_out(module, Q, KV), expected)


class BuiltBeforeCalled(nn.Module):
    """Flax numbers a compact submodule when it is built: 'Dense_0' is built first but runs second."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        head = nn.Dense(4)
        body = nn.Dense(4)
        return head(nn.relu(body(x)))


class NumberedDownwards(nn.Module):
    """An author's numbers: the stages run Up_2, Up_1, Up_0."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        for i in reversed(range(3)):
            x = nn.relu(nn.Dense(4, name=f"Up_{i}")(x))
        return x


@pytest.mark.parametrize(("model", "count"), [(BuiltBeforeCalled(), 2), (NumberedDownwards(), 3)])
def test_numbers_the_file_order_contradicts_are_no_order(
    model: nn.Module, count: int, tmp_path: Path
) -> None:
    """The params dict holds the layers in the order they first ran; where that contradicts their numbers,
    neither is taken (the numbers paired them crossed, silently); mapping= loads them exactly."""
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    variables, expected = _flax(model, x)
    path = _save(variables, tmp_path)
    names = list(variables["params"])
    layers: list[tnn.Module] = []
    for _ in range(count):
        layers += [tnn.Linear(4, 4), tnn.ReLU()]
    net = tnn.Sequential(*(layers[:-1] if count == 2 else layers))
    before = snapshot(net)
    with pytest.raises(WeightportError, match="lists these layers in another order than their numbers"):
        weightport.load(net, path)
    assert snapshot(net) == before
    # the file's order is the order they ran in: the first listed fills the first Linear
    weightport.load(net, path, mapping={name: str(2 * i) for i, name in enumerate(names)})
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=TOL)


class WithRMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.RMSNorm()(nn.Dense(6)(x))


def test_an_rmsnorm_fills_an_rmsnorm_and_not_a_layernorm(tmp_path: Path) -> None:
    """Its params are a scale alone, as a LayerNorm's without bias: Flax's name says which it computes."""
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    variables, expected = _flax(WithRMSNorm(), x)
    path = _save(variables, tmp_path)
    twin = tnn.Sequential(tnn.Linear(4, 6), tnn.RMSNorm(6, eps=1e-6))
    with pytest.warns(UncheckedConfigWarning, match="Flax RMSNorm's epsilon"):
        weightport.load(twin, path)
    with torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), expected, atol=TOL)
    with pytest.raises(
        WeightportError, match=r"1 Flax RMSNorm layer \('RMSNorm_0'\); the model has no nn.RMSNorm"
    ):
        weightport.load(tnn.Sequential(tnn.Linear(4, 6), tnn.LayerNorm(6, eps=1e-6, bias=False)), path)


class _FlaxCnn(nn.Module):
    """Flax's MNIST example's shape: Conv, then a reshape of the (height, width, channels) map, then Dense."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.Conv(4, (3, 3), padding="SAME")(x)
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class _TorchCnn(tnn.Module):
    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.channels_last = (
            tnn.Conv2d(2, 4, 3, padding=1),
            tnn.Linear(4 * 3 * 5, 3),
            channels_last,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((h.permute(0, 2, 3, 1) if self.channels_last else h).flatten(1))


class _FcFirst(_TorchCnn):
    """The same forward, its Linear registered before its conv."""

    def __init__(self) -> None:
        tnn.Module.__init__(self)
        self.fc, self.conv, self.channels_last = (
            tnn.Linear(4 * 3 * 5, 3),
            tnn.Conv2d(2, 4, 3, padding=1),
            False,
        )


class _OtherWidth(_TorchCnn):
    """The same forward, with a module of its own whose output is as wide as the flattened map."""

    def __init__(self) -> None:
        super().__init__(channels_last=False)
        self.table = tnn.Embedding(4, 4 * 3 * 5)


def test_a_dense_that_may_read_a_map_is_refused_or_noted_whatever_the_registration_order(
    tmp_path: Path,
) -> None:
    """Without example_inputs=, a Linear registered before the conv loaded silently (2.0 off): registration
    order proves nothing of the forward's, so its width, positions of the conv's channels, refuses it; where a
    module also outputs that width, either may feed it, and the load warns that the flatten is unchecked."""
    x = np.random.default_rng(4).standard_normal((2, 3, 5, 2)).astype(np.float32)
    variables, _ = _flax(_FlaxCnn(), x)
    path = _save(variables, tmp_path)
    with pytest.raises(WeightportError, match=r"takes 60 inputs, 15 positions of a map of 4 channels"):
        weightport.load(_FcFirst(), path, layout="flax")
    with pytest.warns(
        UncheckedConfigWarning, match=r"whether Flax Dense 'Dense_0' reads a flattened feature map"
    ):
        weightport.load(_OtherWidth(), path, layout="flax", strict=False)


def test_a_dense_after_a_reshaped_map_needs_the_flatten_order_shown(tmp_path: Path) -> None:
    """The checkpoint records no reshape: a model that flattens its NCHW map (rows (channels, height,
    width)) is refused where example_inputs= shows it; one that permutes channels-last first gives Flax's
    outputs; without example_inputs= a Dense whose inputs are positions of the conv's channels is refused."""
    x = np.random.default_rng(4).standard_normal((2, 3, 5, 2)).astype(np.float32)
    variables, expected = _flax(_FlaxCnn(), x)
    path = _save(variables, tmp_path)
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2)
    module = _TorchCnn(channels_last=False)
    before = snapshot(module)
    with pytest.raises(WeightportError, match=r"flattens a channels-first map \(4, 3, 5\) into 'fc'"):
        weightport.load(module, path, layout="flax", example_inputs=inputs)
    assert snapshot(module) == before
    with pytest.raises(
        WeightportError, match=r"Flax Dense 'Dense_0' in 'fc' takes 60 inputs, 15 positions of a map of 4"
    ):
        weightport.load(module, path, layout="flax")
    assert snapshot(module) == before
    faithful = _TorchCnn(channels_last=True).eval()
    _load(faithful, path, example_inputs=inputs)
    with torch.no_grad():
        np.testing.assert_allclose(faithful(inputs).numpy(), expected, rtol=1e-5, atol=1e-5)
