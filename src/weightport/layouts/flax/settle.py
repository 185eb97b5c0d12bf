"""Kinds the params alone leave open, settled against the module by the names both sides use.

A rank-2 ``kernel`` is a Flax ``Dense`` ``(in, out)`` or transformers' ``FlaxConv1D``, which stores
its kernel ``(features, in)`` (``self.param("kernel", init, (features, in))``, applied as
``inputs @ kernel.T``). Both go into PyTorch through one transpose: a Dense's into ``nn.Linear``'s
``(out, in)``, a FlaxConv1D's into transformers' ``Conv1D``'s ``(in, out)``. Which one a layer is
cannot be read from its params, so a Dense-like layer is a FlaxConv1D where its name is a
``Conv1D``'s path in the module (``h/0/attn/c_attn`` -> ``h.0.attn.c_attn``, also inside a wrapped
model), where ``mapping=`` sends it to one, or where the module has ``Conv1D`` modules and no
``nn.Linear`` at all (GPT-2's transformer).

>>> import torch
>>> from weightport.layouts.flax.layers import Layer
>>> layers = [Layer("fc", "Linear", "Dense")]
>>> settle_conv1d(layers, torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
>>> layers[0].kind
'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from weightport.layouts.flax.layers import Layer
from weightport.layouts.flax.tree import name_paths
from weightport.layouts.slots import Slot, module_slots

__all__ = ["settle_conv1d", "named_slots", "CONV1D", "CONV1D_DETAIL"]

CONV1D = "Conv1D"  # the slot kind of transformers' Conv1D (see layouts.slots)
CONV1D_DETAIL = "FlaxConv1D"


def named_slots(layer_name: str, slots: list[Slot], mapping: Mapping[str, str] | None) -> list[Slot]:
    """The slots ``layer_name`` names: through ``mapping=``, its own path, or that path inside a wrapper."""
    target = (mapping or {}).get(layer_name)
    if target is not None:
        path = target.split("[", 1)[0]
        return [s for s in slots if s.path == path]
    paths = (layer_name.replace("/", "."), *name_paths(layer_name))
    return [s for s in slots for p in paths if s.path == p or s.path.endswith("." + p)]


def settle_conv1d(layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None) -> None:
    """Dense-like layers that are transformers' FlaxConv1D become kind ``Conv1D`` (see the module doc)."""
    slots = module_slots(module)
    kinds = {slot.kind for slot in slots}
    if CONV1D not in kinds:
        return
    only_conv1d = "Linear" not in kinds
    for layer in layers:
        if layer.kind != "Linear" or layer.detail != "Dense":
            continue
        named = {slot.kind for slot in named_slots(layer.name, slots, mapping)}
        if named == {CONV1D} or (only_conv1d and not named):
            layer.kind, layer.detail = CONV1D, CONV1D_DETAIL
