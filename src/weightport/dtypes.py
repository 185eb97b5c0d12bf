"""NumPy dtypes as weightport reads them: bfloat16 and float8 through ``ml_dtypes``, loaded lazily.

NumPy has no bfloat16 or float8; ``ml_dtypes`` adds them as NumPy dtypes. It is imported only
when a value needs one (a bfloat16 tensor in a file, a float8 target), so readers and the
command line start without it (``BFLOAT16``, ``FLOAT8_E4M3FN``, ``FLOAT8_E5M2`` and ``ML_FLOATS``
are made on first use); this module never imports torch (see :mod:`weightport.tensors`).

>>> ml_float("bfloat16").name
'bfloat16'
>>> e4m3, e5m2 = ml_float("float8_e4m3fn"), ml_float("float8_e5m2")
>>> holds_all(e4m3, np.dtype("float16")), holds_all(e4m3, e5m2)
(True, False)
>>> is_float(np.dtype("float32")), is_numeric(np.dtype("U3"))
(True, False)
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

__all__ = [
    "ML_FLOAT_NAMES",
    "NON_NUMERIC_KINDS",
    "ml_float",
    "ml_floats",
    "is_ml_float",
    "describe_dtype",
    "is_float",
    "is_numeric",
    "non_numeric",
    "holds_all",
]

# NumPy dtype kinds that hold no tensor values, by what they hold (the ml_dtypes floats' kind can be
# "V" too: check is_ml_float first, or use is_numeric).
NON_NUMERIC_KINDS = {
    "O": "objects",
    "U": "strings",
    "S": "bytes",
    "V": "raw records",
    "M": "dates",
    "m": "time deltas",
}

# The ml_dtypes floats torch has too, by their one name in both libraries (torch >= 2.1 has the first
# five, 2.7 float8_e8m0fnu; ml_dtypes >= 0.5 float8_e8m0fnu). Sub-byte floats (float4, float6) are left
# out: torch holds float4 only as packed pairs (float4_e2m1fn_x2, no casts) and has no float6.
ML_FLOAT_NAMES = (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
_LAZY = {"BFLOAT16": "bfloat16", "FLOAT8_E4M3FN": "float8_e4m3fn", "FLOAT8_E5M2": "float8_e5m2"}


def ml_float(name: str) -> np.dtype | None:
    """The ``ml_dtypes`` dtype called ``name`` (imports ml_dtypes), or None where this version lacks it."""
    import ml_dtypes

    kind = getattr(ml_dtypes, name, None)
    return None if kind is None else np.dtype(kind)


@functools.lru_cache(maxsize=1)
def ml_floats() -> frozenset[np.dtype]:
    """Every dtype of :data:`ML_FLOAT_NAMES` this ``ml_dtypes`` has (imports ml_dtypes)."""
    return frozenset(d for d in map(ml_float, ML_FLOAT_NAMES) if d is not None)


def is_ml_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is one of :func:`ml_floats`; never imports ml_dtypes (no array can hold one
    before it is imported)."""
    return dtype.isbuiltin == 2 and "ml_dtypes" in sys.modules and dtype in ml_floats()


def __getattr__(name: str) -> Any:
    """``BFLOAT16``, ``FLOAT8_*`` and ``ML_FLOATS``, made on first use (they import ml_dtypes)."""
    if name in _LAZY:
        return ml_float(_LAZY[name])
    if name == "ML_FLOATS":
        return ml_floats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds real floating-point values (NumPy's own, bfloat16, float8)."""
    return (dtype.kind == "f" and dtype.isbuiltin != 2) or is_ml_float(dtype)


def is_numeric(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds tensor values: not objects, strings, raw records, dates."""
    return dtype.kind not in NON_NUMERIC_KINDS or is_ml_float(dtype)


def non_numeric(dtype: np.dtype) -> tuple[str, str]:
    """``(what it holds, the fix)`` for a ``dtype`` :func:`is_numeric` refuses, for a message.

    >>> import ml_dtypes
    >>> non_numeric(np.dtype(ml_dtypes.int4))
    ('int4 values, an ml_dtypes type torch has no tensors of', 'cast them to int8 first (array.astype(np.int8)), which holds every int4 value')
    >>> non_numeric(np.dtype([("a", "<f4")]))[0]
    "structured records (fields 'a'), not one array of numbers"
    """
    if dtype.names:
        fields = ", ".join(repr(n) for n in dtype.names)
        return (
            f"structured records (fields {fields}), not one array of numbers",
            "pass each field as an array of its own (array['field'])",
        )
    if dtype.isbuiltin == 2:  # an ml_dtypes type torch has no tensors of (int4, float4, ...)
        import ml_dtypes

        try:
            wide = "uint8" if int(ml_dtypes.iinfo(dtype).min) == 0 else "int8"
        except (ValueError, TypeError):
            wide = "float32"
        return (
            f"{dtype.name} values, an ml_dtypes type torch has no tensors of",
            f"cast them to {wide} first (array.astype(np.{wide})), which holds every {dtype.name} value",
        )
    return f"{NON_NUMERIC_KINDS[dtype.kind]} ({dtype}), not numbers", "pass a numeric NumPy array"


@functools.lru_cache(maxsize=128)
def holds_all(source: np.dtype, target: np.dtype) -> bool:
    """Whether every finite value of float dtype ``source`` exists in float dtype ``target``.

    True when the target has as many mantissa bits, as large a maximum and as small a smallest
    subnormal: then each source value's exponent and digits fit (the target's subnormals included).
    """
    if source == target:
        return True
    import ml_dtypes

    src, dst = ml_dtypes.finfo(source), ml_dtypes.finfo(target)
    signed = float(dst.min) < 0 or float(src.min) >= 0
    return (
        signed
        and int(dst.nmant) >= int(src.nmant)
        and float(dst.max) >= float(src.max)
        and float(dst.smallest_subnormal) <= float(src.smallest_subnormal)
    )


@functools.lru_cache(maxsize=128)
def describe_dtype(dtype: Any) -> str:
    """A short name of a NumPy or torch dtype: ``float32``, ``bfloat16``; ``non-native-endian float32``."""
    if not isinstance(dtype, np.dtype):
        return str(dtype).removeprefix("torch.")
    return ("" if dtype.isnative else "non-native-endian ") + dtype.name
