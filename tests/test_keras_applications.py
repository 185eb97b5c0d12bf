"""keras.applications models into timm and torchvision, from the files Keras writes, paired by proof (the
recorded layer order against the model's call order from ``example_inputs=``), compared in inference mode to
1e-5 of the output's scale; where padding makes a port inexpressible, refused with the reason.

Every Keras model is built with ``weights=None`` and its BatchNorm moving statistics randomized (random
weights; nothing is downloaded). The Keras models' input stages (``Rescaling``, ``Normalization``) have no
PyTorch module: the load reports them with their values, and the test applies them to the PyTorch side's input.
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
from _vision import timm, torchvision  # noqa: E402
from weightport.errors import ForwardNoteWarning, LoadError, UncheckedConfigWarning  # noqa: E402

SIZE = 64


def build(factory: Any, rng: np.random.Generator, size: int = SIZE) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns about input sizes it has no ImageNet weights for
        model = factory(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    for w in model.weights:  # random moving statistics, so the BatchNorms' inference path is exercised
        if "moving_mean" in w.path:
            w.assign(rng.uniform(-0.2, 0.2, tuple(w.shape)).astype(np.float32))
        elif "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 1.5, tuple(w.shape)).astype(np.float32))
    return model


def compare(model: Any, module: nn.Module, x: np.ndarray, preprocessed: np.ndarray) -> float:
    expected = np.asarray(model(x, training=False))
    with torch.no_grad():
        got = module(torch.from_numpy(preprocessed.astype(np.float32)).permute(0, 3, 1, 2)).numpy()
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert error < 1e-5, error
    return error


def test_efficientnet_b0_into_timm_tf_efficientnet_b0(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = build(keras.applications.EfficientNetB0, rng)
    model.save(tmp_path / "b0.keras")
    model.save_weights(tmp_path / "b0.weights.h5")
    x = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    norm = next(layer for layer in model.layers if type(layer).__name__ == "Normalization")
    scaling = next(layer for layer in model.layers if type(layer).__name__ == "Rescaling")
    mean, variance = (np.asarray(v).reshape(-1) for v in norm.weights[:2])
    preprocessed = (x / 255.0 - mean) / np.sqrt(variance)  # Keras's Rescaling(1/255) and Normalization
    example = (torch.zeros(1, 3, SIZE, SIZE),)
    for path in (tmp_path / "b0.keras", tmp_path / "b0.weights.h5"):
        module = timm().create_model("tf_efficientnet_b0", pretrained=False).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)  # a .weights.h5 records no settings
            report = weightport.load(module, path, example_inputs=example)
        compare(model, module, x, preprocessed)
        ignored = " ".join(report.ignored)
        assert f"Keras Normalization '{norm.name}' (mean [0, 0, 0], variance [1, 1, 1])" in ignored, ignored
        hows = {p.how.split(";")[0] for p in report.pairings}
        assert hows <= {
            "by a unique kind and shape",
            "by recorded order (Keras) and call order (example_inputs)",
        }
        if path.suffix == ".keras":
            assert f"Keras Rescaling '{scaling.name}' (scale 0.00392157, offset 0)" in ignored, ignored
            stem = next(p for p in report.pairings if p.module_path == "conv_stem")
            assert "Keras ZeroPadding2D 'stem_conv_pad' pads ((0, 1), (0, 1))" in stem.how


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_mobilenet_v3_small_into_timm_tf_mobilenetv3_small_100(tmp_path: Path, head: str) -> None:
    """Keras ends in 1x1 Conv2D layers after a global pooling with keepdims=True ('Conv_2', then 'Logits');
    timm applies its conv_head as a 1x1 Conv2d, flattens, and classifies with a Linear: on a map of one
    position the same computation, so 'Logits' fills the Linear, from the .keras file and the legacy .h5
    alike. A model given a 1x1 Conv2d classifier takes it as a conv."""
    rng = np.random.default_rng(1)
    model = build(keras.applications.MobileNetV3Small, rng)
    model.save(tmp_path / "v3.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy format
        model.save(tmp_path / "v3.h5")
    x = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    for path in (tmp_path / "v3.keras", tmp_path / "v3.h5"):
        module = timm().create_model("tf_mobilenetv3_small_100", pretrained=False).eval()
        if head == "conv":
            module.flatten = nn.Identity()
            module.classifier = nn.Sequential(nn.Conv2d(1024, 1000, 1), nn.Flatten())
        # the strided depthwise convs Keras pads with ZeroPadding2D: timm's pad themselves, so nothing is noted;
        # Keras's hard_sigmoid, ReLU(6.0)(x + 3) / 6, is noted as the ReLU6 it is (timm's hard_sigmoid gates do it)
        with pytest.warns(ForwardNoteWarning, match=r"Keras ReLU 're_lu_\d+' \(max_value=6\)"):
            report = weightport.load(module, path, example_inputs=(torch.zeros(1, 3, SIZE, SIZE),))
        assert all(n.endswith("build nn.ReLU6(): a plain nn.ReLU does not cap") for n in report.notes)
        compare(model, module, x, x / 127.5 - 1.0)  # Keras's Rescaling(1/127.5, offset=-1)
        (logits,) = [p for p in report.pairings if p.source_layer == "logits"]
        assert (logits.module_kind, logits.source_kind) == (
            ("Linear", "Conv2D 1x1, of a one-position map") if head == "linear" else ("Conv2d", "Conv2D")
        )
        scaling = next(layer for layer in model.layers if type(layer).__name__ == "Rescaling")
        said = f"Keras Rescaling '{scaling.name}' (scale 0.00784314, offset -1)"
        assert path.suffix == ".h5" or any(said in i for i in report.ignored), report.ignored


@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_mobilenet_v2_is_refused_where_padding_makes_it_inexpressible(zoo: str, tmp_path: Path) -> None:
    """Keras's MobileNetV2 pads its stride-2 convs by TensorFlow's 'same' rule ((0, 1) on an even map);
    torchvision's and timm's pad (1, 1) symmetrically: other outputs, so the load is refused with the
    amounts. The BatchNorms are rebuilt with Keras's eps=1e-3 first, so padding is what is left."""
    rng = np.random.default_rng(2)
    model = build(keras.applications.MobileNetV2, rng, size=96)
    model.save(tmp_path / "v2.keras")
    if zoo == "torchvision":
        module = torchvision().models.mobilenet_v2(weights=None).eval()
    else:
        module = timm().create_model("mobilenetv2_100", pretrained=False).eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(LoadError) as caught:
        weightport.load(module, tmp_path / "v2.keras", example_inputs=(torch.zeros(1, 3, 96, 96),))
    problems = caught.value.problems
    assert problems and all("padding" in p.expected for p in problems), [p.expected for p in problems]
    text = str(caught.value)
    assert "Keras padding='same' (before, after): axis 0: n % 2 == 0: (0, 1), n % 2 == 1: (1, 1)" in text
    assert "(Keras ZeroPadding2D 'block_1_pad', then padding='valid'), found padding=(1, 1)" in text
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_convnext_tiny_into_torchvision_and_timm_with_its_layer_scales(tmp_path: Path) -> None:
    """keras.applications ConvNeXtTiny's ``LayerScale`` layers (``x * gamma``) fill torchvision's
    ``CNBlock.layer_scale`` ``(C, 1, 1)`` and timm's ``ConvNeXtBlock.gamma`` ``(C,)``. Every weight is random
    (gamma included: its 1e-6 initial value would hide a swapped block) and differs per block, from the live
    model, the ``.keras`` file and tf_keras's full-model ``.h5``; tf_keras's weights-only ``.h5``, which
    records no classes, leaves a lone gamma's class open (LayerNormalization or LayerScale): refused."""
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(3)
    size = 32
    factory = {"include_preprocessing": False, "classifier_activation": None, "classes": 10}
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(size, size, 3), **factory)
    for w in model.weights:
        offset = 1.0 if w.path.endswith(("gamma", "variance")) else 0.0
        w.assign(offset + rng.normal(0, 0.2, tuple(w.shape)).astype(np.float32))
    model.save(tmp_path / "c.keras")
    legacy = tf_keras.applications.ConvNeXtTiny(weights=None, input_shape=(size, size, 3), **factory)
    legacy.set_weights([np.asarray(w) for w in model.weights])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras calls .h5 a legacy format
        legacy.save(tmp_path / "full.h5")
        legacy.save_weights(tmp_path / "weights_only.h5")
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    example = (torch.zeros(1, 3, size, size),)
    zoo = {
        "torchvision": lambda: torchvision().models.convnext_tiny(num_classes=10),
        "timm": lambda: timm().create_model("convnext_tiny", pretrained=False, num_classes=10),
    }
    for name, make in zoo.items():
        for source in (model, tmp_path / "c.keras", tmp_path / "full.h5"):
            module = make().eval()
            report = weightport.load(module, source, example_inputs=example)
            compare(model, module, x, x)
            scales = [p for p in report.pairings if p.source_kind == "LayerScale"]
            assert len(scales) == 18 and all(p.how.startswith("by recorded order") for p in scales), scales
            first = "features.1.0.layer_scale" if name == "torchvision" else "stages.0.blocks.0.gamma"
            gamma = np.asarray(model.get_layer("convnext_tiny_stage_0_block_0_layer_scale").weights[0])
            assert np.array_equal(module.get_parameter(first).detach().numpy().reshape(-1), gamma)
        module = make().eval()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(weightport.WeightportError, match=r"fits more than one Keras class \(LayerNorm"):
            weightport.load(module, tmp_path / "weights_only.h5", example_inputs=example)
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
