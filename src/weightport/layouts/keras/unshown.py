"""What a weights-only Keras file cannot show: per kind of layer, each setting of its configuration that
changes the forward pass while leaving every variable's shape as it is (Keras's own ``get_config`` keys),
with what the load assumes in its place. Settings the variables show (``units``, ``use_bias``, a GRU's
``reset_after``, a depthwise ``depth_multiplier``) are checked by shape instead; training-only ones
(initializers, dropout, momentum) change no output.

>>> [s.split(" (")[0] for s in _BY_KIND["Linear"]]
['activation']
"""

from __future__ import annotations

from typing import Any

from weightport.layouts.keras.layers import Part, Resolved
from weightport.layouts.pairing import Slot
from weightport.torch_facts import RNN_KINDS

__all__ = ["unshown_settings"]

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
