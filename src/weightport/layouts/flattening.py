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

from weightport.call_order import UNKNOWN, CallOrder
from weightport.errors import LayoutError
from weightport.layouts.base import Rule
from weightport.layouts.slots import Slot
from weightport.sources.base import Source
from weightport.transforms import Chain, Reshape, Transpose

__all__ = [
    "FlatMap",
    "said_axes",
    "rows_reordered",
    "MAP_KINDS",
    "rows_as_channels_first",
    "flattened_rules",
    "flattened_norm_rules",
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
    ``example_inputs=`` flattens a convolution's map of more than one position into ``slot`` in an order other
    than channels-last (a model input flattened as it is fed is no map)."""
    seen = call_order.flat_read(slot.path) if call_order is not None else None
    if seen is None or "c" not in seen[0] or _channels_last(seen[0]) or _positions(seen[1]) <= 1:
        return
    roles, sizes = seen
    what = f"a channels-first map {sizes}" if _channels_first(roles) else f"a map {sizes}"
    raise LayoutError(
        f"{where}: the forward pass on example_inputs= flattens {what} into {slot.said}, numbering its input "
        f"rows {said_axes(roles)}; {said} runs channels-last, so one that read a flattened map numbers them "
        f"{said_axes(_as_channels_last(roles))}, and {unknown}. Fix: {fix}."
    )


@dataclass(frozen=True)
class MapReaders:
    """What a model's modules say of which Linear may read a flattened map: each first Linear after a
    convolution (registration order), every convolution's channels, and every width a module outputs
    (:func:`map_readers`)."""

    after_conv: frozenset[int]  # ids of the Linears registered first after a convolution
    channels: frozenset[int]
    widths: frozenset[int]


def map_readers(module: nn.Module) -> MapReaders:
    """One walk over ``module``'s modules for :func:`unshown_flatten`.

    >>> readers = map_readers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(72, 4), nn.Linear(4, 2)))
    >>> len(readers.after_conv), sorted(readers.channels), sorted(readers.widths)
    (1, [8], [2, 4, 8])
    """
    after_conv: set[int] = set()
    channels: set[int] = set()
    widths: set[int] = set()
    linear_since = False  # a Linear between the last conv and this one reads no map of that conv
    for m in module.modules():
        if isinstance(m, nn.Linear) and channels and not linear_since:
            after_conv.add(id(m))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channels.add(m.out_channels)
            linear_since = False
        linear_since |= isinstance(m, nn.Linear)
        for size in _WIDTHS:
            width = getattr(m, size, None)
            width = width[-1] if isinstance(width, tuple) and width else width  # a norm's normalized_shape
            widths |= {width} if isinstance(width, int) else set()
        if isinstance(m, nn.RNNBase):  # a bidirectional one outputs both directions side by side
            widths.add((m.proj_size or m.hidden_size) * (2 if m.bidirectional else 1))
    return MapReaders(frozenset(after_conv), frozenset(channels), frozenset(widths))


def unshown_flatten(where: str, said: str, readers: MapReaders, slot: Slot, unknown: str, fix: str) -> bool:
    """Refuse a layer ``said`` of a source that records no flatten, loaded without ``example_inputs=``, into
    Linear ``slot`` where its input size may be a flattened map: a proper multiple of a convolution's
    channels that no module outputs as its width (registration order proves nothing of the order the forward
    calls them in). Returns whether the slot may read a map all the same, its order unchecked: the first Linear
    registered after a convolution whose input size, positions of its channels, some module also outputs
    (either may feed it), or no multiple of any convolution's channels (a map of one position reads alike)."""
    rows = getattr(slot.module, "in_features", None)
    if not isinstance(rows, int) or not readers.channels:
        return False
    maps = sorted(c for c in readers.channels if rows % c == 0 and rows > c)  # a map of several positions
    if rows in readers.widths:
        return bool(maps) and id(slot.module) in readers.after_conv
    if not maps:
        return id(slot.module) in readers.after_conv
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
    """How the forward pass on ``example_inputs=`` flattens a map into ``slot``: whether channels-last, and
    the map's shape in the order flattened; a LayoutError saying ``readings`` (the two readings of the
    source's ``items``, rows or columns) where the pass did not run, or flattens no convolution's map into it
    in either of PyTorch's two ways (``as_source``: how the source flattens, for the fix)."""
    roles, sizes = _shown(call_order, slot, readings, items, as_source)
    if _channels_first(roles) or _channels_last(roles):
        return _channels_last(roles), sizes
    raise LayoutError(
        f"{readings}. The forward pass on example_inputs= flattens {said_axes(roles, sizes)} into it, neither a "
        f"channels-first nor a channels-last map. Fix: flatten a feature map into it in forward, {as_source}."
    )


def _shown(
    call_order: CallOrder | None, slot: Slot, readings: str, items: str, as_source: str
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The axes the forward pass on ``example_inputs=`` flattens into ``slot`` (:meth:`CallOrder.flat_read`);
    a LayoutError saying ``readings`` where the pass did not run, or flattens nothing into it."""
    seen = call_order.flat_read(slot.path) if call_order is not None else None
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


class FlatMap(tuple[str, tuple[int, ...] | None]):
    """What a Keras Dense reads flattened: ``(layer, shape)``, the layer that flattened it and the sizes of the
    axes it flattened, in order, where the config records them all; with ``kind`` (``Flatten``, ``Reshape``,
    ``TimeDistributed(Flatten)``), ``roles`` (those axes, in order, as :data:`weightport.call_order.Axes`
    names them), ``sizes`` (each, or None) and ``lost`` (why their order is not known, else ``""``).

    >>> flat = FlatMap("flatten", (3, 4, 8), roles=("s0", "s1", "c"))
    >>> flat, flat.kind, flat.sizes
    (('flatten', (3, 4, 8)), 'Flatten', (3, 4, 8))
    """

    kind: str
    roles: tuple[str, ...]
    sizes: tuple[int | None, ...]
    lost: str

    def __new__(
        cls,
        layer: str,
        shape: tuple[int, ...] | None,
        *,
        kind: str = "Flatten",
        roles: tuple[str, ...] = (),
        sizes: tuple[int | None, ...] = (),
        lost: str = "",
    ) -> FlatMap:
        made = super().__new__(cls, (layer, shape))
        made.kind, made.roles, made.lost = kind, roles, lost
        made.sizes = sizes or (shape if shape is not None else (None,) * len(roles))
        return made


_SPATIAL = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def said_axes(roles: tuple[str, ...], sizes: tuple[int | None, ...] | None = None) -> str:
    """Axes named by role (:data:`weightport.call_order.Axes`), as a message says them.

    >>> said_axes(("s0", "s1", "c")), said_axes(("c", "s0"), (8, 5)), said_axes(("i0", "i1"))
    ('(height, width, channels)', '(channels 8, length 5)', '(input axis 1, input axis 2)')
    """
    spatial = _SPATIAL.get(sum(r.startswith("s") for r in roles), ())
    words = []
    for k, role in enumerate(roles):
        if role == "c":
            word = "channels"
        elif role.startswith("s") and int(role[1:]) < len(spatial):
            word = spatial[int(role[1:])]
        elif role[:1] in ("s", "i"):
            word = f"{'spatial' if role[0] == 's' else 'input'} axis {int(role[1:]) + 1}"
        else:
            word = "a split axis" if role == UNKNOWN else "a new axis"
        size = sizes[k] if sizes is not None and k < len(sizes) else None
        words.append(word if size is None else f"{word} {size}")
    return f"({', '.join(words)})"


def _spatial(roles: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"s{k}" for k in range(sum(r.startswith("s") for r in roles)))


def _channels_first(roles: tuple[str, ...]) -> bool:
    return roles == ("c", *_spatial(roles))


def _channels_last(roles: tuple[str, ...]) -> bool:
    return roles == (*_spatial(roles), "c")


def _as_channels_last(roles: tuple[str, ...]) -> tuple[str, ...]:
    return (*_spatial(roles), "c")


def _positions(sizes: tuple[int | None, ...]) -> int:
    """How many of ``sizes`` are more than 1 (unknown ones counted)."""
    return sum(n != 1 for n in sizes)


def _natural(roles: tuple[str, ...]) -> bool:
    """Whether a plain ``torch.flatten(x, 1)`` reads axes in this order: an NCHW map's, or the model input's
    own (the same array fed to both)."""
    return _channels_first(roles) or roles == tuple(f"i{k}" for k in range(len(roles)))


def rows_reordered(shape: tuple[int, ...], order: tuple[int, ...], out: int) -> Chain:
    """A Dense kernel ``(prod(shape), out)`` whose rows run over axes of ``shape`` as the ``(out, in)`` weight
    of a Linear whose input runs over those axes in ``order`` (each the index of an axis of ``shape``).

    >>> import numpy as np
    >>> kernel = np.arange(6 * 2).reshape(6, 2)  # rows (a 2, b 3)
    >>> rows_reordered((2, 3), (1, 0), 2)(kernel)[0].tolist()  # rows (b, a)
    [0, 6, 2, 8, 4, 10]
    """
    rank, features = len(shape), math.prod(shape)
    return Chain(
        Reshape((features, out), (*shape, out)),
        Transpose((*order, rank)),
        Reshape((*(shape[k] for k in order), out), (features, out)),
        Transpose((1, 0)),
    )


def flattened_norm_rules(
    found: Any, slot: Slot, rules: list[Rule], source: Source, call_order: CallOrder | None
) -> list[Rule]:
    """``rules`` for a Keras norm ``found`` whose input is a flattened map (``layer.flattened``): a vector per
    feature, its entries in the order the model flattens the same axes in; a LayoutError where that order is
    not shown, or the model flattens other axes (as :func:`flattened_rules` does for a Dense's rows)."""
    flat = found.layer.flattened
    if not isinstance(flat, FlatMap):
        return rules
    said = f"Keras {found.layer.class_name} '{found.layer.name}'"
    shown = _model_order(flat, slot, said, source.description, call_order, "vectors' entries")
    if shown is None:
        return rules
    order, shape, seen = shown
    count = math.prod(shape)
    reorder = Chain(
        Reshape((count,), shape), Transpose(order), Reshape(tuple(shape[k] for k in order), (count,))
    )
    moved = f" (entries reordered from {flat.kind} '{flat[0]}''s {said_axes(flat.roles)} to the model's {said_axes(seen)})"
    return [
        replace(r, op=Chain(r.op, reorder), origin=r.origin + moved)
        if r.sources and math.prod(source.infos[r.sources[0]].shape) == count
        else r
        for r in rules
    ]


def _model_order(
    flat: FlatMap, slot: Slot, said: str, where: str, call_order: CallOrder | None, items: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]] | None:
    """How the model's forward reorders what Keras layer ``said`` reads flattened (``flat``): the permutation
    of the axes Keras flattens (those of one position left out), their sizes, and the model's order of their
    roles; None where it reads them in Keras's order. A LayoutError where the order is not known, not shown,
    or the model flattens other axes or sizes (``items``: what the order numbers, for the messages)."""
    if flat.lost:
        raise LayoutError(
            f"{where}: {said} reads {flat.kind} '{flat[0]}' of the output of {flat.lost}: which axis each of its "
            f"{items} belongs to is not known, so no order of them can be checked. Fix: rebuild the Keras model "
            "so that what it flattens comes from layers whose axes weightport follows (convolutions, poolings, "
            f"normalizations, Permute), or reorder its {items} yourself and load the arrays by PyTorch name."
        )
    readings = _readings(said, flat, items)
    if _natural(flat.roles) and (call_order is None or call_order.flat_read(slot.path) is None):
        return None  # the order torch.flatten reads the same axes in
    seen = _shown(call_order, slot, f"{where}: {readings}", items, f"as Keras does before {said}")
    order = _order(flat, seen)
    if isinstance(order, str):
        keras = said_axes(flat.roles, flat.sizes)
        raise LayoutError(
            f"{where}: {readings}. The forward pass on example_inputs= flattens {said_axes(*seen)} into "
            f"{slot.said}, but Keras's {flat.kind} '{flat[0]}' flattens {keras}: "
            + (
                "the sizes differ. Fix: pass example_inputs= of the size the Keras model was built for."
                if order == "sizes"
                else f"other axes. Fix: flatten into {slot.said} what Keras flattens, {keras} in any order."
            )
        )
    if order == tuple(sorted(order)):
        return None
    sizes = dict(zip(*seen))
    return order, tuple(sizes[r] for r, _ in _kept(flat, seen)), seen[0]


def _readings(said: str, flat: FlatMap, items: str = "kernel's rows") -> str:
    """The two readings of what Keras layer ``said`` numbers by ``flat`` (a Dense's kernel's rows)."""
    roles, sizes = flat.roles, flat.sizes
    shape = f" {tuple(sizes)}" if None not in sizes else ""
    what = (
        "the model's input"
        if "c" not in roles
        else "a channels-last map"
        if _channels_last(roles)
        else "a channels-first map"
        if _channels_first(roles)
        else "features over the input's positions"
        if not _spatial(roles)
        else "a map"
    )
    head = f"{said} reads {flat.kind} '{flat[0]}' of {what}{shape}: its {items} run {said_axes(roles)}"
    if "c" not in roles:
        return f"{head}, as a model that flattens the same array reads them; the weights fit any order"
    if not _spatial(roles):  # features over the input's own axes (an Embedding's, a Dense's): no map
        return (
            f"{head}. A PyTorch model that flattens them as they are (torch.flatten(x, 1)) reads them so, one "
            f"that moves the features first (x.transpose(1, 2).flatten(1), as before a Conv1d) reads them "
            f"{said_axes(('c', *(r for r in roles if r != 'c')))}; the weights fit both and the outputs differ"
        )
    return (
        f"{head}. A PyTorch model that flattens its NCHW map (torch.flatten(x, 1), as torchvision's VGG does) "
        f"reads them {said_axes(('c', *_spatial(roles)))}, one that permutes channels-last first "
        f"(x.permute(0, 2, 3, 1).flatten(1)) reads them {said_axes(_as_channels_last(roles))}; the weights fit "
        "both and "
        "the outputs differ"
    )


def _kept(flat: FlatMap, seen: tuple[tuple[str, ...], tuple[int, ...]]) -> list[tuple[str, int | None]]:
    """The axes Keras flattens (``flat``) but those of one position, in Keras's recorded sizes or the
    model's."""
    model = dict(zip(*seen))
    return [(r, n) for r, n in zip(flat.roles, flat.sizes) if n != 1 and model.get(r) != 1]


def _order(flat: FlatMap, seen: tuple[tuple[str, ...], tuple[int, ...]]) -> tuple[int, ...] | str:
    """The axes the model flattens (``seen``), each as the index of the same axis among those Keras flattens
    (``flat``), both without axes of one position; or what differs."""
    keras = _kept(flat, seen)
    model = [(r, n) for r, n in zip(*seen) if n != 1]
    where = {r: k for k, (r, _) in enumerate(keras)}
    if len(where) != len(keras) or sorted(where) != sorted(r for r, _ in model) or len(model) != len(keras):
        return "axes"
    if any(keras[where[r]][1] not in (None, n) for r, n in model):
        return "sizes"
    return tuple(where[r] for r, _ in model)


def flattened_rules(
    found: Any, slot: Slot, rules: list[Rule], source: Source, call_order: CallOrder | None
) -> list[Rule]:
    """``rules`` for Keras Dense ``found`` (a resolved layer, with ``layer.flattened``, a :class:`FlatMap`) in
    ``slot``, its kernel's rows in the order the model flattens the same axes in; a LayoutError where that
    order is not shown, or the model flattens other axes."""
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
    if not isinstance(flat, FlatMap):  # a map recorded channels-last, without its axes
        flat = FlatMap(flat[0], flat[1], roles=(*(f"s{k}" for k in range(len(flat[1] or (0, 0)) - 1)), "c"))
    shown = _model_order(flat, slot, said, where, call_order, "kernel's rows")
    if shown is None:
        return rules
    order, shape, seen = shown
    stored = tuple(source.infos[kernel.sources[0]].shape)
    if kernel.op != Transpose((1, 0)) or len(stored) != 2:
        raise LayoutError(
            f"{where}: {_readings(said, flat)}. The model flattens {said_axes(seen)}, and this kernel {stored} is "
            "not stored (in, out), so weightport does not reorder it. Fix: flatten in the PyTorch model in Keras's "
            f"order {said_axes(flat.roles)}."
        )
    reordered = replace(
        kernel,
        op=rows_reordered(shape, order, stored[1]),
        origin=f"{kernel.origin} (rows reordered from {flat.kind} '{flat[0]}''s {said_axes(flat.roles)} to the "
        f"model's {said_axes(seen)})",
    )
    return [reordered if r is kernel else r for r in rules]
