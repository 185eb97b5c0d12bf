"""A transformers snapshot folder: ``config.json`` beside the weights in one of the formats it saves.

``save_pretrained`` (and ``snapshot_download``) write one folder per model: ``config.json`` and
``model.safetensors``, ``tf_model.h5``, ``flax_model.msgpack`` (or their shards and an index:
``model.safetensors.index.json``, ``tf_model.h5.index.json``, ``flax_model.msgpack.index.json``), or
``pytorch_model.bin``. ``save_pretrained(folder, variant="fp16")`` puts the variant before the name's last
suffix, as transformers' ``_add_variant`` does: ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``
(its shards ``model.fp16-00001-of-00002.safetensors``). The folder is read as the one weights file
it holds, by that format's own reader. Where it holds several (two variants, or a variant beside the plain
file), each is a reading of the model (they may differ): the folder is refused and they are listed, so the
user names the file. ``pytorch_model.bin`` is a pickle, which weightport never loads. A folder with
``config.json`` whose weights have names of their own (``.safetensors`` files, ``.npy`` arrays) is read as
that folder is, its config.json held against the model all the same.

>>> import json, pathlib, tempfile, numpy as np
>>> from weightport.sources.safetensors import write
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
>>> _ = write({"w": np.ones(2, np.float32)}, folder / "model.safetensors")
>>> src = open(folder); list(src.infos), src.metadata["architectures"]
(['w'], ['BertModel'])
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from weightport.errors import SourceError
from weightport.sources.base import Source
from weightport.sources.files import LINKS_NOT_FOLLOWED, open_no_follow

__all__ = ["claims", "open", "WEIGHT_FILES", "several_readings", "weights_file", "is_safetensors_index"]

# The weights files save_pretrained writes, by the format (a name in weightport.sources) that reads them;
# None: a pickle, never read.
WEIGHT_FILES: dict[str, str | None] = {
    "model.safetensors": "safetensors",
    "model.safetensors.index.json": "safetensors-sharded",
    "tf_model.h5": "keras",
    "flax_model.msgpack": "flax-msgpack",
    "tf_model.h5.index.json": "transformers-shards",
    "flax_model.msgpack.index.json": "transformers-shards",
    "pytorch_model.bin": None,
    "pytorch_model.bin.index.json": None,
}
# the names save_pretrained(variant=...) writes a variant of (PyTorch's; transformers' TF and Flax take none)
VARIANT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SHARD = re.compile(
    r"-\d+-of-\d+$"
)  # a shard's suffix: model.fp16-00001-of-00002.safetensors is no variant 'fp16-...'
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# folders whose weights transformers does not name, read by these formats (a suffix they hold -> format)
_OTHER_FOLDERS = {".safetensors": "safetensors-sharded", ".npy": "npy-folder"}


def weights_file(name: str) -> str | None:
    """The weights file save_pretrained names ``name`` after (``model.safetensors`` for itself and for its
    variant ``model.fp16.safetensors``), or None for a name it does not write.

    >>> weights_file("model.fp16.safetensors"), weights_file("model.safetensors.index.ema.json")
    ('model.safetensors', 'model.safetensors.index.json')
    >>> weights_file("model.fp16-00001-of-00002.safetensors"), weights_file("tf_model.h5")
    (None, 'tf_model.h5')
    """
    if name in WEIGHT_FILES:
        return name
    for plain in VARIANT_FILES:
        stem, _, suffix = plain.rpartition(".")
        if name.startswith(stem + ".") and name.endswith("." + suffix):
            variant = name[len(stem) + 1 : -len(suffix) - 1]
            if variant and "/" not in variant and not _SHARD.search(variant):
                return plain
    return None


def is_safetensors_index(name: str) -> bool:
    """Whether ``name`` is a safetensors index: ``*.safetensors.index.json`` or a variant's
    (``model.safetensors.index.fp16.json``)."""
    return name.endswith(".safetensors.index.json") or bool(
        re.search(r"\.safetensors\.index\.[^./]+\.json$", name)
    )


def claims(path: Path) -> bool:
    if not path.is_dir() or not (path / "config.json").exists():
        return False
    with os.scandir(path) as entries:
        names = [e.name for e in entries]
    return any(weights_file(n) for n in names) or any(n.endswith(tuple(_OTHER_FOLDERS)) for n in names)


def open(path: Path) -> Source:
    where = f"folder '{path.name}'"
    with os.scandir(path) as entries:
        present = sorted((e.name for e in entries if weights_file(e.name)), key=_in_order)
    if not present:
        return _other_folder(path, where)
    readable = [name for name in present if WEIGHT_FILES[weights_file(name) or ""] is not None]
    if len(readable) > 1:
        raise several_readings(path, readable, "a transformers snapshot with")
    if not readable:
        raise SourceError(
            f"{where}: its weights are only in {', '.join(present)}, a pickle, which weightport never loads "
            "(unpickling runs code). Fix: save the model as safetensors (transformers: "
            "model.save_pretrained(folder, safe_serialization=True)), then load that folder."
        )
    member = path / readable[0]
    if member.is_symlink():
        raise SourceError(f"{where}: '{readable[0]}' is a symbolic link, {LINKS_NOT_FOLLOWED}.")
    config = _config(path / "config.json", where)
    from weightport.sources import open_source

    source = open_source(member, format=WEIGHT_FILES[weights_file(readable[0]) or ""])
    if (
        path / "adapter_config.json"
    ).exists():  # a PEFT adapter beside the model: its update is not the model's
        source.ignored.append(
            "adapter_config.json and its adapter (PEFT): the model's own weights are read, the adapter not applied"
        )
    return _with_config(source, config, f"'{path.name}/{readable[0]}'")


def _in_order(name: str) -> tuple[int, bool, str]:
    """WEIGHT_FILES' order (the plain file, then its variants), for listing."""
    return list(WEIGHT_FILES).index(weights_file(name) or ""), name not in WEIGHT_FILES, name


def _other_folder(path: Path, where: str) -> Source:
    """A folder with config.json whose weights transformers does not name: read as that folder is (every
    ``.safetensors`` file, or every ``.npy``), config.json held against the model all the same."""
    with os.scandir(path) as entries:
        names = [e.name for e in entries]
    format = next(f for suffix, f in _OTHER_FOLDERS.items() if any(n.endswith(suffix) for n in names))
    config = _config(path / "config.json", where)
    from weightport.sources import open_source

    source = open_source(path, format=format)
    source.ignored = [i for i in source.ignored if not i.startswith("config.json ")]
    return _with_config(source, config, source.description)


def _with_config(source: Source, config: dict[str, Any], read: str) -> Source:
    """``source`` with what ``config`` (the folder's config.json) says of the model, to hold against it."""
    architectures = [str(a) for a in config.get("architectures") or []]
    source.metadata.setdefault("architectures", architectures)
    source.metadata.setdefault("model_type", config.get("model_type"))
    source.metadata.setdefault("snapshot_config", config)
    source.description = (
        f"{read} (a transformers snapshot"
        + (f" of {', '.join(architectures)}" if architectures else "")
        + ")"
    )
    return source


def several_readings(folder: Path, names: list[str], what: str) -> SourceError:
    """The refusal of a folder holding several weights files (``names``), each a reading of the model:
    ``what`` says what the folder is (``"a transformers snapshot with"``). The one home of that rule."""
    listed = ", ".join(f"'{folder / name}'" for name in names)
    return SourceError(
        f"folder '{folder.name}': {what} {len(names)} weights files ({', '.join(names)}); each is a reading of "
        f"the model and they need not agree, so weightport does not choose. Fix: pass the file you mean: one of "
        f"{listed}."
    )


def _config(path: Path, where: str) -> dict[str, Any]:
    """``config.json``, read without following a link and within a size bound."""
    fd = open_no_follow(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_CONFIG_BYTES:
            raise SourceError(
                f"{where}: config.json holds {size:,} bytes, more than a model configuration "
                f"({MAX_CONFIG_BYTES:,}). Fix: check the folder is a transformers snapshot."
            )
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(
            f"{where}: config.json is not valid JSON ({e}). Fix: re-create the snapshot."
        ) from None
    if not isinstance(config, dict):
        raise SourceError(f"{where}: config.json holds no JSON object. Fix: re-create the snapshot.")
    return config
