"""Low-level file access shared by the formats: memory-mapped windows, positioned reads, ``.npy``
headers, and the atomic write every writer goes through.

>>> import io, numpy as np
>>> buf = io.BytesIO(); np.save(buf, np.zeros((2, 3), np.float32)); _ = buf.seek(0)
>>> header = parse_npy_header(buf, "'x.npy'")
>>> header.shape, header.dtype, header.fortran_order, header.data_offset
((2, 3), dtype('float32'), False, 128)
"""

from __future__ import annotations

import ast
import contextlib
import errno
import io
import math
import mmap
import os
import re
import secrets
import stat
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from weightport.errors import SourceError

__all__ = [
    "NpyHeader",
    "parse_npy_header",
    "read_exact",
    "byte_view",
    "open_no_follow",
    "LINKS_NOT_FOLLOWED",
    "contiguous_runs",
    "read_region_exact",
    "atomic_write",
]


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # bytes from the start of the .npy data stream

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


MAX_NPY_HEADER = 65536  # NumPy's own default limit on a header's dictionary literal


def parse_npy_header(f: BinaryIO, where: str) -> NpyHeader:
    """Parse a ``.npy`` header without unpickling; refuse object (pickled) arrays.

    The header's length is checked against :data:`MAX_NPY_HEADER` before its bytes are read, and
    only those bytes go to NumPy's parser (a damaged length or literal is a SourceError).
    """
    header = b""
    try:
        prefix = _read_at_most(f, 8)
        if len(prefix) < 8 or prefix[:6] != b"\x93NUMPY":
            raise ValueError("no .npy magic string")
        width = 2 if prefix[6] == 1 else 4
        if prefix[6] not in (1, 2, 3) or prefix[7] != 0:
            raise ValueError(f"unsupported .npy version {prefix[6]}.{prefix[7]}")
        field = _read_at_most(f, width)
        length = int.from_bytes(field, "little") if len(field) == width else -1
        if not 0 <= length <= MAX_NPY_HEADER:
            raise ValueError(f"header length {length} outside 0..{MAX_NPY_HEADER}")
        header = _read_at_most(f, length)
        if len(header) < length:
            raise ValueError("the header is cut short")
        stream = io.BytesIO(prefix + field + header)
        fmt = np.lib.format
        version = fmt.read_magic(stream)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(stream, max_header_size=MAX_NPY_HEADER)
        offset = len(prefix) + len(field) + len(header)
    except (
        ValueError,
        SyntaxError,
        EOFError,
        OSError,
        TypeError,
        RecursionError,
        MemoryError,
        tokenize.TokenError,
    ) as e:
        lost = _lost_float(header)
        if lost is not None:
            raise SourceError(
                f"{where}: holds dtype '{lost}', a 1-byte float NumPy has no type for: {_ML_DTYPES_LOST}"
            ) from e
        raise SourceError(
            f"{where}: not a valid .npy header ({type(e).__name__}: {e}); the file is corrupt or not a .npy. "
            "Fix: re-create it."
        ) from e
    if dtype.hasobject:
        raise SourceError(
            f"{where}: holds Python objects (a pickled array); weightport never unpickles. "
            "Fix: save numeric arrays only (np.save of a float or int array)."
        )
    if dtype.names:  # a structured array: fields of their own dtypes, not one tensor's values
        fields = ", ".join(repr(n) for n in dtype.names)
        raise SourceError(
            f"{where}: holds structured records (fields {fields}), not one array of numbers. Fix: save each "
            "field as an array of its own (np.save('field.npy', array['field'])), or pass "
            "{name: array[name] for name in array.dtype.names}."
        )
    if dtype.kind == "V":
        raise SourceError(
            f"{where}: holds raw {dtype.itemsize}-byte records (dtype {dtype.str}), which say nothing of what "
            f"they are: {_ML_DTYPES_LOST}"
        )
    if any(int(d) < 0 for d in shape):
        raise SourceError(f"{where}: negative dimension in shape {shape}; the file is corrupt.")
    return NpyHeader(tuple(int(d) for d in shape), dtype, bool(fortran), offset)


_ML_DTYPES_LOST = (
    "np.save writes an ml_dtypes array (bfloat16, float8, int4) that way, losing its type. Fix: save it as "
    "float32 (array.astype(np.float32); int8 for int4), or to .safetensors, which records bfloat16 and float8."
)


def _lost_float(header: bytes) -> str | None:
    """The descr of a header NumPy refused where it names a 1-byte float (``'<f1'``: how np.save writes
    ml_dtypes' float8_e5m2, whose type code is a float's), else None."""
    try:
        fields = ast.literal_eval(header.decode("latin1").strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    descr = fields.get("descr") if isinstance(fields, dict) else None
    return descr if isinstance(descr, str) and re.fullmatch(r"[<>|=]?f1", descr) else None


def _read_at_most(f: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes from a file or stream (fewer only at its end)."""
    chunks, left = [], size
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def folder_has(path: os.PathLike[str] | str, suffix: str) -> bool:
    """Whether a folder directly holds an entry whose name ends with ``suffix``."""
    with os.scandir(path) as entries:
        return any(e.name.endswith(suffix) for e in entries)


def byte_view(out: np.ndarray) -> memoryview:
    """A writable byte view of a C-contiguous array (bfloat16 included)."""
    return out.reshape(-1).view(np.uint8).data


def read_exact(fd: int, offset: int, out: memoryview, where: str, name: str) -> None:
    """Fill ``out`` from file descriptor ``fd`` at ``offset``, or raise SourceError on a short read."""
    done = 0
    total = len(out)
    while done < total:
        try:
            count = (
                os.preadv(fd, [out[done:]], offset + done)
                if hasattr(os, "preadv")
                else _pread_into(fd, out[done:], offset + done)
            )
        except OSError as e:
            raise SourceError(f"{where}: reading tensor '{name}' failed: {e}") from e
        if count == 0:
            raise SourceError(
                f"{where}: tensor '{name}' ends after {done} of {total} bytes; the file was truncated "
                "or changed while reading. Fix: re-create it, and do not modify it during the load."
            )
        done += count


WINDOW_BYTES = 16 * 1024 * 1024


def _check_within(fd: int, end: int, where: str, name: str) -> None:
    size = os.fstat(fd).st_size
    if end > size:
        raise SourceError(
            f"{where}: tensor '{name}' ends at byte {end} but the file has {size}; the file was truncated "
            "or changed while reading. Fix: re-create it, and do not modify it during the load."
        )


def mapped_chunks(
    fd: int, offset: int, dtype: np.dtype, count: int, where: str, name: str
) -> Iterator[np.ndarray]:
    """``count`` values of ``dtype`` at byte ``offset``, as read-only arrays over memory-mapped windows.

    Each window (16 MiB) is unmapped once the next is asked for, so the file's pages never pile up in
    this process's memory; a chunk is valid only until then. Reading mapped pages from the page cache
    costs no copy, which makes this faster than positioned reads for the value checks and the copy
    into the destination. (A file truncated by another process while mapped ends the process with
    SIGBUS: do not modify files during a load.)
    """
    itemsize = dtype.itemsize
    _check_within(fd, offset + count * itemsize, where, name)
    per_window = max(1, WINDOW_BYTES // max(1, itemsize))
    granularity = mmap.ALLOCATIONGRANULARITY
    for first in range(0, count, per_window):
        n = min(per_window, count - first)
        start = offset + first * itemsize
        base = start - start % granularity
        window = mmap.mmap(
            fd, start - base + n * itemsize, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base
        )
        try:
            yield np.frombuffer(window, dtype, count=n, offset=start - base)
        finally:
            with contextlib.suppress(BufferError):  # a consumer kept a view: the mapping goes with it
                window.close()


def map_array(
    fd: int,
    offset: int,
    dtype: np.dtype,
    shape: tuple[int, ...],
    where: str,
    name: str,
    fortran_order: bool = False,
) -> np.ndarray:
    """A read-only array over the bytes at ``offset`` of ``fd``, memory-mapped in place: no copy.

    For transforms that read a tensor out of order (a Keras kernel transposed into PyTorch's
    layout): they read straight from the page cache instead of from a copy of the tensor. The
    mapping lives as long as the array (or a view of it); the size is checked against the file.
    """
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    _check_within(fd, offset + nbytes, where, name)
    if nbytes == 0:
        return np.empty(shape, dtype)
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    window = mmap.mmap(
        fd,
        offset - base + nbytes,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),  # one call maps every page (Linux)
        prot=mmap.PROT_READ,
        offset=base,
    )
    flat = np.frombuffer(window, dtype, count=count, offset=offset - base)
    return flat.reshape(shape[::-1]).T if fortran_order and len(shape) > 1 else flat.reshape(shape)


def read_mapped(fd: int, offset: int, out: np.ndarray, where: str, name: str) -> None:
    """Fill C-contiguous ``out`` from the file at ``offset`` through mapped windows (streamed copies)."""
    from weightport.copying import copy_array

    flat = out.reshape(-1).view(np.uint8)  # bytes as they are: any dtype, any byte order
    done = 0
    for chunk in mapped_chunks(fd, offset, np.dtype(np.uint8), flat.size, where, name):
        copy_array(flat[done : done + chunk.size], chunk)
        done += chunk.size
        del chunk


def contiguous_runs(shape: tuple[int, ...], region: tuple[slice, ...]) -> Iterator[tuple[int, int]]:
    """``(first element, element count)`` of each contiguous run of ``region`` in a C-order array, in order.

    Rows ``a:b`` of a matrix are one run; its columns ``a:b`` are one run per row.

    >>> list(contiguous_runs((4, 3), (slice(1, 3), slice(0, 3))))
    [(3, 6)]
    >>> list(contiguous_runs((4, 3), (slice(0, 2), slice(1, 3))))
    [(1, 2), (4, 2)]
    """
    lengths = [part.stop - part.start for part in region]
    if not shape:
        yield 0, 1
        return
    if any(n <= 0 for n in lengths):
        return
    axis = len(shape) - 1  # the runs go along this axis: every axis after it is whole
    while axis > 0 and region[axis].start == 0 and region[axis].stop == shape[axis]:
        axis -= 1
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    run = lengths[axis] * strides[axis]
    base = sum(part.start * stride for part, stride in zip(region[: axis + 1], strides))
    if axis == 0:
        yield base, run
        return
    for index in np.ndindex(*lengths[:axis]):
        yield base + sum(i * stride for i, stride in zip(index, strides)), run


def read_region_exact(
    fd: int,
    offset: int,
    shape: tuple[int, ...],
    region: tuple[slice, ...],
    out: np.ndarray,
    where: str,
    name: str,
) -> int:
    """Fill C-contiguous ``out`` with ``region`` of the C-order array of ``shape`` at byte ``offset``.

    One positioned read per contiguous run; returns the bytes read.
    """
    itemsize = out.dtype.itemsize
    flat = byte_view(out)
    done = 0
    for first, count in contiguous_runs(shape, region):
        nbytes = count * itemsize
        read_exact(fd, offset + first * itemsize, flat[done : done + nbytes], where, name)
        done += nbytes
    return done


def _pread_into(fd: int, out: memoryview, offset: int) -> int:
    data = os.pread(fd, len(out), offset)
    out[: len(data)] = data
    return len(data)


# Why a link found inside a folder or an index is refused, and the way out (for SourceError messages).
LINKS_NOT_FOLLOWED = (
    "and links found inside a folder or an index are not followed (a Hugging Face cache snapshot links "
    "every file to its blobs/ folder). Fix: load from a folder of plain files "
    "(huggingface_hub.snapshot_download(repo_id, local_dir=...) writes one; or copy it with cp -rL), or pass a "
    "single file's own path (a shard holds only its part of the model; config.json is not read then)"
)


def open_no_follow(path: os.PathLike[str] | str) -> int:
    """Open a file for reading without following a symbolic link at its last component."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            why = f"it is a symbolic link, {LINKS_NOT_FOLLOWED}"
        elif e.errno == errno.ENOENT:
            why = "no such file. Fix: check that every file the folder or index names is there"
        else:
            why = f"cannot be opened ({e.strerror or e}). Fix: check the file's permissions"
        raise SourceError(f"'{path}': {why}.") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through ``write(f)`` to a temporary name beside ``path``, then rename it into place:
    a failed write never leaves half a file (h5py, which writes by name, does the same itself).

    The file gets the permissions a plain ``open(path, "wb")`` gives: those of the file it replaces,
    else 0o666 less the umask (0644 under umask 022, as ``np.savez``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        _keep_mode(fd, path)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new file under an unused name beside ``path``, created with mode 0o666 so that the umask (and a
    folder's default ACL) applies as to any new file: ``tempfile.mkstemp`` creates it 0o600 whatever they say."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name beside it", str(path))


def _keep_mode(fd: int, path: Path) -> None:
    """Give the new file the permissions of the file it replaces, as writing over that file would."""
    fchmod = getattr(os, "fchmod", None)  # not on Windows, where the bits mean little
    if fchmod is None:
        return
    try:
        found = os.stat(path)
    except OSError:
        return  # nothing there yet (or nothing readable): the umask decides
    if stat.S_ISREG(found.st_mode):
        fchmod(fd, stat.S_IMODE(found.st_mode))
