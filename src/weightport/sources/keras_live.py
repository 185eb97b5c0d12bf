"""A live Keras model or layer (Keras 3 or tf_keras) as a source, without importing Keras.

Keras objects are recognised by the module their class comes from (``keras...``
or ``tf_keras...``). Their variables are read with ``np.asarray`` and named as
Keras 3 would file them in a ``.weights.h5`` (``layers/lstm/cell/vars/0``), so
the Keras layout treats a live model and its saved weights alike. Unlike a
weights file, a live model knows its layer order and each layer's
``get_config()`` (and the input shape it was built for), which go into ``metadata["layers"]`` as
the ``.keras`` reader puts them.

>>> class Dense:  # a stand-in: real Keras layers are claimed the same way
...     __module__ = "keras.src.layers.core.dense"
...     weights = []
>>> claims_object(Dense()), claims_object(object())
(True, False)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from weightport.sources.base import Source
from weightport.sources.keras import snake_case
from weightport.sources.mapping import MappingSource

__all__ = ["claims_object", "open_object"]

_MODULES = ("keras", "tf_keras")
# Keras's own order of a layer's variables, by variable name.
_ROLE_ORDER = (
    "kernel",
    "recurrent_kernel",
    "bias",
    "embeddings",
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
)


def claims_object(obj: object) -> bool:
    """True for Keras 3 or tf_keras layers and models, subclasses included (e.g. a user's Model)."""
    return hasattr(type(obj), "weights") and any(
        (getattr(c, "__module__", "") or "").split(".", 1)[0] in _MODULES for c in type(obj).__mro__
    )


def open_object(obj: Any) -> Source:
    """The variables of a Keras model or layer, named as in a Keras 3 ``.weights.h5``."""
    arrays: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    _add(obj, "", arrays, layers, ordered=True)
    name = getattr(obj, "name", "")
    source = MappingSource.from_mapping(arrays, description=f"the Keras {type(obj).__name__} '{name}'")
    source.metadata.update(layout="keras", keras_file="live", layers=layers)
    config = _model_config(obj)
    if config is not None:
        source.metadata["model_config"] = config
    return source


def _model_config(obj: Any) -> dict[str, Any] | None:
    """A Sequential's or Functional's config as a ``.keras`` file records it (its graph: a ZeroPadding2D
    feeding a conv), or None for other objects."""
    kind = _graph_kind(obj)
    if kind is None:
        return None
    config = _config(obj)
    if config is None:
        return None
    try:  # as a file holds it: lists, not the tuples (a keras_history) a live config may keep
        return {"class_name": kind, "config": json.loads(json.dumps(config, default=str))}
    except (TypeError, ValueError):
        return None


def _graph_kind(obj: Any) -> str | None:
    """``"Sequential"`` or ``"Functional"`` for a model whose layers form a graph (a subclassed model's do
    not: it lists them in attribute order), else None."""
    return next((c.__name__ for c in type(obj).__mro__ if c.__name__ in ("Sequential", "Functional")), None)


def _is_container(obj: Any) -> bool:
    return isinstance(getattr(obj, "layers", None), list) and not hasattr(obj, "forward_layer")


def _add(
    obj: Any, path: str, arrays: dict[str, np.ndarray], layers: list[dict[str, Any]], ordered: bool
) -> None:
    if _is_container(obj):
        # a Sequential's or Functional's layers are in the order it runs them; a subclassed model's in the
        # order its attributes were set, which records nothing about the order it calls them in
        ordered = ordered and _graph_kind(obj) is not None
        counts: dict[str, int] = {}
        for layer in obj.layers:
            base = snake_case(type(layer).__name__)
            key = base if base not in counts else f"{base}_{counts[base] + 1}"
            counts[base] = counts.get(base, -1) + 1
            _add(layer, f"{path}layers/{key}/", arrays, layers, ordered)
        return
    name = getattr(obj, "name", None)
    while type(obj).__name__ == "TimeDistributed" and getattr(obj, "layer", None) is not None:
        obj, path = obj.layer, f"{path}layer/"  # one layer applied at every step: that layer's weights
    record = {"path": path.rstrip("/"), "name": name, "class_name": type(obj).__name__}
    if not ordered:
        record["unordered"] = True
    record["config"] = _config(obj)
    shape = _input_shape(obj)
    if shape is not None:
        record["input_shape"] = shape
    layers.append(record)
    if hasattr(obj, "forward_layer") and hasattr(obj, "backward_layer"):
        for side in ("forward_layer", "backward_layer"):
            _add_vars(getattr(obj, side), f"{path}{side}/", arrays)
    else:
        _add_vars(obj, path, arrays)


def _add_vars(layer: Any, path: str, arrays: dict[str, np.ndarray]) -> None:
    cell = getattr(layer, "cell", None)
    if cell is not None and hasattr(cell, "weights"):
        layer, path = cell, f"{path}cell/"
    variables = list(layer.weights)
    names = [_short_name(v) for v in variables]
    if all(n in _ROLE_ORDER for n in names) and len(set(names)) == len(names):
        variables = [v for _, v in sorted(zip(names, variables), key=lambda p: _ROLE_ORDER.index(p[0]))]
    for i, variable in enumerate(variables):
        arrays[f"{path}vars/{i}"] = np.array(np.asarray(variable), copy=True)


def _short_name(variable: Any) -> str:
    name = str(getattr(variable, "name", ""))
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def _config(layer: Any) -> dict[str, Any] | None:
    try:
        config = layer.get_config()
    except (NotImplementedError, TypeError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _input_shape(layer: Any) -> list[int | None] | None:
    """The input shape a built Keras 3 layer was built for (batch axis first), as a ``.keras`` file's
    ``build_config`` records it; None where the layer does not say."""
    try:
        shape = (layer.get_build_config() or {}).get("input_shape")
    except (NotImplementedError, TypeError, ValueError, AttributeError):
        return None
    if isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape):
        return list(shape)
    return None
