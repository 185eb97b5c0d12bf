"""Keras layers that hold no PyTorch weight but change what the model computes: ``Normalization`` and
``Rescaling`` (the input stage of ``keras.applications`` models, or a step between two layers). No PyTorch
module takes them, so they are set aside and reported as ignored with their values, saying what to compute
and where: before the model only where nothing but the model's inputs feeds them, else between the
layers the configuration shows around them; never dropped silently. A weights-only file shows such a
layer by its group alone (a Rescaling, a Normalization given its statistics): it is reported as well.

>>> _values([0.5, 0.25])
'[0.5, 0.25]'
>>> g = {"in": ("InputLayer", {}, [], None), "d": ("Dense", {}, ["in"], None),
...      "r": ("Rescaling", {}, ["d"], None), "e": ("Dense", {}, ["r"], None)}
>>> where_applied("r", g, {"e": "head"})
"on the output of Keras 'd' and before Keras 'e' (module 'head') reads it, inside the model"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from weightport.layouts.keras.axes import Node
from weightport.layouts.keras.layers import PREPROCESSING, Layer
from weightport.sources.base import Source
from weightport.sources.keras import snake_case

__all__ = ["set_aside", "reported", "where_applied"]

# a Keras 3 .weights.h5 group key: the class's snake_case name, numbered per class
_KEY = re.compile(r"^(?P<base>.*?)(?:_\d+)?$")
_OF_KEY = {snake_case(c): c for c in PREPROCESSING}
_UNKNOWN = (
    "where the Keras model applies it (a weights-only file does not record where; the .keras file and "
    "model.summary() show it)"
)


def _values(value: Any) -> str:
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:8])
    return f"[{shown}{', ...' if flat.size > 8 else ''}]" if np.ndim(value) else f"{float(value):.6g}"


def _said(cls: str, name: str, cfg: dict[str, Any] | None, arrays: dict[str, np.ndarray], where: str) -> str:
    """The report's line for one such layer: its values (``cfg`` None: the file records no configuration)
    and what to compute ``where``."""
    if cls == "Rescaling":
        if cfg is None:
            return (
                f"Keras Rescaling '{name}' (its scale and offset are not in this file) has no weights and no "
                f"PyTorch module: compute x * scale + offset {where}"
            )
        scale, offset = _values(cfg.get("scale", 1.0)), _values(cfg.get("offset", 0.0))
        return (
            f"Keras Rescaling '{name}' (scale {scale}, offset {offset}) has no weights and no PyTorch module: "
            f"compute x * {scale} + {offset} {where}"
        )
    cfg = cfg or {}
    mean = cfg.get("mean") if cfg.get("mean") is not None else arrays.get("mean")
    variance = cfg.get("variance") if cfg.get("variance") is not None else arrays.get("variance")
    if mean is None or variance is None:
        stats = "its statistics are not in the file"
    else:
        stats = f"mean {_values(mean)}, variance {_values(variance)}"
    invert = " (invert=True: x * sqrt(variance) + mean)" if cfg.get("invert") else ""
    return (
        f"Keras Normalization '{name}' ({stats}) has no PyTorch module: compute (x - mean) / "
        f"sqrt(variance) {where}{invert}"
    )


def _on_the_input(name: str, graph: Mapping[str, Node], seen: frozenset[str] = frozenset()) -> bool:
    """Whether only the model's inputs feed the layer, directly or through other such layers."""
    feeds = [f for f in graph[name][2] if f not in seen]
    return all(
        f in graph
        and (
            graph[f][0] == "InputLayer"
            or (graph[f][0] in PREPROCESSING and _on_the_input(f, graph, seen | {name}))
        )
        for f in feeds
    )


def where_applied(name: str, graph: Mapping[str, Node], modules: Mapping[str, str]) -> str:
    """Where the Keras model applies the layer ``name``, as the note says it: before the model where only
    its inputs feed it, else between the layers around it (with the PyTorch modules they fill)."""
    if name not in graph:
        return _UNKNOWN
    if _on_the_input(name, graph):
        return "before the model, on its input"

    def named(names: list[str]) -> str:
        return ", ".join(
            f"Keras '{n}'" + (f" (module '{modules[n]}')" if n in modules else "") for n in names
        )

    readers = [n for n, node in graph.items() if name in node[2]]
    said = f"on the output of {named(graph[name][2])}"
    if not readers:
        return f"{said}, the model's output"
    return (
        f"{said} and before {named(readers)} {'reads' if len(readers) == 1 else 'read'} it, inside the model"
    )


def set_aside(layers: list[Layer]) -> tuple[list[Layer], list[Layer]]:
    """The layers that stay to be paired, and the preprocessing layers (which :func:`reported` reports)."""
    kept = [layer for layer in layers if layer.class_name not in PREPROCESSING]
    return kept, [layer for layer in layers if layer.class_name in PREPROCESSING]


def reported(
    aside: list[Layer], source: Source, graph: Mapping[str, Node], modules: Mapping[str, str]
) -> list[str]:
    """One report line per preprocessing layer (its tensors, if any, named first:
    ``layers/normalization/vars/0, ... (Keras Normalization ...)``), those the file shows without tensors
    included; ``modules``: Keras layer name -> the PyTorch module it filled, to say where each applies."""
    said: list[str] = []
    seen: set[str] = set()
    for layer in aside:
        seen.add(layer.name)
        roles = ("mean", "variance", "count")
        named = dict(zip(roles, [layer.own[i] for i in sorted(layer.own)] or list(layer.legacy or [])))
        arrays = {
            r: source.read(t) for r, t in named.items() if r != "count" and source.infos[t].nbytes < 1 << 20
        }
        where = where_applied(layer.name, graph, modules)
        text = _said(str(layer.class_name), layer.name, layer.config, arrays, where)
        said += (
            [f"{t} ({text})" for t in layer.tensors[:1]] + list(layer.tensors[1:])
            if layer.tensors
            else [text]
        )
    for rec in (
        source.metadata.get("layers") or []
    ):  # the ones without tensors (Rescaling, a fixed Normalization)
        name, cls = str(rec.get("name") or ""), rec.get("class_name")
        if cls in PREPROCESSING and name not in seen:
            seen.add(name)
            said.append(_said(str(cls), name, rec.get("config"), {}, where_applied(name, graph, modules)))
    said += _shown_by_groups(source, seen)
    return said


def _shown_by_groups(source: Source, seen: set[str]) -> list[str]:
    """A Keras 3 ``.weights.h5`` keeps a group for every layer, one holding no variable included: such a
    layer of a preprocessing class (a Rescaling, a Normalization given its mean and variance) is reported,
    though the file records neither its values nor where it sits."""
    said = []
    tensors = list(source.infos)
    for path, name in (source.metadata.get("vars_names") or {}).items():
        container, _, key = path.rpartition("/")
        match = _KEY.match(key)
        cls = _OF_KEY.get(match["base"]) if match and container.endswith("layers") else None
        if cls is None or name in seen or any(t.startswith(f"{path}/") for t in tensors):
            continue
        seen.add(name)
        said.append(_said(cls, name, None, {}, _UNKNOWN))
    return said
