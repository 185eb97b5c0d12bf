"""Which axis of each Keras layer's output is which, followed through a model config's graph: a Dense that
reads a flattened map reads its rows in the order of the axes flattened into its input's last axis.

Roles as :data:`weightport.call_order.Axes` names them (``c`` channels, ``s0``, ``s1`` ... spatial axes in
order, ``i0``, ``i1`` ... a model input's own axes), each axis here without the batch axis, and a size
where the config records one. Convolutions start a map (channels last or first, by ``data_format``),
Permute reorders, Flatten, Reshape and TimeDistributed merge (Flatten with ``data_format='channels_first'``
moves the channels last first, as Keras's own ``call`` does); layers that keep the axes carry them on.
Where a layer's effect on its axes is not known, the reason is kept instead.

>>> g = {"in": ("InputLayer", {"batch_shape": [None, 6, 5, 3]}, [], None),
...      "conv": ("Conv2D", {"data_format": "channels_first"}, ["in"], None),
...      "flat": ("Flatten", {}, ["conv"], (None, 4, 4, 3)),
...      "fc": ("Dense", {}, ["flat"], None)}
>>> flat = flat_reads(g)["fc"]
>>> flat, flat.roles
(('flat', (4, 4, 3)), ('c', 's0', 's1'))
"""

from __future__ import annotations

import math
import re
from typing import Any

from weightport.call_order import UNKNOWN, regroup
from weightport.layouts.flattening import FlatMap

__all__ = ["Node", "axes_of", "flat_reads", "PER_FEATURE"]

Node = tuple[str, dict[str, Any], list[str], tuple[int, ...] | None]
_Axis = tuple[tuple[str, Any], ...]  # the (role, size or None) pairs merged into one axis, in turn
_Axes = tuple[_Axis, ...]

# layers that pass each feature of a flat vector through on its own: a Flatten before them still decides
# which feature is which
PER_FEATURE = frozenset(
    {
        "Dropout",
        "Activation",
        "ActivityRegularization",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "Identity",
    }
)
# layers whose output is their input's shape, its axes in the same order
_SAME_SHAPE = PER_FEATURE | {
    "InputLayer", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU", "BatchNormalization",
    "LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization", "Rescaling",
    "Normalization", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "Masking", "RandomFlip",
    "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness",
}  # fmt: skip
# layers whose output axes are their input's, in the same order, of other sizes
_RESIZE = {"Resizing", "CenterCrop", "RandomCrop"} | {
    f"{kind}{rank}D"
    for rank in (1, 2, 3)
    for kind in ("ZeroPadding", "Cropping", "UpSampling", "MaxPooling", "AveragePooling")
}
_JOINS = frozenset({"Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum", "Concatenate"})
_CONV = re.compile(r"(?:Separable|Depthwise)?Conv(\d)D(?:Transpose)?|LocallyConnected(\d)D")
_GLOBAL = re.compile(r"Global(?:Average|Max)Pooling\dD")
_MERGES = frozenset({"Flatten", "Reshape"})


def axes_of(graph: dict[str, Node]) -> dict[str, _Axes | str]:
    """Layer name -> its output's axes (batch axis left out), or why they are not known."""
    out: dict[str, _Axes | str] = {}
    for name in graph:
        _visit(name, graph, out, set())
    return out


def _visit(name: str, graph: dict[str, Node], out: dict[str, _Axes | str], seen: set[str]) -> _Axes | str:
    if name in out:
        return out[name]
    if name not in graph or name in seen:
        return f"the input '{name}', which the configuration does not wire"
    seen.add(name)
    cls, cfg, inputs, built = graph[name]
    ins = [_visit(i, graph, out, seen) for i in inputs] or [_raw(cfg, built, name)]
    out[name] = _output(cls, cfg, name, ins, built)
    return out[name]


def _raw(cfg: dict[str, Any], built: tuple[int, ...] | None, name: str) -> _Axes | str:
    """A model input's axes: its own, in the order the user feeds them."""
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape") or built
    if not isinstance(shape, (list, tuple)) or not shape:
        return f"the input of '{name}', whose shape the configuration does not record"
    return tuple(((f"i{k}", n),) for k, n in enumerate(shape[1:]))


def _output(cls: str, cfg: dict[str, Any], name: str, ins: list[_Axes | str], built: Any) -> _Axes | str:
    """The axes of layer ``name``'s output, from its inputs' ``ins``."""
    conv = _CONV.fullmatch(cls)
    if conv:
        spatial = tuple(((f"s{k}", None),) for k in range(int(conv[1] or conv[2])))
        channels: _Axes = ((("c", None),),)
        return channels + spatial if cfg.get("data_format") == "channels_first" else spatial + channels
    first = ins[0]
    if cls in _JOINS:
        known = [a for a in ins if not isinstance(a, str)]
        if len(known) < len(ins):
            return next(a for a in ins if isinstance(a, str))
        same = len({tuple(tuple(r for r, _ in axis) for axis in a) for a in known}) == 1
        return first if same else f"{cls} '{name}', which joins maps of different axis orders"
    if isinstance(first, str):
        return first
    if _GLOBAL.fullmatch(cls):
        if cfg.get("keepdims"):
            return first
        return (first[0] if cfg.get("data_format") == "channels_first" else first[-1],)
    if cls in _SAME_SHAPE:
        return _sized(first, built)
    if cls in _RESIZE:  # sizes as the next layer was built for, where it records them
        return tuple(((a[0][0], None),) if len(a) == 1 else a for a in first)
    if cls == "Permute":
        dims = cfg.get("dims")
        if isinstance(dims, list) and sorted(dims) == list(range(1, len(first) + 1)):
            return tuple(first[d - 1] for d in dims)
    elif cls in _MERGES:
        return _merged(cls, cfg, name, _sized(first, built))
    elif cls == "TimeDistributed" and isinstance(cfg.get("layer"), dict) and len(first) >= 2:
        inner = cfg["layer"]
        inner_built = (built[0], *built[2:]) if isinstance(built, tuple) and len(built) >= 2 else None
        made = _output(
            str(inner.get("class_name")), inner.get("config") or {}, name, [first[1:]], inner_built
        )
        return made if isinstance(made, str) else (first[0], *made)
    elif cls in ("Dense", "Embedding"):
        kept = first[:-1] if cls == "Dense" else first
        return (*kept, (("c", None),))
    return f"{cls} '{name}', whose effect on the order of its input's axes weightport does not follow"


def _sized(axes: _Axes, built: Any) -> _Axes:
    """``axes`` with the sizes of the input a layer was built for, where it records them."""
    shape = tuple(built[1:]) if isinstance(built, tuple) and len(built) == len(axes) + 1 else None
    if shape is None:
        return axes
    return tuple(((a[0][0], n),) if len(a) == 1 else a for a, n in zip(axes, shape))


def _merged(cls: str, cfg: dict[str, Any], name: str, axes: _Axes) -> _Axes | str:
    """The axes after a Flatten or Reshape of ``axes``."""
    if cls == "Flatten":
        if cfg.get("data_format") == "channels_first" and len(axes) > 1:
            axes = (*axes[1:], axes[0])  # Keras moves the channels last before it flattens
        return (tuple(pair for axis in axes for pair in axis),)
    target = [int(d) for d in cfg.get("target_shape") or ()]
    if len(target) == 1:
        return (tuple(pair for axis in axes for pair in axis),)
    sizes = [math.prod(n for _, n in axis) if all(n for _, n in axis) else None for axis in axes]
    if None in sizes or not target or target.count(-1) > 1:
        return f"Reshape '{name}' of axes whose sizes the configuration does not record"
    total = math.prod(int(n) for n in sizes if n)
    known = math.prod(d for d in target if d != -1)
    after = tuple(d if d != -1 else total // max(known, 1) for d in target)
    made = regroup(axes, tuple(int(n) for n in sizes if n), after)  # type: ignore[arg-type]
    if made is None or any(a[0][0] == UNKNOWN for a in made):
        return f"Reshape '{name}' to {tuple(target)}, which splits its input's axes"
    return made


def _merger(name: str, graph: dict[str, Node]) -> str:
    """The kind of layer ``name`` is where it merges axes into one (``Flatten``, ``Reshape``, or a
    ``TimeDistributed`` one), else ``""``."""
    cls, cfg, _, _ = graph[name]
    if cls == "TimeDistributed" and isinstance(cfg.get("layer"), dict):
        inner = str(cfg["layer"].get("class_name"))
        return f"TimeDistributed({inner})" if inner in _MERGES else ""
    return cls if cls in _MERGES else ""


def flat_reads(graph: dict[str, Node]) -> dict[str, FlatMap]:
    """Dense layer name (or a norm's with a vector per feature of a flat input, whose entries the flatten
    orders too) -> the Flatten (or Reshape) of several axes that feeds it through layers that keep each
    feature, with the roles flattened into its input rows, in order (:class:`FlatMap`); left out where at
    most one of them has more than one position."""
    known = axes_of(graph)
    out: dict[str, FlatMap] = {}
    for name, (cls, cfg, inputs, _) in graph.items():
        if cls not in ("Dense", "EinsumDense") and not _norm_of_features(cls, cfg):
            continue
        while len(inputs) == 1 and inputs[0] in graph and _passes_features(graph[inputs[0]]):
            inputs = graph[inputs[0]][2]
        if len(inputs) != 1 or inputs[0] not in graph or not _merger(inputs[0], graph):
            continue
        source, kind = inputs[0], _merger(inputs[0], graph)
        axes = known.get(source, "")
        built = graph[source][3]
        if isinstance(axes, str):
            if built is None or len(built) > 2 + kind.startswith("Time"):
                out[name] = FlatMap(source, None, kind=kind, lost=axes)
            continue
        pairs = axes[-1]
        roles = tuple(r for r, _ in pairs)
        sizes = tuple(n for _, n in pairs)
        if len(pairs) < 2 or (None not in sizes and sum(n != 1 for n in sizes) <= 1):
            continue
        if len(set(roles)) < len(roles) or UNKNOWN in roles:
            out[name] = FlatMap(
                source, None, kind=kind, lost=f"axes {kind} '{source}' merges, not told apart"
            )
            continue
        shape = None if None in sizes else tuple(int(n) for n in sizes)
        out[name] = FlatMap(source, shape, kind=kind, roles=roles, sizes=sizes)
    return out


# norms with a weight per feature of the last axis: after a flatten, the flatten decides which is which
_FEATURE_NORMS = frozenset({"BatchNormalization", "LayerNormalization"})


def _norm_of_features(cls: str, cfg: dict[str, Any]) -> bool:
    """Whether a layer normalizes a flat input's last axis with a vector per feature (BatchNormalization,
    LayerNormalization over ``axis=-1``, which tf.keras records as 1 for a 2-D input)."""
    if cls not in _FEATURE_NORMS:
        return False
    axis = cfg.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    return axis in (-1, 1)


def _passes_features(node: Node) -> bool:
    """Whether a layer passes each feature of a flat vector through on its own (a norm of the features
    keeps which is which, though it holds a vector over them)."""
    cls, cfg, _, _ = node
    return cls in PER_FEATURE or _norm_of_features(cls, cfg)
