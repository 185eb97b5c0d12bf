"""The box algebra of the :mod:`weightport.transforms` ops: which box of which input holds the
values of each box of an op's output.

One algebra serves two writers: the local write fuses a transform into the copy
(:func:`view_pieces`: each output box written from a view of its input, no intermediate
array), and the sharded write reads only a rank's shard through a layout
(:func:`region_pieces`: rows ``a:b`` of a transposed kernel are its columns ``a:b``).
A new :class:`~weightport.transforms.Op` that moves values box to box gets one branch in
``_next_pieces`` (or ``_first_pieces`` for ops of several inputs); others give None and
are computed whole.

>>> x = np.arange(6).reshape(2, 3)
>>> [(region, view.tolist()) for region, view in view_pieces(Transpose((1, 0)), [x])]
[((slice(0, 3, None), slice(0, 2, None)), [[0, 3], [1, 4], [2, 5]])]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from weightport.transforms import (
    Chain,
    Concat,
    Identity,
    Op,
    PadBlocks,
    ReorderBlocks,
    Reshape,
    Select,
    Shape,
    SliceBlocks,
    Stack,
    Transpose,
    Zeros,
)

__all__ = ["Region", "Piece", "region_pieces", "view_pieces"]

Region = tuple[slice, ...]


@dataclass(frozen=True)
class Piece:
    """One box of an op's output and the box of one input it comes from.

    ``dst`` is the box in the output; ``src`` the input's index (None: the box is
    zeros); ``region`` the box of that input holding the same values; ``axes`` the
    input axis each output axis comes from (-1: a new axis of length 1). Input
    axes not in ``axes`` were selected away (their slice has length 1).
    """

    dst: Region
    src: int | None
    region: Region
    axes: tuple[int, ...]

    def clip(self, axis: int, low: int, high: int) -> Piece | None:
        """The part of this piece with ``low <= index < high`` on output ``axis`` (None: empty)."""
        return _clip(self, axis, low, high)

    def view(self, array: np.ndarray) -> np.ndarray:
        """``array`` (the input's values in ``region``) as the values of ``dst`` (a view)."""
        kept = [a for a in self.axes if a >= 0]
        array = array[tuple(slice(None) if a in kept else 0 for a in range(array.ndim))]
        order = sorted(kept)
        array = array.transpose([order.index(a) for a in kept])
        for i, a in enumerate(self.axes):
            if a < 0:
                array = np.expand_dims(array, i)
        return array


def _box(shape: Shape) -> Region:
    return tuple(slice(0, d) for d in shape)


def _clip(piece: Piece, axis: int, low: int, high: int) -> Piece | None:
    """``piece`` cut to ``low <= index < high`` on output ``axis``; None when nothing is left."""
    part = piece.dst[axis]
    start, stop = max(part.start, low), min(part.stop, high)
    if start >= stop:
        return None
    if start == part.start and stop == part.stop:
        return piece
    dst = list(piece.dst)
    dst[axis] = slice(start, stop)
    region = list(piece.region)
    source_axis = piece.axes[axis]
    if piece.src is not None and source_axis >= 0:
        old = region[source_axis]
        region[source_axis] = slice(old.start + start - part.start, old.start + stop - part.start)
    return Piece(tuple(dst), piece.src, tuple(region), piece.axes)


def _shift(piece: Piece, axis: int, by: int) -> Piece:
    dst = list(piece.dst)
    dst[axis] = slice(dst[axis].start + by, dst[axis].stop + by)
    return Piece(tuple(dst), piece.src, piece.region, piece.axes)


def _zeros(box: Region) -> Piece:
    return Piece(box, None, (), (-1,) * len(box))


def _first_pieces(op: Op, shapes: Sequence[Shape]) -> tuple[list[Piece], Shape] | None:
    """The pieces of the first op of a chain, from its inputs' full boxes."""
    if isinstance(op, Zeros):
        return [_zeros(_box(op.shape))], op.shape
    whole = [Piece(_box(s), i, _box(s), tuple(range(len(s)))) for i, s in enumerate(shapes)]
    if isinstance(op, Concat):
        out, offset = [], 0
        for piece, shape in zip(whole, shapes):
            out.append(_shift(piece, op.axis, offset))
            offset += shape[op.axis]
        return out, op.out_shape(shapes)
    if isinstance(op, Stack):
        stacked = [
            Piece((slice(i, i + 1), *p.dst), p.src, p.region, (-1, *p.axes)) for i, p in enumerate(whole)
        ]
        return stacked, op.out_shape(shapes)
    if op.arity != 1 or len(shapes) != 1:
        return None
    return _next_pieces(op, whole, tuple(shapes[0]))


def _next_pieces(op: Op, pieces: list[Piece], shape: Shape) -> tuple[list[Piece], Shape] | None:
    """Map ``pieces`` of an array of ``shape`` through the one-input ``op``."""
    if isinstance(op, Identity) or (isinstance(op, Reshape) and op.source == op.target):
        return pieces, shape
    if isinstance(op, Transpose):
        moved = [
            Piece(tuple(p.dst[a] for a in op.axes), p.src, p.region, tuple(p.axes[a] for a in op.axes))
            for p in pieces
        ]
        return moved, op.out_shape([shape])
    new_shape = op.out_shape([shape])
    out: list[Piece] = []
    if isinstance(op, ReorderBlocks):
        size = shape[op.axis] // len(op.order)
        for piece in pieces:
            for i, block in enumerate(op.order):
                part = _clip(piece, op.axis, block * size, (block + 1) * size)
                if part is not None:
                    out.append(_shift(part, op.axis, (i - block) * size))
    elif isinstance(op, SliceBlocks):
        size = shape[op.axis] // op.count
        for piece in pieces:
            part = _clip(piece, op.axis, op.index * size, (op.index + 1) * size)
            if part is not None:
                out.append(_shift(part, op.axis, -op.index * size))
    elif isinstance(op, Select):
        for piece in pieces:
            part = _clip(piece, 0, op.index, op.index + 1)
            if part is not None:
                out.append(Piece(part.dst[1:], part.src, part.region, part.axes[1:]))
    elif isinstance(op, PadBlocks):
        size = shape[op.axis]
        out = [_shift(p, op.axis, op.index * size) for p in pieces]
        for block in range(op.count):
            if block != op.index:
                box = list(_box(new_shape))
                box[op.axis] = slice(block * size, (block + 1) * size)
                out.append(_zeros(tuple(box)))
    else:
        return None  # reshapes, sums: no box-to-box correspondence
    return out, new_shape


def region_pieces(op: Op, shapes: Sequence[Shape], region: Region) -> list[Piece] | None:
    """The pieces of ``op(*inputs)[region]``, each from one box of one input; None if not expressible.

    This is how a rank reads only its shard through a layout: a transposed Keras
    kernel whose PyTorch rows ``a:b`` are wanted reads the kernel's columns ``a:b``.
    Each piece's ``dst`` is relative to ``region``'s start. Ops that make values
    from several inputs at once (:class:`Sum`) or reshape give None.

    >>> op = Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0)))
    >>> x = np.arange(12).reshape(2, 6)
    >>> pieces = region_pieces(op, [x.shape], (slice(1, 3), slice(0, 2)))
    >>> [(p.dst, p.region) for p in pieces]  # output rows 1:3 come from two columns apart
    [((slice(0, 1, None), slice(0, 2, None)), (slice(0, 2, None), slice(3, 4, None))), ((slice(1, 2, None), slice(0, 2, None)), (slice(0, 2, None), slice(0, 1, None)))]
    >>> out = np.empty((2, 2), int)
    >>> for p in pieces:
    ...     out[p.dst] = p.view(x[p.region])
    >>> bool((out == op(x)[1:3, 0:2]).all())
    True
    """
    ops = op.ops if isinstance(op, Chain) else (op,)
    try:
        mapped = _first_pieces(ops[0], shapes)
        for step in ops[1:]:
            if mapped is None:
                return None
            mapped = _next_pieces(step, *mapped)
    except ValueError:
        return None
    if mapped is None:
        return None
    pieces, shape = mapped
    if len(region) != len(shape):
        return None
    out = []
    for piece in pieces:
        part: Piece | None = piece
        for axis, want in enumerate(region):
            part = _clip(part, axis, want.start, want.stop) if part is not None else None
        if part is not None:
            local = tuple(slice(d.start - w.start, d.stop - w.start) for d, w in zip(part.dst, region))
            out.append(Piece(local, part.src, part.region, part.axes))
    return out


def view_pieces(op: Op, arrays: Sequence[np.ndarray]) -> list[tuple[Region, np.ndarray]] | None:
    """``op(*arrays)`` as (output region, NumPy view) pieces without copying, or None.

    Gate reorders, transposes, selections, block slices and concatenations are all views
    of the inputs: writing each piece into its region of the destination fuses the
    transform into the copy (no intermediate array). Ops that make new values (zeros,
    sums, reshapes) give None. The same box algebra as :func:`region_pieces`, over the
    whole output.

    >>> x = np.arange(12).reshape(2, 6)
    >>> pieces = view_pieces(Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0))), [x])
    >>> out = np.empty((6, 2), int)
    >>> for region, view in pieces:
    ...     out[region] = view
    >>> bool((out == Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0)))(x)).all())
    True
    """
    try:
        shape = op.out_shape([a.shape for a in arrays])
    except ValueError:
        return None
    pieces = region_pieces(op, [a.shape for a in arrays], _box(shape))
    if pieces is None or any(p.src is None for p in pieces):
        return None
    return [(p.dst, p.view(arrays[p.src][p.region])) for p in pieces]  # type: ignore[index]
