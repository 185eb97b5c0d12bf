"""The reader contract every file format and in-memory container plugs into.

A :class:`Source` lists every tensor's name, shape and dtype before any data is
read (sizes written in a file are checked against the file's real size when the
source is opened), and reads one tensor's data on request, either into a buffer
it is given (:meth:`Source.read_into`) or into a fresh array (:meth:`Source.read`).

>>> import numpy as np
>>> from weightport.sources import open_source
>>> src = open_source({"w": np.zeros((2, 3), np.float32)})
>>> src.infos["w"]
TensorInfo(name='w', shape=(2, 3), dtype=dtype('float32'))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightport.errors import SourceError

__all__ = ["TensorInfo", "Source", "Region", "check_extent", "region_shape"]

Region = tuple[slice, ...]


def region_shape(region: Region) -> tuple[int, ...]:
    """The shape of a box given as one ``slice(start, stop)`` per axis.

    >>> region_shape((slice(2, 5), slice(0, 4)))
    (3, 4)
    """
    return tuple(part.stop - part.start for part in region)


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor in a source, known before its data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Source(ABC):
    """A read-only, lazily read collection of named arrays.

    Attributes:
        description: how messages name it, e.g. ``"'model.npz'"``.
        infos: every tensor's :class:`TensorInfo`, in the source's own order.
        ignored: entries seen but not read (stray files in a folder), for the report.
        metadata: format facts that layouts use (layer order, configuration).
        in_memory: True when reading cannot fail (data already in memory).
        bytes_read: bytes of tensor data delivered so far (read from the file, or
            handed out from memory): the reader's own accounting, for tests and
            benchmarks.
    """

    description: str
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    in_memory: bool = False
    bytes_read: int = field(default=0, init=False, repr=False, compare=False)

    @abstractmethod
    def read_into(self, name: str, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous, of the tensor's shape and dtype) with tensor ``name``."""

    def read_can_fail(self, name: str) -> bool:
        """Whether reading ``name`` can raise after the source was opened and checked.

        False for data in memory, and for data read through memory maps: there a vanished
        page ends the process (SIGBUS) instead of raising, so no caller ever sees a module
        half-written by a read error, and no undo copy is needed.
        """
        return not self.in_memory

    def read(self, name: str) -> np.ndarray:
        """Return tensor ``name`` as an array that the caller must not write to."""
        info = self.infos[name]
        out = np.empty(info.shape, info.dtype)
        self.read_into(name, out)
        return out

    def mapped(self, name: str) -> np.ndarray | None:
        """Tensor ``name`` as a read-only array over the file's bytes in place (memory-mapped), or
        None where the reader cannot (compressed or chunked data, data in memory: use :meth:`read`).

        For writes that read the tensor out of order (transposed kernels): no intermediate copy.
        """
        return None

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        """The values of tensor ``name`` in ``region`` (one ``slice(start, stop)`` per axis).

        Fills ``out`` (C-contiguous, of the region's shape) when given, else returns
        an array the caller must not write to. Readers of files override this to
        read only the region's bytes; this default reads the whole tensor.
        """
        part = self.read(name)[region]
        if out is None:
            return np.array(part)  # a copy, so the whole tensor is freed
        np.copyto(out, part)
        return out

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        """Tensor ``name``'s values as flat chunks in any order, for value checks.

        Readers of files override this to stream through one small reused buffer,
        so checking a tensor never holds all of it in memory; chunks are only
        valid until the next one is yielded.
        """
        yield self.read(name).reshape(-1)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files; the default has nothing to release."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.infos)

    def keys(self) -> Mapping[str, TensorInfo]:
        return self.infos


def check_extent(where: str, name: str, offset: int, nbytes: int, file_size: int) -> None:
    """Refuse a tensor whose declared bytes do not lie inside the real file.

    >>> check_extent("'m.bin'", "w", 8, 16, 20)
    Traceback (most recent call last):
    weightport.errors.SourceError: 'm.bin': tensor 'w' declares bytes 8..24 but the file has 20 bytes; the file is truncated or corrupt. Fix: re-create or re-download it.
    """
    if offset < 0 or nbytes < 0 or offset + nbytes > file_size:
        raise SourceError(
            f"{where}: tensor '{name}' declares bytes {offset}..{offset + nbytes} but the file has "
            f"{file_size} bytes; the file is truncated or corrupt. Fix: re-create or re-download it."
        )
