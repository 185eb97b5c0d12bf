"""A Keras Dense after a Flatten of a feature map: Keras numbers its input rows (height, width, channels).
A PyTorch model that flattens its NCHW map numbers them (channels, height, width), one that permutes
channels-last first as Keras does; the weights fit both. The forward pass on example_inputs= shows which,
and the kernel's rows are reordered to match; without it the load is refused with both readings. Every
load is compared with Keras's own outputs.
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
from conftest import refused  # noqa: E402
from weightport.errors import LayoutError, UncheckedConfigWarning  # noqa: E402


def keras_model() -> Any:
    """Conv2D -> Flatten -> Dropout -> Dense: a (3, 4, 8) map, 96 rows; every weight random."""
    model = keras.Sequential(
        [
            keras.Input((3, 4, 2)),
            keras.layers.Conv2D(8, 3, padding="same", name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(5, name="fc"),
        ]
    )
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.3, tuple(w.shape)).astype(np.float32) for w in model.weights])
    return model


class ChannelsFirst(nn.Module):
    """torchvision's way: torch.flatten of the NCHW map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(2, 8, 3, padding=1), nn.Dropout(0.5), nn.Linear(96, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.conv(x), 1)))


class ChannelsLast(ChannelsFirst):
    """A faithful port: permute channels-last, then flatten, as Keras does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.conv(x).permute(0, 2, 3, 1).flatten(1)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    model = keras_model()
    folder = tmp_path_factory.mktemp("flatten")
    model.save(folder / "m.keras")
    model.save_weights(folder / "m.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        model.save(folder / "m.h5")  # records the Flatten, but not the map's shape
    return model, folder


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
@pytest.mark.parametrize("build", [ChannelsFirst, ChannelsLast])
def test_the_rows_follow_the_order_the_model_flattens_in(
    files: tuple[Any, Path], name: str, build: type[nn.Module]
) -> None:
    model, folder = files
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 2)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2)
    module = build().eval()
    report = weightport.load(module, folder / name, example_inputs=inputs)
    with torch.no_grad():
        np.testing.assert_allclose(module(inputs).numpy(), expected, rtol=1e-5, atol=1e-5)
    (row,) = [r for r in report.rows if r.target == "fc.weight"]
    assert ("rows reordered" in row.origin) == (build is ChannelsFirst), row.origin


def test_without_example_inputs_both_readings_are_refused(files: tuple[Any, Path]) -> None:
    _, folder = files
    refused(
        ChannelsFirst(),
        folder / "m.keras",
        r"Keras Dense 'fc' reads Flatten 'flatten' of a channels-last map \(3, 4, 8\).*Fix: pass example_inputs=",
        LayoutError,
    )


def test_a_weights_only_file_says_what_it_cannot_know(files: tuple[Any, Path]) -> None:
    """It records no Flatten: a model that flattens a channels-first map is refused (the .keras file is the
    fix); without example_inputs= a Dense whose 96 inputs are 12 positions of the conv's 8 channels may read
    a map, and is refused with both readings."""
    model, folder = files
    x = torch.randn(2, 2, 3, 4)
    module = ChannelsFirst()
    path = folder / "m.weights.h5"
    first = r"flattens a channels-first map \(8, 3, 4\) into 'fc'.*\.keras file"
    refused(module, path, first, LayoutError, example_inputs=x)
    unshown = (
        r"Keras Dense 'fc' in 'fc' takes 96 inputs, 12 positions of a map of 8 channels.*"
        r"Fix: pass example_inputs=.*or load the \.keras file"
    )
    refused(module, path, unshown, LayoutError)
    channels_last = ChannelsLast().eval()  # Keras's own order: the rows as stored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)  # the conv's settings
        weightport.load(channels_last, folder / "m.weights.h5", example_inputs=x)
    expected = np.asarray(model(x.permute(0, 2, 3, 1).numpy(), training=False))
    with torch.no_grad():
        np.testing.assert_allclose(channels_last(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_dense_after_pooling_takes_its_kernel_as_it_is(tmp_path: Path) -> None:
    """No Flatten in the configuration (GlobalAveragePooling before the Dense): one order, whatever the model
    flattens, and a model that flattens a pooled 1 x 1 map loads as Keras computes."""
    model = keras.Sequential(
        [
            keras.Input((3, 4, 2)),
            keras.layers.Conv2D(8, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5),
        ]
    )
    rng = np.random.default_rng(5)
    model.set_weights([rng.normal(0, 0.3, tuple(w.shape)).astype(np.float32) for w in model.weights])
    model.save(tmp_path / "m.keras")
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    torch_model = nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2)
    weightport.load(torch_model, tmp_path / "m.keras", example_inputs=inputs)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(inputs).numpy(), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_a_weights_only_dense_whose_width_a_conv_outputs_loads_with_the_note(tmp_path: Path) -> None:
    """Pooled to the conv's 8 channels: 8 inputs are a width a module outputs, not a map's positions, so a
    weights-only file loads without example_inputs= (as Keras computes) and no flatten order is noted; a
    Dense after it, whose inputs are the first one's outputs, is not taken for a map either."""
    model = keras.Sequential(
        [
            keras.Input((3, 4, 2)),
            keras.layers.Conv2D(8, 3, name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(16, name="fc1"),
            keras.layers.Dense(5, name="fc2"),
        ]
    )
    rng = np.random.default_rng(6)
    model.set_weights([rng.normal(0, 0.3, tuple(w.shape)).astype(np.float32) for w in model.weights])
    model.save_weights(tmp_path / "m.weights.h5")
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    torch_model = nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.Linear(16, 5)
    ).eval()
    with pytest.warns(UncheckedConfigWarning) as caught:  # the conv's settings
        weightport.load(torch_model, tmp_path / "m.weights.h5")
    assert not any("flattened" in str(w.message) for w in caught), [str(w.message) for w in caught]
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(inputs).numpy(), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
