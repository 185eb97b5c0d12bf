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

Other projects write folders of the same shape, each naming its config by markers of its own: diffusers
(``_class_name``, ``_diffusers_version``; weights ``diffusion_pytorch_model.safetensors``, its variants and
shards named by the same rule), timm (``architecture`` with ``model_args`` or ``pretrained_cfg``), open_clip
(``open_clip_config.json``, its ``model_cfg``), sentence-transformers (``modules.json`` beside a transformers
snapshot). The folder is described as what it is, its config kept in ``metadata["folder_config"]`` for
:mod:`weightport.snapshot_config` to hold against the model (or, where the model keeps no record to hold it
against, to note). A diffusers pipeline (``model_index.json``) is several models: refused, its components
listed. A PEFT adapter beside a snapshot is another reading of the model: refused.

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

__all__ = [
    "claims",
    "open",
    "WEIGHT_FILES",
    "several_readings",
    "weights_file",
    "is_safetensors_index",
    "config_writer",
]

# The stems of the PyTorch weights files save_pretrained writes (safetensors', the pickle's): transformers'
# and diffusers' (ModelMixin.save_pretrained names its files, variants and shards by the same rule)
_STEMS = (("model", "pytorch_model"), ("diffusion_pytorch_model", "diffusion_pytorch_model"))
# the names save_pretrained(variant=...) writes a variant of (PyTorch's; transformers' TF and Flax take none)
VARIANT_FILES = tuple(
    name
    for safe, pickled in _STEMS
    for name in (
        f"{safe}.safetensors",
        f"{safe}.safetensors.index.json",
        f"{pickled}.bin",
        f"{pickled}.bin.index.json",
    )
)
# The weights files save_pretrained writes, by the format (a name in weightport.sources) that reads them;
# None: a pickle, never read.
WEIGHT_FILES: dict[str, str | None] = {
    **{
        name: "safetensors-sharded" if name.endswith(".safetensors.index.json") else None
        for name in VARIANT_FILES
    },
    **{f"{safe}.safetensors": "safetensors" for safe, _ in _STEMS},
    "tf_model.h5": "keras",
    "flax_model.msgpack": "flax-msgpack",
    "tf_model.h5.index.json": "transformers-shards",
    "flax_model.msgpack.index.json": "transformers-shards",
}
# the config files beside the weights, by the project writing them (config.json's writer is read from it)
_CONFIGS = ("config.json", "open_clip_config.json")
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
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():  # a diffusers pipeline: refused, its components listed
        return True
    if not any((path / name).exists() for name in _CONFIGS):
        return False
    with os.scandir(path) as entries:
        names = [e.name for e in entries]
    return any(weights_file(n) or n.endswith((*_OTHER_FOLDERS, ".bin")) for n in names)


def config_writer(file: str, config: dict[str, Any], names: list[str]) -> str | None:
    """The project that wrote ``config`` (the folder's ``file``, beside ``names``), by its own markers;
    None where it has none of them.

    >>> config_writer("config.json", {"_class_name": "UNet2DModel", "act_fn": "silu"}, [])
    'diffusers'
    >>> config_writer("config.json", {"architecture": "resnet18", "model_args": {}}, [])
    'timm'
    """
    if file == "open_clip_config.json":
        return "open_clip"
    if "_class_name" in config or "_diffusers_version" in config:
        return "diffusers"
    # model_type alone is a user's own config too: with it, a weights file transformers names its own
    diffusers = _STEMS[1][0]
    transformers_files = any((found := weights_file(n)) and not found.startswith(diffusers) for n in names)
    if any(k in config for k in ("transformers_version", "architectures")) or (
        "model_type" in config and transformers_files
    ):
        return "sentence-transformers" if "modules.json" in names else "transformers"
    if "architecture" in config and ("model_args" in config or "pretrained_cfg" in config):
        return "timm"
    return None


def open(path: Path) -> Source:
    where = f"folder '{path.name}'"
    if (path / "model_index.json").is_file():
        raise _pipeline(path, where)
    with os.scandir(path) as entries:
        names = sorted(e.name for e in entries)
    present = sorted((n for n in names if weights_file(n)), key=_in_order)
    file = next(name for name in _CONFIGS if name in names)
    config = _config(path / file, where)
    writer = config_writer(file, config, names)
    what = _WHAT.get(writer or "", "a folder")
    if not present and any(n.endswith(tuple(_OTHER_FOLDERS)) for n in names):
        return _other_folder(path, where, (writer, file, config), names)
    readable = [name for name in present if WEIGHT_FILES[weights_file(name) or ""] is not None]
    if len(readable) > 1:
        raise several_readings(path, readable, f"{what} with")
    if not readable:
        pickles = present or [n for n in names if n.endswith(".bin")]
        raise SourceError(
            f"{where}: its weights are only in {', '.join(pickles)}, a pickle, which weightport never loads "
            "(unpickling runs code). Fix: save the model as safetensors (transformers, diffusers: "
            "model.save_pretrained(folder, safe_serialization=True); any model: "
            "safetensors.torch.save_file(model.state_dict(), path)), then load that."
        )
    member = path / readable[0]
    if member.is_symlink():
        raise SourceError(f"{where}: '{readable[0]}' is a symbolic link, {LINKS_NOT_FOLLOWED}.")
    adapters = [n for n in names if n.startswith("adapter_model.")]
    if (
        "adapter_config.json" in names and adapters
    ):  # transformers' from_pretrained applies it where peft is in
        raise several_readings(
            path,
            [readable[0], *adapters],
            "the model and the PEFT adapter beside it (adapter_config.json):",
            f"the model alone: pass '{member}'; with the adapter, as transformers applies it: merge it first "
            f"(peft: PeftModel.from_pretrained(model, '{path}').merge_and_unload().save_pretrained(merged)), "
            "then load the merged folder",
        )
    from weightport.sources import open_source

    source = open_source(member, format=WEIGHT_FILES[weights_file(readable[0]) or ""])
    return _with_config(source, (writer, file, config), f"'{path.name}/{readable[0]}'", path, names)


def _in_order(name: str) -> tuple[int, bool, str]:
    """WEIGHT_FILES' order (the plain file, then its variants), for listing."""
    return list(WEIGHT_FILES).index(weights_file(name) or ""), name not in WEIGHT_FILES, name


# what a folder each project writes is called
_WHAT = {
    "transformers": "a transformers snapshot",
    "sentence-transformers": "a sentence-transformers folder",
    "diffusers": "a diffusers folder",
    "timm": "a timm folder",
    "open_clip": "an open_clip folder",
}


def _other_folder(
    path: Path, where: str, config: tuple[str | None, str, dict[str, Any]], names: list[str]
) -> Source:
    """A folder with a config whose weights save_pretrained does not name: read as that folder is (every
    ``.safetensors`` file, or every ``.npy``), its config held against the model all the same."""
    format = next(f for suffix, f in _OTHER_FOLDERS.items() if any(n.endswith(suffix) for n in names))
    from weightport.sources import open_source

    source = open_source(path, format=format)
    source.ignored = [i for i in source.ignored if not i.startswith(f"{config[1]} ")]
    return _with_config(source, config, source.description, path, names)


def _with_config(
    source: Source, config: tuple[str | None, str, dict[str, Any]], read: str, path: Path, names: list[str]
) -> Source:
    """``source`` with what ``config`` (the folder's config file: its writer, name, settings) says of the
    model, to hold against it."""
    writer, file, settings = config
    source.metadata.setdefault("folder_config", {"writer": writer, "file": file, "settings": settings})
    kind = settings.get("_class_name") or settings.get("architecture")
    architectures = [str(a) for a in settings.get("architectures") or []]
    if writer in (None, "transformers", "sentence-transformers"):  # held against a transformers model's
        source.metadata.setdefault("architectures", architectures)
        source.metadata.setdefault("model_type", settings.get("model_type"))
        source.metadata.setdefault("snapshot_config", settings)
        kind = ", ".join(architectures)
    what = _WHAT.get(writer or "", f"with {file} beside it")
    if writer == "sentence-transformers":
        what += ", a transformers snapshot"
        source.ignored += _sentence_modules(path)
    source.description = f"{read} ({what}" + (f" of {kind}" if kind and writer else "") + ")"
    return source


def _sentence_modules(path: Path) -> list[str]:
    """sentence-transformers' modules (modules.json) kept in folders of their own: not read from this one."""
    try:
        modules = json.loads((path / "modules.json").read_bytes()[:MAX_CONFIG_BYTES])
        found = [(str(m["path"]), str(m.get("type", "?"))) for m in modules if m.get("path")]
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return []
    return [
        f"{folder}/ (modules.json: {kind}): a module of its own, not read from this folder; load "
        f"'{path / folder}' into that module"
        for folder, kind in found
    ]


def _pipeline(path: Path, where: str) -> SourceError:
    """The refusal of a diffusers pipeline folder (model_index.json): several models, each in its folder."""
    try:
        index = json.loads((path / "model_index.json").read_bytes()[:MAX_CONFIG_BYTES])
    except (OSError, ValueError, RecursionError):
        index = {}
    parts = []
    for name, entry in index.items() if isinstance(index, dict) else []:
        folder = path / str(name)
        if not name.startswith("_") and folder.is_dir() and any(weights_file(n) for n in os.listdir(folder)):
            kind = entry[-1] if isinstance(entry, list) and entry else "?"
            parts.append(f"'{folder}' ({kind})")
    return SourceError(
        f"{where}: a diffusers pipeline (model_index.json), {len(parts)} models each in a folder of its own; "
        "weightport loads one model at a time. Fix: pass the folder of the model you load: "
        + (", ".join(parts) or "one of its component folders")
        + "."
    )


def several_readings(folder: Path, names: list[str], what: str, fix: str | None = None) -> SourceError:
    """The refusal of a folder holding several weights files (``names``), each a reading of the model:
    ``what`` says what the folder is (``"a transformers snapshot with"``), ``fix`` how to choose (pass one
    of the files, unless given). The one home of that rule."""
    listed = ", ".join(f"'{folder / name}'" for name in names)
    return SourceError(
        f"folder '{folder.name}': {what} {len(names)} weights files ({', '.join(names)}); each is a reading of "
        "the model and they need not agree, so weightport does not choose. Fix: "
        + (fix or f"pass the file you mean: one of {listed}")
        + "."
    )


def _config(path: Path, where: str) -> dict[str, Any]:
    """A config file (``config.json``), read without following a link and within a size bound."""
    fd = open_no_follow(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_CONFIG_BYTES:
            raise SourceError(
                f"{where}: {path.name} holds {size:,} bytes, more than a model configuration "
                f"({MAX_CONFIG_BYTES:,}). Fix: check the folder is a model's (its config beside its weights)."
            )
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(
            f"{where}: {path.name} is not valid JSON ({e}). Fix: re-create the snapshot."
        ) from None
    if not isinstance(config, dict):
        raise SourceError(f"{where}: {path.name} holds no JSON object. Fix: re-create the snapshot.")
    return config
