"""A module's tensors out as NumPy arrays and files (``.npz``, ``.safetensors``).

Arrays are copies, never views of the module's memory. Files are written to a
temporary name beside the target and renamed into place, so a failed save never
leaves half a file.

>>> import torch, weightport
>>> arrays = weightport.to_numpy(torch.nn.Linear(2, 3))
>>> {k: v.shape for k, v in arrays.items()}
{'weight': (3, 2), 'bias': (3,)}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from torch import nn

from weightport.dtypes import BFLOAT16, ML_FLOATS, holds_all
from weightport.errors import SourceError
from weightport.tensors import numpy_of

__all__ = [
    "to_numpy",
    "save",
    "save_path",
    "write_npz",
    "write_safetensors",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_REFUSED",
]

# The format's dtype codes (safetensors' Rust ``Dtype``; safetensors 0.8 has 22) that torch has a dtype for.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BFLOAT16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "C64": np.dtype("<c8"),
}
_ML_FLOATS_BY_NAME = {d.name: d for d in ML_FLOATS}  # those torch and ml_dtypes both have
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),  # the OCP "fn" variant: no infinity, NaN S.1111.111
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),  # MX block scales: powers of two
):
    if _name in _ML_FLOATS_BY_NAME:
        SAFETENSORS_DTYPES[_code] = _ML_FLOATS_BY_NAME[_name]

# Codes of the format that weightport refuses, with why; the reader names the tensor and the fix.
SAFETENSORS_REFUSED: dict[str, str] = {
    "F4": "4-bit float e2m1, two values packed per byte; torch keeps it only as packed pairs, "
    "float4_e2m1fn_x2, and cannot cast those",
    "F6_E2M3": "6-bit float e2m3, packed; torch has no 6-bit float dtype",
    "F6_E3M2": "6-bit float e3m2, packed; torch has no 6-bit float dtype",
}
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """Every tensor of ``module.state_dict()`` as a NumPy copy, by state-dict name."""
    return {name: numpy_of(t, copy=True) for name, t in module.state_dict().items()}


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz``.

    NumPy's format has no bfloat16 or float8 (it would write raw bytes, ``V1``): bfloat16 goes in as
    float32, float8 as float16 (float32 for float8_e8m0fnu), both exact; loading them back into the
    same tensors gives the same bits, but for NaN: it stays NaN of the same sign, and float8_e5m2's
    several NaN payloads become one (``.safetensors`` keeps every bit).
    """
    out = {k: _npz_ready(np.asarray(v)) for k, v in arrays.items()}
    target = Path(path)
    _atomic_write(target, lambda f: np.savez(f, **out))  # type: ignore[arg-type]
    return target


def _npz_ready(array: np.ndarray) -> np.ndarray:
    if array.dtype not in ML_FLOATS:
        return array
    wide = np.dtype(np.float16) if holds_all(array.dtype, np.dtype(np.float16)) else np.dtype(np.float32)
    return array.astype(wide)


def write_safetensors(
    arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``arrays`` to a ``.safetensors`` file (little-endian, C order)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    prepared = []
    for name, value in arrays.items():
        array = np.asarray(value)
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        code = _CODES.get(data.dtype)
        if code is None:
            raise SourceError(f"'{name}': dtype {array.dtype} cannot be stored in .safetensors")
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        prepared.append(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: BinaryIO) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for data in prepared:
            f.write(data.reshape(-1).view(np.uint8).data)

    target = Path(path)
    _atomic_write(target, write)
    return target


def save_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path :func:`save` can write (``.npz`` or ``.safetensors``), else a SourceError;
    callers check it before long work whose result it is to hold."""
    target = Path(path)
    if target.suffix not in _WRITERS:
        raise SourceError(
            f"'{target}': cannot save to '{target.suffix}'. Fix: use a .npz or .safetensors path."
        )
    return target


def save(module: nn.Module | Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Save a module's tensors (or a dict of arrays) to ``.npz`` or ``.safetensors`` by suffix.

    Loading the file back with :func:`weightport.load` restores the module exactly.
    """
    target = save_path(path)  # before copying the module's tensors out
    arrays = to_numpy(module) if isinstance(module, nn.Module) else dict(module)
    return _WRITERS[target.suffix](arrays, target)


_WRITERS: dict[str, Callable[[Mapping[str, np.ndarray], Path], Path]] = {
    ".npz": write_npz,
    ".safetensors": write_safetensors,
}
