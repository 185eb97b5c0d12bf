"""More Keras layer kinds, against Keras's own outputs: DepthwiseConv1D/2D, SeparableConv1D/2D (one layer filling a
depthwise and a pointwise conv), Conv1DTranspose/Conv2DTranspose, GroupNormalization; Normalization and
Rescaling reported with their values; padding by ZeroPadding2D and strided 'same' into modules that pad so
(timm's Conv2dSame), and refused with the amounts where a fixed padding cannot. Every comparison in inference
mode, to 1e-5 of the output's scale.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from _vision import timm  # noqa: E402
from conftest import nchw  # noqa: E402
from weightport.errors import ForwardNoteWarning, LayoutError, LoadError, UncheckedConfigWarning  # noqa: E402
from weightport.layouts.keras import export, save_weights_h5  # noqa: E402

B = 2


def randomize(model: Any, rng: np.random.Generator) -> None:
    model.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights])


def files(model: Any, tmp_path: Path) -> dict[str, Any]:
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    return {".keras": tmp_path / "m.keras", ".weights.h5": tmp_path / "m.weights.h5", "live": model}


def load(target: nn.Module, source: Any) -> weightport.LoadReport:
    """``weightport.load``; a bare ``.weights.h5`` records no settings, and says so."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore" if str(source).endswith(".weights.h5") else "error", UncheckedConfigWarning
        )
        warnings.simplefilter("ignore", ForwardNoteWarning)  # notes on forward: tests/test_messages_notes.py
        return weightport.load(target, source)


def close(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
    assert error < 1e-5, error
    return error


# ---- the new kinds load, and give Keras's outputs -------------------------------------------------------

Case = tuple[
    Callable[[], list[Any]],
    tuple[int, ...],
    Callable[[], nn.Module],
    Callable[[nn.Module, torch.Tensor], torch.Tensor],
]
CASES: dict[str, Case] = {
    "depthwise_multiplier_2": (lambda: [keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")], (7, 6, 4), lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), lambda m, x: m(x)),
    "depthwise_strided_no_bias": (lambda: [keras.layers.DepthwiseConv2D((3, 2), strides=2, use_bias=False, dilation_rate=1)], (9, 8, 3), lambda: nn.Conv2d(3, 3, (3, 2), stride=2, groups=3, bias=False), lambda m, x: m(x)),
    "separable": (lambda: [keras.layers.SeparableConv2D(5, 3, padding="same", depth_multiplier=2)], (6, 6, 3), lambda: nn.Sequential(OrderedDict(depthwise=nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False), pointwise=nn.Conv2d(6, 5, 1))), lambda m, x: m(x)),
    "depthwise1d_dilated_same": (lambda: [keras.layers.DepthwiseConv1D(3, depth_multiplier=3, padding="same", dilation_rate=2)], (9, 4), lambda: nn.Conv1d(4, 12, 3, padding=2, dilation=2, groups=4), lambda m, x: m(x)),
    "separable1d_strided": (lambda: [keras.layers.SeparableConv1D(5, 3, strides=2, depth_multiplier=2)], (9, 3), lambda: nn.Sequential(OrderedDict(depthwise=nn.Conv1d(3, 6, 3, stride=2, groups=3, bias=False), pointwise=nn.Conv1d(6, 5, 1))), lambda m, x: m(x)),
    "conv2d_transpose_valid": (lambda: [keras.layers.Conv2DTranspose(3, 3, strides=2)], (4, 5, 2), lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), lambda m, x: m(x)),
    "conv2d_transpose_same": (lambda: [keras.layers.Conv2DTranspose(3, 4, strides=2, padding="same")], (4, 5, 2), lambda: nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1), lambda m, x: m(x)),
    "conv2d_transpose_same_s3": (lambda: [keras.layers.Conv2DTranspose(2, 2, strides=3, padding="same")], (3, 4, 2), lambda: nn.ConvTranspose2d(2, 2, 2, stride=3, output_padding=1), lambda m, x: m(x)),
    "conv1d_transpose": (lambda: [keras.layers.Conv1DTranspose(4, 3, strides=2, use_bias=False)], (5, 3), lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, bias=False), lambda m, x: m(x)),
    "group_norm": (lambda: [keras.layers.GroupNormalization(groups=3, epsilon=1e-3)], (4, 5, 6), lambda: nn.GroupNorm(3, 6, eps=1e-3), lambda m, x: m(x)),
    "group_norm_no_center": (lambda: [keras.layers.GroupNormalization(groups=2, center=False)], (3, 4), lambda: nn.GroupNorm(2, 4, eps=1e-3), lambda m, x: m(x)),
    "zero_padding_then_valid": (lambda: [keras.layers.ZeroPadding2D(((1, 1), (2, 2))), keras.layers.Conv2D(4, 3, strides=2)], (7, 6, 3), lambda: nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2)), lambda m, x: m(x)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_new_kinds_give_keras_outputs(name: str, tmp_path: Path) -> None:
    layers, shape, module, run = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    model = keras.Sequential([keras.Input(shape), *layers()])
    randomize(model, rng)
    x = rng.standard_normal((B, *shape)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    for kind, source in files(model, tmp_path).items():
        target = module().eval()
        if kind == ".weights.h5" and name.endswith("no_center"):  # gamma alone, or beta alone? Not said
            with pytest.raises(LayoutError, match=r"does not record which of gamma \(scale=False\) and beta"):
                load(target, source)
            continue
        report = load(target, source)
        close(nchw(lambda t, m=target: run(m, t), x), expected)
        assert report.pairings, kind


def test_depthwise_output_channel_is_input_times_multiplier_plus_m(tmp_path: Path) -> None:
    """Keras's output channel ``i * multiplier + m`` reads input channel ``i``: a kernel that is zero
    except for input 1, multiplier slot 0 moves input 1 to output 2 only."""
    model = keras.Sequential(
        [keras.Input((3, 3, 2)), keras.layers.DepthwiseConv2D(1, depth_multiplier=2, use_bias=False)]
    )
    kernel = np.zeros((1, 1, 2, 2), np.float32)
    kernel[0, 0, 1, 0] = 1.0
    model.set_weights([kernel])
    conv = nn.Conv2d(2, 4, 1, groups=2, bias=False)
    weightport.load(conv, model)
    assert conv.weight[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_separable_halves_pair_by_recorded_and_call_order(tmp_path: Path) -> None:
    """Two SeparableConv2D of one shape in a Sequential: the four halves pair by Keras's order and
    nn.Sequential's, each half named in the report."""
    rng = np.random.default_rng(3)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.SeparableConv2D(4, 3, padding="same"),
            keras.layers.SeparableConv2D(4, 3, padding="same"),
        ]
    )
    randomize(model, rng)
    x = rng.standard_normal((B, 6, 6, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    for source in files(model, tmp_path).values():
        target = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 4, 1),
            nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 4, 1),
        )  # fmt: skip
        report = load(target, source)
        close(nchw(target, x), expected)
        names = [p.source_layer for p in report.pairings]
        assert names[0].endswith("/depthwise") and names[1].endswith("/pointwise"), names
        assert all("order" in p.how or "unique" in p.how for p in report.pairings)


def test_normalization_and_rescaling_are_reported_with_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    norm = keras.layers.Normalization()
    norm.adapt(rng.standard_normal((50, 3)).astype(np.float32) * 2 + 1)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Rescaling(0.5, offset=-1.0), norm, keras.layers.Dense(2)]
    )
    x = rng.standard_normal((B, 3)).astype(np.float32)
    expected = np.asarray(model(x))
    mean, variance = (np.asarray(v) for v in norm.weights[:2])
    for kind, source in {k: v for k, v in files(model, tmp_path).items() if k != "live"}.items():
        dense = nn.Linear(3, 2)
        report = load(dense, source)
        ignored = " ".join(report.ignored)
        assert "Keras Normalization" in ignored and f"{float(mean.reshape(-1)[0]):.6g}" in ignored, ignored
        where = "before the model, on its input" if kind == ".keras" else "where the Keras model applies it"
        assert (
            f"compute (x - mean) / sqrt(variance) {where}" in ignored
        )  # a weights-only file shows no wiring
        if kind == ".keras":
            assert "Keras Rescaling" in ignored and "scale 0.5, offset -1" in ignored, ignored
        xt = (x * 0.5 - 1.0 - mean.reshape(-1)) / np.sqrt(variance.reshape(-1))  # the preprocessing, by hand
        with torch.no_grad():
            close(dense(torch.from_numpy(xt.astype(np.float32))).numpy(), expected)


# ---- padding: into modules that pad so, and refused where a fixed padding cannot -----------------------


def test_strided_same_and_zero_padding_load_into_timm_conv2d_same(tmp_path: Path) -> None:
    Conv2dSame = timm().layers.Conv2dSame
    rng = np.random.default_rng(5)
    inputs = keras.Input((8, 10, 3))
    y = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    y = keras.layers.ZeroPadding2D(((0, 1), (1, 1)))(y)  # what TF's 'same' pads a (4, 5) map: correct_pad
    y = keras.layers.DepthwiseConv2D(3, strides=2)(y)
    model = keras.Model(inputs, y)
    randomize(model, rng)
    x = rng.standard_normal((B, 8, 10, 3)).astype(np.float32)
    expected = np.asarray(model(x))
    for kind in (".keras",):
        target = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), Conv2dSame(4, 4, 3, stride=2, groups=4))
        report = weightport.load(target, files(model, tmp_path)[kind])  # Conv2dSame pads: no note on forward
        close(nchw(target, x), expected)
        assert "Conv2dSame pads inputs of the size it was built for" in report.pairings[1].how
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        model.save(tmp_path / "m.h5")  # records no size a layer was built for
    target = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), Conv2dSame(4, 4, 3, stride=2, groups=4))
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(
        weightport.LoadError, match=r"expected padding \(before, after\) per axis = \(\(0, 1\)"
    ):
        weightport.load(target, tmp_path / "m.h5")
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    nchw_x = torch.from_numpy(x).permute(0, 3, 1, 2)  # the forward pass gives the size: (4, 5) at the second
    report = weightport.load(target, tmp_path / "m.h5", example_inputs=nchw_x)
    close(nchw(target, x), expected)
    assert "Conv2dSame pads inputs of the size it was built for ((4, 5))" in report.pairings[1].how


def test_zero_padding_into_an_unpadded_conv_says_to_pad(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.ZeroPadding2D(((0, 1), (2, 0))), keras.layers.Conv2D(3, 3)]
    )
    randomize(model, rng)
    x = rng.standard_normal((B, 6, 6, 2)).astype(np.float32)
    conv = nn.Conv2d(2, 3, 3)
    model.save(tmp_path / "m.keras")
    with pytest.warns(
        ForwardNoteWarning, match=r"pads the input by \(\(0, 1\), \(2, 0\)\).*pad it so in forward"
    ):
        report = weightport.load(conv, tmp_path / "m.keras")
    assert "pads the input by ((0, 1), (2, 0))" in report.pairings[0].how
    close(nchw(lambda t: conv(F.pad(t, (2, 0, 0, 1))), x), np.asarray(model(x)))


REFUSED: dict[str, tuple[Callable[[], list[Any]], tuple[int, ...], Callable[[], nn.Module], str]] = {
    "depthwise_other_groups": (lambda: [keras.layers.DepthwiseConv2D(1, depth_multiplier=2)], (4, 4, 2), lambda: nn.Conv2d(4, 4, 1, groups=4), r"expected groups=2 and in_channels=2 \(Keras DepthwiseConv2D"),
    "depthwise1d_other_groups": (lambda: [keras.layers.DepthwiseConv1D(1, depth_multiplier=2)], (4, 2), lambda: nn.Conv1d(4, 4, 1, groups=4), r"expected groups=2 and in_channels=2 \(Keras DepthwiseConv1D"),
    "same_stride_2_symmetric": (lambda: [keras.layers.Conv2D(3, 3, strides=2, padding="same")], (6, 6, 2), lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), r"axis 0: n % 2 == 0: \(0, 1\), n % 2 == 1: \(1, 1\)"),
    "zero_padding_asymmetric_into_padded": (lambda: [keras.layers.ZeroPadding2D(((0, 1), (0, 1))), keras.layers.Conv2D(3, 3, strides=2)], (6, 6, 2), lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), r"padding \(before, after\) per axis = \(\(0, 1\), \(0, 1\)\)"),
    "valid_into_conv2d_same": (lambda: [keras.layers.Conv2D(3, 3, strides=2)], (6, 6, 2), lambda: timm().layers.Conv2dSame(2, 3, 3, stride=2), r"found Conv2dSame, which pads each input as 'same'"),
    "transpose_odd_crop": (lambda: [keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same")], (4, 4, 2), lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), r"Keras padding='same' crops 0 before and 1 after"),
    "group_norm_groups": (lambda: [keras.layers.GroupNormalization(groups=2)], (3, 4), lambda: nn.GroupNorm(4, 4, eps=1e-3), r"expected num_groups=2 \(Keras groups\), found num_groups=4"),
    "group_norm_eps": (lambda: [keras.layers.GroupNormalization(groups=2)], (3, 4), lambda: nn.GroupNorm(2, 4), r"eps=0.001 \(Keras epsilon\)"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_pytorch_cannot_express_is_refused_with_the_reason(name: str, tmp_path: Path) -> None:
    layers, shape, module, message = REFUSED[name]
    model = keras.Sequential([keras.Input(shape), *layers()])
    model.save(tmp_path / "m.keras")
    target = module()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(LoadError, match=message):
        weightport.load(target, tmp_path / "m.keras")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ---- export: the reverse, read back by Keras ---------------------------------------------------------------


def test_export_of_the_new_kinds_is_what_keras_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    target = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3),
        nn.ConvTranspose2d(6, 4, 3, stride=2),
        nn.GroupNorm(2, 4, eps=1e-3),
    ).eval()
    with torch.no_grad():
        target[2].weight.uniform_(0.5, 1.5)
        target[2].bias.uniform_(-0.5, 0.5)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 3)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
            keras.layers.Conv2DTranspose(4, 3, strides=2),
            keras.layers.GroupNormalization(groups=2),
        ]
    )
    assert sorted(export(target)) == [
        "layers/conv2d_transpose/vars/0", "layers/conv2d_transpose/vars/1", "layers/depthwise_conv2d/vars/0",
        "layers/depthwise_conv2d/vars/1", "layers/group_normalization/vars/0", "layers/group_normalization/vars/1",
    ]  # fmt: skip
    save_weights_h5(target, tmp_path / "t.weights.h5")
    model.load_weights(tmp_path / "t.weights.h5")
    x = rng.standard_normal((B, 5, 5, 3)).astype(np.float32)
    close(nchw(target, x), np.asarray(model(x)))


def test_export_of_a_depthwise_conv1d_is_what_keras_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    torch.manual_seed(8)
    target = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1, groups=3), nn.Conv1d(6, 4, 1)).eval()
    model = keras.Sequential(
        [
            keras.Input((7, 3)),
            keras.layers.DepthwiseConv1D(3, depth_multiplier=2, padding="same"),
            keras.layers.Conv1D(4, 1),
        ]
    )
    assert sorted(export(target)) == [
        "layers/conv1d/vars/0", "layers/conv1d/vars/1", "layers/depthwise_conv1d/vars/0", "layers/depthwise_conv1d/vars/1"
    ]  # fmt: skip
    save_weights_h5(target, tmp_path / "t.weights.h5")
    model.load_weights(tmp_path / "t.weights.h5")
    x = rng.standard_normal((B, 7, 3)).astype(np.float32)
    close(nchw(target, x), np.asarray(model(x)))


# ---- MultiHeadAttention into nn.MultiheadAttention -----------------------------------------------------------


@pytest.mark.parametrize(("dim", "heads", "key_dim", "kv_dim"), [(8, 2, 4, None), (6, 3, 2, 5)])
def test_multi_head_attention_gives_keras_outputs(
    dim: int, heads: int, key_dim: int, kv_dim: int | None, tmp_path: Path
) -> None:
    """Packed ``in_proj_weight`` where key and value inputs have the query's size; separate
    ``q/k/v_proj_weight`` (kdim, vdim) where they do not. Keras and PyTorch both scale by 1/sqrt(key_dim)."""
    rng = np.random.default_rng(dim)
    query, context = keras.Input((5, dim)), keras.Input((7, kv_dim or dim))
    model = keras.Model([query, context], keras.layers.MultiHeadAttention(heads, key_dim)(query, context))
    randomize(model, rng)
    xq = rng.standard_normal((B, 5, dim)).astype(np.float32)
    xc = rng.standard_normal((B, 7, kv_dim or dim)).astype(np.float32)
    expected = np.asarray(model([xq, xc]))
    for kind, source in files(model, tmp_path).items():
        mha = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kv_dim, vdim=kv_dim).eval()
        report = load(mha, source)
        with torch.no_grad():
            got = mha(torch.from_numpy(xq), torch.from_numpy(xc), torch.from_numpy(xc), need_weights=False)[0]
        close(got.numpy(), expected)
        if kind != ".weights.h5":
            assert "Keras is called (query, value, key=value)" in report.pairings[0].how


@pytest.mark.parametrize("kv_dim", [None, 5])
def test_multi_head_attention_from_tf_keras_legacy_h5_gives_keras_outputs(
    kv_dim: int | None, tmp_path: Path
) -> None:
    """A legacy ``.h5`` names the four sublayers ``query``/``key``/``value``/``attention_output``: full-model
    and weights-only files load as a ``.keras`` file's attention does."""
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(30)
    query, context = tf_keras.Input((5, 8)), tf_keras.Input((7, kv_dim or 8))
    model = tf_keras.Model([query, context], tf_keras.layers.MultiHeadAttention(2, 4)(query, context))
    randomize(model, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras calls .h5 a legacy format
        model.save(tmp_path / "full.h5")
        model.save_weights(tmp_path / "weights.h5")
    xq = rng.standard_normal((B, 5, 8)).astype(np.float32)
    xc = rng.standard_normal((B, 7, kv_dim or 8)).astype(np.float32)
    expected = np.asarray(model([xq, xc]))
    for path in (tmp_path / "full.h5", tmp_path / "weights.h5"):
        mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kv_dim, vdim=kv_dim).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)  # weights only: no settings
            warnings.simplefilter("ignore", ForwardNoteWarning)
            weightport.load(mha, path)
        with torch.no_grad():
            got = mha(torch.from_numpy(xq), torch.from_numpy(xc), torch.from_numpy(xc), need_weights=False)[0]
        close(got.numpy(), expected)


def test_multi_head_attention_pytorch_cannot_express_is_refused_with_the_sizes(tmp_path: Path) -> None:
    query = keras.Input((5, 8))
    model = keras.Model(query, keras.layers.MultiHeadAttention(2, 3)(query, query))  # 2 * 3 != 8
    model.save(tmp_path / "m.keras")
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    with pytest.raises(
        LoadError, match=r"found Keras num_heads=2, key_dim=3, value_dim=3, query size 8, output size 8"
    ):
        weightport.load(mha, tmp_path / "m.keras")
    assert all(torch.equal(before[k], v) for k, v in mha.state_dict().items())
    with pytest.raises(LoadError, match=r"expected num_heads=2 \(the Keras layer's\), found num_heads=4"):
        weightport.load(nn.MultiheadAttention(8, 4, batch_first=True), _attention_file(tmp_path, 8, 2, 4))


def _attention_file(tmp_path: Path, dim: int, heads: int, key_dim: int) -> Path:
    query = keras.Input((5, dim))
    model = keras.Model(query, keras.layers.MultiHeadAttention(heads, key_dim)(query, query))
    model.save(tmp_path / "a.keras")
    return tmp_path / "a.keras"


# ---- inspect names Keras variables and says what does not port -------------------------------------------


def test_inspect_names_keras_variables_and_flags_what_does_not_port(tmp_path: Path) -> None:
    from weightport.inspect import describe_source, format_description

    inputs = keras.Input((4, 4, 3))
    y = keras.layers.Rescaling(0.5, name="scale")(inputs)
    y = keras.layers.Conv2D(2, 3, name="conv2d")(y)
    y = keras.layers.BatchNormalization(name="batch_normalization")(y)
    y = keras.layers.Reshape((4, 2))(y)
    y = keras.layers.PReLU(name="p_re_lu")(y)
    model = keras.Model(inputs, y)
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    for path in (tmp_path / "m.weights.h5", tmp_path / "m.keras"):
        info = describe_source(path)
        names = {t: v for layer in info["layers"] for t, v in layer["variables"].items()}
        assert names["layers/conv2d/vars/0"] == "kernel" and names["layers/conv2d/vars/1"] == "bias"
        assert [names[f"layers/batch_normalization/vars/{i}"] for i in range(4)] == [
            "gamma", "beta", "moving_mean", "moving_variance",
        ]  # fmt: skip
        text = format_description(info)
        assert "batch_normalization moving_variance" in text, text
        if path.suffix == ".keras":
            assert "  scale: Rescaling, 0 tensors; not ported: no PyTorch module computes it" in text, text
        # a bare .weights.h5 records no class, but files the layer under Keras's key for its class
        assert "p_re_lu: PReLU, 1 tensor; not ported: weightport has no rule for Keras PReLU" in text, text


@pytest.mark.parametrize("kv_dim", [None, 5])
def test_multi_head_attention_export_is_what_keras_loads(kv_dim: int | None, tmp_path: Path) -> None:
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kv_dim, vdim=kv_dim).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.uniform_(-0.5, 0.5)
    query, context = keras.Input((5, 8)), keras.Input((7, kv_dim or 8))
    model = keras.Model([query, context], keras.layers.MultiHeadAttention(2, 4)(query, context))
    save_weights_h5(mha, tmp_path / "t.weights.h5")
    model.load_weights(tmp_path / "t.weights.h5")
    rng = np.random.default_rng(9)
    xq = rng.standard_normal((B, 5, 8)).astype(np.float32)
    xc = rng.standard_normal((B, 7, kv_dim or 8)).astype(np.float32)
    with torch.no_grad():
        got = mha(torch.from_numpy(xq), torch.from_numpy(xc), torch.from_numpy(xc), need_weights=False)[0]
    close(got.numpy(), np.asarray(model([xq, xc])))


def test_legacy_h5_from_tf_keras_with_the_new_kinds(tmp_path: Path) -> None:
    """tf.keras names a depthwise kernel ``depthwise_kernel`` and records ``groups=1`` for it (1D kinds too)."""
    tf_keras = pytest.importorskip("tf_keras")
    K = tf_keras.layers
    model = tf_keras.Sequential(
        [tf_keras.Input((6, 6, 3)), K.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), K.SeparableConv2D(4, 3),
         K.Conv2DTranspose(2, 3, strides=2), K.GroupNormalization(2)]
    )  # fmt: skip
    rng = np.random.default_rng(10)
    randomize(model, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.keras calls HDF5 legacy
        model.save(tmp_path / "m.h5")
    x = rng.standard_normal((B, 6, 6, 3)).astype(np.float32)
    target = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.Conv2d(6, 4, 1),
        nn.ConvTranspose2d(4, 2, 3, stride=2), nn.GroupNorm(2, 2, eps=1e-3),
    ).eval()  # fmt: skip
    weightport.load(target, tmp_path / "m.h5")
    close(nchw(target, x), model(x).numpy())
    # weights only (save_weights): no classes; the variables' names and the module's kinds tell them
    model = tf_keras.Sequential(
        [tf_keras.Input((6, 6, 3)), K.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), K.SeparableConv2D(4, 3),
         K.GroupNormalization(2)]
    )  # fmt: skip
    randomize(model, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_weights(tmp_path / "w.h5")
    target = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.Conv2d(6, 4, 1),
        nn.GroupNorm(2, 4, eps=1e-3),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)  # weights only: settings unrecorded
        weightport.load(target, tmp_path / "w.h5")
    close(nchw(target, x), model(x).numpy())
    model = tf_keras.Sequential(
        [
            tf_keras.Input((9, 3)),
            K.DepthwiseConv1D(3, depth_multiplier=2),
            K.SeparableConv1D(4, 3, padding="same"),
        ]
    )
    randomize(model, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(tmp_path / "m1.h5")
        model.save_weights(tmp_path / "w1.h5")
    x = rng.standard_normal((B, 9, 3)).astype(np.float32)
    target = nn.Sequential(
        nn.Conv1d(3, 6, 3, groups=3), nn.Conv1d(6, 6, 3, groups=6, bias=False, padding=1), nn.Conv1d(6, 4, 1)
    ).eval()
    weightport.load(target, tmp_path / "m1.h5")
    close(nchw(target, x), model(x).numpy())
    target = nn.Sequential(
        nn.Conv1d(3, 6, 3, groups=3), nn.Conv1d(6, 6, 3, groups=6, bias=False, padding=1), nn.Conv1d(6, 4, 1)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        weightport.load(target, tmp_path / "w1.h5")
    close(nchw(target, x), model(x).numpy())


@pytest.mark.parametrize("kind", ["live", ".keras"])
def test_batch_norm_over_another_axis_than_the_last_says_what_forward_does(kind: str, tmp_path: Path) -> None:
    """BatchNormalization(axis=1) on a channels_last input normalizes its rows, not its channels: it loads
    with a note that the module needs that axis as dim 1, and so fed gives Keras's outputs."""
    rng = np.random.default_rng(21)
    model = keras.Sequential([keras.Input((4, 5, 3)), keras.layers.BatchNormalization(axis=1)])
    randomize(model, rng)
    for w in model.weights:
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 1.5, tuple(w.shape)).astype(np.float32))
    x = rng.standard_normal((B, 4, 5, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    bn = nn.BatchNorm2d(4, eps=1e-3).eval()
    with pytest.warns(
        ForwardNoteWarning, match=r"takes axis 1 of its 4-D input as the channels, not its last"
    ):
        weightport.load(bn, model if kind == "live" else tmp_path / "m.keras")
    with torch.no_grad():
        got = bn(torch.from_numpy(x)).numpy()  # the Keras tensor as it is: dim 1 is the axis normalized
    close(got, np.asarray(model(x, training=False)))


def test_group_norm_over_axis_1_is_a_group_norm_of_that_axis(tmp_path: Path) -> None:
    """GroupNormalization(axis=1), a channels_first model's: nn.GroupNorm given the tensor as it is."""
    rng = np.random.default_rng(22)
    model = keras.Sequential([keras.Input((4, 5, 6)), keras.layers.GroupNormalization(groups=2, axis=1)])
    randomize(model, rng)
    x = rng.standard_normal((B, 4, 5, 6)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    norm = nn.GroupNorm(2, 4, eps=1e-3)
    with pytest.warns(ForwardNoteWarning, match=r"takes axis 1 of its 4-D input as the channels"):
        weightport.load(norm, tmp_path / "m.keras")
    with torch.no_grad():
        got = norm(torch.from_numpy(x)).numpy()
    close(got, np.asarray(model(x, training=False)))


def test_zero_padding_before_a_same_conv_adds_to_its_padding(tmp_path: Path) -> None:
    """ZeroPadding2D(1) then Conv2D(3, padding='same'): 2 per side in all. nn.Conv2d(padding=2) loads exactly;
    padding=1 (the 'same' alone) is refused with the sum; a strided 'same' after it is refused."""
    rng = np.random.default_rng(23)
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), keras.layers.ZeroPadding2D(1), keras.layers.Conv2D(4, 3, padding="same")]
    )
    randomize(model, rng)
    x = rng.standard_normal((B, 6, 6, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    conv = nn.Conv2d(3, 4, 3, padding=2)
    weightport.load(conv, tmp_path / "m.keras")
    close(nchw(conv, x), np.asarray(model(x)))
    with pytest.raises(LoadError, match=r"padding \(before, after\) per axis = \(\(2, 2\), \(2, 2\)\)"):
        weightport.load(nn.Conv2d(3, 4, 3, padding=1), model)
    strided = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.ZeroPadding2D(1),
            keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        ]
    )
    with pytest.raises(LoadError, match=r"then by TensorFlow's 'same' rule for stride \(2, 2\)"):
        weightport.load(nn.Conv2d(3, 4, 3, stride=2, padding=2), strided)


def test_a_layer_no_free_module_fits_is_named_with_the_modules_left_empty(tmp_path: Path) -> None:
    """keras.applications MobileNetV3's head is a 1 x 1 Conv2D where torchvision and timm have a Linear: from
    a .keras file (which records the pooling with keepdims=True) it fills the Linear, as Keras computes; a
    weights-only file records no pooling, so the refusal names the Linear that would stay empty."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.GlobalAveragePooling2D(keepdims=True),
            keras.layers.Conv2D(3, 1, name="logits"),
        ]
    )
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.4, tuple(w.shape)).astype(np.float32) for w in model.weights])
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    target = nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(
        LayoutError,
        match=r"the model's modules of kinds no source layer has, which stay empty: 3 \(Linear \(3, 4\)\)",
    ):
        weightport.load(target, tmp_path / "m.weights.h5")
    weightport.load(target, tmp_path / "m.keras")
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    with torch.no_grad():
        got = target(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x)).reshape(2, 3), rtol=1e-5, atol=1e-5)


def test_a_stride_that_differs_is_said_without_a_padding_worked_out_for_it(tmp_path: Path) -> None:
    """Keras ResNet v1 strides the first 1x1 conv, torchvision the 3x3: the stride is the problem, and no
    padding is worked out from the module's own stride."""
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 3, padding="same")])
    model.save(tmp_path / "m.keras")
    with pytest.raises(LoadError) as caught:
        weightport.load(nn.Conv2d(2, 3, 3, stride=2, padding=1), tmp_path / "m.keras")
    (problem,) = caught.value.problems
    assert "stride=(1, 1) (Keras strides)" in problem.expected and "padding" not in str(caught.value), (
        caught.value
    )
