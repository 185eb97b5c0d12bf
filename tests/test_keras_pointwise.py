"""A Keras 1 x 1 Conv2D of a map of one position (after a global pooling with keepdims=True) fills the
nn.Linear a PyTorch model has in its place, only where the file proves the map has one position, and only
as many as the model has Linears that no Dense fills. Every load is compared with Keras's own outputs; the
8 -> 8 layer is square, so only the outputs show a transposed kernel.
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
from weightport.errors import WeightportError  # noqa: E402


def keras_head(pool_first: bool = True) -> Any:
    """Conv2D 3x3 -> GlobalAveragePooling2D(keepdims=True) -> Conv2D 1x1 (8 -> 8) -> ReLU -> Dropout -> Conv2D
    1x1 (8 -> 5) -> Flatten; with ``pool_first=False`` the 1x1 convs run on the 3 x 4 map and the pooling
    comes after them."""
    x = inputs = keras.Input((3, 4, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
    if pool_first:
        x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Activation("relu", name="relu")(keras.layers.Conv2D(8, 1, name="hidden")(x))
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Conv2D(5, 1, name="logits")(x)
    if not pool_first:
        x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    model = keras.Model(inputs, keras.layers.Flatten(name="flat")(x))
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.4, tuple(w.shape)).astype(np.float32) for w in model.weights])
    return model


class LinearHead(nn.Module):
    """torchvision's way: pool, flatten, then Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.hidden, self.drop, self.logits = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.logits(self.drop(torch.relu(self.hidden(h))))


class ConvThenLinear(nn.Module):
    """timm's way: a 1x1 Conv2d head on the pooled map, then flatten and a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.classifier = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(self.conv(x).mean((2, 3), keepdim=True)))
        return self.classifier(h.flatten(1))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    model = keras_head()
    folder = tmp_path_factory.mktemp("pointwise")
    model.save(folder / "m.keras")
    model.save_weights(folder / "m.weights.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        model.save(folder / "m.h5")  # records the pooling's keepdims, not the sizes layers were built for
    return model, folder


def _compare(model: Any, module: nn.Module) -> None:
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 2)).astype(np.float32)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
@pytest.mark.parametrize("build", [LinearHead, ConvThenLinear])
def test_one_position_convs_fill_the_linears_in_their_place(
    files: tuple[Any, Path], name: str, build: type[nn.Module]
) -> None:
    model, folder = files
    module = build()
    report = weightport.load(module, folder / name, example_inputs=torch.zeros(1, 2, 3, 4))
    _compare(model, module)
    kinds = {p.source_layer: p.module_kind for p in report.pairings}
    assert kinds == {
        "conv": "Conv2d",
        "hidden": "Linear" if build is LinearHead else "Conv2d",
        "logits": "Linear",
    }


def test_without_example_inputs_unique_shapes_pair_them(files: tuple[Any, Path]) -> None:
    model, folder = files
    module = LinearHead()
    weightport.load(module, folder / "m.keras")
    _compare(model, module)


def test_a_weights_only_file_proves_no_one_position_map(files: tuple[Any, Path]) -> None:
    """It records no pooling: its 1x1 convs stay convs, and the refusal names the Linears left empty."""
    _, folder = files
    refused(
        LinearHead(),
        folder / "m.weights.h5",
        r"(?s)no free nn.Conv2d left.*stay empty: hidden \(Linear.*logits \(Linear.*keepdims=True",
    )


def test_a_1x1_conv_of_a_whole_map_is_no_linear(tmp_path: Path) -> None:
    """Pooled after the 1x1 convs: they run at every position, and the model's Linears after its pooling
    compute the same only because the convs are linear and the pooling is a mean; weightport does not reason
    that far, so the load is refused rather than guessed."""
    model = keras_head(pool_first=False)
    model.save(tmp_path / "late.keras")
    refused(
        LinearHead(),
        tmp_path / "late.keras",
        r"modules of kinds no source layer has",
        example_inputs=torch.zeros(1, 2, 3, 4),
    )


def test_mapping_pairs_a_one_position_conv_with_a_linear(files: tuple[Any, Path]) -> None:
    """The counts give 'logits' to the classifier; mapping= says 'hidden' is a Linear too, in a model with
    one Linear to spare that it would otherwise leave to the last conv."""
    model, folder = files
    module = LinearHead()
    weightport.load(module, folder / "m.keras", mapping={"hidden": "hidden", "logits": "logits"})
    _compare(model, module)
    with pytest.raises(WeightportError, match=r"mapping 'conv' -> 'hidden'"):
        weightport.load(LinearHead(), folder / "m.keras", mapping={"conv": "hidden"})


def test_a_later_conv_the_file_does_not_prove_keeps_the_earlier_ones_convs(tmp_path: Path) -> None:
    """An upsampling between the two 1x1 convs: 'logits' reads a 2 x 2 map, so it is no Linear, and
    'hidden', followed by that conv, cannot be the Linear either (a model that flattened its map applies no
    conv after). Taking 'hidden' for the model's Linear, all 8 -> 8, would fit every shape; the load is
    refused."""
    x = inputs = keras.Input((3, 4, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Conv2D(8, 1, name="hidden")(x)
    x = keras.layers.UpSampling2D(2, name="up")(x)
    x = keras.layers.Conv2D(8, 1, name="logits")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="mean")(x))
    model.save(tmp_path / "m.keras")
    module = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 8))
    refused(
        module,
        tmp_path / "m.keras",
        r"stay empty: 3 \(Linear \(8, 8\)\)",
        example_inputs=torch.zeros(1, 2, 3, 4),
    )


class TwoSquareLinears(nn.Module):
    """Two 8 -> 8 Linears after the pooling, declared in the opposite order to the one forward calls them in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.second, self.first = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(self.conv(x).mean((2, 3)))))


def test_two_square_one_position_convs_fill_the_linears_in_call_order(tmp_path: Path) -> None:
    """Both 1x1 convs are 8 -> 8 with random biases: shapes cannot tell them apart, nor a transposed kernel,
    and the model declares its Linears in the other order. The recorded order against the forward pass pairs
    them; only Keras's outputs show it is right."""
    x = inputs = keras.Input((3, 4, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Activation("relu", name="relu")(keras.layers.Conv2D(8, 1, name="a")(x))
    model = keras.Model(inputs, keras.layers.Flatten(name="flat")(keras.layers.Conv2D(8, 1, name="b")(x)))
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(0, 0.4, tuple(w.shape)).astype(np.float32) for w in model.weights])
    model.save(tmp_path / "m.keras")
    module = TwoSquareLinears()
    report = weightport.load(module, tmp_path / "m.keras", example_inputs=torch.zeros(1, 2, 3, 4))
    _compare(model, module)
    assert {p.source_layer: p.module_path for p in report.pairings} == {
        "conv": "conv",
        "a": "first",
        "b": "second",
    }
