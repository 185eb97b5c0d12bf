"""transformers' sharded Flax and TensorFlow checkpoints: an index and the shards it names.

``save_pretrained`` splits a big Flax or TF model into ``flax_model-00001-of-00005.msgpack`` ... with
``flax_model.msgpack.index.json``, or ``tf_model-00001-of-00005.h5`` ... with ``tf_model.h5.index.json``;
each index's ``weight_map`` names every variable's shard. A Flax shard is a msgpack tree of its share of
the params (names joined with ``/`` as in one ``flax_model.msgpack``). A TF shard holds each weight as a
dataset named without the model's scope (``bert/embeddings/word_embeddings/weight:0``, where the index says
``tf_bert_model/bert/...``); the shards are read as the one ``tf_model.h5`` they split (``bert`` is the
layer, its weights named with the scope), so transformers' names pair them as they do there. Every shard
must be a plain file name beside the index and not a link; every variable must be in the shard the index
names, and nothing else in a shard is read.

>>> import json, pathlib, tempfile, msgpack, numpy as np
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> arr = np.ones((2, 3), np.float32)
>>> ext = msgpack.ExtType(1, msgpack.packb((arr.shape, "float32", arr.tobytes()), use_bin_type=True))
>>> _ = (folder / "flax_model-00001-of-00001.msgpack").write_bytes(msgpack.packb({"dense": {"kernel": ext}}))
>>> index = {"weight_map": {"dense/kernel": "flax_model-00001-of-00001.msgpack"}}
>>> _ = (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
>>> src = open(folder / "flax_model.msgpack.index.json")
>>> src.infos["dense/kernel"].shape, src.metadata["layout"]
((2, 3), 'flax')
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from weightport.errors import SourceError
from weightport.sources.base import Source
from weightport.sources.files import LINKS_NOT_FOLLOWED
from weightport.sources.sharded import ShardedSource, placed, plain_shard_name, read_weight_map, shard_count

__all__ = ["claims", "open", "FLAX_INDEX", "TF_INDEX"]

FLAX_INDEX = ".msgpack.index.json"
TF_INDEX = ".h5.index.json"


def claims(path: Path) -> bool:
    return path.is_file() and path.name.endswith((FLAX_INDEX, TF_INDEX))


def open(path: Path) -> Source:
    """The shards ``path`` (an index) names, read as the one checkpoint they split."""
    where = f"'{path.name}'"
    flax = path.name.endswith(FLAX_INDEX)
    weight_map = read_weight_map(path, where, "transformers Flax" if flax else "transformers TF")
    shards = {name: _shard_path(path.parent, name, where) for name in dict.fromkeys(weight_map.values())}
    description = f"{where} ({shard_count(len(shards))})"
    return _flax(shards, weight_map, description) if flax else _tf(shards, weight_map, description)


def _shard_path(folder: Path, file_name: str, where: str) -> Path:
    shard = folder / plain_shard_name(file_name, where)
    if shard.is_symlink():
        raise SourceError(f"{where}: shard '{file_name}' is a symbolic link, {LINKS_NOT_FOLLOWED}.")
    if not shard.is_file():
        raise SourceError(
            f"{where}: names shard '{file_name}', which is not a file beside it. Fix: download every shard."
        )
    return shard


def _flax(shards: dict[str, Path], weight_map: dict[str, str], description: str) -> Source:
    from weightport.sources import flax

    opened = {file_name: flax.open(path) for file_name, path in shards.items()}
    owner = placed(description, {f: shard.infos for f, shard in opened.items()}, weight_map)
    arrays = {name: opened[f].read(name) for name, f in owner.items()}
    ignored = [f"{f}: {i}" for f, shard in opened.items() for i in shard.ignored]
    return flax.arrays_source(description, arrays, ignored, "flax-msgpack-sharded")


def _tf(shards: dict[str, Path], weight_map: dict[str, str], description: str) -> Source:
    from weightport.sources.keras_h5 import open_h5

    source = ShardedSource(description=description)
    weights: dict[str, list[str]] = {}  # layer -> its weights, named as one tf_model.h5 names them
    main = _main_layer(weight_map)
    for name, file_name in weight_map.items():
        layer, inner = _tf_names(name, main)
        if not layer or not inner:
            raise SourceError(
                f"{description}: lists '{name}', not a variable named '<model scope>/<layer>/...' (or one "
                "transformers stores under its full name). Fix: pass a tf_model.h5.index.json that "
                "transformers' save_pretrained wrote."
            )
        outer = f"{layer}/{name}"
        weights.setdefault(layer, []).append(outer)
        source.owner[outer], source.inner[outer] = file_name, inner
    try:
        for file_name, path in shards.items():
            source.shards[file_name] = open_h5(path, f"'{file_name}'", os.path.getsize(path))
        held = {f: shard.infos for f, shard in source.shards.items()}
        placed(description, held, {inner: source.owner[outer] for outer, inner in source.inner.items()})
        for outer, file_name in source.owner.items():
            source.infos[outer] = replace(source.shards[file_name].infos[source.inner[outer]], name=outer)
    except BaseException:
        source.close()
        raise
    layers = [
        {"path": layer, "name": layer, "class_name": None, "config": None, "weights": names}
        for layer, names in weights.items()
    ]
    source.metadata.update(layout="keras", keras_file="legacy-h5", layers=layers)
    return source


def _kept_whole(name: str) -> bool:
    """Whether transformers' sharded save stores variable ``name`` under its full name: one built outside the
    model's scope (``model.shared/model.shared/embeddings:0``) or of no layer (``final_logits_bias:0``);
    every other loses its first part, the model's scope."""
    return "model." in name or "/" not in name


def _main_layer(weight_map: Mapping[str, str]) -> str:
    """The layer most scoped variables belong to (``model``, from ``tf_bart_model/model/...``): the one a
    tf_model.h5 keeps the variables built outside the scope under."""
    layers = Counter(
        name.split("/")[1] for name in weight_map if not _kept_whole(name) and name.count("/") >= 2
    )
    return layers.most_common(1)[0][0] if layers else ""


def _tf_names(name: str, main: str) -> tuple[str, str]:
    """``(layer, dataset)`` of index name ``name``: the top-level layer a tf_model.h5 holds it under, and its
    path in the shard.

    >>> _tf_names("tf_bart_model/model/encoder/fc1/kernel:0", "model"), _tf_names("final_logits_bias:0", "model")
    (('model', 'model/encoder/fc1/kernel:0'), ('final_logits_bias', 'final_logits_bias:0'))
    >>> _tf_names("model.shared/model.shared/embeddings:0", "model")
    ('model', 'model.shared/model.shared/embeddings:0')
    """
    if "/" not in name:
        return name.rsplit(":", 1)[0], name
    if _kept_whole(name):
        return main, name
    _, _, inner = name.partition("/")
    return inner.split("/", 1)[0], inner
