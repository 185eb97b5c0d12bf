"""Small pure NumPy transforms that layouts are written in, each with its inverse.

Every op rearranges values without changing any (so value checks can run on the
source arrays), computes its output shape without data, and names its inverse,
so ``op.inverse()(op(x))`` gives ``x`` back and export comes for free.

>>> import numpy as np
>>> op = Chain(ReorderBlocks(axis=1, order=(1, 0, 2)), Transpose((1, 0)))
>>> x = np.arange(12).reshape(2, 6)
>>> op(x).shape, op.out_shape([(2, 6)])
((6, 2), (6, 2))
>>> bool((op.inverse()(op(x)) == x).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Op",
    "Identity",
    "Transpose",
    "ReorderBlocks",
    "Select",
    "Stack",
    "SliceBlocks",
    "Concat",
    "Reshape",
    "Chain",
    "Zeros",
    "Sum",
    "PadBlocks",
    "view_pieces",
    "Piece",
    "region_pieces",
]

Shape = tuple[int, ...]


class Op:
    """A transform from one or more arrays to one array.

    ``value_preserving`` ops only move values (so checks on their inputs hold for
    their output); the others (:class:`Zeros`, :class:`Sum`) make new values.
    """

    arity: int = 1
    value_preserving: bool = True

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        """The output shape for inputs of ``shapes``; ValueError if they do not fit."""
        raise NotImplementedError

    def inverse(self) -> Op:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Identity(Op):
    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return arrays[0]

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return tuple(shapes[0])

    def inverse(self) -> Op:
        return self

    def describe(self) -> str:
        return "as is"


@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes (a view, no copy): ``Transpose((1, 0))`` is ``.T`` of a matrix."""

    axes: tuple[int, ...]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return arrays[0].transpose(self.axes)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if len(shape) != len(self.axes):
            raise ValueError(f"transpose{self.axes} needs {len(self.axes)} dimensions, got {len(shape)}")
        return tuple(shape[a] for a in self.axes)

    def inverse(self) -> Op:
        return Transpose(tuple(int(i) for i in np.argsort(self.axes)))

    def describe(self) -> str:
        return "transpose" if self.axes == (1, 0) else f"transpose{self.axes}"


@dataclass(frozen=True)
class ReorderBlocks(Op):
    """Split ``axis`` into ``len(order)`` equal blocks and put block ``order[i]`` at ``i``.

    Gate reorders are this: Keras GRU z,r,h -> PyTorch r,z,n is ``order=(1, 0, 2)``.
    """

    axis: int
    order: tuple[int, ...]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        array = arrays[0]
        size = array.shape[self.axis] // len(self.order)
        index = np.concatenate([np.arange(b * size, (b + 1) * size) for b in self.order])
        return np.take(array, index, axis=self.axis)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if len(shape) <= self.axis or shape[self.axis] % len(self.order):
            raise ValueError(f"axis {self.axis} of {shape} does not split into {len(self.order)} blocks")
        return tuple(shape)

    def inverse(self) -> Op:
        return ReorderBlocks(self.axis, tuple(int(i) for i in np.argsort(self.order)))

    def describe(self) -> str:
        return f"blocks{self.order}"


@dataclass(frozen=True)
class Select(Op):
    """Take index ``index`` of axis 0 (a view): ONNX's ``W[d]``, Keras GRU's ``bias[0]``.

    ``count`` is the axis's expected length, so the inverse (:class:`Stack`) knows it.
    """

    index: int
    count: int

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return arrays[0][self.index]

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if not shape or shape[0] != self.count:
            raise ValueError(f"expected axis 0 of length {self.count}, got shape {shape}")
        return tuple(shape[1:])

    def inverse(self) -> Op:
        return Stack(self.count)

    def describe(self) -> str:
        return f"[{self.index}]"


@dataclass(frozen=True)
class Stack(Op):
    """Stack ``count`` arrays along a new axis 0 (the inverse of one :class:`Select` per index)."""

    count: int

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.count

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.stack(arrays)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != self.count or len({tuple(s) for s in shapes}) != 1:
            raise ValueError(f"stack needs {self.count} arrays of one shape, got {list(shapes)}")
        return (self.count, *shapes[0])

    def inverse(self) -> Op:
        raise ValueError("Stack has one inverse per output; use Select(i, count) for each")

    def describe(self) -> str:
        return "stack"


@dataclass(frozen=True)
class SliceBlocks(Op):
    """Block ``index`` of ``count`` equal blocks along ``axis`` (a view): ONNX's ``B[:, :4H]``."""

    axis: int
    index: int
    count: int

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        array = arrays[0]
        size = array.shape[self.axis] // self.count
        key = [slice(None)] * array.ndim
        key[self.axis] = slice(self.index * size, (self.index + 1) * size)
        return array[tuple(key)]

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = list(shapes[0])
        if len(shape) <= self.axis or shape[self.axis] % self.count:
            raise ValueError(f"axis {self.axis} of {tuple(shape)} does not split into {self.count} blocks")
        shape[self.axis] //= self.count
        return tuple(shape)

    def inverse(self) -> Op:
        raise ValueError("SliceBlocks has one inverse per block; use Concat(axis, count) of all blocks")

    def describe(self) -> str:
        return f"block {self.index}/{self.count} of axis {self.axis}"


@dataclass(frozen=True)
class Concat(Op):
    """Concatenate ``count`` arrays along ``axis`` (the inverse of :class:`SliceBlocks`)."""

    axis: int
    count: int

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.count

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.concatenate(arrays, axis=self.axis)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != self.count:
            raise ValueError(f"concat needs {self.count} arrays, got {len(shapes)}")
        first = list(shapes[0])
        for s in shapes[1:]:
            rest = [d for i, d in enumerate(s) if i != self.axis]
            if len(s) != len(first) or rest != [d for i, d in enumerate(first) if i != self.axis]:
                raise ValueError(f"cannot concatenate shapes {list(shapes)} along axis {self.axis}")
        first[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(first)

    def inverse(self) -> Op:
        raise ValueError("Concat has one inverse per input; use SliceBlocks(axis, i, count)")

    def describe(self) -> str:
        return f"concat axis {self.axis}"


@dataclass(frozen=True)
class Reshape(Op):
    """Reshape from ``source`` to ``target`` (both given, so the inverse is known)."""

    source: tuple[int, ...]
    target: tuple[int, ...]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return arrays[0].reshape(self.target)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if tuple(shapes[0]) != self.source:
            raise ValueError(f"reshape expects {self.source}, got {tuple(shapes[0])}")
        return self.target

    def inverse(self) -> Op:
        return Reshape(self.target, self.source)

    def describe(self) -> str:
        return f"reshape {self.target}"


class Chain(Op):
    """Apply ``ops`` in turn; only the first may take several arrays."""

    def __init__(self, *ops: Op) -> None:
        if not ops or any(op.arity != 1 for op in ops[1:]):
            raise ValueError("Chain needs at least one op, and only the first may take several arrays")
        self.ops = ops

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.ops[0].arity

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        out = self.ops[0](*arrays)
        for op in self.ops[1:]:
            out = op(out)
        return out

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = self.ops[0].out_shape(shapes)
        for op in self.ops[1:]:
            shape = op.out_shape([shape])
        return shape

    def inverse(self) -> Op:
        return Chain(*(op.inverse() for op in reversed(self.ops)))

    def describe(self) -> str:
        return ", ".join(op.describe() for op in self.ops)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and other.ops == self.ops

    def __hash__(self) -> int:
        return hash(self.ops)

    def __repr__(self) -> str:
        return f"Chain{self.ops!r}"


@dataclass(frozen=True)
class Zeros(Op):
    """A zero array of ``shape`` from no input: Keras SimpleRNN has no ``bias_hh``."""

    shape: tuple[int, ...]
    arity = 0
    value_preserving = False

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return self.shape

    def inverse(self) -> Op:
        raise ValueError("Zeros has no inverse: the value it makes carries no information")

    def describe(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class Sum(Op):
    """Element-wise sum of ``count`` arrays (export of a split bias into a single one)."""

    count: int
    value_preserving = False

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.count

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        out = np.array(arrays[0], copy=True)
        for a in arrays[1:]:
            out = out + a
        return out

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != self.count or len({tuple(s) for s in shapes}) != 1:
            raise ValueError(f"sum needs {self.count} arrays of one shape, got {list(shapes)}")
        return tuple(shapes[0])

    def inverse(self) -> Op:
        raise ValueError("Sum has no inverse: it loses the split")

    def describe(self) -> str:
        return "sum"


@dataclass(frozen=True)
class PadBlocks(Op):
    """Put the input as block ``index`` of ``count`` along ``axis``, zeros elsewhere.

    Linen's GRU has only ``b_hn`` on the hidden side: ``bias_hh = [0, 0, b_hn]``.
    The inverse is :class:`SliceBlocks` (the zero blocks carry nothing).
    """

    axis: int
    index: int
    count: int
    value_preserving = False

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        array = arrays[0]
        shape = list(array.shape)
        size = shape[self.axis]
        shape[self.axis] = size * self.count
        out = np.zeros(shape, array.dtype)
        key = [slice(None)] * array.ndim
        key[self.axis] = slice(self.index * size, (self.index + 1) * size)
        out[tuple(key)] = array
        return out

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        shape = list(shapes[0])
        if len(shape) <= self.axis:
            raise ValueError(f"no axis {self.axis} in shape {tuple(shape)}")
        shape[self.axis] *= self.count
        return tuple(shape)

    def inverse(self) -> Op:
        return SliceBlocks(self.axis, self.index, self.count)

    def describe(self) -> str:
        return f"as block {self.index + 1} of {self.count}, zeros elsewhere"


Region = tuple[slice, ...]


def view_pieces(op: Op, arrays: Sequence[np.ndarray]) -> list[tuple[Region, np.ndarray]] | None:
    """``op(*arrays)`` as (output region, NumPy view) pieces without copying, or None.

    Gate reorders, transposes, selections and block slices are all views of the
    input: writing each piece into its region of the destination fuses the
    transform into the copy (no intermediate array). Ops that make new arrays
    (concatenations, zeros, sums, reshapes) give None.

    >>> x = np.arange(12).reshape(2, 6)
    >>> pieces = view_pieces(Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0))), [x])
    >>> out = np.empty((6, 2), int)
    >>> for region, view in pieces:
    ...     out[region] = view
    >>> bool((out == Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0)))(x)).all())
    True
    """
    ops = op.ops if isinstance(op, Chain) else (op,)
    if len(arrays) != 1 or ops[0].arity != 1:
        return None
    shape = tuple(arrays[0].shape)
    pieces: list[tuple[Region, np.ndarray]] = [(tuple(slice(0, d) for d in shape), arrays[0])]
    for step in ops:
        mapped = _map_pieces(step, pieces, shape)
        if mapped is None:
            return None
        pieces, shape = mapped
    return pieces


def _full(region: Region, axis: int, size: int) -> bool:
    return region[axis].start == 0 and region[axis].stop == size


def _map_pieces(
    op: Op, pieces: list[tuple[Region, np.ndarray]], shape: Shape
) -> tuple[list[tuple[Region, np.ndarray]], Shape] | None:
    if isinstance(op, Identity):
        return pieces, shape
    if isinstance(op, Transpose):
        return [(tuple(r[a] for a in op.axes), v.transpose(op.axes)) for r, v in pieces], op.out_shape(
            [shape]
        )
    if isinstance(op, ReorderBlocks):
        axis, count = op.axis, len(op.order)
        if not all(_full(r, axis, shape[axis]) for r, _ in pieces):
            return None
        size = shape[axis] // count
        out = []
        for region, view in pieces:
            for i, block in enumerate(op.order):
                key = [slice(None)] * view.ndim
                key[axis] = slice(block * size, (block + 1) * size)
                new = list(region)
                new[axis] = slice(i * size, (i + 1) * size)
                out.append((tuple(new), view[tuple(key)]))
        return out, shape
    if isinstance(op, (Select, SliceBlocks)):
        axis = 0 if isinstance(op, Select) else op.axis
        if not all(_full(r, axis, shape[axis]) for r, _ in pieces):
            return None
        new_shape = op.out_shape([shape])
        out = []
        for region, view in pieces:
            new = list(region)
            if isinstance(op, Select):
                del new[0]
            else:
                new[axis] = slice(0, new_shape[axis])
            out.append((tuple(new), op(view)))
        return out, new_shape
    return None


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
