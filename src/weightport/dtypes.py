"""NumPy <-> PyTorch dtypes, bfloat16 and float8 included (through ``ml_dtypes``).

NumPy has no bfloat16 or float8; ``ml_dtypes`` adds them as NumPy dtypes, and
torch tensors of them are read and written bit for bit through an integer view of
the same width (``torch.from_numpy`` and ``Tensor.numpy`` take none of them).

>>> import torch
>>> to_torch_dtype(np.dtype("float16"))
torch.float16
>>> to_numpy_dtype(torch.bfloat16).name
'bfloat16'
>>> to_torch_dtype(FLOAT8_E4M3FN)
torch.float8_e4m3fn
>>> holds_all(FLOAT8_E4M3FN, np.dtype("float16")), holds_all(FLOAT8_E4M3FN, FLOAT8_E5M2)
(True, False)
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import torch

__all__ = [
    "BFLOAT16",
    "FLOAT8_E4M3FN",
    "FLOAT8_E5M2",
    "ML_FLOATS",
    "NON_NUMERIC_KINDS",
    "to_torch_dtype",
    "to_numpy_dtype",
    "as_torch",
    "tensor_as_numpy",
    "describe_dtype",
    "is_float",
    "is_numeric",
    "holds_all",
]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT8_E4M3FN = np.dtype(ml_dtypes.float8_e4m3fn)
FLOAT8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)

# NumPy dtype kinds that hold no tensor values, by what they hold (the ml_dtypes floats' kind can be
# "V" too: check ML_FLOATS first, or use is_numeric).
NON_NUMERIC_KINDS = {
    "O": "objects",
    "U": "strings",
    "S": "bytes",
    "V": "raw records",
    "M": "dates",
    "m": "time deltas",
}

_PAIRS: list[tuple[np.dtype, torch.dtype]] = [
    (np.dtype(np.float64), torch.float64),
    (np.dtype(np.float32), torch.float32),
    (np.dtype(np.float16), torch.float16),
    (BFLOAT16, torch.bfloat16),
    (np.dtype(np.complex128), torch.complex128),
    (np.dtype(np.complex64), torch.complex64),
    (np.dtype(np.int64), torch.int64),
    (np.dtype(np.int32), torch.int32),
    (np.dtype(np.int16), torch.int16),
    (np.dtype(np.int8), torch.int8),
    (np.dtype(np.uint8), torch.uint8),
    (np.dtype(np.bool_), torch.bool),
]
# float8 dtypes by their one name in both libraries; each is used where both have it (torch >= 2.1 has the
# first four, 2.7 float8_e8m0fnu; ml_dtypes >= 0.5 float8_e8m0fnu). Sub-byte floats (float4, float6) are
# left out: torch holds float4 only as packed pairs (float4_e2m1fn_x2, no casts) and has no float6.
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    _numpy, _torch = getattr(ml_dtypes, _name, None), getattr(torch, _name, None)
    if _numpy is not None and _torch is not None:
        _PAIRS.append((np.dtype(_numpy), _torch))

# Floats NumPy holds only through ml_dtypes: torch shares their memory through a same-width int view.
ML_FLOATS = frozenset(n for n, _ in _PAIRS if n.type.__module__.startswith("ml_dtypes"))
_SAME_WIDTH_INT: dict[int, tuple[np.dtype, torch.dtype]] = {
    1: (np.dtype(np.int8), torch.int8),
    2: (np.dtype(np.int16), torch.int16),
}

_TO_TORCH = {n: t for n, t in _PAIRS}
_TO_NUMPY = {t: n for n, t in _PAIRS}
for _bits in (16, 32, 64):
    _unsigned = getattr(torch, f"uint{_bits}", None)
    if _unsigned is not None:
        _TO_TORCH[np.dtype(f"uint{_bits}")] = _unsigned
        _TO_NUMPY[_unsigned] = np.dtype(f"uint{_bits}")


def to_torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype with the same values as ``dtype`` (any byte order), or None."""
    return _TO_TORCH.get(dtype.newbyteorder("="))


def to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype holding the same values as torch ``dtype``."""
    try:
        return _TO_NUMPY[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no NumPy equivalent") from None


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds real floating-point values (NumPy's own, bfloat16, float8)."""
    return dtype in ML_FLOATS or (dtype.kind == "f" and dtype.isbuiltin != 2)


def is_numeric(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds tensor values: not objects, strings, raw records, dates."""
    return dtype.kind not in NON_NUMERIC_KINDS or dtype in ML_FLOATS


@functools.lru_cache(maxsize=128)
def holds_all(source: np.dtype, target: np.dtype) -> bool:
    """Whether every finite value of float dtype ``source`` exists in float dtype ``target``.

    True when the target has as many mantissa bits, as large a maximum and as small a smallest
    subnormal: then each source value's exponent and digits fit (the target's subnormals included).
    """
    if source == target:
        return True
    src, dst = ml_dtypes.finfo(source), ml_dtypes.finfo(target)
    signed = float(dst.min) < 0 or float(src.min) >= 0
    return (
        signed
        and int(dst.nmant) >= int(src.nmant)
        and float(dst.max) >= float(src.max)
        and float(dst.smallest_subnormal) <= float(src.smallest_subnormal)
    )


@functools.lru_cache(maxsize=128)
def describe_dtype(dtype: np.dtype | torch.dtype) -> str:
    """A short name: ``float32``, ``bfloat16``, ``>float32`` for non-native byte order."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return ("" if dtype.isnative else "non-native-endian ") + dtype.name


def tensor_as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (bfloat16 and float8 as ml_dtypes, bit for bit).

    Raises TypeError for dtypes NumPy cannot hold, as ``Tensor.numpy`` does.
    """
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is not None and dtype in ML_FLOATS:
        return tensor.view(_SAME_WIDTH_INT[dtype.itemsize][1]).numpy().view(dtype)
    return tensor.numpy()


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
    if array.dtype in ML_FLOATS:
        return as_torch(array.view(_SAME_WIDTH_INT[array.dtype.itemsize][0])).view(_TO_TORCH[array.dtype])
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        return torch.from_numpy(array.astype(np.int64))
    if not array.flags.writeable:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)
