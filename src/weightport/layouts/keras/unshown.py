"""What a weights-only Keras file cannot show: per kind of layer, each setting of its configuration that
changes the forward pass while leaving every variable's shape as it is (Keras's own ``get_config`` keys),
with what the load assumes in its place. Settings the variables show (``units``, ``use_bias``, a GRU's
``reset_after``, a depthwise ``depth_multiplier``) are checked by shape instead; training-only ones
(initializers, dropout, momentum) change no output.

>>> [s.split(" (")[0] for s in _BY_KIND["Linear"]]
['activation']
"""

from __future__ import annotations

import re
from typing import Any

from weightport.layouts.keras.layers import PREPROCESSING, Part, Resolved
from weightport.layouts.keras.padding import TF_SAME
from weightport.layouts.pairing import Slot
from weightport.sources.base import Source
from weightport.sources.keras import snake_case
from weightport.torch_facts import RNN_KINDS

__all__ = ["unshown_settings", "unshown_weightless"]

_ACTIVATION = "activation (assumed none, 'linear')"
_CONV = "strides, padding, dilation_rate, groups (assumed as the module's stride, padding, dilation, groups)"
_NORM_AXIS = ("axis (assumed the input's last, which the module sees as its channels or normalized dims)",)
_BY_KIND: dict[str, tuple[str, ...]] = {
    "Linear": (_ACTIVATION,),
    "Conv1d": (_CONV, _ACTIVATION),
    "Conv2d": (_CONV, _ACTIVATION),
    "ConvTranspose1d": (
        "strides, padding, output_padding, dilation_rate (assumed as the module's stride, padding, "
        "output_padding, dilation)",
        _ACTIVATION,
    ),
    "ConvTranspose2d": (
        "strides, padding, output_padding, dilation_rate (assumed as the module's stride, padding, "
        "output_padding, dilation)",
        _ACTIVATION,
    ),
    "Embedding": ("mask_zero (assumed False: no step masked)",),
    "BatchNorm": _NORM_AXIS,
    "LayerNorm": (*_NORM_AXIS, "rms_scaling (assumed False)"),
    "GroupNorm": _NORM_AXIS,
    "LSTM": ("activation, recurrent_activation (assumed tanh, sigmoid)",),
    "GRU": ("activation, recurrent_activation (assumed tanh, sigmoid)",),
    "MultiheadAttention": (
        "attention_axes (assumed None: attention over the sequence axis), sliding_window (assumed None: every "
        "step attends to every step)",
    ),
}


def unshown_settings(found: Resolved, part: Part, slot: Slot) -> list[str]:
    """The forward settings of ``found``'s layer a weights-only file does not record, each with what is assumed."""
    m: Any = slot.module
    kind = found.kind
    settings: list[str] = []
    if kind in ("BatchNorm", "LayerNorm", "GroupNorm"):
        settings.append(f"epsilon (the module has eps={m.eps:g}; Keras's default is 1e-3)")
    if kind == "GroupNorm":
        settings.append(f"groups (assumed num_groups={m.num_groups}, as the module)")
    if kind == "RNN":
        settings.append(f"activation (assumed '{m.nonlinearity}', as the module)")
    settings += _BY_KIND.get(kind, ())
    if "(depthwise half)" in found.detail:  # Keras applies a separable conv's activation after its 1x1 half
        settings = [s for s in settings if s != _ACTIVATION]
    elif "(pointwise half)" in found.detail:  # the 1x1 half runs with stride 1, no padding, no dilation
        settings = [s for s in settings if s != _CONV]
    if kind in RNN_KINDS:
        settings.append("go_backwards, stateful (assumed False)")
    if kind in RNN_KINDS and len(found.parts) == 2:
        settings.append("merge_mode (assumed 'concat', as PyTorch's output)")
    return settings


# A Keras class without weights whose settings change its output -> those settings, with Keras's defaults and
# how PyTorch computes them (:mod:`.weightless` and :mod:`.pooling` say the same where a configuration records
# them). A Keras 3 ``.weights.h5`` files each layer under its class's snake-case name, whatever the layer's.
_SAME = f"'same' pads by TensorFlow's rule ({TF_SAME})"
_POOL = "pool_size, strides, padding (Keras's defaults 2, pool_size, 'valid': nn.{cls}Pool{r}d(2)); {same}, "
_MAX = "and a max pool never takes a padded pixel: build it with padding=0 and pad its input with -inf in forward"
_AVG = (
    "and an average pool divides by the pixels inside the input only: count_include_pad=False where both sides "
    "pad alike, else pad with zeros and divide by the inside pixels in forward"
)
_UPSAMPLE = "size (Keras's default 2 per axis, 'nearest': nn.Upsample(scale_factor=2))"
_ENCODERS = (
    "CategoryEncoding", "Discretization", "Hashing", "HashedCrossing", "StringLookup", "IntegerLookup",
    "TextVectorization",
)  # fmt: skip
_WEIGHTLESS: dict[str, str] = {
    "LeakyReLU": "negative_slope (Keras's default 0.3: nn.LeakyReLU(0.3); nn.LeakyReLU()'s is 0.01)",
    "ELU": "alpha (Keras's default 1: nn.ELU())",
    "ReLU": "negative_slope, threshold, max_value (Keras's defaults 0, 0, None: nn.ReLU(); 6: nn.ReLU6())",
    "ThresholdedReLU": "theta (Keras's default 1: nn.Threshold(1.0, 0.0))",
    "Softmax": "axis (Keras's default -1, its channels-last input's channels: dim=1 of a map)",
    "Activation": "activation (Keras's 'leaky_relu' has slope 0.2, nn.LeakyReLU()'s 0.01; 'softmax' is over axis -1)",
    "UnitNormalization": "axis (Keras's default -1: F.normalize over the channels)",
    **{
        f"{kind}Pooling{r}D": _POOL.format(cls=kind[:3], r=r, same=_SAME) + (_MAX if kind == "Max" else _AVG)
        for r in (1, 2, 3)
        for kind in ("Max", "Average")
    },
    **{
        f"Adaptive{kind}Pooling{r}D": f"output_size (nn.Adaptive{kind[:3]}Pool{r}d(output_size))"
        for r in (1, 2, 3)
        for kind in ("Max", "Average")
    },
    **{
        f"ZeroPadding{r}D": "padding (Keras's default 1 on each side; ((top, bottom), (left, right)) is "
        "nn.ZeroPad2d((left, right, top, bottom)), the last axis first)"
        for r in (1, 2, 3)
    },
    **{
        f"Cropping{r}D": "cropping (Keras's default 1 on each side: x[..., 1:-1] per axis)" for r in (1, 2, 3)
    },
    "UpSampling1D": _UPSAMPLE,
    "UpSampling2D": f"{_UPSAMPLE}, interpolation ('bilinear': nn.Upsample(mode='bilinear', align_corners=False))",
    "UpSampling3D": _UPSAMPLE,
    "Permute": "dims (1-based axes of its channels-last input, the batch left out)",
    "RepeatVector": "n (how many steps it repeats its input)",
    "Dot": "axes, normalize (Keras's normalize=False; True divides both inputs by their L2 norms)",
    "Attention": "score_mode (Keras's default 'dot', unscaled: softmax(q k^T) v), use_causal_mask",
    "AdditiveAttention": "use_causal_mask (Keras's default False: every step attends)",
    "Masking": "mask_value (Keras's default 0: the layers after skip the steps whose features all equal it; no "
    "PyTorch module does)",
    "Resizing": "height, width, interpolation, crop_to_aspect_ratio (Keras's default 'bilinear')",
    "CenterCrop": "height, width (the crop it takes from the middle)",
    "AutoContrast": "value_range (Keras's default (0, 255))",
    "ContrastLimitedAdaptiveHistogramEqualization": "value_range, tile_grid_size, clip_limit",
    "MelSpectrogram": "its FFT, window, stride, mel bins and scaling",
    **dict.fromkeys(
        _ENCODERS, "its encoding settings (the PyTorch model's inputs must arrive encoded as it encodes them)"
    ),
    "Lambda": "its function (Python code the PyTorch model must compute as it does)",
    "TimeDistributed": "the layer it wraps and that layer's settings",
}
# Classes no setting of which changes an output at inference (or only its shape, which the weights after show,
# or only in training: dropout, noise, random augmentation), and those :mod:`.preprocessing` reports itself.
_HARMLESS = frozenset(
    {
        "InputLayer", "Identity", "Flatten", "Reshape", "Add", "Subtract", "Multiply", "Average", "Maximum",
        "Minimum", "Concatenate", "ActivityRegularization", "MaxNumBoundingBoxes", "Dropout", "AlphaDropout",
        "GaussianDropout", "GaussianNoise", "AugMix", "CutMix", "MixUp", "RandAugment", "Solarization",
        "Equalization", *PREPROCESSING,
        *(f"Global{kind}Pooling{r}D" for kind in ("Max", "Average") for r in (1, 2, 3)),
        *(f"SpatialDropout{r}D" for r in (1, 2, 3)),
    }
)  # fmt: skip
_CLASS_OF_KEY = {snake_case(c): c for c in [*_WEIGHTLESS, *_HARMLESS]}
_NUMBERED = re.compile(r"(.+?)(?:_\d+)?")
_CONTAINERS = ("layers", "_layer_checkpoint_dependencies")  # where Keras 3 files a model's layers


def _key(name: str) -> str:
    """A default layer name without the ``_N`` Keras numbers repeats with: 'max_pooling2d_3' -> 'max_pooling2d'."""
    found = _NUMBERED.fullmatch(name)
    return name if name in _CLASS_OF_KEY or found is None else found[1]


def _said(cls: str, name: str, called: str | None = None) -> str:
    named = f"; the model calls it '{called}'" if called and called != name else ""
    return f"Keras {cls} '{name}' (no weights, so nothing pairs it): {_WEIGHTLESS[cls]}{named}"


def _weightless_groups(source: Source) -> list[str]:
    """A ``.weights.h5``'s layers without weights: the groups Keras files a model's layers as
    ('.../layers/<key>') with no array under them, less the models nested inside (they file layers of their
    own)."""
    groups = set(getattr(source, "groups", ()))
    weighted = {name.rsplit("/", k)[0] for name in source.infos for k in range(1, name.count("/") + 1)}
    return [
        g
        for g in sorted(groups)
        if g.rpartition("/")[0].rpartition("/")[2] in _CONTAINERS
        and g not in weighted
        and not any(f"{g}/{c}" in groups for c in _CONTAINERS)
    ]


def unshown_weightless(source: Source) -> list[str]:
    """For a weights-only file, the layers it shows without weights whose settings change what the model
    computes: each with the settings it cannot show, which the PyTorch model must compute as the Keras model
    set them. A Keras 3 ``.weights.h5`` names each layer's group by its class, so a class neither in the table
    nor known to change nothing is said too (a layer of one's own); a legacy ``.h5`` lists the layers' own
    names, so only default ones tell a class.

    >>> class File:
    ...     metadata = {"keras_file": "weights.h5", "vars_names": {"layers/max_pooling2d_1": "pool"}}
    ...     groups = ["layers", "layers/conv2d", "layers/conv2d/vars", "layers/max_pooling2d_1", "layers/add"]
    ...     infos = {"layers/conv2d/vars/0": None}
    >>> [(u.split(":")[0], u.split("; ")[-1]) for u in unshown_weightless(File())]
    [("Keras MaxPooling2D 'max_pooling2d_1' (no weights, so nothing pairs it)", "the model calls it 'pool'")]
    """
    meta = source.metadata
    out = []
    if meta.get("keras_file") == "weights.h5":
        names = meta.get("vars_names") or {}
        for group in _weightless_groups(source):
            key = _key(group.rsplit("/", 1)[-1])
            name, called = group.rsplit("/", 1)[-1], names.get(group)
            cls = _CLASS_OF_KEY.get(key)
            if cls in _WEIGHTLESS:
                out.append(_said(cls, name, called))
            elif cls is None:
                out.append(
                    f"Keras layer '{name}' (no weights, so nothing pairs it): its class ('{key}' by the file) is "
                    "none weightport knows, perhaps one's own, so whatever it computes is not checked"
                    + ("" if not called or called == name else f"; the model calls it '{called}'")
                )
    elif meta.get("keras_file") == "legacy-h5":
        for name in (str(r.get("name")) for r in meta.get("layers") or [] if not r.get("weights")):
            cls = _CLASS_OF_KEY.get(_key(name))
            if cls in _WEIGHTLESS:
                out.append(_said(cls, name))
            elif name.startswith("tf."):  # tf.keras makes a layer (TFOpLambda) of each TensorFlow op called
                out.append(
                    f"TensorFlow op layer '{name}' (no weights, so nothing pairs it): its arguments and "
                    "constants, which the PyTorch model must compute as they say"
                )
    return out
