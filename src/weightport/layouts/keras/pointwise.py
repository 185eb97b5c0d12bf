"""A Keras 1 x 1 convolution of a one-position map, as the ``nn.Linear`` a PyTorch model has in its place.

keras.applications heads pool with ``keepdims=True`` and classify with 1 x 1 ``Conv2D`` layers
(MobileNetV3's ``Conv_2`` and ``Logits``); torchvision's and timm's twins flatten the pooled map and
apply ``nn.Linear``. On a map of one position the two compute the same thing: the kernel
``(1, 1, in, out)`` is the Linear's ``(out, in)`` weight. Such a layer is taken as a Linear only where
the file proves the map has one position (a global pooling with ``keepdims=True`` upstream, through
layers that keep positions, or the size the layer was built for), and only as many of them as the
model has Linears that no Dense fills and fewer convolutions than the file: the last convolutions of the
model's recorded order, each such a 1 x 1 one (a PyTorch model that has flattened its map applies no
convolution to it afterwards). ``mapping=`` can name others.

>>> from weightport.layouts.keras.layers import Layer, Part, Resolved
>>> found = Resolved(Layer("Logits", "Logits", "Conv2D", {"groups": 1}), "Conv2d", "Conv2D",
...                  [Part("Conv2D", {"kernel": "k"}, {"groups": 1}, shapes={"kernel": (1, 1, 8, 3)})])
>>> found.layer.one_position = True
>>> pointwise(found)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from weightport.layouts.keras.layers import Resolved
from weightport.layouts.slots import Slot

__all__ = ["pointwise", "as_linears", "PLAIN_CONVS"]

PLAIN_CONVS = frozenset({"Conv1D", "Conv2D", "Conv3D"})  # no depthwise, separable or transposed one


def pointwise(found: Resolved) -> bool:
    """Whether ``found`` is a plain 1 x 1 convolution of a map its file proves has one position."""
    if len(found.parts) != 1 or not found.layer.one_position:
        return False
    part = found.parts[0]
    kernel = part.shapes.get("kernel", ())
    return (
        part.cls in PLAIN_CONVS
        and part.config is not None
        and int(part.config.get("groups", 1) or 1) == 1
        and len(kernel) >= 3
        and math.prod(kernel[:-2]) == 1
    )


def as_linears(
    resolved: list[Resolved], slots: list[Slot], mapped: Mapping[str, str | None]
) -> list[Resolved]:
    """``resolved`` with the 1 x 1 convolutions of one-position maps that fill the model's Linears taken as
    Linears: those ``mapped`` to a Linear (layer name -> the kind of the module it is mapped to), and of the
    rest, the last convolutions of their kind in recorded order, as many as the model has Linears no Dense
    fills and convolutions too few for the file's, where each of those is such a 1 x 1 convolution."""

    def count(kinds: list[str], kind: str) -> int:
        return sum(k == kind for k in kinds)

    slot_kinds = [s.kind for s in slots]
    layer_kinds = [f.kind for f in resolved]
    chosen = {i for i, f in enumerate(resolved) if mapped.get(f.layer.name) == "Linear" and pointwise(f)}
    free = [i for i, f in enumerate(resolved) if f.layer.name not in mapped and pointwise(f)]
    spare_linears = count(slot_kinds, "Linear") - count(layer_kinds, "Linear") - len(chosen)
    for kind in dict.fromkeys(resolved[i].kind for i in free):
        extra_convs = count(layer_kinds, kind) - count(slot_kinds, kind)
        take = min(spare_linears, extra_convs)
        last = (
            [i for i, f in enumerate(resolved) if f.kind == kind and i not in chosen][-take:]
            if take > 0
            else []
        )
        if last and all(i in free for i in last):  # no conv of the map after them: the model flattened it
            chosen |= set(last)
            spare_linears -= len(last)
    return [
        replace(f, kind="Linear", detail=f"{f.detail} 1x1, of a one-position map") if i in chosen else f
        for i, f in enumerate(resolved)
    ]
