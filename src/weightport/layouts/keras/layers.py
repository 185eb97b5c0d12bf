"""The Keras layers a source holds: their groups, each layer's parts and variables, and its kind.

A layer is found from its tensors' group paths (or the layer list the source records), split into
parts (one, or a ``Bidirectional``'s two sides), its variables named by role, and given the PyTorch
kind it fills; a layer without a recorded class gets its Keras class from its variables' shapes.

>>> wrapped_kind("TimeDistributed", {"layer": {"class_name": "Dense", "config": {}}})
'TimeDistributed(Dense)'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from weightport.errors import LayoutError
from weightport.layouts.keras.einsum import dense_reading
from weightport.layouts.keras.graph import flattened_maps, graph_of, maskings, note_padding, one_position_maps
from weightport.layouts.keras.ranks import input_ranks
from weightport.layouts.slots import LAYER_SCALE
from weightport.sources.base import Source
from weightport.sources.keras import snake_case
from weightport.sources.keras_h5 import VARS_PATH
from weightport.torch_facts import RNN_GATE_COUNT, RNN_KINDS

__all__ = [
    "KINDS",
    "CLASS_OF_KIND",
    "DEPTHWISE",
    "NEEDS_CONFIG",
    "UNPORTED",
    "Layer",
    "Part",
    "Resolved",
    "collect",
    "unique_names",
    "resolve",
    "split",
    "inner_layers",
    "recorded_order",
    "wrapped_kind",
]

# Keras class -> the PyTorch kind it fills
_RECURRENT = {"SimpleRNN": "RNN", "LSTM": "LSTM", "GRU": "GRU"}
KINDS = {
    **_RECURRENT,
    "Dense": "Linear",
    "Conv1D": "Conv1d",
    "Conv2D": "Conv2d",
    "Embedding": "Embedding",
    "BatchNormalization": "BatchNorm",
    "LayerNormalization": "LayerNorm",
    "DepthwiseConv1D": "Conv1d",  # into Conv1d(groups=in_channels)
    "DepthwiseConv2D": "Conv2d",  # into Conv2d(groups=in_channels)
    "SeparableConv1D": "Conv1d",  # split into its depthwise and pointwise halves, one Conv1d each
    "SeparableConv2D": "Conv2d",  # split into its depthwise and pointwise halves, one Conv2d each
    "Conv1DTranspose": "ConvTranspose1d",
    "Conv2DTranspose": "ConvTranspose2d",
    "GroupNormalization": "GroupNorm",
    "MultiHeadAttention": "MultiheadAttention",  # its four EinsumDense sublayers: one nn.MultiheadAttention
    "LayerScale": LAYER_SCALE,  # keras.applications ConvNeXt's x * gamma: a module's one vector (.scale)
    "EinsumDense": "Linear",  # where its equation is a Dense's (.einsum); a weights-only file lacks it
}
CLASS_OF_KIND: dict[str, str] = {}
for _cls, _kind in KINDS.items():
    CLASS_OF_KIND.setdefault(_kind, _cls)  # export files a Conv2d as Conv2D, not as a SeparableConv2D half
# Keras layers that hold no PyTorch weight but change what the model computes: set aside and reported
# (with their values) instead of being left unread or silently dropped
PREPROCESSING = ("Normalization", "Rescaling")
_CLASS_OF_KEY = {snake_case(c): c for c in [*KINDS, *PREPROCESSING, "Bidirectional"]}
# Keras's own classes with weights that no rule here ports: never taken for another class whose variables
# look alike (a PReLU's alpha for a Conv's kernel or a Dense's)
UNPORTED = {
    snake_case(c): c
    for c in (
        "PReLU",
        "Conv3D",
        "Conv3DTranspose",
        "Attention",
        "AdditiveAttention",
        "GroupQueryAttention",
        "SpectralNormalization",
        "ConvLSTM1D",
        "ConvLSTM2D",
        "ConvLSTM3D",
        "LocallyConnected1D",
        "LocallyConnected2D",
        "RMSNormalization",
    )
}
# classes read only through their configuration (an EinsumDense's equation says how its kernel reads)
NEEDS_CONFIG = ("EinsumDense",)
# classes whose variables a weights-only file cannot tell from a ported class's (a Dense's kernel, a Conv's)
_LOOKS_PORTED = (*NEEDS_CONFIG, "PReLU")
# classes whose variables have the same shapes: a layer named after one (Keras's default name) is that one
_LOOK_ALIKE = {"Conv1DTranspose": "Conv1D", "Conv2DTranspose": "Conv2D"}

# Keras's variable order per class, for files that number variables (vars/0, vars/1, ...).
_ROLES = {
    **{c: ("kernel", "recurrent_kernel", "bias") for c in _RECURRENT},
    "Dense": ("kernel", "bias"),
    "Conv1D": ("kernel", "bias"),
    "Conv2D": ("kernel", "bias"),
    "Embedding": ("embeddings",),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "LayerNormalization": ("gamma", "beta"),
    "DepthwiseConv1D": ("kernel", "bias"),
    "DepthwiseConv2D": ("kernel", "bias"),
    "SeparableConv1D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "Conv1DTranspose": ("kernel", "bias"),
    "Conv2DTranspose": ("kernel", "bias"),
    "GroupNormalization": ("gamma", "beta"),
    "Normalization": ("mean", "variance", "count"),
    "LayerScale": ("gamma",),
    "EinsumDense": ("kernel", "bias"),
}
_NORMS = ("BatchNormalization", "LayerNormalization", "GroupNormalization")
DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
# a separable conv's class -> the classes of its depthwise and pointwise halves
_SEPARABLE = {
    "SeparableConv1D": ("DepthwiseConv1D", "Conv1D"),
    "SeparableConv2D": ("DepthwiseConv2D", "Conv2D"),
}

# a MultiHeadAttention's sublayers, each a group of its own in the file (kernel, then bias)
ATTENTION_PARTS = ("query_dense", "key_dense", "value_dense", "output_dense")
_KEY = re.compile(r"^(?P<base>.*?)(?:_(?P<n>\d+))?$")
_SIDES = ("forward_layer", "backward_layer")


# ---- what the source holds ------------------------------------------------------------------------------


@dataclass
class Layer:
    """One Keras layer of the source and its tensors (by variable index, or legacy names in order)."""

    path: str
    name: str
    class_name: str | None = None
    config: dict[str, Any] | None = None
    own: dict[int, str] = field(default_factory=dict)
    cell: dict[int, str] = field(default_factory=dict)
    sides: dict[str, dict[int, str]] = field(default_factory=dict)
    subs: dict[str, dict[int, str]] = field(default_factory=dict)  # a MultiHeadAttention's sublayers
    legacy: list[str] | None = None
    seq: tuple[str, ...] = ()
    index: int = 0
    sub: int = 0  # a separable conv's halves: 0 depthwise, 1 pointwise (the order they run in)
    # a ZeroPadding1D/2D feeding this layer alone (.keras, legacy .h5): its name and (before, after) per axis
    padded_by: str = ""
    padding: tuple[tuple[int, int], ...] | None = None
    built: tuple[int, ...] | None = None  # the input's spatial size as the layer was built (after padding)
    input_rank: int | None = None  # the rank of the input the layer was built for (batch axis included)
    unordered: bool = False  # listed by a subclassed model (attribute order): no recorded order
    masked_by: str = ""  # a Masking layer upstream (its mask reaches this layer): how a note names it
    # a Dense fed by a Flatten of a channels-last map: that Flatten's name and the map's shape, where known
    flattened: tuple[str, tuple[int, ...] | None] | None = None
    one_position: bool = False  # it reads a map of one position (after a global pooling with keepdims=True)

    @property
    def tensors(self) -> list[str]:
        found = [
            *self.own.values(),
            *self.cell.values(),
            *(t for s in self.sides.values() for t in s.values()),
            *(t for s in self.subs.values() for t in s.values()),
        ]
        return found + list(self.legacy or [])


def collect(source: Source, graph: dict[str, Any] | None = None) -> tuple[list[Layer], list[str]]:
    """The source's layers in model order where known, and the tensors no layer claims; ``graph``: the
    model config's :func:`graph_of`, where the caller has it."""
    records = source.metadata.get("layers")
    parsed: dict[str, dict[str, dict[int, str]]] = {}
    leftover: list[str] = []
    for name in source.infos:
        m = VARS_PATH.match(name)
        if m is None:
            leftover.append(name)
            continue
        slot = m["side"] or ("cell" if m["cell"] else "own")
        parsed.setdefault(m["layer"] or "", {}).setdefault(slot, {})[int(m["i"])] = name
    _gather_attention(parsed)
    layers: list[Layer] = []
    if records:
        claimed: set[str] = set()
        graph = graph_of(source.metadata.get("model_config")) if graph is None else graph
        masks = maskings(graph)
        flats = flattened_maps(graph)
        pooled = one_position_maps(graph)
        ranks = input_ranks(graph)  # what the graph's recorded shapes show, where no layer's own build does
        for position, rec in enumerate(records):
            path = str(rec.get("path", ""))
            layer = Layer(path, str(rec.get("name") or path), rec.get("class_name"), rec.get("config"))
            # a subclassed model lists its layers in attribute order, which records no call order
            layer.unordered = bool(rec.get("unordered"))
            layer.seq, layer.index = ((path,), 0) if layer.unordered else (("model",), position)
            note_padding(layer, graph)
            layer.masked_by = masks.get(layer.name, "")
            layer.flattened = flats.get(layer.name)
            layer.one_position = layer.name in pooled
            if layer.input_rank is None and isinstance(rec.get("input_shape"), list):  # a live model's
                layer.input_rank = len(rec["input_shape"])
            layer.input_rank = layer.input_rank or ranks.get(layer.name)
            if rec.get("weights") is not None:
                layer.legacy = list(rec["weights"])
                _legacy_attention(layer)
                _legacy_normalization(layer)
            else:
                _fill(layer, parsed.get(path, {}))
            if layer.tensors:
                claimed.update(layer.tensors)
                layers.append(layer)
        leftover = [n for n in source.infos if n not in claimed]
        return layers, leftover
    names = source.metadata.get("vars_names") or {}
    for path, slots in parsed.items():
        layer = Layer(path, str(names.get(path) or path or "(root)"))
        container, _, key = path.rpartition("/")
        if container.rsplit("/", 1)[-1] in ("layers", "_layer_checkpoint_dependencies"):
            m = _KEY.match(key)
            assert m is not None
            layer.class_name = _class_of_key(m["base"])
            layer.seq, layer.index = (container, m["base"]), int(m["n"] or 0)
        else:
            layer.seq = (path,)
        _fill(layer, slots)
        layers.append(layer)
    return layers, leftover


def _class_of_key(base: str) -> str | None:
    """The Keras class whose default name (and Keras 3 ``.weights.h5`` key) is ``base``, where it is one this
    layout knows: ported, preprocessing, or without a rule."""
    return _CLASS_OF_KEY.get(base) or UNPORTED.get(base)


def _gather_attention(parsed: dict[str, dict[str, dict[int, str]]]) -> None:
    """A group whose four subgroups are a MultiHeadAttention's sublayers (``query_dense`` ...
    ``output_dense``) becomes one layer holding them."""
    parents = {p.rpartition("/")[0] for p in parsed if p.rpartition("/")[2] in ATTENTION_PARTS}
    for parent in parents:
        paths = [f"{parent}/{sub}" for sub in ATTENTION_PARTS]
        if all(p in parsed and set(parsed[p]) == {"own"} for p in paths):
            entry = parsed.setdefault(parent, {})
            for sub, p in zip(ATTENTION_PARTS, paths):
                entry[sub] = parsed.pop(p)["own"]


# tf.keras names a MultiHeadAttention's sublayers in a legacy .h5 (``.../query/kernel:0``)
_LEGACY_ATTENTION = {
    "query": "query_dense",
    "key": "key_dense",
    "value": "value_dense",
    "attention_output": "output_dense",
}


def _legacy_attention(layer: Layer) -> None:
    """A legacy layer whose weights are exactly a MultiHeadAttention's four sublayers (kernel, bias each;
    tf.keras's own names) holds them as a ``.keras`` file's attention does."""
    if layer.class_name not in (None, "MultiHeadAttention"):
        return
    subs: dict[str, dict[int, str]] = {}
    for name in layer.legacy or []:
        parts = name.split(":", 1)[0].split("/")
        if len(parts) < 2 or parts[-2] not in _LEGACY_ATTENTION or parts[-1] not in ("kernel", "bias"):
            return
        subs.setdefault(_LEGACY_ATTENTION[parts[-2]], {})[0 if parts[-1] == "kernel" else 1] = name
    if set(subs) == set(ATTENTION_PARTS):
        layer.subs, layer.legacy = subs, None


def _legacy_normalization(layer: Layer) -> None:
    """A legacy layer of no recorded class holding Keras's ``mean``, ``variance`` and ``count`` is a
    ``Normalization`` (set aside and reported with its values, as from a file that records the class)."""
    if layer.class_name is None and _legacy_roles(layer.legacy or []).keys() == {"mean", "variance", "count"}:
        layer.class_name = "Normalization"


def _fill(layer: Layer, slots: dict[str, dict[int, str]]) -> None:
    layer.subs = {s: slots[s] for s in ATTENTION_PARTS if s in slots}
    layer.own = slots.get("own", {})
    layer.cell = slots.get("cell", {})
    layer.sides = {s: slots[s] for s in _SIDES if s in slots}


def unique_names(layers: list[Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        seen[layer.name] = seen.get(layer.name, 0) + 1
    for layer in layers:
        if seen[layer.name] > 1:
            layer.name = layer.path


def inner_layers(layer: Layer) -> list[str]:
    """The distinct sub-layer paths inside a legacy layer's weight names (``bert/embeddings/...``)."""
    inner = [name[len(layer.path) + 1 :].rpartition("/")[0] for name in layer.legacy or []]
    return list(dict.fromkeys(i for i in inner if i))


def recorded_order(layer: Layer) -> tuple[tuple[str, ...], tuple[int, int]] | None:
    """Where the source records the layer's place: the model's layer list (a ``.keras`` config, a
    legacy ``.h5``'s ``layer_names``, a live model), or a ``.weights.h5`` key's number, which counts
    layers of one class in one container; a subclassed model's attribute names record none."""
    if layer.seq == ("model",) or len(layer.seq) == 2:
        return layer.seq, (layer.index, layer.sub)
    return None


# ---- what each layer is -----------------------------------------------------------------------------------


@dataclass
class Part:
    """One direction of one layer: the Keras class, its variables by role, its config."""

    cls: str
    vars: dict[str, str]
    config: dict[str, Any] | None
    reverse: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each variable's shape, by role


@dataclass
class Resolved:
    layer: Layer
    kind: str
    detail: str
    parts: list[Part]


def _ordered(tensors: dict[int, str]) -> list[str]:
    return [tensors[i] for i in sorted(tensors)]


def _inner(config: dict[str, Any] | None, key: str) -> tuple[str | None, dict[str, Any] | None]:
    entry = (config or {}).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
        return entry.get("class_name"), entry["config"]
    return None, None


def wrapped_kind(class_name: str | None, config: dict[str, Any] | None) -> str | None:
    """``Bidirectional(LSTM)``, ``TimeDistributed(Dense)``: a wrapper named with the layer it wraps.

    >>> wrapped_kind("Bidirectional", {"layer": {"class_name": "LSTM", "config": {}}})
    'Bidirectional(LSTM)'
    """
    inner, _ = _inner(config, "layer")
    return f"{class_name}({inner})" if class_name and inner else class_name


def resolve(layer: Layer, source: Source, slot_kinds: set[str], mapped: bool, where: str) -> Resolved | None:
    """The layer's kind and its variables by role; None for layers this layout has no rule for.

    A layer of a class this layout does not know (``MultiHeadAttention``, a custom class) is
    left alone unless ``mapping=`` pairs it; one without a recorded class is judged by its shapes.
    """
    shapes = {n: source.infos[n].shape for n in layer.tensors}
    if layer.class_name == "MultiHeadAttention" and not layer.subs and len(layer.own) in (4, 8):
        # a live layer lists its weights flat, as Keras builds them: query, key, value, output (kernel, bias)
        step = len(layer.own) // 4
        flat = _ordered(layer.own)
        layer.subs = {
            sub: dict(enumerate(flat[i * step : (i + 1) * step])) for i, sub in enumerate(ATTENTION_PARTS)
        }
        layer.own = {}
    if layer.subs or layer.class_name == "MultiHeadAttention":
        if not layer.subs or layer.class_name not in (None, "MultiHeadAttention"):
            return None  # a legacy file's attention: its weights are named, not grouped by sublayer
        roles = {
            f"{sub.split('_')[0]}_{var}": t
            for sub, tensors in layer.subs.items()
            for var, t in zip(("kernel", "bias"), _ordered(tensors))
        }
        part = Part(
            "MultiHeadAttention", roles, layer.config, False, {r: tuple(shapes[t]) for r, t in roles.items()}
        )
        return Resolved(layer, "MultiheadAttention", "MultiHeadAttention", [part])
    if layer.legacy is not None:
        groups = _legacy_groups(layer)
    elif layer.sides:
        groups = [_ordered(layer.sides[s]) for s in _SIDES if s in layer.sides]
    else:
        groups = [_ordered(layer.cell or layer.own)]
    bidirectional = layer.class_name == "Bidirectional" or len(groups) == 2
    if bidirectional:
        fwd_cls, fwd_cfg = _inner(layer.config, "layer")
        bwd_cls, bwd_cfg = _inner(layer.config, "backward_layer")
        if fwd_cfg is not None and bwd_cfg is None:
            bwd_cls, bwd_cfg = fwd_cls, {**fwd_cfg, "go_backwards": not fwd_cfg.get("go_backwards", False)}
        configs = [(fwd_cls, fwd_cfg), (bwd_cls, bwd_cfg)]
    else:
        configs = [(layer.class_name, layer.config)]
    if len(groups) != len(configs):
        return None
    parts: list[Part] = []
    for (cls, cfg), tensors in zip(configs, groups):
        if cls in NEEDS_CONFIG:
            cfg = dense_reading(cfg) if cfg is not None else None
            if cfg is None:
                return None  # no equation (a weights-only file), or one no nn.Linear computes
        if cls not in KINDS:
            guessable = cls is None or (mapped and cls not in UNPORTED.values())
            cls = _guess(tensors, shapes, layer, slot_kinds, where) if guessable else None
        if cls is None:
            return None
        roles = (
            _legacy_roles(tensors)
            if layer.legacy is not None
            else _index_roles(cls, tensors, cfg, layer, where)
        )
        if cls in DEPTHWISE and "depthwise_kernel" in roles:  # tf.keras's name for it
            roles["kernel"] = roles.pop("depthwise_kernel")
        parts.append(Part(cls, roles, cfg, len(parts) == 1, {r: tuple(shapes[t]) for r, t in roles.items()}))
    kind = KINDS[parts[0].cls]
    if bidirectional and (kind not in RNN_KINDS or parts[1].cls != parts[0].cls):
        return None
    detail = f"Bidirectional({parts[0].cls})" if bidirectional else parts[0].cls
    return Resolved(layer, kind, detail, parts)


def split(found: Resolved) -> list[Resolved]:
    """A ``SeparableConv1D``/``SeparableConv2D`` as its two halves, each filling one conv and paired on its own.

    The depthwise half (``name/depthwise``: strides, padding, dilation, ``depth_multiplier``, no bias)
    runs first, then the pointwise 1x1 half (``name/pointwise``: ``filters``, ``use_bias``,
    ``activation``), as Keras computes it; any other layer is returned as it is.
    """
    part = found.parts[0]
    if part.cls not in _SEPARABLE:
        return [found]
    depthwise_cls, pointwise_cls = _SEPARABLE[part.cls]
    cfg = part.config
    depthwise: dict[str, Any] | None = None
    pointwise: dict[str, Any] | None = None
    if cfg is not None:
        depthwise = {k: cfg[k] for k in ("strides", "padding", "dilation_rate", "data_format") if k in cfg}
        depthwise |= {
            "depth_multiplier": cfg.get("depth_multiplier", 1),
            "use_bias": False,
            "activation": None,
        }
        pointwise = {
            "filters": cfg.get("filters"),
            "strides": 1,
            "padding": "valid",
            "dilation_rate": 1,
            "use_bias": cfg.get("use_bias", True),
            "activation": cfg.get("activation"),
        }
    halves = [
        ("depthwise", depthwise_cls, {"kernel": "depthwise_kernel"}, depthwise),
        ("pointwise", pointwise_cls, {"kernel": "pointwise_kernel", "bias": "bias"}, pointwise),
    ]
    out = []
    for sub, (what, cls, roles, half_cfg) in enumerate(halves):
        layer = replace(
            found.layer, name=f"{found.layer.name}/{what}", path=f"{found.layer.path}/{what}", sub=sub
        )
        if sub:
            layer.padded_by, layer.padding, layer.built = "", None, None  # the 1x1 half reads no padding
        variables = {role: part.vars[var] for role, var in roles.items() if var in part.vars}
        out.append(Resolved(layer, found.kind, f"{part.cls} ({what} half)", [Part(cls, variables, half_cfg)]))
    return out


def _legacy_groups(layer: Layer) -> list[list[str]]:
    """A legacy layer's weights, split into forward and backward for a Bidirectional.

    Weight names start with what all of them share (the layer's name: ``bi/``; Keras 3 puts a
    Sequential model's name first: ``sequential/bi/``); the next component names the side
    (``forward_lstm``, ``backward_lstm``).
    """
    weights = layer.legacy or []
    subs = [w[len(layer.path) + 1 :].split("/") for w in weights]
    shared = 0
    while subs and all(len(s) > shared + 1 for s in subs) and len({s[shared] for s in subs}) == 1:
        shared += 1
    sides = list(dict.fromkeys(s[shared] for s in subs if len(s) > shared + 1))
    if (
        len(sides) == 2
        and all(len(s) > shared + 1 for s in subs)
        and (
            layer.class_name == "Bidirectional"
            or (layer.class_name is None and sides[0].startswith("forward_"))
        )
    ):
        return [[w for w, s in zip(weights, subs) if s[shared] == side] for side in sides]
    return [weights]


def _legacy_roles(tensors: list[str]) -> dict[str, str]:
    return {t.rsplit("/", 1)[-1].split(":", 1)[0]: t for t in tensors}


def _index_roles(
    cls: str, tensors: list[str], cfg: dict[str, Any] | None, layer: Layer, where: str
) -> dict[str, str]:
    roles = list(_ROLES[cls])
    if cls in _NORMS:
        scale, center = True, True
        if cfg is not None:
            scale, center = bool(cfg.get("scale", True)), bool(cfg.get("center", True))
        elif len(tensors) == len(roles) - 2:
            scale = center = False
        elif len(tensors) == len(roles) - 1:
            left = [r for r in roles if r not in ("gamma", "beta")]
            raise LayoutError(
                f"{where}: Keras {cls} '{layer.name}' holds {len(tensors)} variables where the whole layer has "
                f"{len(roles)} ({', '.join(roles)}), and the file does not record which of gamma (scale=False) "
                f"and beta (center=False) was left out: either reading loads (gamma, {', '.join(left)} with the "
                f"bias 0; or beta, {', '.join(left)} with the weight 1) and computes something else. Fix: load "
                "the .keras file or the live model, which record scale and center, or read the arrays with "
                "weightport.open_source and pass them as a dict under the module's names."
            )
        roles = [r for r in roles if (r != "gamma" or scale) and (r != "beta" or center)]
    if len(tensors) > len(roles):
        return {}
    return dict(zip(roles, tensors))


def _guess(
    tensors: list[str], shapes: dict[str, tuple[int, ...]], layer: Layer, slot_kinds: set[str], where: str
) -> str | None:
    """The Keras class a layer without a recorded class must be, from its variables' shapes (and its name,
    where it is Keras's default name for a class whose variables look like a ported one's: an EinsumDense
    or a PReLU is never guessed; a name such as 'attention' is a user's as often, and decides nothing)."""
    m = _KEY.match(layer.name.rsplit("/", 1)[-1])
    named = _class_of_key(m["base"]) if m else None
    if named in _LOOKS_PORTED:
        return None
    dims = [shapes[t] for t in tensors]
    names = [t.rsplit("/", 1)[-1].split(":", 1)[0] for t in tensors] if layer.legacy is not None else []
    candidates: list[str] = []
    recurrent = bool(layer.cell or layer.sides) and len(dims) in (2, 3) and len(dims[1]) == 2
    if ("recurrent_kernel" in names or recurrent) and len(dims) > 1 and len(dims[1]) == 2:
        rows, cols = dims[1]
        gates = cols // rows if rows and cols % rows == 0 else 0
        candidates = [c for c, k in _RECURRENT.items() if RNN_GATE_COUNT[k] == gates]
    elif "depthwise_kernel" in names and len(dims[0]) in (3, 4):  # tf.keras's name for a depthwise kernel
        rank = "1D" if len(dims[0]) == 3 else "2D"
        candidates = [f"SeparableConv{rank}" if "pointwise_kernel" in names else f"DepthwiseConv{rank}"]
    elif "embeddings" in names:
        candidates = ["Embedding"]
    elif "moving_mean" in names:
        candidates = ["BatchNormalization"]
    elif "gamma" in names or "beta" in names:
        # a LayerNormalization's and a GroupNormalization's variables are alike, and a gamma alone may also
        # be a LayerScale's: the module's kinds tell
        candidates = [
            "LayerNormalization",
            "GroupNormalization",
            *(["LayerScale"] if names == ["gamma"] else []),
        ]
    elif dims and len(dims[0]) in (3, 4) and len(dims) <= 2:
        candidates = ["Conv1D" if len(dims[0]) == 3 else "Conv2D"]
    elif dims and len(dims[0]) == 2 and len(dims) == 2 and dims[1] == (dims[0][1],):
        candidates = ["Dense"]
    elif len(dims) == 1 and len(dims[0]) == 2:
        candidates = ["Dense", "Embedding"]
    elif all(len(d) == 1 for d in dims) and len({d for d in dims}) == 1:
        candidates = {4: ["BatchNormalization"], 2: ["LayerNormalization", "BatchNormalization"]}.get(
            len(dims), []
        )
    if named in _LOOK_ALIKE and _LOOK_ALIKE[named] in candidates:
        return named
    if len(candidates) > 1:
        fitting = [c for c in candidates if KINDS[c] in slot_kinds]
        if len(fitting) > 1:
            shown = ", ".join(f"{n} {s}" for n, s in zip(tensors, dims))
            raise LayoutError(
                f"{where}: Keras layer '{layer.name}' ({shown}) fits more than one Keras class "
                f"({', '.join(fitting)}), and the module has layers of each kind "
                f"({', '.join(KINDS[c] for c in fitting)}). Fix: pass mapping={{'{layer.name}': 'module.path'}} "
                "to say which module it fills, or load the .keras file or a full-model .h5 (model.save), which record "
                "each layer's class."
            )
        candidates = fitting or candidates
    return candidates[0] if candidates else None
