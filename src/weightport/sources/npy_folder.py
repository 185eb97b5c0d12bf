"""A folder of ``.npy`` files, one tensor each, named by file stem (``encoder.weight_ih_l0.npy``).

Only regular files directly in the folder are read; links, subfolders and other
files are listed in ``ignored`` (and so in the load report), never followed. A folder
without ``.npy`` files that Orbax wrote (its ``_METADATA``, ``_CHECKPOINT_METADATA``,
``manifest.ocdbt`` or ``commit_success.txt``, there or in numbered step folders) is refused
as such, with the call that restores it for :func:`weightport.load`; so is what TensorFlow writes
(:func:`tensorflow_files`: a checkpoint's ``.index`` and ``.data-*`` files, a SavedModel).

>>> import numpy as np, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp()); np.save(folder / "bias.npy", np.zeros(2))
>>> (folder / "notes.txt").write_text("hi")
2
>>> src = open(folder); list(src.infos), src.ignored
(['bias'], ['notes.txt (not a .npy file)'])
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from weightport.errors import SourceError
from weightport.sources.base import Source, TensorInfo
from weightport.sources.files import folder_has
from weightport.sources.npy import NpyFile, NpyFiles, inspect_npy

__all__ = ["claims", "open", "tensorflow_files"]


def claims(path: Path) -> bool:
    return path.is_dir() and not folder_has(path, ".safetensors")


def open(path: Path) -> Source:
    where = f"folder '{path.name}'"
    files: dict[str, NpyFile] = {}
    infos: dict[str, TensorInfo] = {}
    ignored: list[str] = []
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                ignored.append(f"{entry.name} (a link: not followed)")
            elif not entry.is_file(follow_symlinks=False):
                ignored.append(f"{entry.name} (not a regular file)")
            elif entry.name.lower().endswith(".npy") and not entry.name.endswith(".npy"):
                stem = entry.name[: -len(".npy")]
                ignored.append(
                    f"{entry.name} (its suffix is not '.npy' in lower case: rename the file {stem}.npy)"
                )
            elif _doubled(entry.name):  # np.save(folder / "bias.NPY", a) writes bias.NPY.npy
                stem = entry.name[: -len(".npy.npy")]
                said = entry.name[len(stem) : -len(".npy")]
                fix = (
                    f"delete it: {stem}.npy is there"
                    if (path / f"{stem}.npy").exists()
                    else f"rename it {stem}.npy"
                )
                ignored.append(f"{entry.name} (np.save added '.npy' after '{said}': {fix})")
            elif not entry.name.endswith(".npy"):
                ignored.append(f"{entry.name} (not a .npy file)")
            else:
                name = entry.name.removesuffix(".npy")
                file = Path(entry.path)
                header = inspect_npy(file, f"'{path.name}/{entry.name}'", name)
                files[name] = NpyFile(file, header)
                infos[name] = TensorInfo(name, header.shape, header.dtype)
    if not files:
        tensorflow = tensorflow_files(path)
        if tensorflow is not None:
            what, fix = tensorflow
            raise SourceError(f"{where}: holds no .npy files: it is {what}. Fix: {fix}")
        orbax = _orbax(path)
        if orbax is not None:
            what, item = orbax
            raise SourceError(
                f"{where}: holds no .npy files: it is {what}, which weightport does not read (its arrays are in "
                "TensorStore files that only orbax's own code reads; weightport reads arrays itself and never "
                "unpickles or runs a checkpoint's code). Fix: restore it with orbax and pass the pytree: import "
                f"orbax.checkpoint as ocp; weightport.load(model, ocp.StandardCheckpointer().restore({str(item)!r}), "
                "layout='flax')"
            )
        raise SourceError(
            f"{where}: holds no .npy files. Fix: save each tensor as <state-dict name>.npy in it."
        )
    source = NpyFiles(description=where, infos=infos, ignored=ignored, files=files)
    source.keep_open()
    return source


def _doubled(name: str) -> bool:
    """``bias.NPY.npy``: a name np.save gave a path ending in another case of ``.npy``."""
    inner = name[: -len(".npy")]
    return name.endswith(".npy") and inner.lower().endswith(".npy") and not inner.endswith(".npy")


_ITEM = ("_METADATA", "manifest.ocdbt")  # what Orbax writes in a saved pytree's own folder
_STEP = ("_CHECKPOINT_METADATA", "commit_success.txt")  # and beside it, in a finished save's folder


def _orbax(path: Path) -> tuple[str, Path] | None:
    """What Orbax checkpoint ``path`` is and the folder ``StandardCheckpointer().restore`` takes, or None
    where Orbax did not write it: a saved pytree (``_METADATA``), a ``CheckpointManager`` step holding its
    items (``7/default``), or a ``CheckpointManager``'s folder of numbered steps (the latest is named)."""
    if any((path / name).is_file() for name in _ITEM):
        return "an Orbax checkpoint", path
    items = sorted(p for p in _folders(path) if any((p / name).is_file() for name in _ITEM))
    if items and any((path / name).is_file() for name in _STEP):
        return f"an Orbax checkpoint step holding the item(s) {', '.join(p.name for p in items)}", items[0]
    if any((path / name).is_file() for name in _STEP):  # a finished save whose items are not found
        return "an Orbax checkpoint", path
    steps = sorted((p for p in _folders(path) if p.name.isdigit()), key=lambda p: int(p.name))
    for step in reversed(steps):
        found = _orbax(step)
        if found is not None:
            shown = ", ".join(p.name for p in steps[-6:])
            return f"an Orbax CheckpointManager's folder (steps {shown}; the latest restored here)", found[1]
    return None


def _folders(path: Path) -> list[Path]:
    """The folders directly in ``path`` (not links)."""
    with os.scandir(path) as entries:
        return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


_DATA = re.compile(r"^(?P<prefix>.+)\.data-\d{5}-of-\d{5}$")  # a checkpoint's shards, beside its .index
_SAVED_MODEL = ("saved_model.pb", "saved_model.pbtxt")
_LATEST = re.compile(r'^model_checkpoint_path:\s*"(?P<path>[^"]+)"', re.MULTILINE)  # the `checkpoint` file's
_UNREAD = "which weightport does not read (TensorFlow names its variables by its object graph, not by layer)"
_RESTORED = (
    "then weightport.load(module, m); or save it as Keras's own file, m.save_weights('m.weights.h5'), "
    "and load that."
)


def tensorflow_files(path: Path) -> tuple[str, str] | None:
    """What TensorFlow wrote at ``path`` and the fix that loads it, or None where TensorFlow did not
    write it: a SavedModel (``saved_model.pb`` beside ``variables/``: its folder, a file in it, the
    ``variables`` folder) or a checkpoint (``<prefix>.index`` with ``<prefix>.data-00000-of-00001``: its
    folder, the prefix, either file, the ``checkpoint`` file naming the latest)."""
    folder = path if path.is_dir() else path.parent
    named = path.is_dir() or path.name in (*_SAVED_MODEL, "fingerprint.pb")  # else a file of variables/
    for saved in (folder.parent,) if folder.name == "variables" else (folder,) if named else ():
        if any((saved / name).is_file() for name in _SAVED_MODEL) and (saved / "variables").is_dir():
            variables = str(saved / "variables" / "variables")
            return (
                f"a TensorFlow SavedModel ('{saved}': saved_model.pb with its variables/), {_UNREAD}",
                "build the Keras model in code, restore the variables into it and pass that model: "
                f"tf.train.Checkpoint(m).read({variables!r}).assert_existing_objects_matched() (a model saved "
                f"by tf.saved_model.save(m, ...); tf.train.list_variables({variables!r}) shows the names "
                f"otherwise), {_RESTORED}",
            )
    prefix = _checkpoint_prefix(path)
    if prefix is None:
        return None
    return (
        f"a TensorFlow checkpoint (prefix '{prefix}': {Path(prefix).name}.index and its .data-* files), "
        + _UNREAD,
        "build the Keras model in code, restore the checkpoint into it and pass that model: "
        f"tf.train.Checkpoint(model=m).read({prefix!r}).assert_existing_objects_matched() (with the keyword "
        "it was written under, or tf.train.Checkpoint(m) where the model itself was saved, as tf.keras's "
        f"model.save_weights does; tf.train.list_variables({prefix!r}) shows the names), {_RESTORED}",
    )


def _checkpoint_prefix(path: Path) -> str | None:
    """The TensorFlow checkpoint prefix ``path`` is, holds or names, or None."""
    if path.is_dir():
        folder, stem = path, None
    elif path.name.endswith(".index"):
        folder, stem = path.parent, path.name.removesuffix(".index")
    elif _DATA.match(path.name):
        folder, stem = path.parent, _DATA.match(path.name)["prefix"]  # type: ignore[index]
    elif path.name == "checkpoint" or not path.exists():  # the file naming the latest; a prefix
        folder, stem = path.parent, None if path.exists() else path.name
    else:
        return None
    if not folder.is_dir():
        return None
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file()]
    data = {m["prefix"] for m in map(_DATA.match, names) if m}
    prefixes = sorted((n.removesuffix(".index") for n in names if n.endswith(".index")), key=_natural)
    prefixes = [p for p in prefixes if p in data]
    if stem is None:
        stem = _latest(folder, prefixes)
    return str(folder / stem) if stem in prefixes else None


def _latest(folder: Path, prefixes: list[str]) -> str | None:
    """The prefix a folder's ``checkpoint`` file names (tf.train.CheckpointManager's latest), else the
    last by number."""
    file, found = folder / "checkpoint", None
    try:
        if file.is_file() and not file.is_symlink():
            with file.open("rb") as f:
                found = _LATEST.search(f.read(1 << 16).decode("utf-8", "replace"))
    except OSError:
        pass
    named = Path(found["path"]).name if found else None
    return named if named in prefixes else (prefixes[-1] if prefixes else None)


def _natural(name: str) -> list[object]:
    """``ckpt-2`` before ``ckpt-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
