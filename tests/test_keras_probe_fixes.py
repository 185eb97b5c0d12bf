"""What a probe of the Keras layout found, each against Keras's own outputs (every weight and bias random,
shapes not square): a transposed conv whose kernel is smaller than its stride loads into its exact twin
(``output_padding = stride - kernel``); one that Keras crops unevenly loads into a ConvTranspose with no
padding, with a note naming the crop its forward must make, the refusal's own fix included; a Rescaling or
Normalization inside a model is said to apply where it sits, never "before the model", and a weights-only
file that shows one by its group reports it; a MultiHeadAttention over other axes than a 3-D query's one
sequence axis loads with a note saying how forward folds the query's axes, judged by the rank the file
records, and is refused where none is recorded.
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

import weightport  # noqa: E402
from conftest import nchw  # noqa: E402
from weightport.errors import ForwardNoteWarning, LoadError, UncheckedConfigWarning  # noqa: E402

B = 2


def built(shape: tuple[int, ...], *layers: Any, seed: int = 0) -> Any:
    """A Sequential Keras model with every weight (biases too) drawn at random."""
    model = keras.Sequential([keras.Input(shape), *layers])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights])
    return model


def sources(model: Any, tmp_path: Path) -> dict[str, Any]:
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    return {".keras": tmp_path / "m.keras", ".weights.h5": tmp_path / "m.weights.h5", "live": model}


def load(target: nn.Module, source: Any) -> tuple[weightport.LoadReport, list[str]]:
    """The report and the forward notes a load gives (a weights-only file's unchecked settings aside)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = weightport.load(target, source)
    notes = [str(w.message) for w in caught if issubclass(w.category, ForwardNoteWarning)]
    others = [w for w in caught if not issubclass(w.category, (ForwardNoteWarning, UncheckedConfigWarning))]
    assert not others, [str(w.message) for w in others]
    return report, notes


def close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---- transposed convs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape", "module"),
    [
        (lambda: keras.layers.Conv1DTranspose(4, 1, strides=2), (7, 3), lambda: nn.ConvTranspose1d(3, 4, 1, 2, output_padding=1)),
        # axis 0: kernel 2 < stride 3 (output_padding 1); axis 1: kernel 3 > stride 2 (none)
        (lambda: keras.layers.Conv2DTranspose(4, (2, 3), strides=(3, 2)), (5, 6, 3), lambda: nn.ConvTranspose2d(3, 4, (2, 3), (3, 2), output_padding=(1, 0))),
    ],
)  # fmt: skip
def test_a_valid_transposed_conv_with_a_kernel_below_its_stride_loads_into_its_twin(
    layer: Any, shape: tuple[int, ...], module: Any, tmp_path: Path
) -> None:
    """Keras gives ``n * s + max(k - s, 0)`` outputs: the twin adds ``s - k`` with ``output_padding``."""
    model = built(shape, layer(), seed=1)
    x = np.random.default_rng(1).standard_normal((B, *shape)).astype(np.float32)
    expected = np.asarray(model(x))
    for source in sources(model, tmp_path).values():
        target = module()
        _, notes = load(target, source)
        assert not notes
        close(nchw(target, x), expected)
    with pytest.raises(LoadError, match=r"expected padding=\(0,( 0)?\), output_padding=\((1,|1, 0)\)"):
        weightport.load(nn.ConvTranspose1d(3, 4, 1, 2) if len(shape) == 2 else nn.ConvTranspose2d(3, 4, (2, 3), (3, 2)), tmp_path / "m.keras")  # fmt: skip


@pytest.mark.parametrize(
    ("layer", "shape", "module", "said"),
    [
        # axis 0: 'same' crops 2 (1 and 1); axis 1: crops 1, all after (no ConvTranspose crops so)
        (lambda: keras.layers.Conv2DTranspose(4, 3, strides=(1, 2), padding="same"), (5, 6, 3), lambda: nn.ConvTranspose2d(3, 4, 3, (1, 2)), "((1, 1), (0, 1)) (before, after) per axis, y[..., 1:-1, 0:-1]"),
        (lambda: keras.layers.Conv2DTranspose(4, 2, padding="same"), (5, 6, 3), lambda: nn.ConvTranspose2d(3, 4, 2), "0 before and 1 after on each axis, y[..., 0:-1, 0:-1]"),
        # output_padding=1 with 'same': 2 * (n - 1) + 3 - 2 + 1 outputs, cropped 0 before
        (lambda: keras.layers.Conv1DTranspose(4, 3, strides=2, padding="same", output_padding=1), (7, 3), lambda: nn.ConvTranspose1d(3, 4, 3, 2), "0 before and 1 after on the axis, y[..., 0:-1]"),
    ],
)  # fmt: skip
def test_an_uneven_same_crop_loads_into_an_unpadded_transposed_conv_with_a_note(
    layer: Any, shape: tuple[int, ...], module: Any, said: str, tmp_path: Path
) -> None:
    model = built(shape, layer(), seed=2)
    x = np.random.default_rng(2).standard_normal((B, *shape)).astype(np.float32)
    expected = np.asarray(model(x))
    spans = said.rpartition("y[..., ")[2].rstrip("]").split(", ")  # the note's own slice, applied as it says
    crops = tuple(slice(int(b), int(e) if e else None) for b, e in (s.split(":") for s in spans))
    for kind, source in sources(model, tmp_path).items():
        target = module()
        report, notes = load(target, source)
        if kind != ".weights.h5":  # a weights-only file records no padding (it says so, unchecked)
            (note,) = notes
            assert (
                "crops its output unevenly" in note
                and f"crop the module's output in forward by {said}" in note
            )
            assert said in report.pairings[0].how
        close(nchw(lambda t, m=target: m(t)[(..., *crops)], x), expected)


def test_the_refusal_of_an_uneven_crop_gives_a_fix_that_loads(tmp_path: Path) -> None:
    model = built((5, 6, 3), keras.layers.Conv2DTranspose(4, (2, 3), strides=(3, 2), padding="same"), seed=3)
    model.save(tmp_path / "m.keras")
    with pytest.raises(LoadError) as refused:
        weightport.load(nn.ConvTranspose2d(3, 4, (2, 3), (3, 2), padding=(0, 1)), tmp_path / "m.keras")
    fix = "build the module with padding=0 and output_padding=(1, 0), and crop its output in forward by "
    assert fix + "((0, 0), (0, 1)) (before, after) per axis, y[..., 0:, 0:-1]" in str(refused.value)
    target = nn.ConvTranspose2d(3, 4, (2, 3), (3, 2), output_padding=(1, 0))
    load(target, tmp_path / "m.keras")
    x = np.random.default_rng(3).standard_normal((B, 5, 6, 3)).astype(np.float32)
    close(nchw(lambda t: target(t)[..., 0:, 0:-1], x), np.asarray(model(x)))


# ---- Rescaling and Normalization where they sit ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["Rescaling", "Normalization"])
def test_a_preprocessing_layer_inside_the_model_is_said_to_apply_where_it_sits(
    kind: str, tmp_path: Path
) -> None:
    mean, variance = np.array([0.5, -1.0, 2.0]), np.array([4.0, 0.25, 1.0])
    step = (
        keras.layers.Rescaling(2.0, offset=1.0)
        if kind == "Rescaling"
        else keras.layers.Normalization(mean=mean.tolist(), variance=variance.tolist())
    )
    model = built((4,), keras.layers.Dense(3, name="first"), step, keras.layers.Dense(2, name="last"), seed=4)
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    for name, source in sources(model, tmp_path).items():
        target = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        report, _ = load(target, source)
        (line,) = [line for line in report.ignored if f"Keras {kind}" in line]
        assert "before the model" not in line, line
        if name == ".weights.h5":  # the file shows the layer by its group, not where it sits
            assert "where the Keras model applies it (a weights-only file does not record where" in line
            continue
        assert (
            "on the output of Keras 'first' (module '0') and before Keras 'last' (module '1') reads it"
            in line
        )
        with torch.no_grad():
            inner = target[0](torch.from_numpy(x)).double().numpy()
            inner = inner * 2 + 1 if kind == "Rescaling" else (inner - mean) / np.sqrt(variance)
            close(target[1](torch.from_numpy(inner.astype(np.float32))).numpy(), expected)


def test_a_preprocessing_layer_on_the_input_is_said_to_apply_before_the_model(tmp_path: Path) -> None:
    model = built(
        (4,), keras.layers.Rescaling(0.5), keras.layers.Rescaling(1.0, offset=-1.0), keras.layers.Dense(2)
    )
    report, _ = load(nn.Linear(4, 2), sources(model, tmp_path)[".keras"])
    lines = [line for line in report.ignored if "Keras Rescaling" in line]
    assert len(lines) == 2 and all(line.endswith("before the model, on its input") for line in lines), lines


def test_a_weights_only_file_reports_a_normalization_it_holds_no_values_of(tmp_path: Path) -> None:
    """Keras keeps an empty group for a Normalization given its mean and variance: it is reported, as the
    .keras file reports it, not passed over."""
    norm = keras.layers.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[4.0, 9.0, 1.0, 0.25])
    model = built((4,), norm, keras.layers.Dense(3), seed=5)
    report, _ = load(nn.Linear(4, 3), sources(model, tmp_path)[".weights.h5"])
    said = " ".join(report.ignored)
    assert f"Keras Normalization '{norm.name}' (its statistics are not in the file)" in said, said


# ---- MultiHeadAttention over other axes --------------------------------------------------------------------


def _attention_model(shape: tuple[int, ...], axes: Any, seed: int) -> Any:
    query = keras.Input(shape)
    model = keras.Model(query, keras.layers.MultiHeadAttention(2, 3, attention_axes=axes)(query, query))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights])
    return model


def _attend(m: nn.Module, q: torch.Tensor) -> torch.Tensor:
    return m(q, q, q, need_weights=False)[0]


@pytest.mark.parametrize(
    ("shape", "axes", "said", "forward"),
    [
        ((3, 4, 6), None, "q.flatten(1, 2)", lambda m, q: _attend(m, q.flatten(1, 2)).unflatten(1, q.shape[1:3])),
        ((3, 4, 6), (1, 2), "q.flatten(1, 2)", lambda m, q: _attend(m, q.flatten(1, 2)).unflatten(1, q.shape[1:3])),
        ((3, 4, 6), (-2,), "q.flatten(0, 1)", lambda m, q: _attend(m, q.flatten(0, 1)).unflatten(0, q.shape[:2])),
        ((3, 4, 6), (1,), "q.permute(0, 2, 1, 3).reshape(-1, n, q.shape[-1])",
         lambda m, q: _attend(m, q.permute(0, 2, 1, 3).reshape(-1, 3, 6)).reshape(q.permute(0, 2, 1, 3).shape).permute(0, 2, 1, 3)),
        ((3, 2, 4, 6), (1, 3), "q.permute(0, 2, 1, 3, 4).reshape(-1, n, q.shape[-1])",
         lambda m, q: _attend(m, q.permute(0, 2, 1, 3, 4).reshape(-1, 12, 6)).reshape(q.permute(0, 2, 1, 3, 4).shape).permute(0, 2, 1, 3, 4)),
    ],
)  # fmt: skip
def test_attention_over_other_axes_loads_with_a_note_on_folding_them(
    shape: tuple[int, ...], axes: Any, said: str, forward: Any, tmp_path: Path
) -> None:
    model = _attention_model(shape, axes, seed=6)
    x = np.random.default_rng(6).standard_normal((B, *shape)).astype(np.float32)
    expected = np.asarray(model(x))
    model.save(tmp_path / "m.keras")
    for source in (tmp_path / "m.keras", model):
        mha = nn.MultiheadAttention(6, 2, batch_first=True).eval()
        _, notes = load(mha, source)
        assert len(notes) == 1 and said in notes[0], notes
        with torch.no_grad():
            close(forward(mha, torch.from_numpy(x)).numpy(), expected)


def test_attention_on_a_3d_query_loads_without_a_note_on_its_axes(tmp_path: Path) -> None:
    model = _attention_model((5, 6), (1,), seed=7)
    model.save(tmp_path / "m.keras")
    mha = nn.MultiheadAttention(6, 2, batch_first=True).eval()
    _, notes = load(mha, tmp_path / "m.keras")
    assert len(notes) == 1 and "attends over" not in notes[0], notes
    x = np.random.default_rng(7).standard_normal((B, 5, 6)).astype(np.float32)
    with torch.no_grad():
        close(_attend(mha, torch.from_numpy(x)).numpy(), np.asarray(model(x)))


def test_attention_axes_against_no_recorded_rank_are_refused(tmp_path: Path) -> None:
    """tf.keras records no built shape, and a Lambda hides the rank its input has: attention_axes=[1] may be
    a 3-D query's sequence or the first of several axes."""
    tf_keras = pytest.importorskip("tf_keras")
    query = tf_keras.Input((3, 4, 6))
    hidden = tf_keras.layers.Lambda(lambda t: t * 1.0)(query)
    layer = tf_keras.layers.MultiHeadAttention(2, 3, attention_axes=(1,))
    model = tf_keras.Model(query, layer(hidden, hidden))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras calls .h5 a legacy format
        model.save(tmp_path / "full.h5")
    mha = nn.MultiheadAttention(6, 2, batch_first=True)
    with pytest.raises(LoadError, match=r"Keras attention_axes=\[1\], and the source records no shape"):
        weightport.load(mha, tmp_path / "full.h5")


# ---- layers without weights whose settings PyTorch's defaults do not share ---------------------------------


def test_a_leaky_relu_between_two_denses_gets_a_note_with_its_slope(tmp_path: Path) -> None:
    model = built(
        (4,), keras.layers.Dense(3), keras.layers.LeakyReLU(0.3, name="slope"), keras.layers.Dense(2), seed=8
    )
    x = np.random.default_rng(8).standard_normal((5, 4)).astype(np.float32)
    for source in (sources(model, tmp_path)[".keras"], model):
        target = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(), nn.Linear(3, 2))
        _, notes = load(target, source)
        (note,) = notes
        assert "Keras LeakyReLU 'slope' (negative_slope=0.3) on the output of Keras 'dense" in note
        assert "(module '0') and before Keras" in note and "build nn.LeakyReLU(0.3)" in note
        target[1] = nn.LeakyReLU(0.3)  # as the note says
        with torch.no_grad():
            close(target(torch.from_numpy(x)).numpy(), np.asarray(model(x)))


def test_an_elu_of_keras_default_alpha_gets_no_note(tmp_path: Path) -> None:
    model = built((4,), keras.layers.Dense(3), keras.layers.ELU(), keras.layers.Dense(2), seed=9)
    _, notes = load(
        nn.Sequential(nn.Linear(4, 3), nn.ELU(), nn.Linear(3, 2)), sources(model, tmp_path)[".keras"]
    )
    assert notes == []
