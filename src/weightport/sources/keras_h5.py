"""HDF5 files read safely (every dataset a tensor named by its path, checked before any read), and
Keras 3 ``.weights.h5`` files written (:func:`write_weights_h5`).

The whole tree is walked once when the file is opened, and the file is refused
if anything in it could make a read touch other files or more memory than the
file holds: soft, external or user-defined links, external storage, virtual
datasets, an unknown (plugin) filter, a second hard link to one object, or a
dataset whose declared shape times itemsize is not backed by the bytes stored
(contiguous data must lie inside the file; compressed chunks may not expand past
:data:`MAX_EXPANSION` times their stored size). h5py is imported only here, when a file is
opened or written (:func:`import_h5py`); TensorFlow and Keras never are.

>>> import io, numpy as np, h5py
>>> buf = io.BytesIO()
>>> with h5py.File(buf, "w") as f:
...     f["layers/dense/vars/0"] = np.ones((2, 3), np.float32)
>>> src = open_h5(buf, "'x.h5'", len(buf.getvalue()))
>>> src.infos["layers/dense/vars/0"].shape, float(src.read("layers/dense/vars/0").sum())
((2, 3), 6.0)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightport.dtypes import is_ml_float, ml_float
from weightport.errors import MissingDependencyError, SourceError
from weightport.sources.base import Region, Source, TensorInfo, check_extent, region_shape
from weightport.sources.files import map_array, mapped_chunks, open_no_follow, read_mapped

__all__ = [
    "H5Source",
    "open_h5",
    "import_h5py",
    "write_weights_h5",
    "VARS_PATH",
    "MAX_EXPANSION",
    "EXPANSION_FLOOR",
]

# Filters h5py reads without plugins; anything else is refused before a read is tried.
_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 32000: "lzf"}
_COMPRESSING = {1, 4, 5, 6, 32000}
MAX_EXPANSION = 1000  # compressed data may declare at most this many times the bytes it stores ...
EXPANSION_FLOOR = 1 << 26  # ... once it declares more than 64 MiB
_FIX = "Fix: re-save the weights with Keras (model.save_weights), or write the arrays plainly with h5py"

Skip = Callable[[str], "str | None"]


def import_h5py(where: str) -> Any:
    """h5py, or a :class:`MissingDependencyError` that says how to install it."""
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(f"Reading {where} needs h5py: pip install 'weightport[keras]'") from None
    return h5py


@dataclass
class H5Source(Source):
    """Datasets of one open HDF5 file; ``groups`` lists every group path, ``attrs`` their attributes."""

    datasets: dict[str, Any] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    vars_names: dict[str, str] = field(default_factory=dict)  # layer group path -> its 'vars' group's name
    offsets: dict[str, int] = field(default_factory=dict)  # plain contiguous datasets: their bytes' offset
    _file: Any = None
    _fd: int = -1

    def read_can_fail(self, name: str) -> bool:
        return not self.in_memory and name not in self.offsets  # raw datasets are memory-mapped

    def read_into(self, name: str, out: np.ndarray) -> None:
        if name in self.offsets and out.size:  # raw bytes straight from the file, past the HDF5 library
            read_mapped(self._fd, self.offsets[name], out, self.description, name)
            self.bytes_read += out.nbytes
            return
        self._read(name, out, None)

    def mapped(self, name: str) -> np.ndarray | None:
        if name not in self.offsets:
            return None
        info = self.infos[name]
        array = map_array(self._fd, self.offsets[name], info.dtype, info.shape, self.description, name)
        self.bytes_read += array.nbytes
        return array

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        if name not in self.offsets:
            yield from super().iter_chunks(name)
            return
        info = self.infos[name]
        count = info.nbytes // max(1, info.dtype.itemsize)
        yield from mapped_chunks(self._fd, self.offsets[name], info.dtype, count, self.description, name)

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        """Only the region's elements, through an HDF5 hyperslab selection (``read_direct``)."""
        out = np.empty(region_shape(region), self.infos[name].dtype) if out is None else out
        self._read(name, out, region)
        return out

    def _read(self, name: str, out: np.ndarray, region: Region | None) -> None:
        dataset = self.datasets[name]
        if out.size == 0:
            return
        target = out.view(dataset.dtype) if is_ml_float(out.dtype) else out
        try:
            if region is None or not region:
                dataset.read_direct(target)
            else:
                dataset.read_direct(target, source_sel=region)
        except _H5_DAMAGE as e:
            raise SourceError(
                f"{self.description}: reading tensor '{name}' failed ({e}); the file is corrupt. "
                "Fix: re-create it."
            ) from e
        self.bytes_read += out.nbytes

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def root_attrs(self) -> Mapping[str, Any]:
        assert self._file is not None
        return self._attrs(self._file, "(root)")

    def group_attrs(self, path: str) -> Mapping[str, Any]:
        """Attributes of a group the walk already checked (so reaching it follows no link)."""
        assert self._file is not None and path in self.groups
        return self._attrs(self._file[path], path)

    def _attrs(self, obj: Any, path: str) -> dict[str, Any]:
        """Every attribute of ``obj``, read now: a damaged one is a SourceError here, not later."""
        try:
            return {str(k): obj.attrs[k] for k in obj.attrs}
        except _H5_DAMAGE as e:
            raise SourceError(
                f"{self.description}: the attributes of '{path}' cannot be read ({type(e).__name__}: {e}); "
                f"the file is corrupt. {_FIX}."
            ) from e


# What h5py raises reading a damaged file: HDF5's errors come as RuntimeError, KeyError, OSError,
# ValueError or TypeError, depending on where its checks fail.
_H5_DAMAGE = (RuntimeError, KeyError, OSError, ValueError, TypeError)


def open_h5(
    file: str | os.PathLike[str] | Any, where: str, file_size: int, skip: Skip | None = None
) -> H5Source:
    """Open and check an HDF5 file (a path or a binary file object) of ``file_size`` bytes.

    Args:
        file: a path, or a seekable binary file object (a ``.keras`` member in memory).
        where: how messages name the file, e.g. ``"'model.weights.h5'"``.
        file_size: the real size in bytes, which every stored extent must fit in.
        skip: ``skip(path)`` returns a reason to leave a group or dataset unread
            (it goes to ``ignored``), or None to read it.
    """
    h5py = import_h5py(where)
    try:
        handle = h5py.File(file if not isinstance(file, Path) else str(file), "r")
    except (OSError, ValueError) as e:
        raise SourceError(
            f"{where}: not a readable HDF5 file ({e}); it is truncated, corrupt or not HDF5. "
            "Fix: re-create or re-download it."
        ) from None
    source = H5Source(description=where, _file=handle)
    try:
        _walk(h5py, handle, "", source, file_size, set(), skip or (lambda path: None))
        if isinstance(file, (str, os.PathLike)):
            _index_raw_datasets(source, Path(file), file_size)
    except SourceError:
        source.close()
        raise
    except _H5_DAMAGE as e:  # HDF5's own checks of a damaged file (bad signatures, addresses past the end)
        source.close()
        raise SourceError(
            f"{where}: HDF5 reports the file damaged ({type(e).__name__}: {e}); it is truncated or corrupt. {_FIX}."
        ) from e
    except BaseException:
        source.close()
        raise
    return source


def _index_raw_datasets(source: H5Source, path: Path, file_size: int) -> None:
    """Offsets of datasets stored as plain contiguous bytes (no chunks, no filters, no external storage).

    Those are read with memory-mapped windows of the file itself, which is several times faster than
    going through HDF5; every other dataset still goes through ``read_direct``.
    """
    for name, dataset in source.datasets.items():
        info = source.infos.get(name)
        if info is None or dataset.chunks is not None or dataset.id.get_create_plist().get_nfilters():
            continue
        offset = dataset.id.get_offset()
        if offset is None or dataset.dtype.itemsize != info.dtype.itemsize:
            continue
        check_extent(source.description, name, offset, info.nbytes, file_size)
        source.offsets[name] = offset
    if source.offsets:
        source._fd = open_no_follow(path)


def _walk(
    h5py: Any, group: Any, prefix: str, source: H5Source, size: int, seen: set[int], skip: Skip
) -> None:
    where = source.description
    for key in group:
        path = prefix + key
        link = group.get(key, getlink=True)
        if isinstance(link, h5py.SoftLink):
            raise SourceError(
                f"{where}: '{path}' is a soft link to '{link.path}'; weightport follows no links inside a "
                f"file. {_FIX}."
            )
        if isinstance(link, h5py.ExternalLink):
            raise SourceError(
                f"{where}: '{path}' is an external link to '{link.filename}:{link.path}', which would read "
                f"another file; refusing the file. {_FIX}."
            )
        if not isinstance(link, h5py.HardLink):
            raise SourceError(f"{where}: '{path}' is a user-defined link; refusing the file. {_FIX}.")
        reason = skip(path)
        if reason is not None:
            source.ignored.append(f"{path} ({reason})")
            continue
        obj = group[key]
        address = h5py.h5o.get_info(obj.id).addr
        if address in seen:
            raise SourceError(
                f"{where}: '{path}' is a second link to an object already seen; Keras never writes "
                f"that, so the file was crafted or damaged. {_FIX}."
            )
        seen.add(address)
        if isinstance(obj, h5py.Group):
            source.groups.append(path)
            if key == "vars" and "name" in obj.attrs:
                source.vars_names[prefix.rstrip("/")] = _text(obj.attrs["name"])
            _walk(h5py, obj, path + "/", source, size, seen, skip)
        elif isinstance(obj, h5py.Dataset):
            _add_dataset(h5py, obj, path, source, size)
        else:
            source.ignored.append(f"{path} (a named datatype, not an array)")


def _add_dataset(h5py: Any, dataset: Any, name: str, source: H5Source, file_size: int) -> None:
    where = source.description
    if dataset.is_virtual:
        raise SourceError(
            f"{where}: dataset '{name}' is virtual (its data lives in other datasets or files); "
            f"refusing the file. {_FIX}."
        )
    if dataset.external:
        files = ", ".join(str(e[0]) for e in dataset.external)
        raise SourceError(
            f"{where}: dataset '{name}' keeps its data in external file(s) {files}; refusing the file. {_FIX}."
        )
    dtype = dataset.dtype
    if dtype.kind == "V" and dtype.itemsize == 2 and _text(dataset.attrs.get("dtype", "")) == "bfloat16":
        dtype = ml_float("bfloat16")  # type: ignore[assignment]  # how Keras 3 stores bfloat16: 2-byte opaque + a dtype attribute
    elif dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        source.ignored.append(f"{name} (holds {dtype}, not numbers)")
        return
    if dataset.shape is None:
        source.ignored.append(f"{name} (an empty dataspace, no array)")
        return
    shape = tuple(int(d) for d in dataset.shape)
    declared = math.prod(shape) * dtype.itemsize
    _check_storage(h5py, dataset, name, declared, where, file_size)
    source.datasets[name] = dataset
    source.infos[name] = TensorInfo(name, shape, dtype)


def _check_storage(h5py: Any, dataset: Any, name: str, declared: int, where: str, file_size: int) -> None:
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    stored = dataset.id.get_storage_size()
    if layout == h5py.h5d.COMPACT:
        if stored != declared:
            raise SourceError(
                f"{where}: dataset '{name}' declares {declared} bytes but its compact storage holds {stored}; "
                f"the file is corrupt or crafted. {_FIX}."
            )
    elif layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        if declared and (offset is None or stored < declared):
            raise SourceError(
                f"{where}: dataset '{name}' declares {declared} bytes but stores {stored}; "
                f"the file is truncated or crafted. {_FIX}."
            )
        if declared:
            check_extent(where, name, int(offset), declared, file_size)
    elif layout == h5py.h5d.CHUNKED:
        filters = [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]
        unknown = [f for f in filters if f not in _FILTERS]
        if unknown:
            raise SourceError(
                f"{where}: dataset '{name}' uses HDF5 filter {unknown[0]}, which needs a plugin; weightport "
                f"reads only {', '.join(_FILTERS.values())}. {_FIX}."
            )
        for offset, nbytes in _chunks(dataset):
            check_extent(where, name, offset, nbytes, file_size)
        if not any(f in _COMPRESSING for f in filters):
            if stored < declared:
                raise SourceError(
                    f"{where}: dataset '{name}' declares {declared} bytes but stores {stored}; "
                    f"the file is truncated or crafted. {_FIX}."
                )
        elif declared > EXPANSION_FLOOR and declared > MAX_EXPANSION * stored:
            raise SourceError(
                f"{where}: dataset '{name}' declares {declared} bytes from {stored} compressed bytes "
                f"(more than {MAX_EXPANSION} times); refusing a decompression bomb. {_FIX}."
            )
    else:
        raise SourceError(f"{where}: dataset '{name}' uses an HDF5 storage layout weightport does not read.")


def _chunks(dataset: Any) -> list[tuple[int, int]]:
    """(file offset, stored size) of every allocated chunk."""
    found: list[tuple[int, int]] = []
    dsid = dataset.id
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(lambda info: found.append((int(info.byte_offset), int(info.size))))
    else:  # pragma: no cover - old HDF5
        for i in range(dsid.get_num_chunks()):
            info = dsid.get_chunk_info(i)
            found.append((int(info.byte_offset), int(info.size)))
    return found


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ---- the writer ------------------------------------------------------------------------------------

# Keras 3 files a layer's variables as <layer>[/forward_layer|/backward_layer][/cell]/vars/<i>; the layer path
# may be empty (a lone layer)
VARS_PATH = re.compile(
    r"^(?:(?P<layer>.*?)/)??(?:(?P<side>forward_layer|backward_layer)/)?(?:(?P<cell>cell)/)?vars/(?P<i>\d+)$"
)


def write_weights_h5(arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write ``arrays`` keyed as in a Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>``) as that file.

    Each array becomes a dataset at its ``/``-separated name, and each layer's ``vars`` group carries
    the layer's ``name``, as Keras writes it; bfloat16 is stored as Keras 3 stores it (2-byte opaque
    data with a ``dtype`` attribute). The file is written atomically: a temp file, then a rename.

    >>> import pathlib, tempfile
    >>> path = write_weights_h5({"layers/dense/vars/0": np.ones((3, 2), np.float32)},
    ...                         pathlib.Path(tempfile.mkdtemp()) / "m.weights.h5")
    >>> src = open_h5(path, "'m.weights.h5'", path.stat().st_size)
    >>> list(src.infos), src.vars_names
    (['layers/dense/vars/0'], {'layers/dense': 'dense'})
    >>> src.close()
    """
    group_attrs: dict[str, dict[str, str]] = {}
    for name in arrays:
        m = VARS_PATH.match(name)
        if m and m["layer"]:  # Keras names each layer in its 'vars' group
            group_attrs[f"{m['layer']}/vars"] = {"name": m["layer"].rsplit("/", 1)[-1]}
    target = Path(path)
    h5py = import_h5py(f"'{target.name}'")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for group, attrs in group_attrs.items():
                g = f.require_group(group) if group else f
                for k, v in attrs.items():
                    g.attrs[k] = v
            for name, value in arrays.items():
                array = np.ascontiguousarray(value)
                if array.dtype.name == "bfloat16" and is_ml_float(array.dtype):
                    f.create_dataset(name, data=array.view(np.dtype("V2"))).attrs["dtype"] = "bfloat16"
                else:
                    f[name] = array
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
