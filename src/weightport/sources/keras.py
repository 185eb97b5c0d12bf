"""Keras weight files, read with h5py alone: ``.weights.h5``, ``.keras``, legacy ``.h5``.

Every dataset becomes a tensor named by its HDF5 path (``layers/lstm/cell/vars/0``,
``enc/enc/lstm_cell/kernel:0``); the file is checked as
:mod:`weightport.sources.keras_h5` describes. ``metadata`` carries what the
Keras layout needs:

- ``layout``: ``"keras"``; ``keras_file``: ``"weights.h5"`` (Keras 3
  ``save_weights``), ``"keras"`` (a ``.keras`` archive), ``"legacy-h5"``
  (Keras 2 ``save_weights``), ``"legacy-model-h5"`` (Keras 2 ``model.save``).
- ``layers``: the layers in model order, where the file records it (the
  ``.keras`` ``config.json``; a legacy file's ``layer_names`` attribute), each a
  dict with ``path`` (the group its tensors sit under), ``name``, ``class_name``
  and ``config`` (None where the file has no configuration), and for legacy
  files ``weights`` (its tensors in Keras's order, from ``weight_names``).
- ``vars_names``: for Keras 3 files, each layer group's ``vars/@name``: the
  layer's own name (group keys are class names numbered per class).
- ``model_config``: the whole model configuration, where the file has one.

A bare ``.weights.h5`` records no layer order and no configuration (HDF5 lists
groups alphabetically, ``dense_10`` before ``dense_2``); the Keras layout
recovers the order from the per-class numbering of the keys.

A ``.keras`` file that is HDF5 rather than a zip (Keras 2.12's ``model.save("m.keras")`` wrote
the legacy full-model file) is read as the HDF5 file it is.

Optimizer state and random-seed state are listed in ``ignored``, never read.
A ``.keras`` zip is checked before its weights are read into memory: member
names may not leave the archive, and a member may not expand to more than
:data:`ZIP_MAX_EXPANSION` times its stored size (beyond :data:`ZIP_FLOOR`).

>>> import pathlib, tempfile, numpy as np, h5py
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.weights.h5"
>>> with h5py.File(path, "w") as f:
...     f["layers/dense/vars/0"] = np.ones((3, 2), np.float32)
...     f["layers/dense/vars"].attrs["name"] = "head"
>>> src = open(path)
>>> list(src.infos), src.metadata["keras_file"], src.metadata["vars_names"]
(['layers/dense/vars/0'], 'weights.h5', {'layers/dense': 'head'})
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from weightport.errors import SourceError
from weightport.sources.base import Source
from weightport.sources.keras_h5 import H5Source, open_h5
from weightport.sources.npz import unsafe_member_name

__all__ = ["claims", "open", "snake_case", "ZIP_MAX_EXPANSION", "ZIP_FLOOR"]

ZIP_MAX_EXPANSION = 100
ZIP_FLOOR = 1 << 24  # 16 MiB
_CONFIG_CAP = 1 << 26  # config.json larger than 64 MiB is not a config
_CHUNK = 1 << 22
_SUFFIXES = (".h5", ".hdf5", ".keras")
_NOT_WEIGHTS = {"optimizer": "optimizer state", "optimizer_weights": "optimizer state"}
_CONTAINERS = ("Sequential", "Functional", "Model")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_KERAS3_NAME = re.compile(r"(^|/)vars/\d+$")  # Keras 3 files a layer's variables as <layer>/vars/<i>


def claims(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SUFFIXES)


def open(path: Path) -> Source:
    where = f"'{path.name}'"
    if path.name.lower().endswith(".keras") and not _is_hdf5(path):
        return _open_archive(path, where)
    source = open_h5(path, where, os.path.getsize(path), _skip)
    try:
        _describe_h5(source)
    except BaseException:
        source.close()
        raise
    return source


def _is_hdf5(path: Path) -> bool:
    """Whether the file starts with the HDF5 signature (Keras 2.12 saves ``m.keras`` as legacy HDF5)."""
    try:
        with path.open("rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False  # the archive reader says what is wrong with the file


def _skip(path: str) -> str | None:
    if "/" not in path and path in _NOT_WEIGHTS:
        return _NOT_WEIGHTS[path]
    if path.rsplit("/", 1)[-1] == "seed_generator":
        return "random-seed state"
    return None


def snake_case(class_name: str) -> str:
    """The key Keras 3 files a layer under: its class name in snake case (before numbering).

    >>> [snake_case(c) for c in ("Dense", "SimpleRNN", "Conv1D", "BatchNormalization", "GRU")]
    ['dense', 'simple_rnn', 'conv1d', 'batch_normalization', 'gru']
    """
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


# ---- legacy and Keras 3 .h5 -------------------------------------------------------------------


def _describe_h5(source: H5Source) -> None:
    attrs = source.root_attrs()
    meta = source.metadata
    if _list_attr(attrs, "layer_names") is not None:
        meta.update(layout="keras", keras_file="legacy-h5")
        meta["layers"] = _unordered_if_subclassed(_legacy_layers(source, "", None))
    elif "model_weights" in source.groups and "model_config" in attrs:
        meta.update(layout="keras", keras_file="legacy-model-h5")
        config = _json(attrs["model_config"], source.description, "model_config")
        meta["model_config"] = config
        meta["layers"] = _legacy_layers(source, "model_weights/", config)
    elif source.description.lower().endswith(".weights.h5'") or any(
        _KERAS3_NAME.search(n) for n in source.infos
    ):
        meta.update(layout="keras", keras_file="weights.h5", vars_names=dict(source.vars_names))
    if "keras_version" in attrs:
        meta["keras_version"] = _text(attrs["keras_version"])


def _legacy_layers(source: H5Source, prefix: str, config: dict[str, Any] | None) -> list[dict[str, Any]]:
    where = source.description
    group_attrs = source.group_attrs(prefix.rstrip("/")) if prefix else source.root_attrs()
    names = _list_attr(group_attrs, "layer_names") or []
    configs = {name: unwrap_time_distributed(cls, cfg)[:2] for name, cls, cfg in _config_entries(config)}
    layers = []
    for name in names:
        path = prefix + name
        if path not in source.groups:
            raise SourceError(
                f"{where}: lists layer '{name}' but has no group '{path}'; the file is corrupt."
            )
        weights = [f"{path}/{w}" for w in _list_attr(source.group_attrs(path), "weight_names") or []]
        missing = [w for w in weights if w not in source.infos]
        if missing:
            raise SourceError(f"{where}: layer '{name}' lists weight '{missing[0]}', which the file lacks.")
        cls, cfg = configs.get(name, (None, None))
        by_prefix = _by_first_component(path, weights)
        if cls in _CONTAINERS and set(by_prefix) == {name}:
            # Keras 3 files a nested model's weights under its own name once more: 'stem/stem_conv/kernel'
            by_prefix = _by_first_component(f"{path}/{name}", weights)
        if len(by_prefix) > 1 or (cls in _CONTAINERS and by_prefix):
            # a nested model: one entry in layer_names, its layers' weights named by their own layers
            inner = _leaf_configs(cfg)
            parts = [
                (sub, *inner.get(sub, (None, None)), sub_weights) for sub, sub_weights in by_prefix.items()
            ]
        else:
            parts = [(name, cls, cfg, weights)]
        for part_name, part_cls, part_cfg, part_weights in parts:
            layers.append(
                {
                    "path": path,
                    "name": part_name,
                    "class_name": part_cls,
                    "config": part_cfg,
                    "weights": part_weights,
                }
            )
    return layers


def _unordered_if_subclassed(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A subclassed model's ``layer_names`` is its attribute order, not the order it calls its layers in.
    tf.keras names such a model's weights inside its own scope (``my_model/dense/kernel:0`` in group
    ``dense``), a Sequential or Functional model's after the layer (``dense/kernel:0``): where every
    layer's weights sit in one scope other than its name, each record says its order is not recorded."""
    scopes = {w[len(layer["path"]) + 1 :].split("/", 1)[0] for layer in layers for w in layer["weights"]}
    inside = len(scopes) == 1 and all(layer["weights"] and scopes != {layer["name"]} for layer in layers)
    if inside and len(layers) > 1:
        for layer in layers:
            layer["unordered"] = True
    return layers


def _by_first_component(path: str, weights: list[str]) -> dict[str, list[str]]:
    """A legacy layer's weights grouped by the layer that named them (``conv1d/kernel:0`` -> ``conv1d``).

    A plain layer names all its weights after itself; a nested model lists its layers' weights,
    each named after its own (leaf) layer, in the model's order.
    """
    groups: dict[str, list[str]] = {}
    for weight in weights:
        groups.setdefault(weight[len(path) + 1 :].split("/", 1)[0], []).append(weight)
    return groups


def _leaf_configs(config: dict[str, Any] | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """(class, config) of every non-container layer inside a model config, by layer name."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, cls, cfg in _config_entries({"config": config} if config is not None else None):
        if cls in _CONTAINERS and isinstance(cfg.get("layers"), list):
            found.update(_leaf_configs(cfg))
        else:
            found[name] = unwrap_time_distributed(cls, cfg)[:2]
    return found


def _config_entries(config: dict[str, Any] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(layer name, class name, layer config) of a model config's top-level layers."""
    inner = (config or {}).get("config")
    entries = inner.get("layers") if isinstance(inner, dict) else None
    out = []
    for entry in entries if isinstance(entries, list) else []:
        cfg = entry.get("config") if isinstance(entry, dict) else None
        if isinstance(cfg, dict):
            out.append((str(cfg.get("name", entry.get("name", ""))), str(entry.get("class_name")), cfg))
    return out


def unwrap_time_distributed(cls: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """The layer a ``TimeDistributed`` wrapper applies at every time step, with one set of weights.

    Returns its class, its config, and the path under the wrapper's group where Keras 3 keeps its
    variables (``/layer``); anything else comes back as it is.

    >>> unwrap_time_distributed("TimeDistributed", {"layer": {"class_name": "Dense", "config": {"units": 3}}})
    ('Dense', {'units': 3}, '/layer')
    """
    inner = ""
    while cls == "TimeDistributed" and isinstance(cfg.get("layer"), dict):
        wrapped = cfg["layer"]
        if not isinstance(wrapped.get("config"), dict):
            break
        cls, cfg, inner = str(wrapped.get("class_name")), wrapped["config"], inner + "/layer"
    return cls, cfg, inner


def _list_attr(attrs: Any, name: str) -> list[str] | None:
    """A list-of-strings attribute; Keras splits big ones into ``name0``, ``name1``, ..."""
    if name in attrs:
        return [_text(v) for v in attrs[name]]
    if f"{name}0" in attrs:
        out: list[str] = []
        i = 0
        while f"{name}{i}" in attrs:
            out += [_text(v) for v in attrs[f"{name}{i}"]]
            i += 1
        return out
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _json(value: Any, where: str, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(_text(value))
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{where}: its {what} is not valid JSON ({e}); the file is corrupt.") from None
    if not isinstance(parsed, dict):
        raise SourceError(f"{where}: its {what} is not a JSON object; the file is corrupt.")
    return parsed


# ---- .keras archives --------------------------------------------------------------------------


def _open_archive(path: Path, where: str) -> Source:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(
            f"{where}: not a readable .keras archive ({e}); it is truncated or corrupt."
        ) from None
    with archive:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            if unsafe_member_name(info.filename):
                raise SourceError(
                    f"{where}: member name '{info.filename}' leaves the archive; refusing the file. "
                    "Fix: re-save the model with Keras (model.save)."
                )
            if info.filename in members:
                raise SourceError(f"{where}: holds two members named '{info.filename}'; refusing the file.")
            members[info.filename] = info
        if "model.weights.h5" not in members:
            sharded = " (sharded weights are not supported)" if "model.weights.json" in members else ""
            raise SourceError(f"{where}: holds no model.weights.h5{sharded}; it is not a Keras 3 model file.")
        config = None
        if "config.json" in members:
            config = _json(
                _read_member(archive, members["config.json"], where, _CONFIG_CAP), where, "config.json"
            )
        data = _read_member(archive, members["model.weights.h5"], where, None)
    source = open_h5(io.BytesIO(data), where, len(data), _skip)
    source.in_memory = True
    try:
        meta = source.metadata
        meta.update(
            layout="keras", keras_file="keras", vars_names=dict(source.vars_names), model_config=config
        )
        layers = _config_layers(config or {}, source, "")
        if layers:
            meta["layers"] = layers
    except BaseException:
        source.close()
        raise
    return source


def _numbered_key(base: str, index: int, keys: list[str]) -> str:
    """The key of the ``index``-th layer of a class whose keys start with ``base``.

    Keras numbers a container's layers per class in model order: ``dense``, ``dense_1``, ... The
    numbers may have gaps (Keras 2.12 counted every layer with weights twice: ``dense``,
    ``dense_2``), so the layer takes the ``index``-th of the keys present, by number; where the
    file has fewer, the key Keras 3 would give.

    >>> _numbered_key("dense", 1, ["dense_2", "dense", "gru", "dense_10"])
    'dense_2'
    >>> _numbered_key("dense", 3, ["dense"])
    'dense_3'
    """
    pattern = re.compile(re.escape(base) + r"(?:_(\d+))?")
    numbered = sorted((int(m[1] or 0), key) for key in keys if (m := pattern.fullmatch(key)) is not None)
    if index < len(numbered):
        return numbered[index][1]
    return base if index == 0 else f"{base}_{index}"


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, cap: int | None) -> bytes:
    name = info.filename
    if info.file_size > ZIP_FLOOR and info.file_size > ZIP_MAX_EXPANSION * max(info.compress_size, 1):
        raise SourceError(
            f"{where}: member '{name}' declares {info.file_size} bytes from {info.compress_size} stored "
            f"(more than {ZIP_MAX_EXPANSION} times); refusing a zip bomb. Fix: re-save the model with Keras."
        )
    if cap is not None and info.file_size > cap:
        raise SourceError(
            f"{where}: member '{name}' declares {info.file_size} bytes, more than {cap} allowed."
        )
    out = bytearray()
    try:
        with archive.open(info) as stream:
            while len(out) <= info.file_size:
                block = stream.read(min(_CHUNK, info.file_size + 1 - len(out)))
                if not block:
                    break
                out += block
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise SourceError(f"{where}: member '{name}' is corrupt ({e}). Fix: re-save the model.") from None
    if len(out) != info.file_size:
        raise SourceError(
            f"{where}: member '{name}' holds {len(out)} bytes, not the {info.file_size} it declares; "
            "the file is corrupt. Fix: re-save the model."
        )
    return bytes(out)


def _config_layers(config: dict[str, Any], source: H5Source, prefix: str) -> list[dict[str, Any]]:
    """The model's layers in config order, each matched to its group in the weights file.

    A layer's group is found by its name (``layers/<key>/vars/@name``, Keras 3.4 on); files
    without that attribute fall back to Keras's own keys: the class name in snake
    case, numbered per class in the order of ``model.layers`` (see :func:`_numbered_key`).
    """
    entries = _config_entries(config)
    if not entries:
        return []
    container = prefix + "layers"
    if container not in source.groups and prefix + "_layer_checkpoint_dependencies" in source.groups:
        container = prefix + "_layer_checkpoint_dependencies"
    by_name = {name: path for path, name in source.vars_names.items() if path.rsplit("/", 1)[0] == container}
    keys = [g[len(container) + 1 :] for g in source.groups if g.rsplit("/", 1)[0] == container]
    skip_input = config.get("class_name") == "Sequential"
    counts: dict[str, int] = {}
    layers: list[dict[str, Any]] = []
    for name, cls, cfg in entries:
        if skip_input and cls == "InputLayer":
            continue
        base = snake_case(cls)
        counts[base] = counts.get(base, -1) + 1
        path = by_name.get(name) or f"{container}/{_numbered_key(base, counts[base], keys)}"
        cls, cfg, inner = unwrap_time_distributed(cls, cfg)
        path += inner
        if cls in _CONTAINERS and isinstance(cfg.get("layers"), list):
            layers += _config_layers({"class_name": cls, "config": cfg}, source, path + "/")
        else:
            layers.append({"path": path, "name": name, "class_name": cls, "config": cfg})
    return layers
