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

from weightport.layouts.keras.layers import Part, Resolved
from weightport.layouts.pairing import Slot
from weightport.sources.base import Source
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


# Keras's default name for a layer without weights whose settings change its output (:mod:`.weightless`)
# -> (its class, those settings with Keras's defaults and the PyTorch module computing them)
_WEIGHTLESS = {
    "leaky_re_lu": (
        "LeakyReLU",
        "negative_slope (Keras's default 0.3: nn.LeakyReLU(0.3); nn.LeakyReLU()'s is 0.01)",
    ),
    "elu": ("ELU", "alpha (Keras's default 1: nn.ELU())"),
    "re_lu": (
        "ReLU",
        "negative_slope, threshold, max_value (Keras's defaults 0, 0, None: nn.ReLU(); 6: nn.ReLU6())",
    ),
    "activation": (
        "Activation",
        "activation (Keras's 'leaky_relu' has slope 0.2, nn.LeakyReLU()'s 0.01; 'softmax' is over axis -1)",
    ),
    "unit_normalization": ("UnitNormalization", "axis (Keras's default -1: F.normalize over the channels)"),
}
_NAMED = re.compile(rf"(?:^|/)({'|'.join(_WEIGHTLESS)})(?:_\d+)?$")


def unshown_weightless(source: Source) -> list[str]:
    """For a weights-only file, the layers it shows without weights (by Keras's default names, as a Keras 3
    ``.weights.h5`` files each layer's group and a legacy ``.h5`` lists its layer names) whose settings
    change what the model computes: each with the settings it cannot show, which the PyTorch model must
    compute as the Keras model set them."""
    meta = source.metadata
    if meta.get("keras_file") == "weights.h5":
        held = {name.rsplit("/vars/", 1)[0] for name in source.infos}
        names = [
            g for g in sorted(getattr(source, "groups", ())) if g not in held and not g.endswith("/vars")
        ]
    elif meta.get("keras_file") == "legacy-h5":
        names = [str(r.get("name")) for r in meta.get("layers") or [] if not r.get("weights")]
    else:
        return []
    out = []
    for name in names:
        found = _NAMED.search(name)
        if found is not None:
            cls, settings = _WEIGHTLESS[found[1]]
            out.append(
                f"Keras {cls} '{name.rsplit('/', 1)[-1]}' (no weights, so nothing pairs it): {settings}"
            )
    return out
