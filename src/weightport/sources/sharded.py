"""Sharded ``.safetensors``: an ``*.safetensors.index.json`` (or a variant's, ``model.safetensors.index.fp16.json``)
with its shards, or a folder of them.

Every shard must be a plain file name inside the index's own folder (no ``..``,
no path, no link); every name must live in exactly one shard, and where an index
is given, in the shard it names.

>>> import numpy as np, tempfile, pathlib
>>> from weightport.sources.safetensors import write as write_safetensors
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = write_safetensors({"a": np.ones(2, np.float32)}, folder / "part-1.safetensors")
>>> _ = write_safetensors({"b": np.zeros(3, np.float32)}, folder / "part-2.safetensors")
>>> src = open(folder); sorted(src.infos), src.description  # doctest: +ELLIPSIS
(['a', 'b'], "2 shards in folder '...'")
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightport.errors import SourceError
from weightport.sources.base import Region, Source
from weightport.sources.files import LINKS_NOT_FOLLOWED, folder_has, open_no_follow
from weightport.sources.safetensors import SafetensorsSource, read_header
from weightport.sources.snapshot import is_safetensors_index, several_readings

__all__ = ["claims", "open", "ShardedSource", "read_weight_map", "plain_shard_name", "shard_count", "placed"]

MAX_INDEX_BYTES = 64 * 1024 * 1024
FILES_BESIDE_IT = True  # an index given as a link names the shards beside the link, not beside its target


def claims(path: Path) -> bool:
    if path.is_file():
        return is_safetensors_index(path.name)
    return path.is_dir() and folder_has(path, ".safetensors")


@dataclass
class ShardedSource(Source):
    """Several files read as one source (safetensors shards; transformers' TF shards, whose names differ
    from the source's: ``inner``); each name maps to its shard."""

    shards: dict[str, Source] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    inner: dict[str, str] = field(default_factory=dict)  # a name -> its name in its shard, where they differ

    def _in_shard(self, name: str) -> tuple[Source, str]:
        return self.shards[self.owner[name]], self.inner.get(name, name)

    def read_can_fail(self, name: str) -> bool:
        shard, inner = self._in_shard(name)
        return shard.read_can_fail(inner)

    def read_into(self, name: str, out: np.ndarray) -> None:
        shard, inner = self._in_shard(name)
        shard.read_into(inner, out)
        self.bytes_read += out.nbytes

    def mapped(self, name: str) -> np.ndarray | None:
        shard, inner = self._in_shard(name)
        array = shard.mapped(inner)
        self.bytes_read += 0 if array is None else array.nbytes
        return array

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        shard, inner = self._in_shard(name)
        before = shard.bytes_read
        try:
            return shard.read_region(inner, region, out)
        finally:
            self.bytes_read += shard.bytes_read - before

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        shard, inner = self._in_shard(name)
        for chunk in shard.iter_chunks(inner):
            self.bytes_read += chunk.nbytes
            yield chunk

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()


def plain_shard_name(file_name: str, where: str) -> str:
    """``file_name`` where it names a file in the index's own folder (no path, no ``..``)."""
    if not file_name or "/" in file_name or "\\" in file_name or file_name in (".", ".."):
        raise SourceError(
            f"{where}: shard '{file_name}' is not a plain file name in the index's folder; refusing it. "
            "Fix: keep every shard beside the index."
        )
    return file_name


def _open_shard(folder: Path, file_name: str, where: str) -> SafetensorsSource:
    fd = open_no_follow(folder / plain_shard_name(file_name, where))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise SourceError(
                f"{where}: shard '{file_name}' is {kind}, where the index expects a .safetensors file. Fix: put "
                f"the shard file '{file_name}' beside the index in place of it (download the snapshot again)."
            )
        infos, offsets, metadata = read_header(fd, f"'{file_name}'")
    except BaseException:
        os.close(fd)
        raise
    return SafetensorsSource(
        description=f"'{file_name}'", infos=infos, metadata={"safetensors": metadata}, offsets=offsets, _fd=fd
    )


def _assemble(
    source: ShardedSource, where: str, expected: dict[str, str] | None, folder: Path | None = None
) -> ShardedSource:
    held = {f: shard.infos for f, shard in source.shards.items()}
    source.owner = placed(where, held, expected, folder=folder)
    source.infos = {name: source.shards[f].infos[name] for name, f in source.owner.items()}
    return source


_REFETCH = "Fix: download the snapshot again (its index and shards must be written together)."


def placed(
    where: str,
    held: Mapping[str, Iterable[str]],
    expected: Mapping[str, str] | None,
    *,
    folder: Path | None = None,
) -> dict[str, str]:
    """Each tensor name -> the shard file holding it, from ``held`` (file -> the names in it), where every
    name is in one shard only and, with an index's ``expected`` (name -> file), in the one it names, and
    every name it lists is held. Files of ``folder`` holding the very same names are no shards of one model
    but several readings of it (a variant beside the plain file): refused as such."""
    held = {file_name: list(names) for file_name, names in held.items()}
    if folder is not None and expected is None:
        alike: dict[frozenset[str], list[str]] = {}
        for file_name, names in held.items():
            alike.setdefault(frozenset(names), []).append(file_name)
        readings = next((files for names, files in alike.items() if names and len(files) > 1), None)
        if readings is not None:
            raise several_readings(folder, readings, "the same tensor names in")
    owner: dict[str, str] = {}
    for file_name, names in held.items():
        for name in names:
            if name in owner:
                raise SourceError(
                    f"{where}: tensor '{name}' is in both '{owner[name]}' and '{file_name}'. "
                    "Fix: keep each tensor in one shard."
                )
            if expected is not None and expected.get(name) != file_name:
                listed = f"lists it in '{expected[name]}'" if name in expected else "does not list it"
                raise SourceError(
                    f"{where}: tensor '{name}' is in '{file_name}' but the index {listed}. {_REFETCH}"
                )
            owner[name] = file_name
    if expected is not None:
        absent = sorted(set(expected) - set(owner))
        if absent:
            raise SourceError(
                f"{where}: the index lists {', '.join(f'{a!r} in {expected[a]!r}' for a in absent[:5])}, but no "
                "shard holds them there; "
                f"a shard is missing or truncated. {_REFETCH}"
            )
    return owner


def open(path: Path) -> Source:
    source = ShardedSource(description="")
    try:
        if path.is_file():
            _open_index(source, path)
        else:
            _open_folder(source, path)
    except BaseException:
        source.close()
        raise
    return source


def _open_index(source: ShardedSource, path: Path) -> None:
    where = f"'{path.name}'"
    weight_map = read_weight_map(path, where, "safetensors")
    for file_name in dict.fromkeys(weight_map.values()):
        source.shards[file_name] = _open_shard(path.parent, file_name, where)
    source.description = f"{where} ({shard_count(len(source.shards))})"
    _assemble(source, where, weight_map)


def read_weight_map(path: Path, where: str, kind: str) -> dict[str, str]:
    """An index's ``weight_map`` (a tensor's name -> its shard's file name), read within a size bound."""
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise SourceError(f"{where}: an index over {MAX_INDEX_BYTES} bytes is not plausible; refusing it.")
    try:
        index = json.loads(path.read_bytes())
        weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:
        raise SourceError(
            f"{where}: not a valid {kind} index ({e}); it needs a 'weight_map' object. Fix: re-create "
            "it, or load the shards one by one."
        ) from None
    return weight_map


def shard_count(count: int) -> str:
    return f"{count} shard{'s' if count != 1 else ''}"


def _open_folder(source: ShardedSource, path: Path) -> None:
    """Every ``.safetensors`` file in the folder; or, where the folder holds exactly one index, what it lists
    (a hub repository may keep a consolidated copy beside the shards, under names of its own). A
    ``.safetensors`` file the index does not list that holds tensors of the index's names is another
    reading of the model: the folder is refused, as a snapshot holding both is."""
    where = f"folder '{path.name}'"
    with os.scandir(path) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    indexes = [e for e in entries if is_safetensors_index(e.name) and not e.is_symlink()]
    if len(indexes) == 1 and indexes[0].is_file(follow_symlinks=False):
        _open_index(source, Path(indexes[0].path))
        listed = set(source.shards) | {indexes[0].name}
        unlisted = [e for e in entries if e.name not in listed]
        _refuse_other_readings(path, indexes[0].name, source.infos.keys(), unlisted)
        source.ignored += [f"{e.name} (not listed in {indexes[0].name})" for e in unlisted]
        return
    links = []
    for entry in entries:
        if not entry.name.endswith(".safetensors"):
            source.ignored.append(f"{entry.name} (not a .safetensors file)")
        elif entry.is_symlink():
            links.append(entry.name)
            source.ignored.append(f"{entry.name} (a link: not followed)")
        else:
            source.shards[entry.name] = _open_shard(path, entry.name, where)
    if not source.shards:
        raise SourceError(
            f"{where}: its .safetensors files ({', '.join(links[:3])}) are symbolic links, {LINKS_NOT_FOLLOWED}."
        )
    source.description = f"{shard_count(len(source.shards))} in {where}"
    _assemble(source, where, None, path)


def _refuse_other_readings(
    folder: Path, index: str, indexed: Iterable[str], unlisted: list[os.DirEntry[str]]
) -> None:
    """Refuse the folder where a regular ``.safetensors`` file the index does not list holds a tensor
    name the index lists (a consolidated ``model.safetensors`` beside the shards: the two need not agree)."""
    names = set(indexed)
    overlapping: dict[str, list[str]] = {}
    for entry in unlisted:
        if not entry.name.endswith(".safetensors") or not entry.is_file(follow_symlinks=False):
            continue
        fd = open_no_follow(Path(entry.path))
        try:
            infos, _, _ = read_header(fd, f"'{entry.name}'")
        finally:
            os.close(fd)
        common = sorted(names.intersection(infos))
        if common:
            overlapping[entry.name] = common
    if overlapping:
        shared = sorted({n for common in overlapping.values() for n in common})
        said = ", ".join(f"'{n}'" for n in shared[:3]) + (
            f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        )
        raise several_readings(folder, [index, *overlapping], f"tensors of the same names ({said}) in")
