"""``.safetensors`` files, read from memory-mapped windows straight into the destination.

The header is checked before any data is read: its length against the file, each
tensor's ``data_offsets`` against its dtype and shape and against the file's
real size, and no two tensors overlapping. :func:`write` makes the files, with the same dtype codes.
weightport reads the format itself (it is a JSON header and raw bytes) so it can
read into a given buffer and check every size; the ``safetensors`` package is
not needed.

>>> import numpy as np, tempfile, pathlib
>>> path = write({"w": np.eye(2, dtype=np.float32)}, pathlib.Path(tempfile.mkdtemp()) / "m.safetensors")
>>> src = open(path); src.read("w").tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from weightport.dtypes import ml_float
from weightport.errors import SourceError
from weightport.sources.base import Region, Source, TensorInfo, region_shape
from weightport.sources.files import atomic_write, map_array, mapped_chunks, read_mapped, read_region_exact

__all__ = ["claims", "open", "write", "SUFFIX", "dtype_codes", "REFUSED", "SafetensorsSource", "read_header"]

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100_000_000  # the format's limit, as the safetensors package enforces it

# The format's dtype codes (safetensors' Rust ``Dtype``; safetensors 0.8 has 22) that torch has a dtype for.
_CODES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
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
# Codes of ml_dtypes floats, by their ml_dtypes name (imported only when a file holds one)
_ML_CODES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",  # the OCP "fn" variant: no infinity, NaN S.1111.111
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",  # MX block scales: powers of two
}

# Codes of the format that weightport refuses, with why; the reader names the tensor and the fix.
REFUSED: dict[str, str] = {
    "F4": "4-bit float e2m1, two values packed per byte; torch keeps it only as packed pairs, "
    "float4_e2m1fn_x2, and cannot cast those",
    "F6_E2M3": "6-bit float e2m3, packed; torch has no 6-bit float dtype",
    "F6_E3M2": "6-bit float e3m2, packed; torch has no 6-bit float dtype",
}


def _dtype_of(code: str) -> np.dtype | None:
    """The NumPy dtype of a code (None for codes weightport does not read)."""
    found = _CODES.get(code)
    if found is None and code in _ML_CODES:
        found = ml_float(_ML_CODES[code])
    return found


def dtype_codes() -> dict[str, np.dtype]:
    """Every code weightport reads and writes, with its NumPy dtype (imports ml_dtypes).

    >>> dtype_codes()["BF16"].name, dtype_codes()["F32"]
    ('bfloat16', dtype('float32'))
    """
    codes = dict(_CODES)
    for code, name in _ML_CODES.items():
        dtype = ml_float(name)
        if dtype is not None:
            codes[code] = dtype
    return codes


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


@dataclass
class SafetensorsSource(Source):
    offsets: dict[str, int] = field(default_factory=dict)
    _fd: int = -1

    def read_can_fail(self, name: str) -> bool:
        return False  # memory-mapped reads

    def read_into(self, name: str, out: np.ndarray) -> None:
        read_mapped(self._fd, self.offsets[name], out, self.description, name)
        self.bytes_read += out.nbytes

    def mapped(self, name: str) -> np.ndarray | None:
        info = self.infos[name]
        array = map_array(self._fd, self.offsets[name], info.dtype, info.shape, self.description, name)
        self.bytes_read += array.nbytes
        return array

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        info = self.infos[name]
        out = np.empty(region_shape(region), info.dtype) if out is None else out
        self.bytes_read += read_region_exact(
            self._fd, self.offsets[name], info.shape, region, out, self.description, name
        )
        return out

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        info = self.infos[name]
        count = info.nbytes // max(1, info.dtype.itemsize)
        for chunk in mapped_chunks(self._fd, self.offsets[name], info.dtype, count, self.description, name):
            self.bytes_read += chunk.nbytes
            yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_header(fd: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str]]:
    """Infos, absolute data offsets and ``__metadata__`` of the file open at ``fd``, all checked (and
    the bytes of BOOL tensors)."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise SourceError(
            f"{where}: {size} bytes is too short for a .safetensors file; it is truncated. Fix: re-create or re-download it."
        )
    length = int.from_bytes(raw, "little")
    if length > MAX_HEADER_BYTES:
        raise SourceError(
            f"{where}: header claims {length:,} bytes, over the format's limit of {MAX_HEADER_BYTES:,}; the file "
            "is corrupt or not a .safetensors file. Fix: re-create it."
        )
    if length > size - 8:
        raise SourceError(
            f"{where}: header claims {length} bytes but the file has {size - 8} after the length field; "
            "the file is truncated or not a .safetensors file. Fix: re-create it."
        )
    try:
        header = json.loads(os.pread(fd, length, 8), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(
            f"{where}: header is not valid JSON ({e}); the file is corrupt. Fix: re-create or re-download it."
        ) from None
    if not isinstance(header, dict):
        raise SourceError(
            f"{where}: header is not a JSON object; the file is corrupt. Fix: re-create or re-download it."
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SourceError(
            f"{where}: __metadata__ is not a map of strings to strings; the file is corrupt. Fix: re-create it."
        )
    base = 8 + length
    data_size = size - base
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info, begin, end = _entry(name, entry, where)
        if end > data_size:
            raise SourceError(
                f"{where}: tensor '{name}' declares bytes {begin}..{end} of the data but there are only "
                f"{data_size}; the file is truncated. Fix: re-create or re-download it."
            )
        infos[name] = info
        offsets[name] = base + begin
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise SourceError(
                f"{where}: tensors '{a}' and '{b}' overlap in the file; it is corrupt. Fix: re-create or re-download it."
            )
        if begin_b > end_a:
            raise SourceError(
                f"{where}: bytes {end_a}..{begin_b} of the data, between tensors '{a}' and '{b}', belong to no "
                "tensor (the format covers its data buffer exactly); the file is corrupt. Fix: re-create it."
            )
    first, last = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if first != 0 or last != data_size:
        what = (
            f"the first tensor starts at byte {first}"
            if first
            else f"{data_size - last} bytes follow the last tensor"
        )
        raise SourceError(
            f"{where}: {what}, but the data buffer must be covered exactly; the file is corrupt or has "
            "bytes appended. Fix: re-create it."
        )
    _check_bools(fd, infos, offsets, where)
    return infos, offsets, {str(k): str(v) for k, v in dict(metadata).items()}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are all different (the format forbids repeats: readers would disagree)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"the key '{repeated}' appears twice")
    return out


def _entry(name: str, entry: object, where: str) -> tuple[TensorInfo, int, int]:
    try:
        code = entry["dtype"]  # type: ignore[index]
        shape = tuple(_integer(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (_integer(x) for x in entry["data_offsets"])  # type: ignore[index]
    except KeyError as e:
        raise SourceError(
            f"{where}: tensor '{name}' has no {e} field; the file is corrupt. Fix: re-create or re-download it."
        ) from None
    except (TypeError, ValueError):
        raise SourceError(
            f"{where}: tensor '{name}' has a malformed header entry (expected integer 'shape' and 'data_offsets', "
            f"found {_fields(entry)}); the file is corrupt. Fix: re-create or re-download it."
        ) from None
    dtype = _dtype_of(code) if isinstance(code, str) else None
    if dtype is None:
        raise SourceError(_unsupported(name, code, where)) from None
    if any(d < 0 for d in shape) or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
        raise SourceError(
            f"{where}: tensor '{name}' declares shape {shape} of {dtype.name} ({math.prod(shape) * dtype.itemsize} "
            f"bytes) but data_offsets [{begin}, {end}]; the file is corrupt. Fix: re-create it."
        )
    return TensorInfo(name, shape, dtype), begin, end


def _integer(value: object) -> int:
    """A header number, which must be a JSON integer: ``24.0`` or ``true`` is no size or offset."""
    if type(value) is not int:
        raise ValueError(f"not an integer: {value!r}")
    return value


def _fields(entry: object) -> str:
    """What a damaged entry holds, short: ``shape [2], data_offsets [24.0, 32.5]``."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    return ", ".join(f"{key} {str(entry.get(key))[:40]}" for key in ("shape", "data_offsets"))


def _check_bools(fd: int, infos: Mapping[str, TensorInfo], offsets: Mapping[str, int], where: str) -> None:
    """Refuse BOOL bytes other than 0 and 1, which NumPy and torch would read as True. Checked when
    the file is opened, as the header is: a refusal while writing would leave the module half written
    (BOOL tensors are masks, small next to the weights)."""
    for name, info in infos.items():
        if info.dtype != np.bool_:
            continue
        start = 0
        for chunk in mapped_chunks(fd, offsets[name], info.dtype, math.prod(info.shape), where, name):
            raw = chunk.reshape(-1).view(np.uint8)
            bad = np.flatnonzero(raw > 1)
            if bad.size:
                first = int(bad[0])
                index = tuple(int(i) for i in np.unravel_index(start + first, info.shape))
                raise SourceError(
                    f"{where}: tensor '{name}' is BOOL but holds byte {int(raw[first])} at index {index} (byte "
                    f"{offsets[name] + start + first} of the file); a BOOL is stored as 0 or 1, so the "
                    "file is corrupt. Fix: re-create or re-download it."
                )
            start += raw.size


def _unsupported(name: str, code: object, where: str) -> str:
    why = REFUSED.get(code) if isinstance(code, str) else None
    if why is not None:
        return (
            f"{where}: tensor '{name}' has dtype {code} ({why}), which weightport "
            "cannot load. Fix: dequantize it (to BF16, F16 or F32, or to F8_E4M3 with its scales) with the "
            "tool that made the file, and load that file."
        )
    return (
        f"{where}: tensor '{name}' has dtype {code!r}, which weightport does not know; it reads "
        f"{', '.join([*_CODES, *_ML_CODES])}. Fix: convert the tensor to one of those, or update weightport "
        "if the format has a new dtype."
    )


def open(path: Path) -> Source:
    where = f"'{path.name}'"
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        infos, offsets, metadata = read_header(fd, where)
    except BaseException:
        os.close(fd)
        raise
    return SafetensorsSource(
        description=where, infos=infos, metadata={"safetensors": metadata}, offsets=offsets, _fd=fd
    )


def write(
    arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``arrays`` to a ``.safetensors`` file (little-endian, C order), atomically."""
    codes = {dtype: code for code, dtype in dtype_codes().items()} if _needs_ml(arrays) else _BY_DTYPE
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    prepared = []
    for name, value in arrays.items():
        if name == "__metadata__":
            raise SourceError(
                f"'{name}': cannot be saved to '{Path(path).name}': the format keeps that header key for the "
                "file's metadata, so loading the file would refuse it. Fix: save to .npz, or rename the tensor "
                "(weightport.save({new_name: array, ...}, path) with a dict of arrays)."
            )
        array = np.asarray(value)
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        code = codes.get(data.dtype)
        if code is None:
            raise SourceError(
                f"'{name}': dtype {array.dtype} cannot be stored in .safetensors, which has no complex or "
                "long-double type. Fix: save it to .npz, or store its parts (array.real, array.imag) apart."
            )
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        prepared.append(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write_to(f: BinaryIO) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for data in prepared:
            f.write(data.reshape(-1).view(np.uint8).data)

    return atomic_write(Path(path), write_to)


_BY_DTYPE = {dtype: code for code, dtype in _CODES.items()}


def _needs_ml(arrays: Mapping[str, np.ndarray]) -> bool:
    return any(np.asarray(a).dtype.isbuiltin == 2 for a in arrays.values())
