"""``.safetensors`` files, read from memory-mapped windows straight into the destination.

The header is checked before any data is read: its length against the file, each
tensor's ``data_offsets`` against its dtype and shape and against the file's
real size, and no two tensors overlapping. Written by :mod:`weightport.export`.
weightport reads the format itself (it is a JSON header and raw bytes) so it can
read into a given buffer and check every size; the ``safetensors`` package is
not needed.

>>> import numpy as np, tempfile, pathlib
>>> from weightport.export import write_safetensors
>>> path = write_safetensors({"w": np.eye(2, dtype=np.float32)}, pathlib.Path(tempfile.mkdtemp()) / "m.safetensors")
>>> src = open(path); src.read("w").tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightport.errors import SourceError
from weightport.export import SAFETENSORS_DTYPES, SAFETENSORS_REFUSED
from weightport.sources.base import Region, Source, TensorInfo, region_shape
from weightport.sources.files import map_array, mapped_chunks, read_mapped, read_region_exact

__all__ = ["claims", "open", "SafetensorsSource", "read_header"]

MAX_HEADER_BYTES = 100 * 1024 * 1024


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
    """Infos, absolute data offsets and ``__metadata__`` of the file open at ``fd``, all checked."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise SourceError(
            f"{where}: {size} bytes is too short for a .safetensors file; it is truncated. Fix: re-create or re-download it."
        )
    length = int.from_bytes(raw, "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise SourceError(
            f"{where}: header claims {length} bytes but the file has {size - 8} after the length field; "
            "the file is truncated or not a .safetensors file. Fix: re-create it."
        )
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(
            f"{where}: header is not valid JSON ({e}); the file is corrupt. Fix: re-create or re-download it."
        ) from None
    if not isinstance(header, dict):
        raise SourceError(
            f"{where}: header is not a JSON object; the file is corrupt. Fix: re-create or re-download it."
        )
    metadata = header.pop("__metadata__", None) or {}
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
    return infos, offsets, {str(k): str(v) for k, v in dict(metadata).items()}


def _entry(name: str, entry: object, where: str) -> tuple[TensorInfo, int, int]:
    try:
        code = entry["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except KeyError as e:
        raise SourceError(
            f"{where}: tensor '{name}' has no {e} field; the file is corrupt. Fix: re-create or re-download it."
        ) from None
    except (TypeError, ValueError):
        raise SourceError(
            f"{where}: tensor '{name}' has a malformed header entry; the file is corrupt. Fix: re-create or re-download it."
        ) from None
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise SourceError(_unsupported(name, code, where)) from None
    if any(d < 0 for d in shape) or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
        raise SourceError(
            f"{where}: tensor '{name}' declares shape {shape} of {dtype.name} ({math.prod(shape) * dtype.itemsize} "
            f"bytes) but data_offsets [{begin}, {end}]; the file is corrupt. Fix: re-create it."
        )
    return TensorInfo(name, shape, dtype), begin, end


def _unsupported(name: str, code: object, where: str) -> str:
    why = SAFETENSORS_REFUSED.get(code) if isinstance(code, str) else None
    if why is not None:
        return (
            f"{where}: tensor '{name}' has dtype {code} ({why}), which weightport "
            "cannot load. Fix: dequantize it (to BF16, F16 or F32, or to F8_E4M3 with its scales) with the "
            "tool that made the file, and load that file."
        )
    return (
        f"{where}: tensor '{name}' has dtype {code!r}, which weightport does not know; it reads "
        f"{', '.join(SAFETENSORS_DTYPES)}. Fix: convert the tensor to one of those, or update weightport "
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
