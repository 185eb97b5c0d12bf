"""A single ``.npy`` file as a one-tensor source (named by its file stem).

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "fc.weight.npy"); np.save(path, np.eye(2))
>>> src = open(__import__("pathlib").Path(path)); list(src.infos)
['fc.weight']
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightport.sources.base import Region, Source, TensorInfo, check_extent, region_shape
from weightport.sources.files import (
    NpyHeader,
    byte_view,
    map_array,
    mapped_chunks,
    open_no_follow,
    parse_npy_header,
    read_exact,
    read_mapped,
    read_region_exact,
)

KEEP_OPEN = 256

__all__ = ["NpyFile", "NpyFiles", "claims", "open", "read_npy_into", "read_npy_region"]


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npy"


@dataclass(frozen=True)
class NpyFile:
    """Where one tensor lies: its ``.npy`` file and parsed header."""

    path: Path
    header: NpyHeader


def inspect_npy(path: Path, where: str, name: str) -> NpyHeader:
    """Parse ``path``'s header and check that the declared data fits in the file."""
    fd = open_no_follow(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            header = parse_npy_header(f, where)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    check_extent(where, name, header.data_offset, header.nbytes, size)
    return header


def read_npy_into(fd: int, header: NpyHeader, out: np.ndarray, where: str, name: str, base: int = 0) -> None:
    """Read the data of a ``.npy`` (at byte ``base`` of ``fd``) into C-contiguous ``out``."""
    if header.fortran_order and out.ndim > 1:
        staging = np.empty(header.shape[::-1], header.dtype)
        read_exact(fd, base + header.data_offset, byte_view(staging), where, name)
        np.copyto(out, staging.T)
    else:
        read_mapped(fd, base + header.data_offset, out, where, name)


def map_npy(fd: int, header: NpyHeader, where: str, name: str, base: int = 0) -> np.ndarray:
    """The data of a ``.npy`` (at byte ``base`` of ``fd``) as a read-only memory-mapped array, no copy."""
    return map_array(
        fd,
        base + header.data_offset,
        header.dtype,
        header.shape,
        where,
        name,
        fortran_order=header.fortran_order,
    )


def read_npy_region(
    fd: int,
    header: NpyHeader,
    region: Region,
    out: np.ndarray | None,
    where: str,
    name: str,
    base: int = 0,
) -> tuple[np.ndarray, int]:
    """``region`` of a ``.npy``'s data (at byte ``base`` of ``fd``): the array and the bytes read.

    A Fortran-order array is the C-order array of the reversed shape, so its
    region is read reversed and handed back transposed (a view).
    """
    offset = base + header.data_offset
    if header.fortran_order and len(region) > 1:
        staging = np.empty(region_shape(region)[::-1], header.dtype)
        nbytes = read_region_exact(fd, offset, header.shape[::-1], region[::-1], staging, where, name)
        if out is None:
            return staging.T, nbytes
        np.copyto(out, staging.T)
        return out, nbytes
    out = np.empty(region_shape(region), header.dtype) if out is None else out
    return out, read_region_exact(fd, offset, header.shape, region, out, where, name)


@dataclass
class NpyFiles(Source):
    """Tensors each in its own ``.npy`` file, links never followed.

    Up to :data:`KEEP_OPEN` files stay open from the moment the source is opened, so a file
    deleted or replaced later cannot fail the writing pass half-way; beyond that many, each
    file is opened when it is read (and an undo copy protects the load).
    """

    files: dict[str, NpyFile] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)

    def keep_open(self) -> None:
        if len(self.files) <= KEEP_OPEN:
            for name, entry in self.files.items():
                self.fds[name] = open_no_follow(entry.path)

    def read_can_fail(self, name: str) -> bool:
        # C-order data is memory-mapped from a file opened up front: nothing left to fail
        return self.files[name].header.fortran_order or name not in self.fds

    @contextlib.contextmanager
    def _fd(self, name: str) -> Iterator[int]:
        if name in self.fds:
            yield self.fds[name]
            return
        fd = open_no_follow(self.files[name].path)
        try:
            yield fd
        finally:
            os.close(fd)

    def read_into(self, name: str, out: np.ndarray) -> None:
        entry = self.files[name]
        with self._fd(name) as fd:
            read_npy_into(fd, entry.header, out, f"'{entry.path}'", name)
        self.bytes_read += out.nbytes

    def mapped(self, name: str) -> np.ndarray | None:
        if name not in self.fds:
            return None
        entry = self.files[name]
        array = map_npy(self.fds[name], entry.header, f"'{entry.path}'", name)
        self.bytes_read += array.nbytes
        return array

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        entry = self.files[name]
        with self._fd(name) as fd:
            array, nbytes = read_npy_region(fd, entry.header, region, out, f"'{entry.path}'", name)
        self.bytes_read += nbytes
        return array

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        entry = self.files[name]
        count = entry.header.nbytes // max(1, entry.header.dtype.itemsize)
        with self._fd(name) as fd:
            for chunk in mapped_chunks(
                fd, entry.header.data_offset, entry.header.dtype, count, f"'{entry.path}'", name
            ):
                self.bytes_read += chunk.nbytes
                yield chunk

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def open(path: Path) -> Source:
    where = f"'{path.name}'"
    name = path.name.removesuffix(".npy")
    header = inspect_npy(path, where, name)
    info = TensorInfo(name, header.shape, header.dtype)
    source = NpyFiles(description=where, infos={name: info}, files={name: NpyFile(path, header)})
    source.keep_open()
    return source
