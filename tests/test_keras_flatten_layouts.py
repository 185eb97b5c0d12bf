"""Which axes a Keras Dense reads flattened, followed through the model config's graph and through the
PyTorch model's forward: a Reshape that flattens, Flatten(data_format='channels_first') (which moves the
channels last first), a channels-first map flattened as it is, a Permute, a model input, two transposes,
nested models and TimeDistributed. Every load is compared with Keras's own outputs, every weight random
(non-zero biases, BatchNorm statistics); the maps are square where it matters, so a wrong order would not
show in the shapes. (Keras's TF backend computes a channels-first Conv2D wrongly where its output is a cube,
channels = height = width: no map here is one.)
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
L = keras.layers

import weightport  # noqa: E402
from conftest import refused  # noqa: E402
from weightport.call_order import CallOrder  # noqa: E402
from weightport.errors import LayoutError  # noqa: E402


def randomized(model: Any, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    values = [
        rng.uniform(0.5, 1.5, tuple(w.shape))
        if "variance" in w.path
        else rng.uniform(-0.6, 0.6, tuple(w.shape))
        for w in model.weights
    ]
    model.set_weights([v.astype(np.float32) for v in values])
    return model


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def loads_exactly(module: nn.Module, source: Any, inputs: torch.Tensor, expected: Any, **kwargs: Any) -> Any:
    """Load ``source`` into ``module`` and compare its outputs on ``inputs`` with Keras's ``expected``."""
    module.eval()
    report = weightport.load(module, source, **kwargs)
    with torch.no_grad():
        np.testing.assert_allclose(module(inputs).numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)
    return report


def reordered(report: Any) -> bool:
    (row,) = [r for r in report.rows if r.target == "fc.weight"]
    return "rows reordered" in row.origin


class Flattens(nn.Module):
    """conv -> BatchNorm -> ReLU -> a flatten of the NCHW map ``how`` says -> fc."""

    def __init__(self, cin: int, cout: int, features: int, how: str = "nchw") -> None:
        super().__init__()
        self.conv, self.bn, self.fc, self.how = (
            nn.Conv2d(cin, cout, 3),
            nn.BatchNorm2d(cout, eps=1e-3),
            nn.Linear(features, 5),
            how,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if self.how == "last":
            y = y.permute(0, 2, 3, 1)
        elif self.how == "two transposes":
            y = y.transpose(1, 2).transpose(2, 3)  # (N, H, W, C)
        return self.fc(y.reshape(y.shape[0], -1))


def conv_bn(cout: int, data_format: str = "channels_last") -> list[Any]:
    axis = 1 if data_format == "channels_first" else -1
    return [L.Conv2D(cout, 3, data_format=data_format), L.BatchNormalization(axis=axis), L.ReLU()]


@pytest.mark.parametrize("shape", [(5, 5, 2), (6, 5, 3)])
def test_a_reshape_that_flattens_is_a_flatten(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    model = randomized(keras.Sequential([keras.Input(shape), *conv_bn(4), L.Reshape((-1,)), L.Dense(5)]))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    features = 4 * (shape[0] - 2) * (shape[1] - 2)
    twin = Flattens(shape[2], 4, features)
    refused(
        twin,
        tmp_path / "m.keras",
        r"Keras Dense '.*' reads Reshape '.*' of a channels-last map.*example_inputs=",
    )
    report = loads_exactly(twin, tmp_path / "m.keras", nchw(x), model(x), example_inputs=nchw(x))
    assert reordered(report)
    live = loads_exactly(Flattens(shape[2], 4, features), model, nchw(x), model(x), example_inputs=nchw(x))
    assert reordered(live)


def test_a_reshape_that_merges_some_axes_then_a_flatten(tmp_path: Path) -> None:
    """Reshape((H * W, C)) then Flatten: the rows still run (height, width, channels)."""
    model = randomized(
        keras.Sequential([keras.Input((5, 5, 2)), *conv_bn(4), L.Reshape((9, 4)), L.Flatten(), L.Dense(5)])
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 2)).astype(np.float32)
    for how in ("nchw", "last"):
        report = loads_exactly(
            Flattens(2, 4, 36, how), tmp_path / "m.keras", nchw(x), model(x), example_inputs=nchw(x)
        )
        assert reordered(report) == (how == "nchw")


def test_a_reshape_that_splits_axes_is_refused(tmp_path: Path) -> None:
    model = randomized(
        keras.Sequential([keras.Input((5, 5, 2)), *conv_bn(4), L.Reshape((2, 18)), L.Flatten(), L.Dense(5)])
    )
    model.save(tmp_path / "m.keras")
    x = nchw(np.zeros((1, 5, 5, 2), np.float32))
    refused(
        Flattens(2, 4, 36),
        tmp_path / "m.keras",
        r"reads Flatten '.*' of the output of Reshape '.*' to \(2, 18\), which splits its input's axes.*Fix:",
        LayoutError,
        example_inputs=x,
    )


NOTE = "ignore::weightport.errors.ForwardNoteWarning"  # BatchNormalization(axis=1): its channels are dim 1


@pytest.mark.filterwarnings(NOTE)
@pytest.mark.parametrize("how", ["nchw", "last"])
def test_flatten_channels_first_moves_the_channels_last(tmp_path: Path, how: str) -> None:
    """Keras's Flatten(data_format='channels_first') transposes a channels-first map channels-last before it
    flattens: rows (height, width, channels)."""
    model = randomized(
        keras.Sequential(
            [
                keras.Input((2, 5, 5)),
                *conv_bn(4, "channels_first"),
                L.Flatten(data_format="channels_first"),
                L.Dense(5),
            ]
        )
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(3).standard_normal((2, 2, 5, 5)).astype(np.float32)
    tx = torch.from_numpy(x)
    refused(Flattens(2, 4, 36, how), tmp_path / "m.keras", r"of a channels-last map \(3, 3, 4\)", LayoutError)
    report = loads_exactly(Flattens(2, 4, 36, how), tmp_path / "m.keras", tx, model(x), example_inputs=tx)
    assert reordered(report) == (how == "nchw")


@pytest.mark.filterwarnings(NOTE)
def test_a_channels_first_map_flattened_as_it_is(tmp_path: Path) -> None:
    """channels_first Conv2D -> Flatten(): Keras flattens (channels, height, width), as torch.flatten does: the
    NCHW twin loads as it is, with or without example_inputs=; a twin that permutes channels-last first gets
    the rows reordered."""
    model = randomized(
        keras.Sequential([keras.Input((2, 5, 5)), *conv_bn(4, "channels_first"), L.Flatten(), L.Dense(5)])
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 5)).astype(np.float32)
    tx = torch.from_numpy(x)
    assert not reordered(loads_exactly(Flattens(2, 4, 36), tmp_path / "m.keras", tx, model(x)))
    assert not reordered(
        loads_exactly(Flattens(2, 4, 36), tmp_path / "m.keras", tx, model(x), example_inputs=tx)
    )
    assert reordered(loads_exactly(Flattens(2, 4, 36, "last"), model, tx, model(x), example_inputs=tx))


@pytest.mark.parametrize("shape", [(5, 5, 2), (6, 5, 3)])
def test_a_permute_before_the_flatten_is_followed(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    model = randomized(
        keras.Sequential([keras.Input(shape), *conv_bn(4), L.Permute((3, 1, 2)), L.Flatten(), L.Dense(5)])
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(5).standard_normal((2, *shape)).astype(np.float32)
    features = 4 * (shape[0] - 2) * (shape[1] - 2)
    for how in ("nchw", "last", "two transposes"):
        twin = Flattens(shape[2], 4, features, how)
        report = loads_exactly(twin, tmp_path / "m.keras", nchw(x), model(x), example_inputs=nchw(x))
        assert reordered(report) == (how != "nchw")


def test_two_transposes_to_channels_last_are_composed(tmp_path: Path) -> None:
    model = randomized(keras.Sequential([keras.Input((5, 5, 2)), *conv_bn(4), L.Flatten(), L.Dense(5)]))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(6).standard_normal((2, 5, 5, 2)).astype(np.float32)
    twin = Flattens(2, 4, 36, "two transposes")
    assert not reordered(loads_exactly(twin, tmp_path / "m.keras", nchw(x), model(x), example_inputs=nchw(x)))
    order = CallOrder(Flattens(2, 4, 36, "two transposes"), nchw(x))
    assert order.flat_read("fc") == (("s0", "s1", "c"), (3, 3, 4))
    y = torch.zeros(2, 4, 3, 5, 6)
    assert CallOrder(nn.Sequential(nn.Conv3d(4, 2, 1), Moved(), nn.Linear(180, 1)), y).flat_read("2") == (
        ("s1", "s0", "c", "s2"),
        (5, 3, 2, 6),
    )


class Moved(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, 3).transpose(1, 2).flatten(1)


class FlattensInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(27, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_a_model_input_flattened_as_it_is_fed(tmp_path: Path) -> None:
    """No convolution: the twin fed the same array flattens it in Keras's order; nothing is reordered."""
    model = randomized(keras.Sequential([keras.Input((3, 3, 3)), L.Flatten(), L.Dense(5)]))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(7).standard_normal((2, 3, 3, 3)).astype(np.float32)
    tx = torch.from_numpy(x)
    assert not reordered(
        loads_exactly(FlattensInput(), tmp_path / "m.keras", tx, model(x), example_inputs=tx)
    )
    assert not reordered(loads_exactly(FlattensInput(), model, tx, model(x), example_inputs=tx))
    assert not reordered(loads_exactly(FlattensInput(), tmp_path / "m.keras", tx, model(x)))


def test_other_axes_or_other_sizes_are_refused_as_such(tmp_path: Path) -> None:
    """The message says what differs: a map where Keras flattens the model input, or the map's sizes."""
    model = randomized(keras.Sequential([keras.Input((3, 3, 3)), L.Flatten(), L.Dense(5)]))
    model.save(tmp_path / "m.keras")

    class ConvFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(27, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).flatten(1))

    refused(
        ConvFirst(),
        tmp_path / "m.keras",
        r"flattens \(channels 3, height 3, width 3\) into 'fc', but Keras's Flatten '.*' flattens "
        r"\(input axis 1 3, input axis 2 3, input axis 3 3\): other axes",
        LayoutError,
        example_inputs=torch.zeros(1, 3, 3, 3),
    )
    conv = randomized(keras.Sequential([keras.Input((6, 5, 3)), *conv_bn(4), L.Flatten(), L.Dense(5)]))
    conv.save(tmp_path / "c.keras")
    refused(
        Flattens(3, 4, 48),
        tmp_path / "c.keras",
        r"flattens \(channels 4, height 3, width 4\) into 'fc', but Keras's Flatten '.*' flattens "
        r"\(height 4, width 3, channels 4\): the sizes differ",
        LayoutError,
        example_inputs=torch.zeros(1, 3, 5, 6),  # the image transposed: (5, 6), not (6, 5)
    )


def build_nested(k: Any, functional: bool) -> Any:
    """A Sequential holding a model (nested Sequential or functional) with Conv2D -> BN -> Flatten -> Dense."""
    layers = k.layers
    if functional:
        i = k.Input((5, 5, 2))
        h = layers.Flatten()(layers.BatchNormalization()(layers.Conv2D(4, 3)(i)))
        inner = k.Model(i, layers.Dense(5)(h), name="inner")
    else:
        inner = k.Sequential(
            [
                k.Input((5, 5, 2)),
                layers.Conv2D(4, 3),
                layers.BatchNormalization(),
                layers.Flatten(),
                layers.Dense(5),
            ],
            name="inner",
        )
    return k.Sequential([k.Input((5, 5, 2)), inner])


class NestedTwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, eps=1e-3), nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


@pytest.mark.parametrize("functional", [False, True])
def test_a_flatten_inside_a_nested_model(tmp_path: Path, functional: bool) -> None:
    model = randomized(build_nested(keras, functional))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(8).standard_normal((2, 5, 5, 2)).astype(np.float32)
    refused(NestedTwin(), tmp_path / "m.keras", r"reads Flatten '.*' of a channels-last map", LayoutError)
    sources: list[Any] = [tmp_path / "m.keras", model]
    tf_keras = pytest.importorskip("tf_keras")
    legacy = build_nested(tf_keras, functional)
    legacy.set_weights(model.get_weights())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        legacy.save(tmp_path / "m.h5")
    sources.append(tmp_path / "m.h5")
    for source in sources:
        report = loads_exactly(NestedTwin(), source, nchw(x), model(x), example_inputs=nchw(x))
        assert reordered(report), source


def test_a_zero_padding_inside_a_nested_model(tmp_path: Path) -> None:
    """ZeroPadding2D(1) -> Conv2D('valid') inside a nested model is nn.Conv2d(padding=1)."""
    inner = keras.Sequential([keras.Input((5, 5, 2)), L.ZeroPadding2D(1), L.Conv2D(4, 3)], name="inner")
    model = randomized(keras.Sequential([keras.Input((5, 5, 2)), inner]))
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(9).standard_normal((2, 5, 5, 2)).astype(np.float32)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    for source in (tmp_path / "m.keras", model):
        conv.eval()
        weightport.load(conv, source)
        with torch.no_grad():
            got = conv(nchw(x)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


class StepTwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        y = self.conv(x.reshape(b * t, *x.shape[2:]).permute(0, 3, 1, 2))
        return self.fc(y.reshape(b, t, -1))


def test_a_time_distributed_flatten(tmp_path: Path) -> None:
    model = randomized(
        keras.Sequential(
            [
                keras.Input((3, 5, 5, 2)),
                L.TimeDistributed(L.Conv2D(4, 3)),
                L.TimeDistributed(L.Flatten()),
                L.Dense(5),
            ]
        )
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(10).standard_normal((2, 3, 5, 5, 2)).astype(np.float32)
    tx = torch.from_numpy(x)
    refused(
        StepTwin(),
        tmp_path / "m.keras",
        r"reads TimeDistributed\(Flatten\) '.*' of a channels-last map",
        LayoutError,
    )
    for source in (tmp_path / "m.keras", model):
        assert reordered(loads_exactly(StepTwin(), source, tx, model(x), example_inputs=tx))


class _FlattenNormDense(nn.Module):
    """conv -> a flatten (NCHW, or channels-last first) -> a norm of the flat features -> fc."""

    def __init__(self, norm: nn.Module, last: bool) -> None:
        super().__init__()
        self.conv, self.norm, self.fc, self.last = nn.Conv2d(2, 5, 2), norm, nn.Linear(30, 3), last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(self.norm((y.permute(0, 2, 3, 1) if self.last else y).flatten(1)))


@pytest.mark.parametrize("norm", ["BatchNormalization", "LayerNormalization"])
def test_a_norm_between_the_flatten_and_the_dense_is_reordered_too(tmp_path: Path, norm: str) -> None:
    """Conv -> Flatten -> a norm -> Dense: the norm's vectors run over the flattened features as the Dense's
    rows do (the NCHW twin loaded 1.9 off, no warning). With example_inputs= both twins give Keras's outputs
    (norm and Dense reordered alike); without, the norm's two readings are refused."""
    layers = keras.layers
    model = randomized(
        keras.Sequential(
            [
                keras.Input((3, 4, 2)),
                layers.Conv2D(5, 2),
                layers.Flatten(),
                getattr(layers, norm)(),
                layers.Dense(3),
            ]
        )
    )
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 2)).astype(np.float32)
    expected = model(x, training=False)

    def twin(last: bool) -> nn.Module:
        made = nn.BatchNorm1d(30, eps=1e-3) if norm == "BatchNormalization" else nn.LayerNorm(30, eps=1e-3)
        return _FlattenNormDense(made, last)

    for last in (False, True):
        loads_exactly(twin(last), path, nchw(x), expected, example_inputs=nchw(x))
    refused(
        twin(False), path, rf"Keras {norm} '\w+' reads Flatten '\w+' of a channels-last map.*example_inputs="
    )
