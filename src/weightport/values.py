"""Which casts are allowed, and the value checks they need.

A cast is *exact* when every value of the source dtype exists in the target
(float16 -> float32); *rounded* when values may round but must stay finite and in
range (float64 -> float32); *checked* when each value must survive exactly
(int64 -> float32, float -> int, anything -> bool). Some are refused outright.

>>> import torch
>>> cast_kind(np.dtype("float64"), torch.float32)
('range', None)
>>> cast_kind(np.dtype("complex64"), torch.float32)[1]
'complex values have no place in a real tensor; pass .real if the imaginary part is zero'
>>> find_bad_values(np.array([1.0, np.nan]), torch.float32, "finite", False)
'1 NaN/Inf value (first at index (1,): nan)'
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from weightport.dtypes import NON_NUMERIC_KINDS, as_torch, to_numpy_dtype

__all__ = ["cast_kind", "find_bad_values"]

_FLOAT_MANTISSA = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}


def _mantissa(dtype: np.dtype | torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    return _FLOAT_MANTISSA.get(name, 0)


@functools.lru_cache(maxsize=256)
def cast_kind(source: np.dtype, target: torch.dtype) -> tuple[str, str | None]:
    """``(check, refusal)``: the value check a cast needs, or why it is refused.

    Checks: ``none`` (every value fits exactly), ``finite`` (same or wider float),
    ``range`` (narrower float: finite and in range), ``exact`` (each value must
    survive the cast unchanged).
    """
    if source.kind in NON_NUMERIC_KINDS and source.name != "bfloat16":
        return "none", f"{NON_NUMERIC_KINDS[source.kind]} are not tensor values; pass a numeric array"
    src_float = source.kind == "f" or source.name == "bfloat16"
    if target.is_complex:
        if source.kind == "c" or src_float:
            return "finite", None
        return "exact", None
    if source.kind == "c":
        return (
            "none",
            "complex values have no place in a real tensor; pass .real if the imaginary part is zero",
        )
    if target.is_floating_point:
        if src_float:
            src_bits, dst_bits = _mantissa(source), _mantissa(target)
            wider = dst_bits >= src_bits and _range_rank(target) >= _range_rank(source)
            return ("finite" if wider else "range"), None
        if source.kind == "b":
            return "none", None
        int_bits = source.itemsize * 8 - (1 if source.kind == "i" else 0)
        return ("none" if int_bits <= _mantissa(target) else "exact"), None
    if target == torch.bool:
        return ("none" if source.kind == "b" else "exact"), None
    # integer targets
    if source.kind == "b":
        return "none", None
    return "exact", None


def _range_rank(dtype: np.dtype | torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    return {"float16": 0, "bfloat16": 1, "float32": 1, "float64": 2}.get(name, 0)


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    flat = int(torch.nonzero(mask.reshape(-1))[0, 0])
    return tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))


def find_bad_values(array: np.ndarray, target: torch.dtype, check: str, allow_nonfinite: bool) -> str | None:
    """A short description of the values of ``array`` that cannot go into ``target``, or None."""
    if array.size == 0 or check == "none":
        return None
    tensor = as_torch(array)
    if check in ("finite", "range"):
        return _bad_floats(tensor, target, check, allow_nonfinite)
    return _inexact(array, target)


def _bad_floats(tensor: torch.Tensor, target: torch.dtype, check: str, allow_nonfinite: bool) -> str | None:
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
        check = "finite"
    if check == "finite" and allow_nonfinite:
        return None
    if check == "finite":
        # One read-only pass: a finite sum means no NaN/Inf (an overflowed sum falls through to the mask).
        low = high = float(tensor.sum())
    else:
        # One read-only pass: NaN propagates into aminmax, and +-Inf shows as an extreme.
        low, high = (float(x) for x in torch.aminmax(tensor))
    mask = None if math.isfinite(low) and math.isfinite(high) else ~torch.isfinite(tensor)
    if mask is not None and bool(mask.any()):
        if not allow_nonfinite:
            count = int(mask.sum())
            index = _first_index(mask)
            value = tensor[index].item()
            noun = "value" if count == 1 else "values"
            return f"{count} NaN/Inf {noun} (first at index {index}: {value})"
        finite = tensor[~mask]
        if check != "range" or finite.numel() == 0:
            return None
        low, high = (float(x) for x in torch.aminmax(finite))
    elif mask is not None and check == "range":  # the values were finite after all
        low, high = (float(x) for x in torch.aminmax(tensor))
    if check != "range":
        return None
    for extreme in (low, high):
        rounded = torch.tensor(extreme, dtype=torch.float64).to(target)
        if not bool(torch.isfinite(rounded)):
            limit = float(torch.finfo(target).max)
            return f"value {extreme:.6g} outside {str(target).removeprefix('torch.')}'s range (±{limit:.4g})"
    return None


def _inexact(array: np.ndarray, target: torch.dtype) -> str | None:
    dst = to_numpy_dtype(target)
    with np.errstate(all="ignore"):
        if array.dtype.kind in "fc" or array.dtype.name == "bfloat16":
            wide = np.asarray(array, dtype=np.float64 if array.dtype.kind != "c" else np.complex128)
            bad = ~np.isfinite(wide)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                return f"non-finite value {wide[index]} at index {index} that {dst.name} cannot hold"
        converted = array.astype(dst)
        back = converted.astype(array.dtype)
        same = back == array
        if dst.kind == "f":
            same &= np.isfinite(converted)
    if bool(np.all(same)):
        return None
    index = tuple(int(i) for i in np.argwhere(~np.asarray(same))[0])
    count = int(np.size(same) - np.count_nonzero(same))
    noun = "value" if count == 1 else "values"
    return f"{count} {noun} that {dst.name} cannot hold exactly (first at index {index}: {array[index]!r})"
