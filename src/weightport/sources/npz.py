"""``.npz`` archives (``np.savez``/``np.savez_compressed``), read member by member.

Stored (uncompressed) members are read straight from their offset in the file;
compressed ones are streamed and never decompressed past their declared size.
Every member's declared size must equal its ``.npy`` header plus shape times
itemsize, member names with ``..`` or an absolute path are refused, and nothing
is unpickled.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.npz"; np.savez(path, weight=np.eye(2))
>>> src = open(path); src.infos["weight"].shape
(2, 2)
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from weightport.dtypes import holds_all, is_ml_float
from weightport.errors import SourceError
from weightport.sources.base import Region, Source, TensorInfo, check_extent, region_shape
from weightport.sources.files import (
    NpyHeader,
    atomic_write,
    byte_view,
    contiguous_runs,
    mapped_chunks,
    parse_npy_header,
)
from weightport.sources.npy import map_npy, read_npy_into, read_npy_region

__all__ = ["claims", "open", "write", "SUFFIX", "NpzSource", "unsafe_member_name"]

SUFFIX = ".npz"

# What zipfile and zlib raise for a damaged archive: truncations, bad CRCs, damaged deflate streams,
# compression methods or versions it does not support, members flagged as encrypted.
_DAMAGE = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, RuntimeError)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length
_CHUNK = 1 << 22


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz"


def unsafe_member_name(name: str) -> bool:
    """True for names that climb out of an archive or are absolute (``../x``, ``/x``, ``C:x``)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


@dataclass(frozen=True)
class Member:
    info: zipfile.ZipInfo
    header: NpyHeader
    data_start: int  # offset of the member's (possibly compressed) bytes in the file


@dataclass
class NpzSource(Source):
    path: Path = Path()
    members: dict[str, Member] = field(default_factory=dict)
    _fd: int = -1
    _zip: zipfile.ZipFile | None = None

    def read_can_fail(self, name: str) -> bool:
        member = self.members[name]  # stored C-order members are memory-mapped; the rest stream
        return member.info.compress_type != zipfile.ZIP_STORED or member.header.fortran_order

    def read_into(self, name: str, out: np.ndarray) -> None:
        member = self.members[name]
        if member.info.compress_type == zipfile.ZIP_STORED:
            read_npy_into(self._fd, member.header, out, self.description, name, base=member.data_start)
        else:
            self._read_compressed(name, member, out)
        self.bytes_read += out.nbytes

    def mapped(self, name: str) -> np.ndarray | None:
        member = self.members[name]
        if member.info.compress_type != zipfile.ZIP_STORED:
            return None
        array = map_npy(self._fd, member.header, self.description, name, base=member.data_start)
        self.bytes_read += array.nbytes
        return array

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        """Stored members: one positioned read per contiguous run. Compressed ones are
        decompressed in order up to the region's last byte, keeping only its runs."""
        member = self.members[name]
        if member.info.compress_type == zipfile.ZIP_STORED:
            array, nbytes = read_npy_region(
                self._fd, member.header, region, out, self.description, name, base=member.data_start
            )
            self.bytes_read += nbytes
            return array
        header = member.header
        fortran = header.fortran_order and len(region) > 1
        shape, box = (header.shape[::-1], region[::-1]) if fortran else (header.shape, region)
        target = np.empty(region_shape(box), header.dtype)
        self._stream_runs(name, member, shape, box, target)
        array = target.T if fortran else target
        if out is None:
            return array
        np.copyto(out, array)
        return out

    def _stream_runs(
        self, name: str, member: Member, shape: tuple[int, ...], box: Region, target: np.ndarray
    ) -> None:
        assert self._zip is not None
        itemsize = member.header.dtype.itemsize
        flat = byte_view(target)
        scratch = memoryview(bytearray(min(_CHUNK, max(1, member.header.nbytes))))
        position = done = 0
        try:
            with self._zip.open(member.info) as stream:
                stream.read(member.header.data_offset)
                for first, count in contiguous_runs(shape, box):
                    start, nbytes = first * itemsize, count * itemsize
                    while position < start:  # skip to the run: decompress into the scratch buffer
                        got = stream.readinto(scratch[: min(len(scratch), start - position)])  # type: ignore[attr-defined]
                        if not got:
                            break
                        position += got
                    end = done + nbytes
                    while done < end:
                        got = stream.readinto(flat[done : min(end, done + _CHUNK)])  # type: ignore[attr-defined]
                        if not got:
                            raise SourceError(
                                f"{self.description}: member '{name}' ends after {position} bytes of data"
                            )
                        done += got
                        position += got
        except SourceError:
            raise
        except _DAMAGE as e:  # zlib errors, CRC mismatches
            raise SourceError(
                f"{self.description}: member '{name}' is corrupt ({e}). Fix: re-create the file."
            ) from e
        finally:
            self.bytes_read += position

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        member = self.members[name]
        if member.info.compress_type != zipfile.ZIP_STORED:
            yield from super().iter_chunks(name)
            return
        header = member.header
        count = header.nbytes // max(1, header.dtype.itemsize)
        offset = member.data_start + header.data_offset
        for chunk in mapped_chunks(self._fd, offset, header.dtype, count, self.description, name):
            self.bytes_read += chunk.nbytes
            yield chunk

    def _read_compressed(self, name: str, member: Member, out: np.ndarray) -> None:
        assert self._zip is not None
        header = member.header
        target = np.empty(header.shape[::-1], header.dtype) if header.fortran_order and out.ndim > 1 else out
        view = byte_view(target)
        try:
            with self._zip.open(member.info) as stream:
                stream.read(header.data_offset)
                done = 0
                while done < len(view):
                    count = stream.readinto(view[done : done + _CHUNK])  # type: ignore[attr-defined]
                    if not count:
                        break
                    done += count
                if done < len(view):
                    raise SourceError(
                        f"{self.description}: member '{name}' ends after {done} of {len(view)} bytes"
                    )
                stream.read(1)  # reaching the end makes zipfile compare the member's CRC-32
        except SourceError:
            raise
        except _DAMAGE as e:  # zlib errors, CRC mismatches
            raise SourceError(
                f"{self.description}: member '{name}' is corrupt ({e}). Fix: re-create the file."
            ) from e
        if target is not out:
            np.copyto(out, target.T)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open(path: Path) -> Source:
    where = f"'{path.name}'"
    try:
        archive = zipfile.ZipFile(path)
    except SourceError:
        raise
    except _DAMAGE as e:
        raise SourceError(
            f"{where}: not a readable .npz ({type(e).__name__}: {e}); it is truncated or corrupt. Fix: re-create it."
        ) from e
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    source = NpzSource(description=where, path=path, _fd=fd, _zip=archive)
    try:
        _index(source, archive, fd, where)
    except BaseException:
        source.close()
        raise
    return source


def _index(source: NpzSource, archive: zipfile.ZipFile, fd: int, where: str) -> None:
    size = os.fstat(fd).st_size
    seen: set[str] = set()
    for info in archive.infolist():
        if unsafe_member_name(info.filename):
            raise SourceError(
                f"{where}: member name '{info.filename}' leaves the archive; refusing the file. Fix: re-create "
                "it with np.savez, whose member names are the arrays' names."
            )
        if info.filename in seen:  # NumPy would take the last: one file, two readings
            raise SourceError(
                f"{where}: two members are named '{info.filename}', so readers disagree on its values (NumPy "
                "takes the last); the archive is damaged or crafted. Fix: re-create the file with np.savez."
            )
        seen.add(info.filename)
        if info.flag_bits & 0x1:
            raise SourceError(
                f"{where}: member '{info.filename}' is flagged as encrypted, which np.savez never writes. "
                "Fix: re-create the file with np.savez."
            )
        if not info.filename or info.is_dir() or not info.filename.endswith(".npy"):
            source.ignored.append(f"{info.filename} (not a .npy member)")
            continue
        name = info.filename.removesuffix(".npy")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise SourceError(
                f"{where}: member '{name}' uses compression method {info.compress_type}; np.savez stores members "
                "and np.savez_compressed deflates them, the two weightport reads. Fix: re-create the file with one "
                "of those."
            )
        if not 0 <= info.header_offset < size:
            raise SourceError(
                f"{where}: member '{name}' starts at byte {info.header_offset}, outside the file's {size} bytes; "
                "the file is corrupt. Fix: re-create it."
            )
        local = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
        if len(local) < _LOCAL_HEADER.size:
            raise SourceError(
                f"{where}: member '{name}' lies past the end of the file; it is truncated. Fix: re-create it."
            )
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(local)
        if signature != b"PK\x03\x04":
            raise SourceError(
                f"{where}: member '{name}' has a corrupt local header. Fix: re-create the file."
            )
        data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        check_extent(where, name, data_start, info.compress_size, size)
        try:
            with archive.open(info) as stream:
                header = parse_npy_header(stream, f"{where} member '{name}'")  # type: ignore[arg-type]
        except SourceError:
            raise
        except _DAMAGE as e:
            raise SourceError(
                f"{where}: member '{name}' is corrupt ({type(e).__name__}: {e}). Fix: re-create the file."
            ) from e
        if header.data_offset + header.nbytes != info.file_size:
            raise SourceError(
                f"{where}: member '{name}' declares shape {header.shape} ({header.nbytes} bytes of data) but holds "
                f"{info.file_size - header.data_offset} bytes; the file is corrupt. Fix: re-create it."
            )
        if info.compress_type == zipfile.ZIP_STORED:
            check_extent(where, name, data_start + header.data_offset, header.nbytes, size)
        source.members[name] = Member(info, header, data_start)
        source.infos[name] = TensorInfo(name, header.shape, header.dtype)
    if not source.infos:
        raise SourceError(f"{where}: holds no arrays. Fix: save arrays with np.savez(path, name=array).")


def write(arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz``, atomically.

    NumPy's format has no bfloat16 or float8 (it would write raw bytes, ``V1``): bfloat16 goes in as
    float32, float8 as float16 (float32 for float8_e8m0fnu), both exact; loading them back into the
    same tensors gives the same bits, but for NaN: it stays NaN of the same sign, and float8_e5m2's
    several NaN payloads become one (``.safetensors`` keeps every bit).
    """
    path = Path(path)
    out = {}
    for name, value in arrays.items():
        _check_name(name, path)
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise SourceError(
                f"'{name}': cannot be saved to '{path.name}': an array of Python objects ({array.dtype}), which "
                "only pickling could store and no load unpickles. Fix: convert it to numbers first."
            )
        out[name] = _npz_ready(array)

    def write_to(f: BinaryIO) -> None:
        # np.savez's own layout, without its keyword arguments: names such as 'file' or 'allow_pickle' stay names
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in out.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    return atomic_write(path, write_to)


def _check_name(name: str, path: Path) -> None:
    """Refuse a name that the archive could not give back as it was (the reader refuses or drops it)."""
    member = f"{name}.npy"
    why = None
    if "\x00" in name:
        why = "it holds a NUL byte, where zip cuts a member name short"
    elif unsafe_member_name(member):
        why = (
            f"as the member name {member!r} it would leave the archive (it starts with '/' or a backslash, "
            "names a drive, or holds a '..' part)"
        )
    else:
        try:
            member.encode("utf-8")
        except UnicodeEncodeError:
            why = "it is not valid Unicode text (a lone surrogate)"
    if why is not None:
        raise SourceError(
            f"{name!r}: cannot be saved to '{path.name}': {why}, so loading the file would refuse it. "
            "Fix: save to .safetensors, which stores such a name, or rename the tensor "
            "(weightport.save({new_name: array, ...}, path) with a dict of arrays)."
        )


def _npz_ready(array: np.ndarray) -> np.ndarray:
    if not is_ml_float(array.dtype):
        return array
    wide = np.dtype(np.float16) if holds_all(array.dtype, np.dtype(np.float16)) else np.dtype(np.float32)
    return array.astype(wide)
