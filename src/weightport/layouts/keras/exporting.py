"""PyTorch -> Keras: a module's weights as the arrays a Keras 3 ``.weights.h5`` holds.

>>> import torch
>>> sorted(export(torch.nn.Linear(3, 2)))
['layers/dense/vars/0', 'layers/dense/vars/1']

Keras's SimpleRNN and LSTM have one bias where PyTorch has two: they export as ``bias_ih + bias_hh``, and
the result's ``notes`` say so (loading it back puts the sum in ``bias_ih`` and zeros in ``bias_hh``: the
same outputs, other tensors).

>>> print(export(torch.nn.LSTM(3, 2)).notes[0])  # doctest: +ELLIPSIS
'[0]' (LSTM): Keras has one bias, so it holds bias_ih_l0 + bias_hh_l0; ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from torch import nn

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import ExportedArrays
from weightport.layouts.keras.attention import attention_export
from weightport.layouts.keras.layers import CLASS_OF_KIND
from weightport.layouts.keras.rules import EXPORT, depthwise_op
from weightport.layouts.keras.scale import keras_slots, scale_parameter
from weightport.layouts.slots import LAYER_SCALE
from weightport.sources.keras import snake_case
from weightport.torch_facts import RNN_KINDS
from weightport.transforms import Sum

__all__ = ["export", "ExportedArrays"]


def export(module: nn.Module, mapping: Mapping[str, str] | None = None) -> ExportedArrays:
    """``module``'s weights as a Keras 3 ``.weights.h5`` holds them for the equivalent Keras model.

    Each slot (each layer of a multi-layer RNN) becomes one Keras layer, keyed by
    its class in snake case numbered per class in module order (``layers/lstm``,
    ``layers/lstm_1``, ``layers/bidirectional``, ``layers/dense``), which is how
    Keras files a Sequential or functional model with those layers in that order.

    Args:
        module: the PyTorch model.
        mapping: ``{keras group path or key: "module.path[layer]"}`` to file a slot under another key.

    Returns:
        The arrays by key (a dict), with ``.notes``: an RNN's or LSTM's two biases summed into Keras's one.
    """
    from weightport.tensors import numpy_of

    state = module.state_dict()
    wanted = {v: (k if "/" in k else f"layers/{k}") for k, v in (mapping or {}).items()}
    taken = set(wanted.values())
    counts: dict[str, int] = {}
    out = ExportedArrays()
    slots = keras_slots(module)
    # an nn.MultiheadAttention exports its out_proj as its output_dense: never again as a Dense of its own
    # (the model itself being one, its out_proj is listed as a slot too)
    inside = [f"{s.path}." if s.path else "" for s in slots if s.kind == "MultiheadAttention"]
    for slot in slots:
        if slot.kind != "MultiheadAttention" and any(slot.path.startswith(p) for p in inside):
            continue
        kind, m = slot.kind, cast(Any, slot.module)
        if kind not in EXPORT and kind not in ("MultiheadAttention", LAYER_SCALE):
            raise LayoutError(
                f"'{slot.label}' is {type(m).__name__}, which the Keras layout cannot export; it exports "
                f"{', '.join(sorted(CLASS_OF_KIND))} modules."
            )
        if kind == "LSTM" and getattr(m, "proj_size", None):
            raise UnsupportedConfigError(
                f"'{slot.label}' has proj_size={m.proj_size}; Keras LSTM has no projection."
            )
        table = EXPORT.get(kind, [])
        cls = CLASS_OF_KIND[kind]
        if kind in ("Conv1d", "Conv2d") and m.groups > 1 and m.groups == m.in_channels:
            # a Conv1d/Conv2d(groups=in_channels) is a DepthwiseConv1D/2D: kernel (*k, in, out // in)
            shape = (*m.kernel_size, m.in_channels, m.out_channels // m.in_channels)
            table = [("kernel", ("weight",), depthwise_op(shape).inverse()), *EXPORT[kind][1:]]
            cls = f"DepthwiseConv{len(m.kernel_size)}D"
        base = "bidirectional" if slot.bidirectional else snake_case(cls)
        path = wanted.get(slot.label) or wanted.get(slot.path)
        while path is None or (path in taken and slot.label not in wanted and slot.path not in wanted):
            n = counts.get(base, -1) + 1
            counts[base] = n
            path = f"layers/{base}" if n == 0 else f"layers/{base}_{n}"
        taken.add(path)
        if kind == "MultiheadAttention":
            out.update(attention_export(slot, state, path))
            continue
        if kind == LAYER_SCALE:  # a vector however the module shapes it: Keras's gamma (C,)
            out[f"{path}/vars/0"] = numpy_of(state[slot.name(scale_parameter(m) or "")], copy=True).reshape(
                -1
            )
            continue
        sides = (
            [("forward_layer/", False), ("backward_layer/", True)] if slot.bidirectional else [("", False)]
        )
        for side, reverse in sides:
            prefix = f"{path}/{side}{'cell/' if kind in RNN_KINDS else ''}vars/"
            index = 0
            for _var, params, op in table:
                names = [slot.name(p, reverse=reverse) for p in params]
                if not all(n in state for n in names):
                    continue
                if isinstance(op, Sum):
                    out.notes.append(_summed_note(slot.label, type(m).__name__, names))
                out[f"{prefix}{index}"] = np.ascontiguousarray(
                    op(*(numpy_of(state[n], copy=True) for n in names))
                )
                index += 1
    return out


def _summed_note(label: str, kind: str, names: list[str]) -> str:
    who = f"'{label}' ({kind})" if label else kind
    return (
        f"{who}: Keras has one bias, so it holds {' + '.join(names)}; loading it back puts the sum "
        f"in {names[0]} and zeros in {names[1]}: the same outputs (up to float rounding), not the same tensors"
    )
