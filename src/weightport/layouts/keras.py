"""The Keras layout: Keras 3 / Keras 2 weights into the equivalent PyTorch layers.

What maps, and how (each a rule over :mod:`weightport.transforms`):

- ``SimpleRNN`` -> ``nn.RNN`` (tanh or relu), ``LSTM`` -> ``nn.LSTM``:
  ``weight_ih = kernel.T``, ``weight_hh = recurrent_kernel.T``,
  ``bias_ih = bias``, ``bias_hh = 0`` (LSTM gates i,f,c,o are PyTorch's i,f,g,o).
- ``GRU`` (``reset_after=True``) -> ``nn.GRU``: gate blocks z,r,h become r,z,n,
  kernels transposed, ``bias (2, 3H)`` split into ``bias_ih = bias[0]`` and
  ``bias_hh = bias[1]``.
- ``Bidirectional``: ``forward_layer`` -> ``_l{k}``, ``backward_layer`` ->
  ``_l{k}_reverse``; stacked recurrent layers fill one multi-layer module.
- ``Dense`` -> ``nn.Linear`` (``weight = kernel.T``), ``Conv1D``/``Conv2D`` ->
  ``nn.Conv1d``/``nn.Conv2d`` (``transpose(2,1,0)`` / ``transpose(3,2,0,1)``),
  ``Embedding`` as is, ``BatchNormalization`` gamma/beta/moving_mean/
  moving_variance -> weight/bias/running_mean/running_var (``num_batches_tracked``
  is set to 0: Keras counts no batches), ``LayerNormalization`` gamma/beta.

Layers pair with the module's only where the pairing is proven
(:func:`~weightport.layouts.pairing.pair_layers`): by name, by a unique kind and shape, or by
the order the source records matched with the model's call order. ``mapping={keras layer:
"module.path[layer]"}`` pairs by hand, naming a Keras layer by its name or its group path.
Where the source records no class (a subclassed model's weights), the kind follows from the
variables' shapes (three with a square-ish recurrent kernel: recurrent, 4H/3H/H columns for
LSTM/GRU/SimpleRNN; a 2-D kernel and a bias: Dense; 3-D/4-D kernels: Conv; four vectors:
BatchNormalization); shapes that fit two kinds (a lone 2-D array: Dense without bias or
Embedding) are settled by the kinds the module has, else refused with the candidates. Layers of
other classes (attention, custom layers) are left unread (``unmatched``) unless ``mapping=``
pairs them.

Order. ``.keras`` files, legacy ``.h5`` files and live models record the model order. A bare
Keras 3 ``.weights.h5`` records less: it files each layer under its class name numbered per
class in model order (``dense``, ``dense_1``, ..., ``dense_10``; HDF5 lists groups
alphabetically), so positions compare only within one class and container. Layers filed under
attribute names (subclassed models) record none: they pair by name or by a unique fit.

Refused (:class:`~weightport.errors.UnsupportedConfigError`): GRU ``reset_after=False``,
``recurrent_activation`` other than sigmoid, LSTM/GRU ``activation`` other than
tanh, SimpleRNN ``activation`` other than tanh/relu, LayerNormalization
``rms_scaling``, BatchNormalization ``scale=False`` with ``center=True``, a ``Bidirectional``
around a layer with ``go_backwards=True`` (its halves come out swapped).
Settings that act on the input, the state or the output rather than inside the module load, with
a note in the pairing's "how" saying what ``forward`` must do: ``go_backwards`` (flip the input),
``stateful`` (pass the state on), a Dense/Conv ``activation`` (apply it), Conv ``padding='causal'``
and ``'same'`` with stride > 1 (pad the input; the module must have ``padding=0``), Embedding
``mask_zero`` (pack the sequences). Training-only settings (dropout, initializers, ``unit_forget_bias``,
momentum) and ``unroll``, ``return_sequences``, ``return_state``, ``data_format`` load as they are.
Settings checked where the source carries a configuration (``.keras``, a full
legacy ``.h5``, a live model): activation vs ``nonlinearity``, ``use_bias`` vs
``bias=``, ``units`` vs ``hidden_size``, ``epsilon`` vs ``eps`` (Keras's default
1e-3 is not PyTorch's 1e-5), conv strides, dilation, groups and padding; a
mismatch is a :class:`~weightport.errors.LoadError` saying how to build the module.
Without a configuration they are listed in ``LayoutPlan.unchecked``.

:func:`export` is the reverse (arrays keyed as in a Keras 3 ``.weights.h5``; a
SimpleRNN/LSTM bias is ``bias_ih + bias_hh``, which computes the same outputs),
and :func:`save_weights_h5` writes them for Keras's ``model.load_weights``.

>>> import torch
>>> sorted((k, v.shape) for k, v in export(torch.nn.Sequential(torch.nn.GRU(2, 3), torch.nn.Linear(3, 1))).items())
[('layers/dense/vars/0', (3, 1)), ('layers/dense/vars/1', (1,)), ('layers/gru/cell/vars/0', (2, 9)), ('layers/gru/cell/vars/1', (3, 9)), ('layers/gru/cell/vars/2', (2, 9))]
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn

from weightport.errors import LayoutError, LoadError, Problem, UnsupportedConfigError
from weightport.layouts.base import LayoutPlan, Pairing, Rule
from weightport.layouts.pairing import (
    Slot,
    SourceLayer,
    fits_by_rules,
    module_slots,
    pair_layers,
    wrapped_scope,
)
from weightport.sources.base import Source
from weightport.sources.keras import snake_case
from weightport.transforms import Chain, Identity, Op, ReorderBlocks, Select, Stack, Sum, Transpose, Zeros

__all__ = ["NAME", "claims", "plan", "export", "save_weights_h5"]

NAME = "keras"

_T = Transpose((1, 0))
_GRU_KERNEL = Chain(ReorderBlocks(1, (1, 0, 2)), _T)  # Keras z,r,h (columns) -> PyTorch r,z,n (rows)
_GRU_BIAS = ReorderBlocks(0, (1, 0, 2))
_RECURRENT = {"SimpleRNN": "RNN", "LSTM": "LSTM", "GRU": "GRU"}
_KINDS = {
    **_RECURRENT,
    "Dense": "Linear",
    "Conv1D": "Conv1d",
    "Conv2D": "Conv2d",
    "Embedding": "Embedding",
    "BatchNormalization": "BatchNorm",
    "LayerNormalization": "LayerNorm",
}
_CLASS_OF_KIND = {kind: cls for cls, kind in _KINDS.items()}
_CLASS_OF_KEY = {snake_case(c): c for c in [*_KINDS, "Bidirectional"]}
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}

# Keras's variable order per class, for files that number variables (vars/0, vars/1, ...).
_ROLES = {
    **{c: ("kernel", "recurrent_kernel", "bias") for c in _RECURRENT},
    "Dense": ("kernel", "bias"),
    "Conv1D": ("kernel", "bias"),
    "Conv2D": ("kernel", "bias"),
    "Embedding": ("embeddings",),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "LayerNormalization": ("gamma", "beta"),
}

# kind -> (PyTorch parameter, Keras variable, op). Recurrent biases are handled in _recurrent_rules.
_RULES: dict[str, list[tuple[str, str, Op]]] = {
    "RNN": [
        ("weight_ih", "kernel", _T),
        ("weight_hh", "recurrent_kernel", _T),
        ("bias_ih", "bias", Identity()),
    ],
    "GRU": [
        ("weight_ih", "kernel", _GRU_KERNEL),
        ("weight_hh", "recurrent_kernel", _GRU_KERNEL),
        ("bias_ih", "bias", Chain(Select(0, 2), _GRU_BIAS)),
        ("bias_hh", "bias", Chain(Select(1, 2), _GRU_BIAS)),
    ],
    "Linear": [("weight", "kernel", _T), ("bias", "bias", Identity())],
    "Conv1d": [("weight", "kernel", Transpose((2, 1, 0))), ("bias", "bias", Identity())],
    "Conv2d": [("weight", "kernel", Transpose((3, 2, 0, 1))), ("bias", "bias", Identity())],
    "Embedding": [("weight", "embeddings", Identity())],
    "BatchNorm": [
        ("weight", "gamma", Identity()),
        ("bias", "beta", Identity()),
        ("running_mean", "moving_mean", Identity()),
        ("running_var", "moving_variance", Identity()),
    ],
    "LayerNorm": [("weight", "gamma", Identity()), ("bias", "beta", Identity())],
}
_RULES["LSTM"] = _RULES["RNN"]

# kind -> (Keras variable, PyTorch parameters, op): the reverse, for export.
_EXPORT: dict[str, list[tuple[str, tuple[str, ...], Op]]] = {
    "RNN": [
        ("kernel", ("weight_ih",), _T),
        ("recurrent_kernel", ("weight_hh",), _T),
        ("bias", ("bias_ih", "bias_hh"), Sum(2)),
    ],
    "GRU": [
        ("kernel", ("weight_ih",), _GRU_KERNEL.inverse()),
        ("recurrent_kernel", ("weight_hh",), _GRU_KERNEL.inverse()),
        ("bias", ("bias_ih", "bias_hh"), Chain(Stack(2), ReorderBlocks(1, (1, 0, 2)))),
    ],
    **{
        k: [(var, (p,), op.inverse()) for p, var, op in _RULES[k]]
        for k in _RULES
        if k not in ("RNN", "LSTM", "GRU")
    },
}
_EXPORT["LSTM"] = _EXPORT["RNN"]

# layers/<key>[/forward_layer|/backward_layer][/cell]/vars/<i>; the layer path may be empty (a lone layer)
_VARS = re.compile(
    r"^(?:(?P<layer>.*?)/)??(?:(?P<side>forward_layer|backward_layer)/)?(?:(?P<cell>cell)/)?vars/(?P<i>\d+)$"
)
_KEY = re.compile(r"^(?P<base>.*?)(?:_(?P<n>\d+))?$")
_SIDES = ("forward_layer", "backward_layer")


def claims(source: Source) -> bool:
    return source.metadata.get("layout") == NAME


# ---- what the source holds ------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One Keras layer of the source and its tensors (by variable index, or legacy names in order)."""

    path: str
    name: str
    class_name: str | None = None
    config: dict[str, Any] | None = None
    own: dict[int, str] = field(default_factory=dict)
    cell: dict[int, str] = field(default_factory=dict)
    sides: dict[str, dict[int, str]] = field(default_factory=dict)
    legacy: list[str] | None = None
    seq: tuple[str, ...] = ()
    index: int = 0

    @property
    def tensors(self) -> list[str]:
        found = [
            *self.own.values(),
            *self.cell.values(),
            *(t for s in self.sides.values() for t in s.values()),
        ]
        return found + list(self.legacy or [])


def _collect(source: Source) -> tuple[list[_Layer], list[str]]:
    """The source's layers in model order where known, and the tensors no layer claims."""
    records = source.metadata.get("layers")
    parsed: dict[str, dict[str, dict[int, str]]] = {}
    leftover: list[str] = []
    for name in source.infos:
        m = _VARS.match(name)
        if m is None:
            leftover.append(name)
            continue
        slot = m["side"] or ("cell" if m["cell"] else "own")
        parsed.setdefault(m["layer"] or "", {}).setdefault(slot, {})[int(m["i"])] = name
    layers: list[_Layer] = []
    if records:
        claimed: set[str] = set()
        for position, rec in enumerate(records):
            path = str(rec.get("path", ""))
            layer = _Layer(path, str(rec.get("name") or path), rec.get("class_name"), rec.get("config"))
            layer.seq, layer.index = ("model",), position
            if rec.get("weights") is not None:
                layer.legacy = list(rec["weights"])
            else:
                _fill(layer, parsed.get(path, {}))
            if layer.tensors:
                claimed.update(layer.tensors)
                layers.append(layer)
        leftover = [n for n in source.infos if n not in claimed]
        return layers, leftover
    names = source.metadata.get("vars_names") or {}
    for path, slots in parsed.items():
        layer = _Layer(path, str(names.get(path) or path or "(root)"))
        container, _, key = path.rpartition("/")
        if container.rsplit("/", 1)[-1] in ("layers", "_layer_checkpoint_dependencies"):
            m = _KEY.match(key)
            assert m is not None
            layer.class_name = _CLASS_OF_KEY.get(m["base"])
            layer.seq, layer.index = (container, m["base"]), int(m["n"] or 0)
        else:
            layer.seq = (path,)
        _fill(layer, slots)
        layers.append(layer)
    return layers, leftover


def _fill(layer: _Layer, slots: dict[str, dict[int, str]]) -> None:
    layer.own = slots.get("own", {})
    layer.cell = slots.get("cell", {})
    layer.sides = {s: slots[s] for s in _SIDES if s in slots}


def _unique_names(layers: list[_Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        seen[layer.name] = seen.get(layer.name, 0) + 1
    for layer in layers:
        if seen[layer.name] > 1:
            layer.name = layer.path


# ---- what each layer is -----------------------------------------------------------------------------------


@dataclass
class _Part:
    """One direction of one layer: the Keras class, its variables by role, its config."""

    cls: str
    vars: dict[str, str]
    config: dict[str, Any] | None
    reverse: bool = False


@dataclass
class _Resolved:
    layer: _Layer
    kind: str
    detail: str
    parts: list[_Part]


def _ordered(tensors: dict[int, str]) -> list[str]:
    return [tensors[i] for i in sorted(tensors)]


def _inner(config: dict[str, Any] | None, key: str) -> tuple[str | None, dict[str, Any] | None]:
    entry = (config or {}).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
        return entry.get("class_name"), entry["config"]
    return None, None


def _resolve(
    layer: _Layer, source: Source, slot_kinds: set[str], mapped: bool, where: str
) -> _Resolved | None:
    """The layer's kind and its variables by role; None for layers this layout has no rule for.

    A layer of a class this layout does not know (``MultiHeadAttention``, a custom class) is
    left alone unless ``mapping=`` pairs it; one without a recorded class is judged by its shapes.
    """
    shapes = {n: source.infos[n].shape for n in layer.tensors}
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
    parts: list[_Part] = []
    for (cls, cfg), tensors in zip(configs, groups):
        if cls not in _KINDS:
            cls = _guess(tensors, shapes, layer, slot_kinds, where) if cls is None or mapped else None
        if cls is None:
            return None
        roles = (
            _legacy_roles(tensors)
            if layer.legacy is not None
            else _index_roles(cls, tensors, cfg, layer, where)
        )
        parts.append(_Part(cls, roles, cfg, reverse=len(parts) == 1))
    kind = _KINDS[parts[0].cls]
    if bidirectional and (kind not in _GATES or parts[1].cls != parts[0].cls):
        return None
    detail = f"Bidirectional({parts[0].cls})" if bidirectional else parts[0].cls
    return _Resolved(layer, kind, detail, parts)


def _legacy_groups(layer: _Layer) -> list[list[str]]:
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
    cls: str, tensors: list[str], cfg: dict[str, Any] | None, layer: _Layer, where: str
) -> dict[str, str]:
    roles = list(_ROLES[cls])
    if cls in ("BatchNormalization", "LayerNormalization"):
        scale, center = True, True
        if cfg is not None:
            scale, center = bool(cfg.get("scale", True)), bool(cfg.get("center", True))
        elif len(tensors) == len(roles) - 2:
            scale = center = False
        elif len(tensors) == len(roles) - 1:
            center = False  # scale=False with center=True has no PyTorch form; reported as unchecked
        roles = [r for r in roles if (r != "gamma" or scale) and (r != "beta" or center)]
    if len(tensors) > len(roles):
        return {}
    return dict(zip(roles, tensors))


def _guess(
    tensors: list[str], shapes: dict[str, tuple[int, ...]], layer: _Layer, slot_kinds: set[str], where: str
) -> str | None:
    """The Keras class a layer without a recorded class must be, from its variables' shapes."""
    dims = [shapes[t] for t in tensors]
    names = [t.rsplit("/", 1)[-1].split(":", 1)[0] for t in tensors] if layer.legacy is not None else []
    candidates: list[str] = []
    recurrent = bool(layer.cell or layer.sides) and len(dims) in (2, 3) and len(dims[1]) == 2
    if ("recurrent_kernel" in names or recurrent) and len(dims) > 1 and len(dims[1]) == 2:
        rows, cols = dims[1]
        gates = cols // rows if rows and cols % rows == 0 else 0
        candidates = [c for c, k in _RECURRENT.items() if _GATES[k] == gates]
    elif "embeddings" in names:
        candidates = ["Embedding"]
    elif "moving_mean" in names:
        candidates = ["BatchNormalization"]
    elif "gamma" in names or "beta" in names:
        candidates = ["LayerNormalization"]
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
    if len(candidates) > 1:
        fitting = [c for c in candidates if _KINDS[c] in slot_kinds]
        if len(fitting) > 1:
            shown = ", ".join(f"{n} {s}" for n, s in zip(tensors, dims))
            raise LayoutError(
                f"{where}: Keras layer '{layer.name}' ({shown}) fits more than one Keras class "
                f"({', '.join(fitting)}), and the module has layers of each kind "
                f"({', '.join(_KINDS[c] for c in fitting)}). Fix: pass mapping={{'{layer.name}': 'module.path'}} "
                "to say which module it fills, or load the .keras file, which records each layer's class."
            )
        candidates = fitting or candidates
    return candidates[0] if candidates else None


# ---- plan ---------------------------------------------------------------------------------------------


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: Mapping[str, int] | None = None,
) -> LayoutPlan:
    """Rules that put the Keras layers of ``source`` into ``module``'s layers.

    Args:
        module: the PyTorch model (or the submodule being loaded).
        source: a Keras file or live model source (``metadata["layout"] == "keras"``),
            or arrays keyed as :func:`export` writes them.
        mapping: ``{keras layer name or group path: "module.path" or "module.path[layer]"}``.
        call_order: module path -> position of its first call in a forward pass (``example_inputs=``).
    """
    where = source.description
    layers, leftover = _collect(source)
    _unique_names(layers)
    mapping = _translate(mapping, layers)
    slots = module_slots(module)
    slot_kinds = {s.kind for s in slots}
    resolved: list[_Resolved] = []
    unmatched = list(leftover)
    for layer in layers:
        kinds = (
            {_kind_of_target(mapping[layer.name], slots)} - {None} if layer.name in mapping else slot_kinds
        )
        holds_a_model = len(_inner_layers(layer)) > 2  # one layer, or a Bidirectional's two sides, at most
        found = None if holds_a_model else _resolve(layer, source, kinds, layer.name in mapping, where)  # type: ignore[arg-type]
        if found is None:
            unmatched += layer.tensors
        else:
            resolved.append(found)
    if not resolved:
        _refuse_whole_model_layer(layers, where)

    def rules_for(i: int, slot: Slot) -> list[Rule] | None:
        found = resolved[i]
        if (len(found.parts) == 2) != slot.bidirectional:
            return None
        return [r for part in found.parts for r in _part_rules(found, part, slot, source)]

    pairs = pair_layers(
        module,
        [
            SourceLayer(
                r.layer.name,
                r.kind,
                r.detail,
                paths=(r.layer.path.replace("/", "."),) if r.layer.path else (),
                order=_recorded_order(r.layer),
            )
            for r in resolved
        ],
        mapping,
        framework="Keras",
        fits=fits_by_rules(module, source, rules_for),
        call_order=call_order,
        where=where,
    )
    rules: list[Rule] = []
    pairings: list[Pairing] = []
    problems: list[Problem] = []
    refusals: list[str] = []
    unchecked: list[str] = []
    for found, paired in zip(resolved, pairs):
        slot = paired.slot
        _check_direction(found, slot, where)
        how = paired.how
        for part in found.parts:
            rules += _part_rules(found, part, slot, source)
            if part.config is not None:
                problems += _check_config(found, part, slot, refusals)
                how += "".join(f"; {note}" for note in _notes(found, part, slot))
            else:
                _check_weights_only(found, part, slot, source, problems, refusals, unchecked)
        pairings.append(Pairing(found.layer.name, found.detail, slot.label, type(slot.module).__name__, how))
    if refusals:
        raise UnsupportedConfigError("\n".join(dict.fromkeys(refusals)))
    if problems:
        raise LoadError(problems, target=type(module).__name__)
    if unchecked:
        unchecked = list(dict.fromkeys(unchecked))
        unchecked.append(
            "a .keras file (model.save('model.keras')) records these settings so they can be checked"
        )
    used = {s for rule in rules for s in rule.sources}
    unmatched += [t for r in resolved for t in r.layer.tensors if t not in used]
    return LayoutPlan(
        name=NAME,
        rules=rules,
        pairings=pairings,
        unmatched=unmatched,
        unchecked=unchecked,
        scope=wrapped_scope(pairs),
    )


def _translate(mapping: Mapping[str, str] | None, layers: list[_Layer]) -> dict[str, str]:
    """Mapping keys given as group paths become the layer names pairing uses."""
    names = {layer.name for layer in layers}
    by_path = {layer.path: layer.name for layer in layers}
    return {(k if k in names else by_path.get(k, k)): v for k, v in (mapping or {}).items()}


def _kind_of_target(target: str, slots: list[Slot]) -> str | None:
    kinds = {s.kind for s in slots if target in (s.label, s.path)}
    return kinds.pop() if len(kinds) == 1 else None


def _refuse_whole_model_layer(layers: list[_Layer], where: str) -> None:
    """Nothing pairs, and the weights sit under one layer that holds a whole model of layers
    (transformers' ``tf_model.h5`` keeps 39 of BERT's tensors under ``bert``): say that, once,
    instead of one problem per tensor."""
    nested = [layer for layer in layers if len(_inner_layers(layer)) > 2]
    if len(nested) != 1 or sum(len(layer.tensors) for layer in layers) > 2 * len(nested[0].tensors):
        return
    layer = nested[0]
    inner = _inner_layers(layer)
    raise LayoutError(
        f"{where}: the weights sit under the one top-level Keras layer '{layer.name}' "
        f"({layer.class_name or 'class not recorded'}: {len(layer.tensors)} tensors in {len(inner)} inner layers, "
        f"such as '{inner[0]}'), a layer that holds a whole model, as transformers' TF checkpoints "
        "(tf_model.h5) keep theirs. weightport pairs Keras layers that are one PyTorch module each (Dense, "
        "Conv, LSTM, ...) and does not pair the layers inside such a layer by their inner names. Fix: convert "
        "it with the library that wrote it (transformers: load_tf2_checkpoint_in_pytorch_model(model, path) "
        "from transformers.modeling_tf_pytorch_utils, into the PyTorch class built from the same config), then "
        "save that model's state_dict."
    )


def _inner_layers(layer: _Layer) -> list[str]:
    """The distinct sub-layer paths inside a legacy layer's weight names (``bert/embeddings/...``)."""
    inner = [name[len(layer.path) + 1 :].rpartition("/")[0] for name in layer.legacy or []]
    return list(dict.fromkeys(i for i in inner if i))


def _recorded_order(layer: _Layer) -> tuple[tuple[str, ...], int] | None:
    """Where the source records the layer's place: the model's layer list (a ``.keras`` config, a
    legacy ``.h5``'s ``layer_names``, a live model), or a ``.weights.h5`` key's number, which counts
    layers of one class in one container; a subclassed model's attribute names record none."""
    if layer.seq == ("model",) or len(layer.seq) == 2:
        return layer.seq, layer.index
    return None


def _check_direction(found: _Resolved, slot: Slot, where: str) -> None:
    two_way = len(found.parts) == 2
    if two_way == slot.bidirectional:
        return
    m = slot.module
    if two_way:
        raise LayoutError(
            f"{where}: Keras layer '{found.layer.name}' is {found.detail} but '{slot.label}' is a one-way "
            f"{type(m).__name__}. Fix: build it with bidirectional=True, or pass mapping= to pair it with one."
        )
    raise LayoutError(
        f"{where}: Keras layer '{found.layer.name}' ({found.detail}) runs one way but '{slot.label}' is a "
        f"bidirectional {type(m).__name__}. Fix: build it with bidirectional=False, or pass mapping=."
    )


def _part_rules(found: _Resolved, part: _Part, slot: Slot, source: Source) -> list[Rule]:
    kind = found.kind
    rules = []
    layer = f"Keras {found.detail} '{found.layer.name}'"
    # a live layer's source is that layer ("the Keras Dense 'dense'"): its name is said once
    origin = (
        source.description
        if source.description.endswith(f"'{found.layer.name}'") and not found.layer.path
        else f"{source.description} {layer}"
    )
    side = (" backward_layer" if part.reverse else " forward_layer") if len(found.parts) > 1 else ""
    for param, var, op in _RULES[kind]:
        if var not in part.vars:
            continue
        note = ""
        if var in ("moving_mean", "moving_variance") and part.config and "momentum" in part.config:
            momentum = float(part.config["momentum"])
            note = f" (Keras momentum {momentum:g} is PyTorch momentum={1 - momentum:g}; it affects training only)"
        rules.append(
            Rule(slot.name(param, reverse=part.reverse), (part.vars[var],), op, f"{origin}{side} {var}{note}")
        )
    if kind in ("RNN", "LSTM") and "bias" in part.vars:
        size = source.infos[part.vars["bias"]].shape
        rules.append(
            Rule(
                slot.name("bias_hh", reverse=part.reverse),
                (),
                Zeros(tuple(size)),
                f"{origin}: Keras has one bias; bias_hh = 0",
            )
        )
    no_beta = kind in ("BatchNorm", "LayerNorm") and "gamma" in part.vars and "beta" not in part.vars
    if no_beta and getattr(slot.module, "bias", None) is not None:
        size = source.infos[part.vars["gamma"]].shape
        rules.append(Rule(slot.name("bias"), (), Zeros(tuple(size)), f"{origin}: center=False, so bias = 0"))
    if kind == "BatchNorm" and getattr(slot.module, "track_running_stats", False):
        rules.append(
            Rule(slot.name("num_batches_tracked"), (), Zeros(()), f"{origin}: Keras counts no batches; 0")
        )
    return rules


def _act(value: Any) -> str:
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name") or value.get("class_name")
    return "linear" if value is None else str(value).lower()


def _refusals(found: _Resolved, part: _Part, cfg: Mapping[str, Any]) -> list[str]:
    """Settings no PyTorch module of this kind can express, each with why and what to do."""
    kind, label = found.kind, f"Keras {part.cls} '{found.layer.name}'"
    out = []
    act = _act(cfg.get("activation", "tanh"))
    if kind == "GRU" and not cfg.get("reset_after", True):
        out.append(
            f"{label} has reset_after=False: Keras computes h~ = tanh(x W_h + (r * h) U_h + b_h) but "
            "nn.GRU computes n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); they differ unless U_h is zero. "
            "Fix: rebuild the Keras layer with reset_after=True (the default) and retrain, or write a custom cell."
        )
    if kind in ("LSTM", "GRU") and _act(cfg.get("recurrent_activation", "sigmoid")) != "sigmoid":
        ra = _act(cfg.get("recurrent_activation"))
        out.append(
            f"{label} has recurrent_activation='{ra}': nn.{kind} gates use the logistic sigmoid only, and "
            f"'{ra}' gives different gate values (hard_sigmoid is off by up to about 0.1). Fix: rebuild the Keras "
            "layer with recurrent_activation='sigmoid' and retrain, or write a custom cell."
        )
    if kind in ("LSTM", "GRU") and act != "tanh":
        out.append(
            f"{label} has activation='{act}': nn.{kind} uses tanh only. Fix: rebuild the Keras layer with "
            "activation='tanh' and retrain, or write a custom cell."
        )
    if kind == "RNN" and act not in ("tanh", "relu"):
        out.append(
            f"{label} has activation='{act}': nn.RNN offers nonlinearity='tanh' or 'relu' only. Fix: rebuild "
            "the Keras layer with one of those and retrain, or write a custom cell."
        )
    if kind in _GATES and len(found.parts) == 2 and not part.reverse and cfg.get("go_backwards"):
        out.append(
            f"Keras Bidirectional '{found.layer.name}' wraps a {part.cls} with go_backwards=True, so its "
            "'forward' layer reads the input backwards and keeps its outputs in reversed time order while "
            "the 'backward' one reads it forwards; a bidirectional PyTorch module runs its first direction "
            "forwards and realigns the reverse one, so the halves of the output are swapped (and, with "
            "return_sequences, flipped in time). Fix: rebuild the Keras layer with go_backwards=False (the "
            "default) and retrain."
        )
    if kind == "LayerNorm" and cfg.get("rms_scaling"):
        out.append(
            f"{label} has rms_scaling=True: Keras computes x * gamma / sqrt(var(x) + epsilon), removing no mean "
            "(and has no beta); nn.LayerNorm and nn.RMSNorm compute otherwise. Fix: write that normalization "
            "as a module of your own and load gamma into it with the torch layout."
        )
    if kind in ("BatchNorm", "LayerNorm") and not cfg.get("scale", True) and cfg.get("center", True):
        out.append(
            f"{label} has scale=False but center=True: PyTorch norms have a weight whenever they have a bias, and "
            "the transforms cannot make the ones it needs. Fix: rebuild the Keras layer with scale=True, set its "
            "gamma to ones (which computes the same), copy the other weights over, save it and load that file."
        )
    return out


def _notes(found: _Resolved, part: _Part, slot: Slot) -> list[str]:
    """What the caller's ``forward`` must do around the module for Keras's outputs (the pairing's "how").

    These settings act on the input, the state or the output, not on what the module computes, so
    they load: weights are the same, and the note says what to do outside the module.
    """
    cfg, m, kind = part.config or {}, cast(Any, slot.module), found.kind
    notes = []
    if kind in _GATES and not part.reverse:
        if cfg.get("go_backwards") and len(found.parts) == 1:
            notes.append("Keras runs it backwards (go_backwards=True): flip the input in time")
        if cfg.get("stateful"):
            state = "h_n, c_n" if kind == "LSTM" else "h_n"
            notes.append(
                f"Keras carries the state between calls (stateful=True): pass the returned {state} as the "
                "next call's initial state"
            )
    if kind in ("Linear", "Conv1d", "Conv2d") and _act(cfg.get("activation")) != "linear":
        notes.append(
            f"Keras applies activation='{_act(cfg.get('activation'))}' after it: apply it in forward"
        )
    if kind in ("Conv1d", "Conv2d"):
        padding = str(cfg.get("padding", "valid")).lower()
        if padding == "causal":
            notes.append(
                f"Keras pads causally: left-pad the input by {_causal_pad(m)} steps (dilation * (kernel - 1))"
            )
        elif padding == "same" and any(s != 1 for s in m.stride):
            notes.append(f"Keras pads as TensorFlow's padding='same' with stride {m.stride}: {_TF_SAME}")
    if kind == "Embedding" and cfg.get("mask_zero"):
        notes.append(
            "Keras masks id 0 (mask_zero=True), so later recurrent layers skip those steps: pass the lengths "
            "with nn.utils.rnn.pack_padded_sequence"
        )
    return notes


def _causal_pad(conv: Any) -> int:
    """How many steps Keras's ``padding='causal'`` puts before the input of a Conv1D."""
    return int((conv.kernel_size[0] - 1) * conv.dilation[0])


_TF_SAME = (
    "pad each spatial axis of size n by max((ceil(n / stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0) "
    "in all, half of it (rounded down) before and the rest after"
)


def _check_config(found: _Resolved, part: _Part, slot: Slot, refusals: list[str]) -> list[Problem]:
    """Problems between the layer's Keras configuration and the module; refusals go to ``refusals``."""
    cfg = part.config or {}
    refusals += _refusals(found, part, cfg)
    m: Any = slot.module
    kind, label = found.kind, f"{slot.label} <- Keras {part.cls} '{found.layer.name}'"
    problems = []

    def mismatch(expected: str, found_: str, fix: str) -> None:
        problems.append(Problem(label, expected, found_, fix))

    if kind in _GATES:
        if "units" in cfg and int(cfg["units"]) != m.hidden_size:
            mismatch(
                f"hidden_size={cfg['units']} (Keras units)",
                f"hidden_size={m.hidden_size}",
                f"build the module with hidden_size={cfg['units']}",
            )
        if kind == "RNN" and _act(cfg.get("activation", "tanh")) in ("tanh", "relu"):
            act = _act(cfg.get("activation", "tanh"))
            if m.nonlinearity != act:
                mismatch(
                    f"nonlinearity='{act}' (Keras activation)",
                    f"nonlinearity='{m.nonlinearity}'",
                    f"build nn.RNN(..., nonlinearity='{act}')",
                )
    _check_bias(found, part, slot, problems, label)
    if kind in ("BatchNorm", "LayerNorm") and "epsilon" in cfg:
        eps = float(cfg["epsilon"])
        if not math.isclose(eps, m.eps, rel_tol=1e-6):
            mismatch(
                f"eps={eps:g} (Keras epsilon)",
                f"eps={m.eps:g}",
                f"build the PyTorch module with eps={eps:g}: Keras's default is 1e-3, PyTorch's 1e-5",
            )
    if kind == "LayerNorm":
        axis = cfg.get("axis", -1)
        axes = sorted(axis if isinstance(axis, list) else [axis])
        rank = len(m.normalized_shape)
        # tf_keras records positive axes once built, without the input's rank: consecutive ones are
        # taken as trailing (gamma's shape, which the planner checks, must then be normalized_shape).
        built = all(a >= 0 for a in axes) and axes == list(range(axes[0], axes[0] + rank))
        if not built and axes != list(range(-rank, 0)):
            mismatch(
                f"normalization over the last {rank} axes",
                f"Keras axis={axis}",
                "permute the input so the normalized axes come last, and give nn.LayerNorm their sizes",
            )
    if kind in ("Conv1d", "Conv2d"):
        _check_conv(cfg, m, mismatch)
    return problems


def _check_bias(found: _Resolved, part: _Part, slot: Slot, problems: list[Problem], label: str) -> None:
    m: Any = slot.module
    kind = found.kind
    checks: list[tuple[str, str, bool]] = []
    if kind in _GATES:
        checks.append(("use_bias", "bias", bool(m.bias)))
    elif kind in ("Linear", "Conv1d", "Conv2d"):
        checks.append(("use_bias", "bias", m.bias is not None))
    elif kind == "BatchNorm":
        checks.append(("scale/center", "affine", bool(m.affine)))
    elif kind == "LayerNorm":
        checks.append(("scale", "elementwise_affine", m.weight is not None))
        if "beta" in part.vars and m.bias is None:
            checks.append(("center", "bias", False))
    var = {"use_bias": "bias", "scale/center": "gamma", "scale": "gamma", "center": "beta"}
    for setting, arg, has in checks:
        keras_has = var[setting] in part.vars
        if keras_has != has:
            problems.append(
                Problem(
                    label,
                    f"{arg}={keras_has} (Keras {setting}={keras_has})",
                    f"{arg}={has}",
                    f"build the module with {arg}={keras_has}",
                )
            )


def _check_conv(cfg: Mapping[str, Any], m: Any, mismatch: Any) -> None:
    pairs = [
        ("strides", "stride", cfg.get("strides")),
        ("dilation_rate", "dilation", cfg.get("dilation_rate")),
    ]
    for keras, torch_name, value in pairs:
        if value is None:
            continue
        wanted = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(m.stride)
        if tuple(getattr(m, torch_name)) != wanted:
            mismatch(
                f"{torch_name}={wanted} (Keras {keras})",
                f"{torch_name}={getattr(m, torch_name)}",
                f"build the module with {torch_name}={wanted}",
            )
    if "groups" in cfg and int(cfg["groups"]) != m.groups:
        mismatch(
            f"groups={cfg['groups']}", f"groups={m.groups}", f"build the module with groups={cfg['groups']}"
        )
    padding = str(cfg.get("padding", "valid")).lower()
    kernel, dilation = m.kernel_size, m.dilation
    same = tuple((k - 1) * d // 2 for k, d in zip(kernel, dilation))
    symmetric = all((k - 1) * d % 2 == 0 for k, d in zip(kernel, dilation))
    unit_stride = all(s == 1 for s in m.stride)
    unpadded = m.padding in ("valid", (0,) * len(kernel))
    # Keras's 'same' with stride > 1 pads by an amount that depends on the input's size (TensorFlow's
    # rule), which no fixed padding of the module gives; 'causal' pads on one side only. Both load into
    # an unpadded module, and the pairing says how to pad the input.
    ok = {
        "valid": unpadded,
        "same": (m.padding == "same" or (symmetric and m.padding == same)) if unit_stride else unpadded,
        "causal": unpadded,
    }.get(padding, False)
    if not ok:
        fix = {
            "valid": "build the module with padding=0",
            "same": "build the module with padding='same'"
            if unit_stride
            else f"build the module with padding=0 (PyTorch's padding='same' needs stride 1) and {_TF_SAME}",
            "causal": "build the module with padding=0 (PyTorch has no causal padding) and left-pad the input "
            f"by dilation * (kernel - 1) = {_causal_pad(m)} steps",
        }.get(padding, "pad the input yourself")
        mismatch(f"padding equivalent to Keras padding='{padding}'", f"padding={m.padding}", fix)
    elif not unpadded and m.padding_mode != "zeros":
        mismatch(
            "padding_mode='zeros' (Keras pads with zeros)",
            f"padding_mode='{m.padding_mode}'",
            "build the module with padding_mode='zeros'",
        )


def _check_weights_only(
    found: _Resolved,
    part: _Part,
    slot: Slot,
    source: Source,
    problems: list[Problem],
    refusals: list[str],
    unchecked: list[str],
) -> None:
    """What the variables alone show, and which settings stay unchecked."""
    kind, label = found.kind, f"Keras {found.detail} '{found.layer.name}' -> '{slot.label}'"
    _check_bias(found, part, slot, problems, f"{slot.label} <- Keras {part.cls} '{found.layer.name}'")
    settings: list[str] = []
    if kind == "GRU":
        if "bias" in part.vars and len(source.infos[part.vars["bias"]].shape) == 1:
            refusals += _refusals(found, part, {"reset_after": False})
        elif "bias" not in part.vars:
            settings.append("reset_after (assumed True)")
    if kind in ("LSTM", "GRU"):
        settings.append("activation, recurrent_activation (assumed tanh, sigmoid)")
    if kind == "RNN":
        settings.append(f"activation (assumed '{cast(Any, slot.module).nonlinearity}', as the module)")
    if kind in _GATES:
        settings.append("go_backwards (assumed False)")
    if kind in ("BatchNorm", "LayerNorm"):
        settings.append(
            f"epsilon (the module has eps={cast(Any, slot.module).eps:g}; Keras's default is 1e-3)"
        )
        if "gamma" in part.vars and "beta" not in part.vars:
            settings.append("center (one of gamma, beta is missing: taken as gamma, center=False)")
    if kind in ("Conv1d", "Conv2d"):
        settings.append("strides, padding, dilation_rate, groups")
    if settings and not part.reverse:
        unchecked.append(f"{label}: {', '.join(settings)}")


# ---- export ------------------------------------------------------------------------------------------


def export(module: nn.Module, mapping: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """``module``'s weights as a Keras 3 ``.weights.h5`` holds them for the equivalent Keras model.

    Each slot (each layer of a multi-layer RNN) becomes one Keras layer, keyed by
    its class in snake case numbered per class in module order (``layers/lstm``,
    ``layers/lstm_1``, ``layers/bidirectional``, ``layers/dense``), which is how
    Keras files a Sequential or functional model with those layers in that order.

    Args:
        module: the PyTorch model.
        mapping: ``{keras group path or key: "module.path[layer]"}`` to file a slot under another key.
    """
    from weightport.tensors import numpy_of

    state = module.state_dict()
    wanted = {v: (k if "/" in k else f"layers/{k}") for k, v in (mapping or {}).items()}
    taken = set(wanted.values())
    counts: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    for slot in module_slots(module):
        kind, m = slot.kind, cast(Any, slot.module)
        if kind not in _EXPORT:
            raise LayoutError(
                f"'{slot.label}' is {type(m).__name__}, which the Keras layout cannot export; it exports "
                f"{', '.join(sorted(_CLASS_OF_KIND))} modules."
            )
        if kind == "LSTM" and getattr(m, "proj_size", None):
            raise UnsupportedConfigError(
                f"'{slot.label}' has proj_size={m.proj_size}; Keras LSTM has no projection."
            )
        base = "bidirectional" if slot.bidirectional else snake_case(_CLASS_OF_KIND[kind])
        path = wanted.get(slot.label) or wanted.get(slot.path)
        while path is None or (path in taken and slot.label not in wanted and slot.path not in wanted):
            n = counts.get(base, -1) + 1
            counts[base] = n
            path = f"layers/{base}" if n == 0 else f"layers/{base}_{n}"
        taken.add(path)
        sides = (
            [("forward_layer/", False), ("backward_layer/", True)] if slot.bidirectional else [("", False)]
        )
        for side, reverse in sides:
            prefix = f"{path}/{side}{'cell/' if kind in _GATES else ''}vars/"
            index = 0
            for _var, params, op in _EXPORT[kind]:
                names = [slot.name(p, reverse=reverse) for p in params]
                if not all(n in state for n in names):
                    continue
                out[f"{prefix}{index}"] = np.ascontiguousarray(
                    op(*(numpy_of(state[n], copy=True) for n in names))
                )
                index += 1
    return out


def save_weights_h5(
    module_or_arrays: nn.Module | Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    mapping: Mapping[str, str] | None = None,
) -> Path:
    """Write a ``.weights.h5`` that Keras's ``model.load_weights(path)`` reads into the equivalent model.

    Args:
        module_or_arrays: a PyTorch module (exported with :func:`export`), or arrays
            already keyed as a Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>``).
        path: the file to write; it should end in ``.weights.h5``, as Keras requires.
        mapping: as for :func:`export`, e.g. ``{"layers/time_distributed/layer": "fc"}`` for a
            Linear that the Keras model wraps in ``TimeDistributed``.
    """
    from weightport.sources.keras_h5 import write_h5

    if isinstance(module_or_arrays, nn.Module):
        arrays = export(module_or_arrays, mapping)
    else:
        arrays = dict(module_or_arrays)
    attrs: dict[str, dict[str, str]] = {}
    for name in arrays:
        m = _VARS.match(name)
        if m and m["layer"]:  # Keras names each layer in its 'vars' group
            attrs[f"{m['layer']}/vars"] = {"name": m["layer"].rsplit("/", 1)[-1]}
    return write_h5(arrays, path, attrs)


def describe(source: Source) -> list[dict[str, Any]]:
    """The Keras layers in ``source`` in model order where known (for ``weightport inspect``)."""
    layers, _ = _collect(source)
    layers.sort(key=lambda layer: (layer.seq, layer.index))
    return [
        {
            "name": layer.name,
            "kind": _wrapped_kind(layer.class_name, layer.config) or "(from shapes)",
            "config": layer.config or {},
            "tensors": layer.tensors,
        }
        for layer in layers
    ]


def _wrapped_kind(class_name: str | None, config: dict[str, Any] | None) -> str | None:
    """``Bidirectional(LSTM)``, ``TimeDistributed(Dense)``: a wrapper named with the layer it wraps.

    >>> _wrapped_kind("Bidirectional", {"layer": {"class_name": "LSTM", "config": {}}})
    'Bidirectional(LSTM)'
    """
    inner, _ = _inner(config, "layer")
    return f"{class_name}({inner})" if class_name and inner else class_name
