"""Sources: lazy name -> array collections from mappings and files.

:func:`open_source` turns what a user passes into a :class:`Source`. File formats
are found through a registry of reader modules (one file each), imported only
when a file of theirs shows up. Each format module exposes
``claims(path) -> bool`` and ``open(path) -> Source``; one that writes too exposes
``SUFFIX`` and ``write(arrays, path) -> Path``, found by :func:`writer_for` (the one
registry serves both directions). Object readers expose ``claims_object(obj) -> bool``
and ``open_object(obj) -> Source``.

>>> import numpy as np
>>> src = open_source({"fc.weight": np.eye(2)})
>>> list(src.infos), src.description
(['fc.weight'], 'the given mapping')
"""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import numpy as np

from weightport.errors import SourceError, a_or_an
from weightport.sources.base import Source, TensorInfo, check_extent
from weightport.sources.mapping import MappingSource

__all__ = [
    "Source",
    "TensorInfo",
    "MappingSource",
    "SourceLike",
    "check_extent",
    "open_source",
    "register_format",
    "format_names",
    "writer_for",
    "written_suffixes",
]

SourceLike = Union[Source, Mapping[str, Any], str, "os.PathLike[str]", Any]

# Order matters: the first reader that claims a path opens it.
_FORMATS: dict[str, str] = {
    "transformers-snapshot": "weightport.sources.snapshot",
    "safetensors-sharded": "weightport.sources.sharded",
    "transformers-shards": "weightport.sources.hf_shards",
    "safetensors": "weightport.sources.safetensors",
    "npz": "weightport.sources.npz",
    "npy": "weightport.sources.npy",
    "keras": "weightport.sources.keras",
    "flax-msgpack": "weightport.sources.flax",
    "onnx": "weightport.sources.onnx",
    "npy-folder": "weightport.sources.npy_folder",
}
_OBJECT_READERS: list[str] = ["weightport.sources.keras_live", "weightport.sources.flax"]
# The formats a module's arrays can be saved to, by suffix (each format module's SUFFIX and write)
_WRITTEN: dict[str, str] = {".npz": "npz", ".safetensors": "safetensors"}


def register_format(name: str, module_path: str, *, writes: str | None = None) -> None:
    """Add a format module; ``writes=".ext"`` makes :func:`weightport.save` write that suffix with
    its ``write``. An existing name or suffix is never overwritten."""
    if name in _FORMATS:
        raise SourceError(f"format '{name}' is already registered (as {_FORMATS[name]}); pick another name")
    if writes is not None and writes in _WRITTEN:
        raise SourceError(f"suffix '{writes}' is already written by format '{_WRITTEN[writes]}'")
    _FORMATS[name] = module_path
    if writes is not None:
        _WRITTEN[writes] = name


def written_suffixes() -> list[str]:
    """The suffixes :func:`writer_for` has a writer for (``.npz``, ``.safetensors``)."""
    return list(_WRITTEN)


def writer_for(path: str | os.PathLike[str]) -> Callable[[Mapping[str, np.ndarray], Path], Path]:
    """The ``write(arrays, path)`` of the format that ``path``'s suffix names, else a SourceError.

    >>> writer_for("model.npz").__module__
    'weightport.sources.npz'
    """
    target = Path(path)
    name = _WRITTEN.get(target.suffix)
    reader = None if name is None else _reader(_FORMATS[name])
    if reader is None:
        raise SourceError(
            f"'{target}': cannot save to '{target.suffix}'. Fix: use a "
            f"{' or '.join(written_suffixes())} path."
        )
    return reader.write  # type: ignore[no-any-return]


def format_names() -> list[str]:
    return list(_FORMATS)


def _reader(path: str) -> ModuleType | None:
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name == path:
            return None  # a format not built into this version
        raise


def open_source(obj: SourceLike, *, format: str | None = None) -> Source:
    """A :class:`Source` for a mapping, a path, or an object a reader knows.

    Args:
        obj: a Source; a mapping of names to arrays (nested mappings are joined
            with ``/``); a path to a file or folder; or a framework object.
        format: a name from :func:`format_names` to skip detection.
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return _open_path(Path(obj), format)
    if type(obj) is not dict:  # framework containers (an nnx State is a Mapping) go to their reader
        for path in _OBJECT_READERS:
            reader = _reader(path)
            if reader is not None and reader.claims_object(obj):
                return reader.open_object(obj)  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        return MappingSource.from_mapping(obj)
    torch = sys.modules.get("torch")  # a torch module can be here only if torch is imported already
    if torch is not None and isinstance(obj, torch.nn.Module):
        raise SourceError(
            f"cannot read weights from {a_or_an(type(obj).__name__)} module itself: weightport reads arrays by "
            "name. Fix: pass its state dict, weightport.load(model, other.state_dict())."
        )
    raise SourceError(
        f"cannot read weights from {a_or_an(type(obj).__name__)}: pass a mapping of names to arrays, "
        f"a path to a file or folder ({', '.join(_FORMATS)}), or a Keras model"
    )


def _torch_pickle(path: Path) -> bool:
    """Whether ``path`` looks like a file of ``torch.save``: by its suffix, or a .bin / .ckpt by its bytes
    (a zip holding ``data.pkl``, or a pickle)."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return True
    if suffix not in (".bin", ".ckpt") or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return head[:1] == b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format


def _adapter_type(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The ``peft_type`` of the PEFT adapter ``path`` is read as (``"unknown"`` where its adapter_config.json
    does not say), and that adapter_config.json (``{}`` where unreadable): ``adapter_model.*`` with
    adapter_config.json beside it, or a folder holding both and no model weights a snapshot reads instead (a
    snapshot with an adapter beside it reads the model's own)."""
    folder = path if path.is_dir() else path.parent
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    if path.is_dir():
        from weightport.sources.snapshot import weights_file

        names = os.listdir(path)
        snapshot = (path / "config.json").exists() and any(weights_file(n) for n in names)
        if snapshot or not any(n.startswith("adapter_model") for n in names):
            return None
    elif not path.name.startswith("adapter_model"):
        return None
    try:
        import json

        with open(config, "rb") as f:
            settings = {} if config.is_symlink() else json.loads(f.read(1 << 20))
        kind = settings.get("peft_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        settings, kind = {}, None
    return (str(kind) if kind else "unknown"), settings if isinstance(settings, dict) else {}


def _open_path(given: Path, format: str | None) -> Source:
    try:
        path = given.resolve(strict=True)  # the user's own path: links are followed once, here
    except FileNotFoundError:
        _refuse_tensorflow(given)  # a checkpoint's prefix names no file of its own
        raise SourceError(f"'{given}': no such file or folder. Fix: check the path.") from None
    except OSError as e:
        raise SourceError(f"'{given}': cannot be opened ({e.strerror or e}). Fix: check the path.") from None
    if format is not None:
        if format not in _FORMATS:
            raise SourceError(f"unknown format '{format}'; choose one of {', '.join(_FORMATS)}")
        names = [format]
    else:
        names = list(_FORMATS)
    # A link (a hub cache's snapshots/<rev>/model.safetensors -> ../../blobs/<hash>) is claimed by the name
    # the user gave, and read from the file it resolves to.
    named = given if given.is_symlink() else path
    for name in names:
        reader = _reader(_FORMATS[name])
        if reader is not None and (format is not None or reader.claims(named)):
            if named is given and getattr(reader, "FILES_BESIDE_IT", False):
                # an index names files beside it: beside the link the user gave, in its resolved folder
                source: Source = reader.open(given.parent.resolve() / given.name)
            else:
                source = reader.open(path)
            adapter = _adapter_type(path)
            if adapter is not None:  # what layouts hold against the module (a PEFT update is no weight of it)
                source.metadata["peft_type"], source.metadata["adapter_config"] = adapter
            return source
    if _torch_pickle(path):
        entry = "['state_dict']" if path.suffix.lower() == ".ckpt" else ""
        raise SourceError(
            f"'{given}': a PyTorch pickle (torch.save), which weightport does not read (unpickling can run "
            f"code). Fix: read it with torch, which weights_only=True keeps to tensors, and pass the dict: "
            f"weightport.load(model, torch.load('{given}', weights_only=True){entry})."
        )
    _refuse_tensorflow(given)
    raise SourceError(
        f"'{given}': not a format weightport reads. Fix: use one of .npz, .npy, a folder of .npy, "
        f".safetensors (or its .index.json), .weights.h5, .keras, .h5, .msgpack, .onnx, or a transformers "
        "snapshot folder (config.json with model.safetensors, tf_model.h5 or flax_model.msgpack)."
    )


def _refuse_tensorflow(given: Path) -> None:
    """Refuse a TensorFlow checkpoint's or SavedModel's file (or a checkpoint's prefix) as what it is."""
    from weightport.sources.npy_folder import tensorflow_files

    found = tensorflow_files(given)
    if found is not None:
        what, fix = found
        raise SourceError(f"'{given}': {what}. Fix: {fix}")
