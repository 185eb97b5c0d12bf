"""Small pure NumPy transforms that layouts are written in, each with its inverse.

Every op rearranges values without changing any (so value checks can run on the
source arrays), computes its output shape without data, and names its inverse,
so ``op.inverse()(op(x))`` gives ``x`` back and export comes for free. Which box of
which input each output box comes from is :mod:`weightport.boxes`.

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
    "ConcatAfter",
    "Reshape",
    "Chain",
    "Zeros",
    "Full",
    "Sum",
    "PadBlocks",
]

Shape = tuple[int, ...]


class Op:
    """A transform from one or more arrays to one array.

    ``value_preserving`` ops only move values (so checks on their inputs hold for
    their output); the others (:class:`Zeros`, :class:`Full`, :class:`Sum`) make new values.
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
class ConcatAfter(Op):
    """Each input through its own op, then concatenated along ``axis`` (ONNX: an attention's in_proj from its
    query and key-value parts, each stored transposed).

    >>> ConcatAfter((Transpose((1, 0)), Transpose((1, 0)))).out_shape([(4, 4), (4, 8)])
    (12, 4)
    """

    ops: tuple[Op, ...]
    axis: int = 0

    @property
    def arity(self) -> int:  # type: ignore[override]
        return len(self.ops)

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.concatenate([op(a) for op, a in zip(self.ops, arrays)], axis=self.axis)

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != len(self.ops):
            raise ValueError(f"needs {len(self.ops)} arrays, got {len(shapes)}")
        parts = [op.out_shape([s]) for op, s in zip(self.ops, shapes)]
        return Concat(self.axis, len(parts)).out_shape(parts)

    def inverse(self) -> Op:
        raise ValueError("ConcatAfter has one inverse per input")

    def describe(self) -> str:
        return f"concat axis {self.axis} of ({'; '.join(op.describe() for op in self.ops)})"


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
class Full(Op):
    """An array of ``shape`` filled with ``value`` (in ``dtype``), from no input: a folded BatchNorm's
    ``running_var``, the weight of a Keras norm with ``scale=False``."""

    shape: tuple[int, ...]
    value: float
    dtype: str = "float32"
    arity = 0
    value_preserving = False

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.full(self.shape, self.value, np.dtype(self.dtype))

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return self.shape

    def inverse(self) -> Op:
        raise ValueError("Full has no inverse: the value it makes carries no information")

    def describe(self) -> str:
        return f"filled with {self.value:.9g}"


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
