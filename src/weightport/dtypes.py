"""NumPy <-> PyTorch dtypes, bfloat16 included (through ``ml_dtypes``).

>>> import torch
>>> to_torch_dtype(np.dtype("float16"))
torch.float16
>>> to_numpy_dtype(torch.bfloat16).name
'bfloat16'
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import torch

__all__ = ["BFLOAT16", "NON_NUMERIC_KINDS", "to_torch_dtype", "to_numpy_dtype", "as_torch", "describe_dtype"]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# NumPy dtype kinds that hold no tensor values, by what they hold (bfloat16's kind is "V" too: check it first).
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


@functools.lru_cache(maxsize=128)
def describe_dtype(dtype: np.dtype | torch.dtype) -> str:
    """A short name: ``float32``, ``bfloat16``, ``>float32`` for non-native byte order."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return ("" if dtype.isnative else "non-native-endian ") + dtype.name


def as_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array``'s values, sharing memory where torch can.

    Big-endian or negatively strided arrays are copied into native order; bfloat16
    is reinterpreted bit for bit; read-only arrays are shared without torch's
    warning (weightport only ever reads from them).
    """
    dtype = array.dtype
    if (
        dtype.kind in "fcib"
        and dtype.isnative
        and array.flags.writeable
        and min(array.strides, default=0) >= 0
    ):
        return torch.from_numpy(array)  # the common case, checked cheaply
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return as_torch(array.view(np.int16)).view(torch.bfloat16)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        return torch.from_numpy(array.astype(np.int64))
    if not array.flags.writeable:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)
