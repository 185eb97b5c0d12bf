"""Reader for ONNX models (``.onnx``) through the ``onnx`` package; no runtime needed.

Every initializer is a tensor named by its initializer name, and so is the tensor
of every ``Constant`` node, named by the node's output (some exporters store
weights that way; ``torch.onnx.export`` keeps its weights in initializers and uses
``Constant`` nodes for shapes, scalars and zero initial states). Shapes and dtypes
come from the ``TensorProto`` fields; data is read only when asked for.

``metadata`` carries what the ``onnx`` layout needs to place the weights:
``layout="onnx"``, ``nodes`` (the main graph's nodes in order, each a dict with
``op_type``, ``domain``, ``name``, ``inputs``, ``outputs`` and ``attributes`` as
plain Python values, and ``module``, the path of the module it ran in, where the dynamo exporter
recorded it), ``initializers`` and ``constants`` (names, in file order),
``opset`` (domain -> version) and ``producer``. Subgraphs of ``If``/``Loop``
nodes are not read.

Protobuf parses a whole file into memory, so a ``.onnx`` file over
:data:`MAX_MODEL_BYTES` (protobuf's own 2 GiB message limit) is refused before
parsing. Bigger models keep their weights in external data files, which are read
lazily, straight into the destination buffer, and only if they are safe: a
``location`` must be a relative path inside the model's own folder (no ``..``,
no absolute path, no symbolic link at any step, a regular file), and its
``offset`` and ``length`` must lie inside the file and match the declared shape.
``onnx`` itself is never asked to resolve external data (it would resolve it
against the working directory).

>>> from pathlib import Path
>>> claims(Path("model.onnx")), claims(Path("model.onnx.data"))
(True, False)
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from weightport.dtypes import ml_float
from weightport.errors import MissingDependencyError, SourceError
from weightport.sources.base import Source, TensorInfo, check_extent

__all__ = ["MAX_MODEL_BYTES", "ONNX_DTYPES", "BFLOAT16", "OnnxSource", "claims", "open"]

MAX_MODEL_BYTES = 2**31 - 1
"""Largest ``.onnx`` file parsed: protobuf reads whole messages, and caps them at 2 GiB."""

_DEFAULT, _EXTERNAL = 0, 1  # TensorProto.DataLocation

# TensorProto.DataType -> NumPy dtype (ONNX stores raw data little-endian).
ONNX_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(dt).newbyteorder("<")
    for code, dt in {
        1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
        9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
        14: np.complex64, 15: np.complex128,
    }.items()
}  # fmt: skip

BFLOAT16 = 16  # read as ml_dtypes' bfloat16 (imported only then)

# Which typed field holds the values when raw_data is empty, and how many per element.
_FIELDS: dict[int, tuple[str, int]] = {
    1: ("float_data", 1), 14: ("float_data", 2), 11: ("double_data", 1), 15: ("double_data", 2),
    7: ("int64_data", 1), 12: ("uint64_data", 1), 13: ("uint64_data", 1),
    **{code: ("int32_data", 1) for code in (2, 3, 4, 5, 6, 9, 10, 16)},
}  # fmt: skip


FILES_BESIDE_IT = True  # a model given as a link reads its external data beside the link, as onnxruntime does


def claims(path: Path) -> bool:
    """Whether ``path`` looks like an ONNX model (by its ``.onnx`` suffix)."""
    return path.suffix.lower() == ".onnx"


@dataclass(frozen=True)
class _External:
    """Where an external tensor's bytes lie: a checked relative location, offset and length."""

    location: str
    offset: int
    nbytes: int


@dataclass
class OnnxSource(Source):
    """Initializers and ``Constant`` tensors of one ONNX model, read on request."""

    folder: Path = Path()
    payloads: dict[str, Any] = field(default_factory=dict)  # TensorProto, _External or ndarray
    model: Any = None  # the parsed ModelProto, external data not loaded

    def runnable(self) -> bytes | None:
        """The model serialized with every tensor inside it, for a runtime to run; external data is read
        through the checked reader, never from a path the file names. None where a tensor outside the
        main graph's initializers and Constant nodes keeps external data (a subgraph's)."""
        model = self.model
        external = {name for name, payload in self.payloads.items() if isinstance(payload, _External)}
        if external:
            from onnx import ModelProto, TensorProto

            model = ModelProto()
            model.CopyFrom(self.model)
            tensors = list(model.graph.initializer)
            tensors += [
                a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute
            ]
            for tensor in tensors:
                if tensor.data_location == TensorProto.EXTERNAL and tensor.name in external:
                    info = self.infos[tensor.name]
                    out = np.empty(info.shape, info.dtype)
                    self._read_external(tensor.name, self.payloads[tensor.name], out)
                    tensor.raw_data = out.tobytes()
                    del tensor.external_data[:]
                    tensor.data_location = TensorProto.DEFAULT
            if _keeps_external(model.graph):
                return None
        return bytes(model.SerializeToString())

    def read_into(self, name: str, out: np.ndarray) -> None:
        payload = self.payloads[name]
        if isinstance(payload, _External):
            self._read_external(name, payload, out)
        elif isinstance(payload, np.ndarray):
            np.copyto(out, payload, casting="equiv")
        else:
            np.copyto(out, _embedded_array(payload, self.infos[name]), casting="equiv")

    def _read_external(self, name: str, ext: _External, out: np.ndarray) -> None:
        fd = _open_inside(self.folder, ext.location, self.description, name)
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size  # the file may have changed since it was opened
            check_extent(
                f"{self.description} (external file '{ext.location}')", name, ext.offset, ext.nbytes, size
            )
            if ext.nbytes == 0:
                return
            view = out.reshape(-1).view(np.uint8).data
            f.seek(ext.offset)
            done = 0
            while done < ext.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise SourceError(
                        f"{self.description}: external file '{ext.location}' ended while reading tensor "
                        f"'{name}' ({done} of {ext.nbytes} bytes). Fix: re-create or re-download it."
                    )
                done += got


def _keeps_external(graph: Any) -> bool:
    """Whether a tensor anywhere in ``graph`` (subgraphs included) still names external data."""
    for tensor in graph.initializer:
        if tensor.data_location == _EXTERNAL:
            return True
    for node in graph.node:
        for attr in node.attribute:
            tensors = [attr.t, *attr.tensors] if attr.HasField("t") else list(attr.tensors)
            if any(t.data_location == _EXTERNAL for t in tensors):
                return True
            graphs = [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)
            if any(_keeps_external(g) for g in graphs):
                return True
    return False


def open(path: Path) -> OnnxSource:
    """Parse ``path`` (not its external data) and list its tensors.

    Raises:
        SourceError: too big to parse, not a valid ONNX model, or a tensor whose
            declared size does not match its data, or whose external data is unsafe.
        MissingDependencyError: the ``onnx`` package is not installed.
    """
    where = f"'{path.name}'"
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError(f"Reading {where} needs onnx: pip install 'weightport[onnx]'") from e
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise SourceError(f"{where}: cannot be opened ({e.strerror or e}). Fix: check the path.") from None
    if size == 0:
        raise SourceError(
            f"{where}: an empty file (0 bytes), not an ONNX model. Fix: re-export or re-download it."
        )
    if size > MAX_MODEL_BYTES:
        raise SourceError(
            f"{where}: {size} bytes, over the {MAX_MODEL_BYTES} bytes protobuf can parse (it reads whole files). "
            "Fix: save the model with its weights as external data (onnx.save_model(model, path, "
            "save_as_external_data=True))."
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError on garbage
        raise SourceError(
            f"{where}: not a valid ONNX model ({type(e).__name__}: {e}). Fix: re-export or re-download it."
        ) from e
    if not model.HasField("graph") or not model.ir_version:  # protobuf parses many damaged files as empty
        raise SourceError(
            f"{where}: holds no ONNX graph (ir_version {model.ir_version}); it is truncated, damaged or not an "
            "ONNX model. Fix: re-export or re-download it."
        )
    source = OnnxSource(description=where, folder=path.parent, model=model)
    _add_tensors(source, model.graph, onnx)
    try:
        source.metadata.update(
            layout="onnx",
            nodes=[_node_dict(where, i, node, onnx) for i, node in enumerate(model.graph.node)],
            opset={op.domain or "ai.onnx": int(op.version) for op in model.opset_import},
            producer=f"{model.producer_name} {model.producer_version}".strip(),
        )
    except SourceError:
        raise
    except (TypeError, ValueError, KeyError, UnicodeDecodeError, RecursionError) as e:  # a damaged attribute
        raise SourceError(
            f"{where}: a node of its graph cannot be read ({type(e).__name__}: {e}); the file is damaged. "
            "Fix: re-export or re-download it."
        ) from e
    return source


def _add_tensors(source: OnnxSource, graph: Any, onnx: Any) -> None:
    initializers: list[str] = []
    constants: list[str] = []
    sizes: dict[str, int] = {}
    where = source.description
    for i, tensor in enumerate(graph.initializer):
        name = _text(tensor.name, f"{where}: the name of initializer {i}")
        if _add(source, name, tensor, sizes):
            initializers.append(name)
    for sparse in graph.sparse_initializer:
        source.ignored.append(f"{sparse.values.name} (a sparse initializer, which weightport does not read)")
    for i, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        name = _text(node.output[0], f"{where}: {_node_label(i, node)}: its output name")
        for attr in node.attribute:
            value = _constant_value(attr, onnx)
            if value is not None and _add(source, name, value, sizes):
                constants.append(name)
    source.metadata["initializers"] = initializers
    source.metadata["constants"] = constants
    source.in_memory = not any(isinstance(p, _External) for p in source.payloads.values())


def _constant_value(attr: Any, onnx: Any) -> Any:
    """A Constant node's value: its TensorProto, or a small array for the scalar forms."""
    if attr.name == "value":
        return attr.t
    if attr.name == "value_float":
        return np.array(attr.f, np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), np.int64)
    return None  # strings and sparse tensors are no weights


def _add(source: OnnxSource, name: str, tensor: Any, sizes: dict[str, int]) -> bool:
    where = source.description
    if name in source.infos:
        raise SourceError(f"{where}: two tensors are named '{name}'; the file is corrupt. Fix: re-export it.")
    if isinstance(tensor, np.ndarray):
        source.infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype)
        source.payloads[name] = tensor
        return True
    dtype = ml_float("bfloat16") if tensor.data_type == BFLOAT16 else ONNX_DTYPES.get(tensor.data_type)
    if dtype is None:
        source.ignored.append(f"{name} (ONNX data type {tensor.data_type}, which weightport does not read)")
        return False
    shape = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in shape):
        raise SourceError(
            f"{where}: tensor '{name}' declares shape {shape}; the file is corrupt. Fix: re-export it."
        )
    info = TensorInfo(name, shape, dtype)
    if tensor.data_location == _EXTERNAL:
        source.payloads[name] = _external(source, info, tensor, sizes)
    else:
        _check_embedded(where, info, tensor)
        source.payloads[name] = tensor
    source.infos[name] = info
    return True


def _check_embedded(where: str, info: TensorInfo, tensor: Any) -> None:
    count = math.prod(info.shape)
    if tensor.raw_data:
        found, expected, unit = len(tensor.raw_data), info.nbytes, "bytes"
    else:
        field_name, per = _FIELDS[tensor.data_type]
        found, expected, unit = len(getattr(tensor, field_name)), count * per, "values"
    if found != expected:
        raise SourceError(
            f"{where}: tensor '{info.name}' declares shape {info.shape} ({expected} {unit}) but holds "
            f"{found} {unit}; the file is truncated or corrupt. Fix: re-export it."
        )


def _embedded_array(tensor: Any, info: TensorInfo) -> np.ndarray:
    if tensor.raw_data:
        return np.frombuffer(tensor.raw_data, info.dtype).reshape(info.shape)
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(tensor)).reshape(
        info.shape
    )  # data is in the proto: no file access


def _external(source: OnnxSource, info: TensorInfo, tensor: Any, sizes: dict[str, int]) -> _External:
    where = source.description
    what = f"{where}: tensor '{info.name}': its external data"
    entries = {
        _text(entry.key, f"{what} key"): _text(entry.value, f"{what} value") for entry in tensor.external_data
    }
    location = entries.get("location", "")
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else info.nbytes
    except ValueError:
        raise SourceError(
            f"{where}: tensor '{info.name}' has external offset/length that are not integers "
            f"({entries.get('offset')!r}, {entries.get('length')!r}); the file is corrupt. Fix: re-export it."
        ) from None
    location = _check_location(where, info.name, location)
    if length != info.nbytes:
        raise SourceError(
            f"{where}: tensor '{info.name}' declares shape {info.shape} of {info.dtype.name} ({info.nbytes} bytes) "
            f"but its external data is {length} bytes long; the file is corrupt. Fix: re-export it."
        )
    if location not in sizes:
        fd = _open_inside(source.folder, location, where, info.name)
        try:
            sizes[location] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    check_extent(f"{where} (external file '{location}')", info.name, offset, length, sizes[location])
    return _External(location, offset, length)


def _check_location(where: str, name: str, location: str) -> str:
    """``location`` without its ``.`` parts (``./w.bin``: ``w.bin``), where it stays inside the folder."""
    parts = [part for part in location.split("/") if part != "."]
    unsafe = (
        not parts
        or "\\" in location
        or "\x00" in location
        or PurePosixPath(location).is_absolute()
        or bool(PureWindowsPath(location).drive)
        or any(part in ("", "..") for part in parts)
    )
    if unsafe:
        raise SourceError(
            f"{where}: tensor '{name}' keeps its data at external location {location!r}, which is not a plain "
            "relative path inside the model's folder (no '..', no absolute path, no empty part); weightport "
            "does not follow it. Fix: keep the data file next to the model and re-save it with a plain name."
        )
    return "/".join(parts)


def _open_inside(folder: Path, location: str, where: str, name: str) -> int:
    """A read-only descriptor of ``folder/location``, never through a symbolic link."""
    parts = location.split("/")
    refuse = (
        f"{where}: tensor '{name}' keeps its data at external location '{location}', which "
        "{why}; weightport does not follow it. Fix: put the real data file in the model's folder."
    )
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    # O_NONBLOCK: opening a FIFO or a device must not wait for a writer; fstat below refuses anything but a
    # regular file (whose reads O_NONBLOCK does not change)
    flags = (
        os.O_RDONLY
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | nofollow
        | getattr(os, "O_NONBLOCK", 0)
    )
    try:
        if nofollow and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd:
            dir_flags = os.O_RDONLY | os.O_DIRECTORY | nofollow
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i, part in enumerate(parts):
                    if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                        raise SourceError(
                            refuse.format(why=f"is a symbolic link at '{'/'.join(parts[: i + 1])}'")
                        )
                    last = i == len(parts) - 1
                    fd = os.open(part, flags if last else dir_flags, dir_fd=dir_fd)
                    if last:
                        break
                    os.close(dir_fd)
                    dir_fd = fd
            finally:
                os.close(dir_fd)
        else:  # no dir_fd / O_NOFOLLOW (Windows): check every step with lstat, then open
            current = folder
            for i, part in enumerate(parts):
                current = current / part
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    raise SourceError(
                        refuse.format(why=f"is a symbolic link at '{'/'.join(parts[: i + 1])}'")
                    )
            fd = os.open(current, flags)
    except FileNotFoundError:
        raise SourceError(
            f"{where}: tensor '{name}' keeps its data in '{location}', which is not in the model's folder "
            f"'{folder}'. Fix: copy the data file next to the model."
        ) from None
    except OSError as e:
        raise SourceError(refuse.format(why=f"cannot be opened safely ({e.strerror or e})")) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(refuse.format(why="is not a regular file"))
    return fd


_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's record of the modules a node ran in


def _text(value: Any, what: str) -> str:
    """A protobuf string field as text; ``what`` says where it is, for the refusal of one that is not UTF-8."""
    if not isinstance(value, bytes):  # protobuf hands back bytes for a string field that is not UTF-8
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(
            f"{what} is {value!r}, which is not UTF-8 text (ONNX names and strings must be); the file is "
            "damaged. Fix: re-export or re-download it."
        ) from None


def _node_label(index: int, node: Any) -> str:
    """``node 3 (Gemm 'fc')``, readable even where the node's own fields are damaged."""

    def shown(value: Any) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    name = f" {shown(node.name)!r}" if node.name else ""
    return f"node {index} ({shown(node.op_type)}{name})"


def _node_dict(where: str, index: int, node: Any, onnx: Any) -> dict[str, Any]:
    label = f"{where}: {_node_label(index, node)}"
    attributes: dict[str, Any] = {}
    for attr in node.attribute:
        name = _text(attr.name, f"{label}: an attribute name")
        attributes[name] = _plain(attr, onnx, f"{label}: attribute '{name}'")
    found = {
        "op_type": _text(node.op_type, f"{label}: its op_type"),
        "domain": _text(node.domain, f"{label}: its domain"),
        "name": _text(node.name, f"{label}: its name"),
        "inputs": [_text(name, f"{label}: input {i}") for i, name in enumerate(node.input)],
        "outputs": [_text(name, f"{label}: output {i}") for i, name in enumerate(node.output)],
        "attributes": attributes,
    }
    scope = _module_scope(node)
    if scope is not None:
        found["module"] = scope
    return found


def _module_scope(node: Any) -> str | None:
    """The path of the module a node ran in, where the exporter recorded it (``['', 'blocks', 'blocks.0',
    'blocks.0.norm1', 'layer_norm']``: ``blocks.0.norm1``; ``''`` for the model itself), else None."""
    for prop in getattr(node, "metadata_props", ()):
        if prop.key != _SCOPES or len(prop.value) > 4096:
            continue
        parts = re.findall(r"'((?:[^'\\]|\\.)*)'", prop.value)
        return parts[-2] if len(parts) >= 2 else None
    return None


def _plain(attr: Any, onnx: Any, what: str) -> Any:
    """An attribute as a plain Python value; tensors and graphs as a short description."""
    kind = onnx.AttributeProto
    if attr.type == kind.FLOAT:
        return float(attr.f)
    if attr.type == kind.INT:
        return int(attr.i)
    if attr.type == kind.STRING:
        return _text(attr.s, what)
    if attr.type == kind.FLOATS:
        return [float(v) for v in attr.floats]
    if attr.type == kind.INTS:
        return [int(v) for v in attr.ints]
    if attr.type == kind.STRINGS:
        return [_text(s, f"{what}, string {i}") for i, s in enumerate(attr.strings)]
    if attr.type == kind.TENSOR:
        return f"<tensor {list(attr.t.dims)}>"
    if attr.type == kind.GRAPH:
        return f"<graph {attr.g.name}>"
    return f"<{kind.AttributeType.Name(attr.type).lower()}>"
