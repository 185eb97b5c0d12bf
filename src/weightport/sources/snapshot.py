"""A transformers snapshot folder: ``config.json`` beside the weights in one of the formats it saves.

``save_pretrained`` (and ``snapshot_download``) write one folder per model: ``config.json`` and
``model.safetensors``, ``tf_model.h5``, ``flax_model.msgpack`` (or their shards and an index:
``model.safetensors.index.json``, ``tf_model.h5.index.json``, ``flax_model.msgpack.index.json``), or
``pytorch_model.bin``. The folder is read as the one weights file
it holds, by that format's own reader. Where it holds several, each is a reading of the model
(they may differ): the folder is refused and they are listed, so the user names the file.
``pytorch_model.bin`` is a pickle, which weightport never loads.

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
from pathlib import Path
from typing import Any

from weightport.errors import SourceError
from weightport.sources.base import Source
from weightport.sources.files import LINKS_NOT_FOLLOWED, open_no_follow

__all__ = ["claims", "open", "WEIGHT_FILES", "several_readings"]

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
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def claims(path: Path) -> bool:
    return (
        path.is_dir() and (path / "config.json").exists() and any((path / n).exists() for n in WEIGHT_FILES)
    )


def open(path: Path) -> Source:
    where = f"folder '{path.name}'"
    present = [name for name in WEIGHT_FILES if os.path.lexists(path / name)]
    readable = [name for name in present if WEIGHT_FILES[name] is not None]
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

    source = open_source(member, format=WEIGHT_FILES[readable[0]])
    architectures = [str(a) for a in config.get("architectures") or []]
    source.metadata.setdefault("architectures", architectures)
    source.metadata.setdefault("model_type", config.get("model_type"))
    source.metadata.setdefault("snapshot_config", config)
    source.description = (
        f"'{path.name}/{readable[0]}' (a transformers snapshot"
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
