"""Flax weights: ``flax.serialization.to_bytes`` msgpack files and in-memory nnx ``State``.

A Flax msgpack file is one msgpack map: nested maps of names, with each array
stored as ``ExtType(1, packb((shape, dtype_name, C-order bytes)))`` (code 3 is a
NumPy scalar, the same payload with shape ``()``), and each array over 2**30 bytes
split into a map ``{"__msgpack_chunked_array__": True, "shape": {"0": ...},
"chunks": {"0": flat array, ...}}``. It is decoded here with plain ``msgpack``
(never with Flax or JAX); nested names are joined with ``/``, in the file's own
order. Each array's declared shape times itemsize must equal its bytes.

msgpack has no index: the whole file is decoded at once (memory-mapped, but every
array's payload is copied out), so it is held whole in memory. :data:`MAX_BYTES` caps the size read (raise it, or convert the file to
``.npz`` / ``.safetensors``, which are read lazily). Non-array leaves (a Python
``int`` step counter, strings, ``None``) are listed in ``Source.ignored``.

nnx ``State`` objects (``nnx.state(model)``) are read by :func:`open_object`:
``Param`` and ``BatchStat`` leaves become arrays, RNG state is ignored, and list
indices (integer keys) become names.

>>> import msgpack, numpy as np, tempfile, pathlib
>>> arr = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> ext = msgpack.ExtType(1, msgpack.packb((arr.shape, "float32", arr.tobytes()), use_bin_type=True))
>>> path = pathlib.Path(tempfile.mkdtemp()) / "params.msgpack"
>>> _ = path.write_bytes(msgpack.packb({"params": {"Dense_0": {"kernel": ext}}}))
>>> src = open(path)
>>> src.infos["params/Dense_0/kernel"].shape, src.metadata["layout"]
((2, 3), 'flax')
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from weightport.dtypes import ml_float
from weightport.errors import MissingDependencyError, SourceError, a_or_an
from weightport.sources.base import Source, TensorInfo
from weightport.sources.mapping import MappingSource, to_array

__all__ = ["claims", "open", "claims_object", "open_object", "arrays_source", "MAX_BYTES", "SUFFIXES"]

MAX_BYTES = 8 * 2**30
"""Largest msgpack file read (bytes); the whole file is held in memory while it is decoded."""

SUFFIXES = (".msgpack", ".flax")
CHUNKED = "__msgpack_chunked_array__"
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_NUMERIC_KINDS = "biufc"


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def _msgpack(where: str) -> Any:
    try:
        import msgpack
    except ImportError:
        raise MissingDependencyError(
            f"Reading {where} needs msgpack: pip install 'weightport[flax]'"
        ) from None
    return msgpack


class _Ext:
    """An ExtType payload kept undecoded until its name is known (for messages)."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data


def open(path: Path) -> Source:
    """Read a Flax msgpack file whole and return its arrays by ``/``-joined name.

    Raises:
        SourceError: the file is over :data:`MAX_BYTES`, not msgpack, truncated, or
            declares arrays whose bytes do not match their shape and dtype.
    """
    where = f"'{path.name}'"
    msgpack = _msgpack(where)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SourceError(
            f"{where}: is {size} bytes, over the {MAX_BYTES} bytes weightport reads from a msgpack file "
            "(msgpack has no index, so the whole file is held in memory). Fix: raise "
            "weightport.sources.flax.MAX_BYTES if the memory is there, or save the params as .npz or "
            ".safetensors, which are read lazily."
        )
    if size == 0:
        raise SourceError(f"{where}: is empty, not a Flax msgpack file. Fix: re-create it.")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            tree = msgpack.unpackb(data, ext_hook=_Ext, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as e:  # msgpack's errors are ValueErrors
        raise SourceError(
            f"{where}: not a valid msgpack file ({type(e).__name__}: {e}); it is truncated, corrupt, or not "
            "written by flax.serialization.to_bytes. Fix: re-create it."
        ) from None
    if not isinstance(tree, dict):
        raise SourceError(
            f"{where}: holds {a_or_an(type(tree).__name__)} at the top, not a tree of named arrays. "
            "Fix: save a dict of params (flax.serialization.to_bytes(variables))."
        )
    arrays: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    _flatten(msgpack, where, tree, "", arrays, ignored)
    return arrays_source(where, arrays, ignored, "flax-msgpack")


def arrays_source(description: str, arrays: dict[str, np.ndarray], ignored: list[str], fmt: str) -> Source:
    """Decoded Flax arrays by ``/``-joined name, as the source of a checkpoint in format ``fmt``."""
    infos = {n: TensorInfo(n, tuple(int(d) for d in a.shape), a.dtype) for n, a in arrays.items()}
    return MappingSource(
        description=description,
        infos=infos,
        ignored=ignored,
        metadata={"layout": "flax", "format": fmt},
        in_memory=True,
        arrays=arrays,
    )


def _key(where: str, prefix: str, key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise SourceError(
        f"{where}: key {key!r} under '{prefix or '/'}' is {a_or_an(type(key).__name__)}; names must be strings. "
        "The file is not a Flax state dict."
    )


def _flatten(
    msgpack: Any, where: str, node: Any, prefix: str, out: dict[str, np.ndarray], ignored: list[str]
) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = prefix + _key(where, prefix, key)
        if name in out:
            raise SourceError(f"{where}: two entries are named '{name}'. Fix: re-create the file.")
        if isinstance(value, dict) and CHUNKED in value:
            out[name] = _unchunk(msgpack, where, name, value)
        elif isinstance(value, (dict, list)):
            _flatten(msgpack, where, value, name + "/", out, ignored)
        elif isinstance(value, _Ext) and value.code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            out[name] = _decode(msgpack, where, name, value.data)
            value.data = b""  # the array holds its own copy now: free the payload early
        else:
            ignored.append(f"{name} ({_kind(value)}: not an array)")


def _kind(value: Any) -> str:
    if isinstance(value, _Ext):
        return "complex number" if value.code == _EXT_COMPLEX else f"msgpack extension {value.code}"
    return type(value).__name__


def _decode(msgpack: Any, where: str, name: str, payload: bytes) -> np.ndarray:
    """One ``(shape, dtype name, bytes)`` payload as a read-only array, checked."""
    try:
        header = msgpack.unpackb(payload, raw=True)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as e:
        raise SourceError(f"{where}: array '{name}' is corrupt ({e}). Fix: re-create the file.") from None
    if not (isinstance(header, (list, tuple)) and len(header) == 3):
        raise SourceError(
            f"{where}: array '{name}' is not a (shape, dtype, bytes) triple. Fix: re-create the file."
        )
    shape, dtype_name, buffer = header
    if not (
        isinstance(shape, (list, tuple))
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise SourceError(
            f"{where}: array '{name}' has shape {shape!r}, not a list of sizes; the file is corrupt."
        )
    dtype = _dtype(where, name, dtype_name)
    if not isinstance(buffer, bytes):
        raise SourceError(f"{where}: array '{name}' has no byte string of data; the file is corrupt.")
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise SourceError(
            f"{where}: array '{name}' declares shape {tuple(shape)} of {dtype.name} ({expected} bytes) but "
            f"holds {len(buffer)} bytes; the file is truncated or corrupt. Fix: re-create it."
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(shape))


def _dtype(where: str, name: str, raw: Any) -> np.dtype:
    """The dtype Flax wrote as ``arr.dtype.name``: numeric NumPy dtypes and bfloat16 only.

    Flax writes native byte order; every platform JAX runs on is little-endian.
    """
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if text == "bfloat16":
        return ml_float("bfloat16")  # type: ignore[return-value]
    try:
        dtype = np.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS or dtype.name != text:
        raise SourceError(
            f"{where}: array '{name}' has dtype {text!r}; weightport reads numeric arrays (bool, int, uint, "
            "float, complex, bfloat16). Fix: cast it before saving."
        )
    return dtype.newbyteorder("<")


def _sequence(where: str, name: str, part: str, value: Any) -> list[Any]:
    """A Flax tuple stored as ``{"0": a, "1": b, ...}``, in index order."""
    if not isinstance(value, dict) or set(value) != {str(i) for i in range(len(value))}:
        raise SourceError(
            f"{where}: chunked array '{name}' has a malformed '{part}' entry; the file is corrupt."
        )
    return [value[str(i)] for i in range(len(value))]


def _unchunk(msgpack: Any, where: str, name: str, entry: dict[str, Any]) -> np.ndarray:
    """An array that Flax split into flat chunks of at most 2**30 bytes, joined and checked."""
    shape = _sequence(where, name, "shape", entry.get("shape"))
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(f"{where}: chunked array '{name}' has shape {shape!r}; the file is corrupt.")
    chunks = []
    for i, chunk in enumerate(_sequence(where, name, "chunks", entry.get("chunks"))):
        if not (isinstance(chunk, _Ext) and chunk.code == _EXT_NDARRAY):
            raise SourceError(f"{where}: chunk {i} of array '{name}' is not an array; the file is corrupt.")
        chunks.append(_decode(msgpack, where, f"{name}[chunk {i}]", chunk.data))
    if not chunks or len({c.dtype for c in chunks}) != 1 or any(c.ndim != 1 for c in chunks):
        raise SourceError(
            f"{where}: chunked array '{name}' needs flat chunks of one dtype; the file is corrupt."
        )
    total = sum(c.size for c in chunks)
    if total != math.prod(shape):
        raise SourceError(
            f"{where}: chunked array '{name}' declares shape {tuple(shape)} ({math.prod(shape)} values) but its "
            f"chunks hold {total}; the file is truncated or corrupt. Fix: re-create it."
        )
    joined = np.concatenate(chunks).reshape(tuple(shape))
    joined.flags.writeable = False
    return joined


# --- in-memory nnx State -------------------------------------------------------------------------------

_KEPT_VARIABLES = ("Param", "BatchStat")
_WRAPPER = "VariableState"  # Flax 0.8-0.10: State leaves wrap the array and name the Variable class as .type


def _class_names(obj: Any) -> list[tuple[str, str]]:
    return _mro_names(type(obj))


def _mro_names(cls: Any) -> list[tuple[str, str]]:
    return [(getattr(c, "__module__", ""), c.__name__) for c in getattr(cls, "__mro__", ())]


def _nnx_classes(names: list[tuple[str, str]]) -> set[str]:
    return {cls for module, cls in names if module.startswith("flax.nnx")}


def claims_object(obj: Any) -> bool:
    """True for a ``flax.nnx`` ``State`` (found by class, without importing Flax)."""
    return any(module.startswith("flax.nnx") and name == "State" for module, name in _class_names(obj))


def open_object(obj: Any, description: str = "the given nnx State") -> Source:
    """A source over an nnx ``State``: ``Param``/``BatchStat`` leaves by ``/``-joined name.

    The leaves are the variables themselves (Flax 0.11 on) or ``VariableState``
    wrappers whose ``.type`` names the variable class (Flax 0.8 to 0.10); either
    is read. RNG state (``RngKey``, ``RngCount``), other variable kinds and
    variables holding ``None`` (0.10's bias of a Linear without one) are listed in
    ``Source.ignored``; integer keys (list indices) become names.
    """
    arrays: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    _walk_state(obj, "", arrays, ignored)
    return arrays_source(description, arrays, ignored, "nnx-state")


def _walk_state(node: Mapping[Any, Any], prefix: str, out: dict[str, np.ndarray], ignored: list[str]) -> None:
    for key, value in node.items():
        name = prefix + _key("the nnx State", prefix, key)
        if isinstance(value, Mapping):
            _walk_state(value, name + "/", out, ignored)
            continue
        classes = _nnx_classes(_class_names(value))
        kind = type(value).__name__
        if _WRAPPER in classes and hasattr(value, "type"):
            classes = _nnx_classes(_mro_names(value.type))
            kind = getattr(value.type, "__name__", kind)
            value = value.value
        if classes and not classes.intersection(_KEPT_VARIABLES):
            ignored.append(f"{name} (an nnx {kind}, not a Param or BatchStat)")
            continue
        if value is None:
            ignored.append(f"{name} (an nnx {kind} holding None, not an array)")
            continue
        out[name] = to_array(name, value)
