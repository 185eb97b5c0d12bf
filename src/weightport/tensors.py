"""The torch side of the ground floor: dtype pairs, tensors <-> NumPy, and the wrapped module.

torch tensors of bfloat16 and float8 are read and written bit for bit through an integer view of
the same width (``torch.from_numpy`` and ``Tensor.numpy`` take none of them); :func:`numpy_of` is
the one way a tensor becomes NumPy in weightport (a view of CPU memory, or a copy from anywhere).

>>> import torch
>>> to_torch_dtype(np.dtype("float16"))
torch.float16
>>> to_numpy_dtype(torch.bfloat16).name
'bfloat16'
>>> numpy_of(torch.ones(2, dtype=torch.bfloat16), copy=True).dtype.name
'bfloat16'
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import nn

from weightport.dtypes import ML_FLOAT_NAMES, is_ml_float, ml_float
from weightport.errors import Problem, SourceError

__all__ = [
    "to_torch_dtype",
    "to_numpy_dtype",
    "as_torch",
    "numpy_of",
    "narrow",
    "unwrap",
    "shared_memory",
    "shared_memory_problems",
]

_PAIRS: list[tuple[np.dtype, torch.dtype]] = [
    (np.dtype(np.float64), torch.float64),
    (np.dtype(np.float32), torch.float32),
    (np.dtype(np.float16), torch.float16),
    (np.dtype(np.complex128), torch.complex128),
    (np.dtype(np.complex64), torch.complex64),
    (np.dtype(np.int64), torch.int64),
    (np.dtype(np.int32), torch.int32),
    (np.dtype(np.int16), torch.int16),
    (np.dtype(np.int8), torch.int8),
    (np.dtype(np.uint8), torch.uint8),
    (np.dtype(np.bool_), torch.bool),
]
for _bits in (16, 32, 64):
    _unsigned = getattr(torch, f"uint{_bits}", None)
    if _unsigned is not None:
        _PAIRS.append((np.dtype(f"uint{_bits}"), _unsigned))
_TO_TORCH = {n: t for n, t in _PAIRS}
_TO_NUMPY = {t: n for n, t in _PAIRS}
# torch dtypes whose NumPy twin is an ml_dtypes float (ml_dtypes is imported when one is met)
_ML_TORCH = {getattr(torch, name): name for name in ML_FLOAT_NAMES if hasattr(torch, name)}
_SAME_WIDTH_INT: dict[int, tuple[np.dtype, torch.dtype]] = {
    1: (np.dtype(np.int8), torch.int8),
    2: (np.dtype(np.int16), torch.int16),
}


@functools.cache
def _ml_pair(dtype: torch.dtype) -> np.dtype | None:
    return ml_float(_ML_TORCH[dtype])


def to_torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype with the same values as ``dtype`` (any byte order), or None."""
    native = dtype.newbyteorder("=")
    found = _TO_TORCH.get(native)
    if found is None and is_ml_float(native):
        found = next((t for t, name in _ML_TORCH.items() if name == native.name), None)
    return found


def to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype holding the same values as torch ``dtype``."""
    found = _TO_NUMPY.get(dtype)
    if found is None and dtype in _ML_TORCH:
        found = _ml_pair(dtype)
    if found is None:
        raise TypeError(f"torch dtype {dtype} has no NumPy equivalent")
    return found


def numpy_of(tensor: torch.Tensor, *, copy: bool = False) -> np.ndarray:
    """``tensor``'s values in NumPy (bfloat16 and float8 as ml_dtypes, bit for bit).

    ``copy=False``: a view of a CPU tensor's memory (writable: the caller writes through it);
    ``copy=True``: a copy, from any device. Raises TypeError for dtypes NumPy cannot hold and
    SourceError for a tensor without values (on the meta device).
    """
    if tensor.is_meta:
        raise SourceError("a tensor on the meta device has no values to export; load or initialize it first")
    tensor = tensor.detach()
    if copy:
        tensor = tensor.to("cpu").contiguous()
    if tensor.dtype in _ML_TORCH:
        dtype = to_numpy_dtype(tensor.dtype)
        array = tensor.view(_SAME_WIDTH_INT[dtype.itemsize][1]).numpy().view(dtype)
    else:
        array = tensor.numpy()
    return array.copy() if copy else array


def as_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array``'s values, sharing memory where torch can.

    Big-endian or negatively strided arrays are copied into native order; bfloat16
    and float8 are reinterpreted bit for bit; read-only arrays are shared without
    torch's warning (weightport only ever reads from them).
    """
    dtype = array.dtype
    if (
        dtype.kind in "fcib"
        and dtype.isnative
        and dtype.isbuiltin != 2  # NumPy's own dtypes; ml_dtypes' float8_e5m2 has kind "f" too
        and array.flags.writeable
        and min(array.strides, default=0) >= 0
    ):
        return torch.from_numpy(array)  # the common case, checked cheaply
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array)
    if is_ml_float(array.dtype):
        target = to_torch_dtype(array.dtype)
        assert target is not None
        return as_torch(array.view(_SAME_WIDTH_INT[array.dtype.itemsize][0])).view(target)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        return torch.from_numpy(array.astype(np.int64))
    if not array.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def narrow(tensor: torch.Tensor, region: tuple[slice, ...]) -> torch.Tensor:
    """``tensor[region]`` (a view) through ``narrow``: indexing with slices costs far more per call.

    >>> narrow(torch.arange(6).reshape(2, 3), (slice(0, 2), slice(1, 3))).tolist()
    [[1, 2], [4, 5]]
    """
    for axis, part in enumerate(region):
        if part.start != 0 or part.stop != tensor.shape[axis]:
            tensor = tensor.narrow(axis, part.start, part.stop - part.start)
    return tensor


def unwrap(module: nn.Module) -> nn.Module:
    """The module that owns the weights under torch.compile and DataParallel wrappers."""
    while True:
        inner = module._modules.get("_orig_mod")  # not getattr: a missing attribute costs ~0.1 ms
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
            continue
        return module


def shared_memory(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str | None]]:
    """Tensors a write into would change other elements than its own: ``(name, None)`` for one whose elements
    share memory (expanded: a stride of 0), ``(name, other)`` for two whose memory overlaps in part (two views
    of the same elements the same way are one tied tensor, not an overlap).

    >>> base = torch.zeros(4)
    >>> shared_memory([("a", base[:3]), ("b", base[1:]), ("c", torch.zeros(1, 3).expand(2, 3))])
    [('b', 'a'), ('c', None)]
    >>> shared_memory([("a", base[:2]), ("b", base[2:]), ("tied", base[:2])])
    []
    """
    found: list[tuple[str, str | None]] = []
    spans: dict[int, list[tuple[str, torch.Tensor, int, int]]] = {}
    for name, t in named:
        if (
            type(t) not in (torch.Tensor, nn.Parameter)
            or t.layout != torch.strided
            or t.is_meta
            or not t.numel()
        ):
            continue
        if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
            found.append((name, None))
            continue
        shape, strides, offset = (
            [int(n) for n in t.shape],
            [int(x) for x in t.stride()],
            int(t.storage_offset()),
        )
        first = offset + sum((n - 1) * x for n, x in zip(shape, strides) if x < 0)
        last = offset + sum((n - 1) * x for n, x in zip(shape, strides) if x > 0)
        begin, end = first * t.element_size(), (last + 1) * t.element_size()
        for other, u, b, e in spans.setdefault(t.untyped_storage().data_ptr(), []):
            same = (u.storage_offset(), u.shape, u.stride(), u.dtype) == (
                offset,
                t.shape,
                t.stride(),
                t.dtype,
            )
            if not same and b < end and begin < e and _elements_meet(t, u):
                found.append((name, other))
                break
        spans[t.untyped_storage().data_ptr()].append((name, t, begin, end))
    return found


def _elements_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage whose byte ranges overlap share a byte (interleaved columns do not)."""
    if a.is_contiguous() and b.is_contiguous():
        return True

    def bytes_of(t: torch.Tensor) -> np.ndarray:
        offsets = np.zeros((), np.int64)
        for n, step in zip(t.shape, t.stride()):
            offsets = np.add.outer(offsets, np.arange(int(n), dtype=np.int64) * int(step))
        starts = (offsets.reshape(-1) + int(t.storage_offset())) * t.element_size()
        return np.add.outer(starts, np.arange(t.element_size())).reshape(-1)

    return bool(np.intersect1d(bytes_of(a), bytes_of(b)).size)


def shared_memory_problems(named: list[tuple[str, torch.Tensor]]) -> list[Problem]:
    """A problem for each tensor of :func:`shared_memory`: found before anything is written (a copy into an
    expanded tensor fails half-way; into one overlapping another, it overwrites part of that one)."""
    problems = []
    for name, other in shared_memory(named):
        if other is None:
            found = "an expanded tensor: its elements share memory (a stride of 0), so one write sets several"
            fix = f"give it memory of its own before loading (set it to {name}.clone(), or build it without expand)"
        else:
            found = f"a view that shares part of its memory with '{other}', so writing one changes the other"
            fix = "give each memory of its own (clone one), or make them one tensor (a tie) if they are one"
        problems.append(Problem(name, "a tensor with memory of its own to write into", found, fix))
    return problems
