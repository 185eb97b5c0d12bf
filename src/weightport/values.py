"""Which casts are allowed, and the value checks they need.

A cast is *exact* when every value of the source dtype exists in the target
(float16 -> float32, float8 -> float16); *rounded* when values may round but must
stay finite and in range (float64 -> float32); *checked* when each value must
survive exactly (int64 -> float32, float -> int, anything -> bool, and any
narrowing cast into float8: its 2-3 mantissa bits would round most values, and
torch saturates or makes NaN where float8 has no infinity). Some are refused outright.

>>> import torch
>>> cast_kind(np.dtype("float64"), torch.float32)
('range', None)
>>> cast_kind(np.dtype("float32"), torch.float8_e4m3fn)
('exact', None)
>>> cast_kind(np.dtype("complex64"), torch.float32)[1]
'complex values have no place in a real tensor; pass .real if the imaginary part is zero'
>>> find_bad_values(np.array([1.0, np.nan]), torch.float32, "finite", False)
'1 NaN/Inf value (first at index (1,): nan)'
>>> find_bad_values(np.array([0.5, 0.1], np.float32), torch.float8_e4m3fn, "exact", False)
'1 value that float8_e4m3fn cannot hold exactly (first at index (1,): np.float32(0.1))'
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from weightport.copying import all_finite
from weightport.dtypes import holds_all, is_float, is_numeric, ml_floats, non_numeric
from weightport.tensors import as_torch, to_numpy_dtype, to_torch_dtype

__all__ = ["cast_kind", "find_bad_values"]


def _is_float8(dtype: np.dtype) -> bool:
    return dtype.itemsize == 1 and dtype.isbuiltin == 2 and dtype in ml_floats()


@functools.lru_cache(maxsize=256)
def cast_kind(source: np.dtype, target: torch.dtype) -> tuple[str, str | None]:
    """``(check, refusal)``: the value check a cast needs, or why it is refused.

    Checks: ``none`` (every value fits exactly), ``finite`` (same or wider float),
    ``range`` (narrower float: finite and in range), ``exact`` (each value must
    survive the cast unchanged; narrower floats into float8 too).
    """
    if (source.isbuiltin == 2 and to_torch_dtype(source) is None) or not is_numeric(source):
        what, fix = non_numeric(source)  # an ml_dtypes type torch lacks (int4, float4), strings, records
        return "none", f"{what}; {fix}"
    if source.kind in "fc" and source.itemsize > (8 if source.kind == "f" else 16):
        return "none", (
            f"{source.name} (NumPy's long double) has no torch dtype, and torch cannot read it; "
            f"cast the array to {'float64' if source.kind == 'f' else 'complex128'} first"
        )
    src_float = is_float(source)
    if target.is_complex:
        if source.kind == "c" or src_float:
            # each part is a float of half the complex's width: a wider part must fit its range
            part = np.dtype(f"f{source.itemsize // 2}") if source.kind == "c" else source.newbyteorder("=")
            fits = part.itemsize <= torch.empty((), dtype=target).element_size() // 2
            return ("finite" if fits else "range"), None
        return "exact", None
    if source.kind == "c":
        return (
            "none",
            "complex values have no place in a real tensor; pass .real if the imaginary part is zero",
        )
    if target.is_floating_point:
        try:
            dst = to_numpy_dtype(target)
        except TypeError:
            return "none", f"weightport cannot write {target} tensors (torch has no casts into it)"
        if src_float:
            if holds_all(source.newbyteorder("="), dst):
                return "finite", None
            return ("exact" if _is_float8(dst) else "range"), None
        import ml_dtypes  # a float target: its limits (bfloat16 and float8 included)

        info = ml_dtypes.finfo(dst)
        if float(info.min) >= 0:  # float8_e8m0fnu: powers of two only, no zero, no sign
            return "exact", None
        if source.kind == "b":
            return "none", None
        int_bits = source.itemsize * 8 - (1 if source.kind == "i" else 0)
        return ("none" if int_bits <= int(info.nmant) + 1 else "exact"), None
    if target == torch.bool:
        return ("none" if source.kind == "b" else "exact"), None
    # integer targets
    if source.kind == "b":
        return "none", None
    return "exact", None


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    flat = int(torch.nonzero(mask.reshape(-1))[0, 0])
    return tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))


def find_bad_values(array: np.ndarray, target: torch.dtype, check: str, allow_nonfinite: bool) -> str | None:
    """A short description of the values of ``array`` that cannot go into ``target``, or None."""
    if array.size == 0 or check == "none":
        return None
    if check == "exact" and _is_float8(to_numpy_dtype(target)):
        return _inexact_float8(array, target, allow_nonfinite)
    tensor = as_torch(array)
    if check in ("finite", "range"):
        return _bad_floats(tensor, target, check, allow_nonfinite)
    return _inexact(array, target)


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """float8 as float32 (exact): torch has no sum, min/max or isfinite for float8 on the CPU."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


@functools.lru_cache(maxsize=16)
def _has_inf(target: torch.dtype) -> bool:
    return bool(torch.tensor(math.inf).to(target).float().isinf())


def _nonfinite_message(mask: torch.Tensor, values: torch.Tensor, what: str = "NaN/Inf") -> str:
    count = int(mask.sum())
    index = _first_index(mask)
    noun = "value" if count == 1 else "values"
    return f"{count} {what} {noun} (first at index {index}: {values[index].item()})"


def _inexact_float8(array: np.ndarray, target: torch.dtype, allow_nonfinite: bool) -> str | None:
    """What of ``array`` would not survive torch's cast into float8 ``target`` unchanged, or None.

    torch rounds, saturates (float8_e4m3fn takes inf as 448) or makes NaN (the ``fnuz`` and ``e8m0``
    dtypes) without a word: each value is cast there and back and compared. NaN and Inf are refused
    unless ``allow_nonfinite``; Inf then only where the target has an infinity (float8_e5m2).
    """
    source = as_torch(array)
    converted = source.to(target)
    if source.is_floating_point():
        wide = _widened(source)
        bad = ~torch.isfinite(wide)
        if bool(bad.any()):
            if not allow_nonfinite:
                return _nonfinite_message(bad, wide)
            inf = torch.isinf(wide)
            if not _has_inf(target) and bool(inf.any()):
                name = str(target).removeprefix("torch.")
                return _nonfinite_message(inf, wide, "Inf") + f" that {name} cannot hold (it has no infinity)"
        back = _widened(converted.to(source.dtype))
        same = (back == wide) | (torch.isnan(back) & torch.isnan(wide))
    else:  # integers: compared as floats too (e8m0 has no zero: 0 becomes 2**-127, which comes back as 0)
        same = (converted.to(source.dtype) == source) & (converted.double() == source.double())
    if bool(same.all()):
        return None
    return _inexact_message(
        int((~same).sum()), str(target).removeprefix("torch."), _first_index(~same), array
    )


def _bad_floats(tensor: torch.Tensor, target: torch.dtype, check: str, allow_nonfinite: bool) -> str | None:
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)  # the real and imaginary parts, each checked as a float
    tensor = _widened(tensor)
    if check == "finite" and allow_nonfinite:
        return None
    if check == "finite":
        # One read-only pass: the compiled scan, or a finite sum (an overflowed one falls through to the mask).
        scanned = all_finite(tensor)
        low = high = float(tensor.sum()) if scanned is None else (0.0 if scanned else math.nan)
    else:
        # One read-only pass: NaN propagates into aminmax, and +-Inf shows as an extreme.
        low, high = (float(x) for x in torch.aminmax(tensor))
    mask = None if math.isfinite(low) and math.isfinite(high) else ~torch.isfinite(tensor)
    if mask is not None and bool(mask.any()):
        if not allow_nonfinite:
            return _nonfinite_message(mask, tensor)
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
            value, limit = _apart(extreme, float(torch.finfo(target).max))
            return f"value {value} outside {str(target).removeprefix('torch.')}'s range (±{limit})"
    return None


def _apart(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` printed with digits enough that the value's size visibly passes the limit
    (3.40282e+38 beside 3.403e+38 does not: 3.40282e+38 beside 3.4028e+38 does).

    >>> _apart(3.4028235677973366e38, 3.4028234663852886e38)
    ('3.40282e+38', '3.4028e+38')
    >>> _apart(-1e40, 3.4028234663852886e38)
    ('-1e+40', '3.403e+38')
    """
    for digits in range(4, 18):
        shown, bound = f"{value:.{max(digits, 6)}g}", f"{limit:.{digits}g}"
        if abs(float(shown)) > float(bound):
            return shown, bound
    return repr(value), repr(limit)


def _inexact(array: np.ndarray, target: torch.dtype) -> str | None:
    dst = to_numpy_dtype(target)
    with np.errstate(all="ignore"):
        if array.dtype.kind == "c" or is_float(array.dtype):
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
        if array.dtype.kind in "iu" and dst.kind in "iu":
            limits = np.iinfo(dst)  # a wrapped-around value (uint64 -> int64) survives the round trip
            same &= (array >= limits.min) & (array <= limits.max)
    if bool(np.all(same)):
        return None
    index = tuple(int(i) for i in np.argwhere(~np.asarray(same))[0])
    return _inexact_message(int(np.size(same) - np.count_nonzero(same)), dst.name, index, array)


def _inexact_message(count: int, target: str, index: tuple[int, ...], array: np.ndarray) -> str:
    noun = "value" if count == 1 else "values"
    return f"{count} {noun} that {target} cannot hold exactly (first at index {index}: {array[index]!r})"
