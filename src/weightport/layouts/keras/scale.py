"""A Keras ``LayerScale`` (ConvNeXt's, ``x * gamma`` over the channels) and the PyTorch tensor it fills.

PyTorch has no layer-scale module: each port keeps the vector as a parameter of its own, on a
module of no known kind: torchvision's ``CNBlock.layer_scale`` ``(C, 1, 1)``, timm's
``ConvNeXtBlock.gamma`` and ``LayerScale.gamma`` ``(C,)``, transformers' ``layer_scale_parameter``.
Such a module is a *layer-scale slot* where it holds exactly that one parameter and no buffer, a
vector (one dimension above 1), named for what it does (``gamma`` or ``...scale...``, in the
tensor's or the class's name): a bare vector of another name (an added bias) is never taken for
a scale. The Keras vector fills it as it is, reshaped where the module keeps it as ``(C, 1, 1)``.

>>> import torch
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.layer_scale = torch.nn.Parameter(torch.ones(4, 1, 1))
...         self.conv = torch.nn.Conv2d(4, 4, 1)
>>> scale_parameter(Block()), scale_parameter(torch.nn.Linear(2, 2))
('layer_scale', None)
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from torch import nn

from weightport.layouts.base import Rule
from weightport.layouts.slots import LAYER_SCALE, Slot, module_slots
from weightport.transforms import Identity, Op, Reshape

__all__ = ["scale_parameter", "keras_slots", "scale_rule"]

_SCALE_NAME = re.compile(r"gamma|scale", re.IGNORECASE)


def scale_parameter(module: nn.Module) -> str | None:
    """The name of ``module``'s one own layer-scale vector, or None where it is not a layer-scale slot."""
    own = list(module.named_parameters(recurse=False))
    if len(own) != 1 or any(True for _ in module.named_buffers(recurse=False)):
        return None
    name, tensor = own[0]
    if sum(1 for d in tensor.shape if d != 1) != 1:
        return None
    return name if _SCALE_NAME.search(name) or _SCALE_NAME.search(type(module).__name__) else None


def keras_slots(module: nn.Module) -> list[Slot]:
    """``module``'s slots, its layer-scale slots (a module of no known kind holding only the vector)
    given the kind a Keras ``LayerScale`` fills."""
    return [
        replace(slot, kind=LAYER_SCALE)
        if slot.kind.startswith("other:") and scale_parameter(slot.module) is not None
        else slot
        for slot in module_slots(module)
    ]


def scale_rule(gamma: str, size: tuple[int, ...], slot: Slot, said: str) -> Rule:
    """The rule that puts the Keras ``gamma`` (``size``) into the slot's vector, reshaped to its shape."""
    name = scale_parameter(slot.module) or "gamma"
    target = tuple(getattr(slot.module, name).shape) if hasattr(slot.module, name) else size
    op: Op = Reshape(size, target) if target != size and math.prod(target) == math.prod(size) else Identity()
    return Rule(slot.name(name), (gamma,), op, said)
