"""A Dense that reads a flattened feature map: which input row is which.

Keras and Flax run convolutions channels-last, so a ``Flatten`` of a ``(7, 7, 512)`` map numbers the next
Dense's input rows (height, width, channels). A PyTorch model that flattens its NCHW map
(``torch.flatten(x, 1)``, as torchvision's VGG does) numbers them (channels, height, width); one that
permutes channels-last first (``x.permute(0, 2, 3, 1).flatten(1)``) numbers them as Keras does. The shapes
are the same either way, so only the model's forward tells: the pass on ``example_inputs=`` shows how it
flattens (see :meth:`weightport.call_order.CallOrder.flattened`), and the kernel's rows are reordered to
match. Without it, the load is refused with both readings. A source that records no ``Flatten`` (a
weights-only file, a Flax checkpoint) cannot say it read a map: where the model flattens a channels-first
one into the layer, the load is refused (:func:`unrecorded_flatten`). Without ``example_inputs=``, a Dense
in the first Linear after a convolution (in registration order), whose input size is no module's output
width, may read a map: where that size is a multiple of the convolution's channels (or the widest one's)
it is refused with both readings (:func:`unshown_flatten`), otherwise reported unchecked
(:func:`flatten_unchecked`).

>>> op = rows_as_channels_first((2, 2, 3), 5)
>>> import numpy as np
>>> kernel = np.arange(12 * 5).reshape(12, 5)  # rows (h, w, c)
>>> op(kernel)[:, 1].tolist() == kernel.reshape(2, 2, 3, 5).transpose(2, 0, 1, 3).reshape(12, 5)[1].tolist()
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from weightport.call_order import CallOrder
from weightport.errors import LayoutError
from weightport.layouts.base import Rule
from weightport.layouts.slots import Slot
from weightport.sources.base import Source
from weightport.transforms import Chain, Reshape, Transpose

__all__ = [
    "MAP_KINDS",
    "rows_as_channels_first",
    "flattened_rules",
    "unrecorded_flatten",
    "unshown_flatten",
    "map_readers",
    "MapReaders",
    "flatten_unchecked",
    "shown_flatten",
]

NO_CONFIG = "the file, which records no configuration, does not say whether it read a Flatten of a map"
MAP_KINDS = frozenset({"Conv1d", "Conv2d", "Conv3d"})  # layers whose outputs a Dense may read flattened


def rows_as_channels_first(shape: tuple[int, ...], out: int) -> Chain:
    """A Dense kernel ``(prod(shape), out)`` whose rows run over a channels-last map of ``shape`` as the
    ``(out, in)`` weight of a Linear whose input runs over the channels-first map."""
    *spatial, channels = shape
    rank = len(shape)
    features = math.prod(shape)
    return Chain(
        Reshape((features, out), (*shape, out)),
        Transpose((rank - 1, *range(rank - 1), rank)),
        Reshape((channels, *spatial, out), (features, out)),
        Transpose((1, 0)),
    )


def unrecorded_flatten(
    where: str, said: str, slot: Slot, call_order: CallOrder | None, unknown: str, fix: str
) -> None:
    """Refuse a layer ``said`` of a source that records no flatten, where the forward pass on
    ``example_inputs=`` flattens a channels-first map of more than one position into ``slot``."""
    seen = call_order.flattened(slot.path) if call_order is not None else None
    if seen is None or seen[0] or math.prod(seen[1][1:]) == 1:
        return
    raise LayoutError(
        f"{where}: the forward pass on example_inputs= flattens a channels-first map {seen[1]} into {slot.said}, "
        f"numbering its input rows (channels, height, width); {said} runs channels-last, so one that read a "
        f"flattened map numbers them (height, width, channels), and {unknown}. Fix: {fix}."
    )


@dataclass(frozen=True)
class MapReaders:
    """What a model's modules say of which Linear may read a flattened map: each first Linear after a
    convolution (registration order) with that convolution's channels, the widest convolution's channels,
    and every width a module outputs (:func:`map_readers`)."""

    after_conv: dict[int, int]  # id of a Linear -> the channels of the convolution just before it
    widest: int
    widths: frozenset[int]


def map_readers(module: nn.Module) -> MapReaders:
    """One walk over ``module``'s modules for :func:`unshown_flatten`.

    >>> readers = map_readers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(72, 4), nn.Linear(4, 2)))
    >>> list(readers.after_conv.values()), readers.widest, sorted(readers.widths)
    ([8], 8, [2, 4, 8])
    """
    after_conv: dict[int, int] = {}
    convs: list[int] = []
    widths: set[int] = set()
    linear_since = False  # a Linear between the last conv and this one reads no map of that conv
    for m in module.modules():
        if isinstance(m, nn.Linear) and convs and not linear_since:
            after_conv[id(m)] = convs[-1]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            convs.append(m.out_channels)
            linear_since = False
        linear_since |= isinstance(m, nn.Linear)
        for size in _WIDTHS:
            width = getattr(m, size, None)
            width = width[-1] if isinstance(width, tuple) and width else width  # a norm's normalized_shape
            widths |= {width} if isinstance(width, int) else set()
    return MapReaders(after_conv, max(convs, default=0), frozenset(widths))


def unshown_flatten(where: str, said: str, readers: MapReaders, slot: Slot, unknown: str, fix: str) -> bool:
    """Refuse a layer ``said`` of a source that records no flatten, loaded without ``example_inputs=``, into
    Linear ``slot`` where its input size may be a flattened map: the first Linear after a convolution (in
    registration order), its input size a proper multiple of the channels of that convolution or of the
    widest one, and no width a module outputs (``readers``, from :func:`map_readers`). Returns whether the
    slot may read a map at all (the first Linear after a convolution, of no module's output width): its
    order is unchecked."""
    rows = getattr(slot.module, "in_features", None)
    last = readers.after_conv.get(id(slot.module), 0)
    if not isinstance(rows, int) or not last or rows in readers.widths:
        return False
    maps = sorted({c for c in (readers.widest, last) if rows % c == 0})
    if not maps:
        return True
    raise LayoutError(
        f"{where}: {said} in {slot.said} takes {rows} inputs, {rows // maps[-1]} positions of a map of "
        f"{maps[-1]} channels, a width no module outputs: it may read a flattened feature map, and {unknown}. "
        "A channels-last framework numbers such rows (height, width, channels), a PyTorch flatten of an NCHW "
        "map (channels, height, width); the weights fit both and the outputs differ. Fix: pass example_inputs= "
        f"(one forward pass on meta tensors shows whether and how the model flattens a map into it), or {fix}."
    )


_WIDTHS = (
    "out_channels",
    "out_features",
    "num_features",
    "num_channels",
    "normalized_shape",
    "embedding_dim",
    "hidden_size",
)


def flatten_unchecked(said: str) -> str:
    """The note for a Dense of a source with convolutions that records no flatten, loaded without
    ``example_inputs=``."""
    return (
        f"whether {said} reads a flattened feature map: a channels-last framework numbers such rows "
        "(height, width, channels), a PyTorch flatten of an NCHW map (channels, height, width); "
        "example_inputs= shows how the model flattens"
    )


def shown_flatten(
    call_order: CallOrder | None, slot: Slot, readings: str, items: str, as_source: str
) -> tuple[bool, tuple[int, ...]]:
    """How the forward pass on ``example_inputs=`` flattens a map into ``slot`` (see
    :meth:`CallOrder.flattened`); a LayoutError saying ``readings`` (the two readings of the source's
    ``items``, rows or columns) where the pass did not run, or flattens no map into it (``as_source``: how
    the source flattens, for the fix)."""
    seen = call_order.flattened(slot.path) if call_order is not None else None
    if seen is not None:
        return seen
    fix = (
        "pass example_inputs= (inputs for one forward pass, run on meta tensors: it shows how the model "
        f"flattens, and the {items} are reordered to match)"
        if call_order is None
        else f"flatten a feature map into it in forward, {as_source}"
    )
    shown = "" if call_order is None else " The forward pass on example_inputs= flattens no map into it."
    raise LayoutError(f"{readings}.{shown} Fix: {fix}.")


def flattened_rules(
    found: Any, slot: Slot, rules: list[Rule], source: Source, call_order: CallOrder | None
) -> list[Rule]:
    """``rules`` for Keras Dense ``found`` (a resolved layer, with ``layer.flattened``) in ``slot``, its
    kernel's rows in the order the model flattens its map in; a LayoutError where that order is not shown,
    or is not the one the file records."""
    where, said = source.description, f"Keras Dense '{found.layer.name}'"
    flat = found.layer.flattened
    weight = slot.name("weight")
    kernel = next((r for r in rules if r.target == weight), None)
    if kernel is None:
        return rules
    if flat is None and any(part.config is not None for part in found.parts):
        return rules  # the configuration shows no Flatten before it
    if flat is None:  # a file without a configuration: nothing says whether Keras flattened a map
        unrecorded_flatten(
            where,
            said,
            slot,
            call_order,
            NO_CONFIG,
            "load the .keras file or the Keras model itself (it records the Flatten, and the rows are reordered "
            "to match), or build the Keras model from these weights and save it with model.save('model.keras')",
        )
        return rules
    flatten, recorded = flat
    shown = f" {recorded}" if recorded else ""
    readings = (
        f"{said} reads Flatten '{flatten}' of a channels-last map{shown}: its kernel's rows run (height, width, "
        "channels). A PyTorch model that flattens its NCHW map (torch.flatten(x, 1), as torchvision's VGG "
        "does) reads them (channels, height, width), one that permutes channels-last first "
        "(x.permute(0, 2, 3, 1).flatten(1)) as Keras does; the weights fit both and the outputs differ"
    )
    channels_last, shape = shown_flatten(
        call_order, slot, f"{where}: {readings}", "rows", "as Keras does before that Dense"
    )
    keras_shape = shape if channels_last else (*shape[1:], shape[0])
    if recorded is not None and tuple(recorded) != keras_shape:
        raise LayoutError(
            f"{where}: {readings}. The forward pass on example_inputs= flattens a map {shape} into {slot.said}, "
            f"which is not that map. Fix: pass example_inputs= of the size the Keras model was built for."
        )
    stored = tuple(source.infos[kernel.sources[0]].shape)
    if channels_last or math.prod(keras_shape[:-1]) == 1:
        return rules
    if kernel.op != Transpose((1, 0)) or len(stored) != 2:
        raise LayoutError(
            f"{where}: {readings}. The model flattens channels-first, and this kernel {stored} is not stored "
            "(in, out), so weightport does not reorder it. Fix: permute the map channels-last before "
            "flattening in the PyTorch model (x.permute(0, 2, 3, 1).flatten(1))."
        )
    out = stored[1]
    reordered = replace(
        kernel,
        op=rows_as_channels_first(keras_shape, out),
        origin=f"{kernel.origin} (rows reordered from Flatten '{flatten}''s (height, width, channels) to "
        f"the model's (channels, height, width))",
    )
    return [reordered if r is kernel else r for r in rules]
