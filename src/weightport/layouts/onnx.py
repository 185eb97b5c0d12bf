"""The ONNX layout: weights of LSTM, GRU, RNN, Gemm, MatMul(+Add), Conv, Gather (embeddings),
BatchNormalization and LayerNormalization nodes into PyTorch.

Weights are found by a node's input position, not by name (``torch.onnx.export``
names them ``onnx::LSTM_201``), from the node list the ONNX reader puts in
``source.metadata["nodes"]``. Each node that holds weights is one source layer,
paired with the module's layers by order within kind (``mapping={node name:
"module.path[layer]"}`` pairs by hand); stacked recurrent nodes fill the layers
of one multi-layer ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (or cells).

What maps, and how:

- LSTM ``W (D,4H,F)``, ``R (D,4H,H)``, ``B (D,8H) = [Wb, Rb]``: gates i,o,f,c are
  reordered to PyTorch's i,f,g,o; direction index 1 goes to ``_reverse``. GRU
  gates z,r,h become r,z,n; RNN blocks stay. A missing ``B`` means zero biases.
- ``Gemm`` (``transA=0``; ``transB`` either way) and ``MatMul`` by a stored
  matrix, with the ``Add`` of a stored bias that follows it, become ``nn.Linear``
  (``weight = B.T`` for ``MatMul``). ``Conv`` becomes ``nn.Conv1d/2d/3d`` as is.
- ``Gather`` of a stored float matrix along axis 0 becomes ``nn.Embedding``;
  ``BatchNormalization`` (scale, B, mean, var) ``nn.BatchNorm*d`` and
  ``LayerNormalization`` (Scale, B) ``nn.LayerNorm``, with ``epsilon`` checked
  against ``eps``. Exporters fold an eval-mode BatchNorm into the layer before
  it; a module's BatchNorm with no node is then reported with that reason.

A weight may reach its node through ``Identity`` nodes (exporters write one for a tensor used twice)
and ``Cast`` nodes that widen exactly (float16 storage read as float32); nothing else is evaluated.
tf2onnx's forms are recognised: a Dense on a 3-D input adds its bias after a ``Reshape`` back to the
leading axes (followed when the target shape's stored last entry is the output size), and a Keras
Conv1D is a 2-D ``Conv`` over an axis an ``Unsqueeze`` made (kernel 1, stride 1, no padding there),
which fills an ``nn.Conv1d``, with its bias added per channel after the ``Squeeze``. A node applied
twice to the same stored tensors is one layer. Scalar initializers are graph constants, not weights.
A recurrence left in a ``Loop``/``Scan`` (tf2onnx's SimpleRNN) maps nothing; the missing module says so.

Refused, with the reason (:class:`UnsupportedConfigError`): GRU
``linear_before_reset=0`` (the ONNX default), non-zero peepholes ``P`` (all-zero
``P`` is accepted), ``clip``, ``input_forget=1``, activations other than
PyTorch's (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh, RNN Tanh or Relu), Gemm
``alpha``/``beta`` other than 1 (the transforms only move values; fold the
factors into ``B`` and ``C`` first), ``transA=1``, asymmetric Conv pads (except padding='same''s, stride 1),
``auto_pad=SAME_*`` with a stride above 1 (the padding depends on the input's
length), BatchNormalization ``spatial=0``. Accepted, as they change no weight:
the RNN ``layout`` (batch- or time-first inputs and outputs; noted in the
pairing), ``sequence_lens`` (ONNX zeroes steps past each length, as PyTorch does
for a packed input; noted), ``activation_alpha``/``activation_beta`` of Sigmoid
and Tanh (which take none), BatchNormalization ``momentum`` and ``training_mode``,
LayerNormalization ``stash_type``. A module with ``padding_mode`` other than
'zeros' matches a ``Pad`` node before the Conv (torch.onnx.export's form); amounts
the graph computes are reported as unchecked.

A ``direction="reverse"`` node runs over the sequence backwards; PyTorch has no
reverse-only layer, so it is refused unless ``mapping=`` names the
unidirectional layer (or cell) it goes into: its weights are then that layer's,
and the model must flip its input and output in time
(``y = flip(layer(flip(x)))``).

Settings the node carries are checked against the module: ``hidden_size``,
direction vs ``bidirectional``, the RNN activation vs ``nonlinearity``, a stored
bias vs ``bias=`` (an all-zero one also fits ``bias=False``), Conv strides,
pads, dilations and groups.

:func:`export` writes the reverse: ONNX-layout arrays under keys
``"<slot>/<ONNX input name>"``, where ``<slot>`` is the layer's label in
:func:`~weightport.layouts.pairing.module_slots` (``"lstm[0]"``, ``"fc"``; the
root module's is ``""`` or ``"[0]"``, and a root key is just the input name).
Recurrent layers give ``W``, ``R``, ``B`` (no ``B`` with ``bias=False``), Linear
gives Gemm's ``B`` (``transB=1``, so ``(out, in)``) and ``C``, Conv gives ``W``
and ``B``, Embedding ``data``, BatchNorm ``scale``, ``B``, ``input_mean``,
``input_var``, LayerNorm ``Scale`` and ``B``. Planned without a graph (a plain mapping with ``layout="onnx"``),
keys of that scheme are read back as identity; node attributes are then taken
from the module and reported as unchecked.

>>> import torch
>>> sorted((k, v.shape) for k, v in export(torch.nn.GRU(2, 3)).items())
[('[0]/B', (1, 18)), ('[0]/R', (1, 9, 3)), ('[0]/W', (1, 9, 2))]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from weightport.dtypes import is_ml_float
from weightport.errors import LayoutError, LoadError, UnsupportedConfigError
from weightport.layouts.base import LayoutPlan, Rule
from weightport.layouts.folded import folded_batchnorms
from weightport.layouts.pairing import (
    Paired,
    Slot,
    SourceLayer,
    as_pairings,
    fits_by_rules,
    module_slots,
    pair_layers,
    slot_kind,
    wrapped_scope,
)
from weightport.sources.base import Source
from weightport.transforms import (
    Chain,
    Identity,
    Op,
    ReorderBlocks,
    Reshape,
    Select,
    SliceBlocks,
    Transpose,
    Zeros,
)

__all__ = ["NAME", "claims", "plan", "export"]

NAME = "onnx"
FRAMEWORK = "ONNX"

# kind -> (gate blocks, ONNX block order as PyTorch wants it, PyTorch's activations per direction)
_RECURRENT: dict[str, tuple[int, tuple[int, ...], tuple[str, ...]]] = {
    "LSTM": (4, (0, 2, 3, 1), ("Sigmoid", "Tanh", "Tanh")),
    "GRU": (3, (1, 0, 2), ("Sigmoid", "Tanh")),
    "RNN": (1, (0,), ("Tanh",)),
}
_CONV_KINDS = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}
_WEIGHT_INPUT = {"Linear": "B", "Embedding": "data"}  # the ONNX input a plain layer's weight comes from
# Normalization nodes by module kind: the ONNX op, and for each stored input (by position, from 1) the
# module tensor it fills and its ONNX name.
_NORM_OPS = {"BatchNorm": "BatchNormalization", "LayerNorm": "LayerNormalization"}
_KIND_OF_NORM_OP = {op: kind for kind, op in _NORM_OPS.items()}
_NORMS = {
    "BatchNormalization": (
        ("weight", "scale"),
        ("bias", "B"),
        ("running_mean", "input_mean"),
        ("running_var", "input_var"),
    ),
    "LayerNormalization": (("weight", "Scale"), ("bias", "B")),
}
# The module setting that leaves it without a tensor the file holds (nn.LayerNorm(bias=False) keeps its weight).
_NORM_SETTING = {
    ("BatchNorm", "weight"): "affine",
    ("BatchNorm", "bias"): "affine",
    ("BatchNorm", "running_mean"): "track_running_stats",
    ("BatchNorm", "running_var"): "track_running_stats",
    ("LayerNorm", "weight"): "elementwise_affine",
    ("LayerNorm", "bias"): "bias",
}
_FIX_COMPUTED = (
    "re-export with do_constant_folding=True (torch.onnx.export's default), which stores each weight; "
    "a model exported with do_constant_folding=False keeps PyTorch's own parameter names, so "
    "weightport.load(model, path, layout='torch', strict=False) reads it directly"
)


def claims(source: Source) -> bool:
    return source.metadata.get("layout") == NAME


@dataclass
class _Node:
    index: int
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any]
    synthetic: bool = False  # made from export()'s keys: no attributes to check
    label: str = ""  # how messages and mapping= name it: its name, made unique

    def __post_init__(self) -> None:
        self.label = self.label or self.name or f"{self.op_type}#{self.index}"

    def input(self, position: int) -> str:
        return self.inputs[position] if position < len(self.inputs) else ""

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)


@dataclass
class _Layer:
    """One node that holds weights: what it fills, and its stored tensors by role."""

    node: _Node
    kind: str
    tensors: dict[str, str]
    ops: dict[str, Op] = field(default_factory=dict)  # Linear: how the stored tensor becomes weight/bias
    detail: str = ""
    spatial: tuple[int, ...] | None = None  # Conv: the node's spatial axes the module's are (None: all)
    # Conv: a Pad node right before it, as (PyTorch padding_mode, its pads on the node's spatial axes as
    # (begin, end), or None where the graph computes them); torch.onnx.export writes one for padding_mode
    # other than 'zeros'.
    pad: tuple[str, tuple[tuple[int, ...], tuple[int, ...]] | None] | None = None


@dataclass
class _Issues:
    """Every refusal of one plan, raised together (UnsupportedConfigError if any is one)."""

    where: str
    messages: list[str] = field(default_factory=list)
    unsupported: bool = False

    def add(self, node: _Node, message: str, *, unsupported: bool = False) -> None:
        self.messages.append(f"{self.where} node '{node.label}' ({node.op_type}): {message}")
        self.unsupported = self.unsupported or unsupported

    def raise_if_any(self, target: str) -> None:
        if not self.messages:
            return
        cls = UnsupportedConfigError if self.unsupported else LayoutError
        if len(self.messages) == 1:
            raise cls(self.messages[0])
        lines = "\n".join(f"  - {m}" for m in self.messages)
        raise cls(f"{self.where} cannot be loaded into {target}: {len(self.messages)} problems:\n{lines}")


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: Mapping[str, int] | None = None,
) -> LayoutPlan:
    """Rules for ``module`` from the weight-holding nodes of an ONNX graph (or export()'s keys).

    Raises:
        UnsupportedConfigError: a node computes something PyTorch's module cannot.
        LayoutError: nodes and module layers do not pair, or their settings differ.
    """
    issues = _Issues(source.description)
    target = type(module).__name__
    if "nodes" in source.metadata:
        nodes = _nodes(source.metadata["nodes"])
        unchecked: list[str] = []
        folded = folded_batchnorms(module, source)
        if folded is not None:  # the cause, said once: pairing would blame each fused layer's bias instead
            raise LoadError([folded], target=target)
    else:
        nodes, pins = _nodes_from_keys(module, source)
        mapping = {**pins, **(mapping or {})}
        unchecked = [
            "ONNX node attributes (activations, clip, linear_before_reset, Conv strides and pads): "
            "plain arrays carry no graph, so they are taken to match the module"
        ]
    validated: set[str] = set()
    layers = _find_layers(nodes, source, issues, validated)
    issues.raise_if_any(target)
    wanted = [
        SourceLayer(
            lay.node.label,
            lay.kind,
            lay.detail,
            _named_path(lay),
            order=None if lay.node.synthetic else ("graph", lay.node.index),  # nodes are in topological order
        )
        for lay in layers
    ]

    def rules_for(i: int, slot: Slot) -> list[Rule] | None:
        trial = _Issues(source.description)
        rules = _layer_rules(layers[i], Paired(wanted[i], slot, ""), source, trial, set(), [])
        return None if trial.messages else rules

    try:
        paired = pair_layers(
            module,
            wanted,
            mapping,
            framework=FRAMEWORK,
            fits=fits_by_rules(module, source, rules_for),
            call_order=call_order,
            where=source.description,
        )
    except LayoutError as e:
        _explain_unrolled_recurrence(module, layers, source.description, e)
        raise
    rules: list[Rule] = []
    for layer, pair in zip(layers, paired):
        rules += _layer_rules(layer, pair, source, issues, validated, unchecked)
    issues.raise_if_any(target)
    used = {s for rule in rules for s in rule.sources} | validated
    hints = _loop_hints(module, layers, nodes, source) if "nodes" in source.metadata else {}
    if "nodes" in source.metadata:
        _unmapped_hints(module, layers, nodes, source, hints)
    return LayoutPlan(
        name=NAME,
        rules=rules,
        pairings=as_pairings(paired),
        scope=wrapped_scope(paired),
        unmatched=[n for n in _weight_names(source) if n not in used],
        unchecked=unchecked,
        missing_hints=hints,
    )


def _layer_rules(
    layer: _Layer, pair: Paired, source: Source, issues: _Issues, validated: set[str], unchecked: list[str]
) -> list[Rule]:
    if layer.kind in _RECURRENT:
        return _recurrent_rules(layer, pair, source, issues, validated)
    if layer.node.op_type in _NORMS:
        return _norm_rules(layer, pair, source, issues, validated)
    return _plain_rules(layer, pair, source, issues, validated, unchecked)


def _unmapped_hints(
    module: nn.Module, layers: list[_Layer], nodes: list[_Node], source: Source, hints: dict[str, str]
) -> None:
    """Why an Embedding or Linear got nothing when the graph uses a stored table or weight some other way:
    ``Gather`` along an axis other than 0, ``MatMul`` by a stored tensor of 3 or more axes."""
    graph = _Graph.of(nodes, source)
    found = {layer.kind for layer in layers}
    why: dict[str, str] = {}
    for node in nodes:
        first = graph.stored(node.input(0)) if node.op_type == "Gather" else None
        second = graph.stored(node.input(1)) if node.op_type == "MatMul" else None
        if first and len(source.infos[first].shape) == 2 and _is_float(source.infos[first].dtype):
            why.setdefault(
                "Embedding",
                f"Gather node '{node.label}' takes entries of the stored table '{first}' along axis "
                f"{node.attr('axis', 0)}, while nn.Embedding looks up rows (axis 0): the output's axes differ: "
                "store the table transposed and gather along axis 0, or index the tensor in forward()",
            )
        if second and len(source.infos[second].shape) > 2:
            why.setdefault(
                "Linear",
                f"MatMul node '{node.label}' multiplies by the stored {len(source.infos[second].shape)}-D "
                f"tensor '{second}' {source.infos[second].shape}, a batched product with one matrix per "
                "leading index, not one nn.Linear: hold it as an nn.Parameter and load it with "
                "layout='torch' under its own name, or use torch.matmul in forward()",
            )
    for slot in module_slots(module):
        if slot.kind in why and slot.kind not in found:
            hints.setdefault(slot.path, why[slot.kind])


def _named_path(layer: _Layer) -> tuple[str, ...]:
    """The module path a layer's stored tensors name, where they all share one (``head.weight``, ``head.bias``:
    ``head``, as torch.onnx.export keeps parameter names); synthetic names (``onnx::LSTM_201``) name none."""
    owners = {name.rpartition(".")[0] for name in layer.tensors.values()}
    (owner,) = owners if len(owners) == 1 else ("",)
    return (owner,) if owner and ":" not in owner else ()


def _nodes(raw_nodes: list[Mapping[str, Any]]) -> list[_Node]:
    """The reader's node dicts as nodes; a name that is empty or not unique gets ``#index``."""
    names = Counter(raw.get("name", "") for raw in raw_nodes)
    nodes = []
    for index, raw in enumerate(raw_nodes):
        domain, op, name = raw.get("domain", ""), raw["op_type"], raw.get("name", "")
        nodes.append(
            _Node(
                index,
                op if domain in ("", "ai.onnx") else f"{domain}.{op}",
                name,
                tuple(raw["inputs"]),
                tuple(raw["outputs"]),
                dict(raw.get("attributes", {})),
                label="" if names[name] == 1 else f"{name or op}#{index}",
            )
        )
    return nodes


def _explain_unrolled_recurrence(
    module: nn.Module, layers: list[_Layer], where: str, error: LayoutError
) -> None:
    """When pairing failed and a recurrent module has no node of its kind in the graph, say why.

    Exporters that unroll the recurrence into per-step MatMul/Add nodes (torch.onnx.export's dynamo
    exporter does so for nn.RNN) leave nothing that maps back to the module's weights; a graph whose
    recurrent nodes are of another kind (an LSTM file, a GRU module) is a module of the wrong class.
    """
    found = {layer.kind for layer in layers}
    recurrent = sorted(found & set(_RECURRENT))
    for path, sub in module.named_modules():
        kind = slot_kind(sub)
        if not (isinstance(sub, nn.RNNBase) and kind in _RECURRENT and kind not in found):
            continue
        label = f"'{path}'" if path else "the model itself"
        if recurrent:  # the graph recurs with another kind of node: the module is of the wrong class
            raise LayoutError(
                f"{where} has ONNX {' and '.join(recurrent)} node(s) but no {kind} node for {label} "
                f"({type(sub).__name__}): the weights of one kind of recurrent layer do not fit another. "
                f"Fix: build the module as nn.{recurrent[0]} with the graph's sizes, or load a file exported "
                f"from a model with a {kind}. (Pairing said: {error})"
            ) from error
        raise LayoutError(
            f"{where} has no ONNX {kind} node for {label} ({type(sub).__name__}): the graph computes "
            "the recurrence some other way (an exporter that unrolls it into per-step MatMul and Add "
            "nodes, as torch.onnx.export's dynamo exporter does for nn.RNN), and those nodes do not "
            f"map back to the module's weights. Fix: export with torch.onnx.export(..., dynamo=False), "
            f"which writes {kind} nodes, or save the PyTorch weights themselves (weightport.save). "
            f"(Pairing said: {error})"
        ) from error


def _loop_hints(
    module: nn.Module, layers: list[_Layer], nodes: list[_Node], source: Source
) -> dict[str, str]:
    """Why a recurrent module got nothing when the graph runs its recurrence in a ``Loop`` or ``Scan``.

    tf2onnx rewrites Keras LSTM and GRU(reset_after=True) into ONNX LSTM/GRU nodes, but leaves SimpleRNN,
    GRU(reset_after=False) and masked layers as a loop whose body (a subgraph, not read here) multiplies
    by weights passed in as the loop's inputs: nothing says which input is which gate's matrix.
    """
    loops = [node for node in nodes if node.op_type in ("Loop", "Scan")]
    found = {layer.kind for layer in layers}
    hints = {}
    for slot in module_slots(module):
        if not loops or slot.kind not in _RECURRENT or slot.kind in found:
            continue
        loop = loops[0]
        weights = [n for n in loop.inputs if n in source.infos and len(source.infos[n].shape) >= 1]
        hints[slot.path] = (
            f"the graph has no ONNX {slot.kind} node: {loop.op_type} node '{loop.label}' runs the recurrence "
            f"step by step, its body (a subgraph, which weightport does not read) multiplying by "
            f"{', '.join(repr(w) for w in weights[:4]) or 'tensors'} with nothing to say which is which gate's. "
            "tf2onnx writes such loops for Keras SimpleRNN, GRU(reset_after=False) and masked layers. "
            "Load the Keras weights file instead (weightport.load(model, 'model.weights.h5') maps SimpleRNN; "
            "GRU(reset_after=False) computes what no PyTorch GRU does), or convert to ONNX from a model "
            f"whose {slot.kind} becomes an ONNX {slot.kind} node"
        )
    return hints


def _weight_names(source: Source) -> list[str]:
    """Tensors that must be placed: floating-point initializers with at least one axis.

    Constant values are graph code, and so are scalars: no weight of a layer this layout maps is a
    0-d tensor, while exporters that keep every constant as an initializer (tf2onnx) store the scalar
    zero their initial states are expanded from, or a loop's bounds, that way.
    """
    names = source.metadata.get("initializers", list(source.infos))
    return [
        n for n in names if n in source.infos and _is_float(source.infos[n].dtype) and source.infos[n].shape
    ]


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or is_ml_float(dtype)


def _all_zero(source: Source, name: str) -> bool:
    return not np.any(source.read(name))


# --- finding the layers --------------------------------------------------------------------------------


# ONNX Cast ``to`` codes and the stored dtypes each widens exactly (every value kept): such a Cast
# between a stored tensor and a node (float16 storage read as float32) changes no value.
_EXACT_CASTS = {
    1: ("float16", "bfloat16", "float32"),
    11: ("float16", "bfloat16", "float32", "float64"),
    10: ("float16",),
}
_PASS_THROUGH = ("Identity", "Cast")  # the ops a stored tensor is followed through


@dataclass
class _Graph:
    """The nodes' wiring, and which inputs are stored tensors (followed through Identity and exact Casts)."""

    source: Source
    producers: dict[str, _Node]
    consumers: dict[str, list[_Node]]
    fused: set[int] = field(default_factory=set)  # Add nodes already taken as some layer's bias

    @classmethod
    def of(cls, nodes: list[_Node], source: Source) -> _Graph:
        consumers: dict[str, list[_Node]] = {}
        for node in nodes:
            for name in node.inputs:
                consumers.setdefault(name, []).append(node)
        return cls(source, {out: node for node in nodes for out in node.outputs}, consumers)

    def stored(self, name: str, depth: int = 0) -> str | None:
        """The stored tensor that input ``name`` holds, or None when the graph computes it.

        ``Identity`` nodes (exporters write them for a tensor used twice) and ``Cast`` nodes that widen
        exactly are followed; any other op would compute new values, and none is ever run.
        """
        if not name:
            return None
        if name in self.source.infos:
            return name
        node = self.producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH or depth > len(self.producers):
            return None
        inner = self.stored(node.input(0), depth + 1)
        if inner is None or node.op_type == "Identity":
            return inner
        dtype = self.source.infos[inner].dtype.name
        return inner if dtype in _EXACT_CASTS.get(node.attr("to"), ()) else None

    def ints(self, name: str) -> list[int] | None:
        """The values of a small stored integer tensor (axes, perm, shape), or None."""
        found = self.stored(name)
        if found is None or self.source.infos[found].dtype.kind not in "iu":
            return None
        values = np.asarray(self.source.read(found)).reshape(-1)
        return [int(v) for v in values] if values.size <= 64 else None

    def only_consumer(self, node: _Node) -> _Node | None:
        after = self.consumers.get(node.outputs[0], []) if node.outputs else []
        return after[0] if len(after) == 1 else None


def _find_layers(nodes: list[_Node], source: Source, issues: _Issues, validated: set[str]) -> list[_Layer]:
    graph = _Graph.of(nodes, source)
    layers: list[_Layer] = []
    seen: set[tuple[Any, ...]] = set()
    for node in nodes:
        if node.op_type in _RECURRENT:
            layer = _recurrent_layer(node, graph, issues, validated)
        elif node.op_type == "Gemm":
            layer = _gemm_layer(node, graph, issues)
        elif node.op_type == "MatMul":
            layer = _matmul_layer(node, graph)
        elif node.op_type == "Conv":
            layer = _conv_layer(node, graph, issues)
        elif node.op_type == "Gather":
            layer = _gather_layer(node, graph)
        elif node.op_type in _NORMS:
            layer = _norm_layer(node, graph, issues)
        else:
            layer = None
        if layer is None:
            continue
        # A layer applied twice (one Linear called in two places) shows as two nodes on the same stored
        # tensors: it is one source layer, filled once.
        key: tuple[Any, ...] = (
            layer.kind,
            tuple(sorted(layer.tensors.items())),
            repr(sorted(layer.ops.items())),
            repr(sorted(node.attributes.items())),
            layer.spatial,
        )
        if key not in seen:
            seen.add(key)
            layers.append(layer)
    return layers


def _computed(node: _Node, role: str, name: str, issues: _Issues) -> None:
    issues.add(
        node, f"input {role} '{name}' is computed by the graph, not stored in the file. Fix: {_FIX_COMPUTED}."
    )


def _stored_inputs(
    node: _Node, inputs: list[tuple[str, int, str]], graph: _Graph, issues: _Issues
) -> dict[str, str] | None:
    """``{key: stored tensor}`` for the node's ``(key, position, ONNX name)`` inputs that are given;
    None (and an issue) when one of them is computed by the graph."""
    tensors = {}
    for key, position, role in inputs:
        name = node.input(position)
        if not name:
            continue
        found = graph.stored(name)
        if found is None:
            _computed(node, role, name, issues)
            return None
        tensors[key] = found
    return tensors


def _recurrent_layer(node: _Node, graph: _Graph, issues: _Issues, validated: set[str]) -> _Layer | None:
    kind = node.op_type
    roles = [("W", 1), ("R", 2), ("B", 3)] + ([("P", 7)] if kind == "LSTM" else [])
    tensors = _stored_inputs(node, [(role, position, role) for role, position in roles], graph, issues)
    if tensors is None:
        return None
    if "W" not in tensors or "R" not in tensors:
        issues.add(node, "has no W or R input; the graph is malformed. Fix: re-export the model.")
        return None
    if node.synthetic:
        return _Layer(node, kind, tensors, detail=f"ONNX {kind} arrays")
    _check_recurrent_node(node, tensors, graph, issues, validated)
    direction = node.attr("direction", "forward")
    notes = [f"hidden_size={node.attr('hidden_size')}", f"direction={direction}"]
    if node.attr("layout", 0):
        notes.append("layout=1: X and Y batch-first, as batch_first=True takes them")
    if node.input(4):
        # ONNX zeroes Y past each sequence's length and takes Y_h at its last step: PyTorch does the same
        # for a PackedSequence. The weights are the same either way; how forward() is called is the model's.
        notes.append(
            "sequence_lens: steps past each length give zeros, as PyTorch gives for a packed input "
            "(nn.utils.rnn.pack_padded_sequence)"
        )
    return _Layer(node, kind, tensors, detail=f"ONNX {kind} node ({', '.join(notes)})")


def _check_initial_states(node: _Node, graph: _Graph, issues: _Issues, validated: set[str]) -> None:
    """Initial states stored in the file (torch.onnx.export's dynamo exporter writes zeros there).

    All zero is what PyTorch's module starts from when ``forward`` gets no state: accepted. Anything
    else is an input of the computation, not a weight the module can hold: refused. States computed by
    the graph (from its inputs) are the caller's, as in PyTorch.
    """
    states = (
        (("initial_h", 5, "h_0"), ("initial_c", 6, "c_0"))
        if node.op_type == "LSTM"
        else (("initial_h", 5, "h_0"),)
    )
    for role, position, torch_name in states:
        name = graph.stored(node.input(position))
        if name is None:
            continue
        if _all_zero(graph.source, name):
            validated.add(name)
            continue
        issues.add(
            node,
            f"input {role} '{name}' is a stored, non-zero initial state; PyTorch's {node.op_type} starts "
            f"from zeros unless forward() is given {torch_name}, and a module holds no state to load it "
            f"into. Fix: pass those values as {torch_name} when calling the module (read them with "
            f"weightport.open_source), or re-export without a constant initial state.",
            unsupported=True,
        )


def _check_recurrent_node(
    node: _Node, tensors: dict[str, str], graph: _Graph, issues: _Issues, validated: set[str]
) -> None:
    kind, source = node.op_type, graph.source
    directions = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    if kind == "GRU" and node.attr("linear_before_reset", 0) != 1:
        issues.add(
            node,
            "linear_before_reset=0 (the ONNX default) computes h~ = tanh(W_h x + R_h (r * h) + b), "
            "applying the reset gate before the recurrent product, but PyTorch's GRU computes "
            "n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); they agree only when R_h is zero. "
            "Fix: re-export the model with linear_before_reset=1 (torch.onnx.export writes that).",
            unsupported=True,
        )
    if "P" in tensors:
        if _all_zero(source, tensors["P"]):
            validated.add(tensors["P"])
        else:
            issues.add(
                node,
                f"input P '{tensors['P']}' holds non-zero peephole weights; ONNX adds P_i*c, P_f*c "
                "and P_o*c inside the gates, PyTorch's LSTM has no peephole terms. Fix: use a model "
                "without peepholes (P absent or all zero).",
                unsupported=True,
            )
    _check_initial_states(node, graph, issues, validated)
    if node.attr("clip") is not None:
        issues.add(
            node,
            f"clip={node.attr('clip')} clamps the gates' inputs to [-clip, clip]; PyTorch's "
            f"{kind} never clips. Fix: re-export without clip.",
            unsupported=True,
        )
    if node.attr("input_forget", 0):
        issues.add(
            node,
            "input_forget=1 couples the input and forget gates; PyTorch's LSTM keeps them "
            "independent. Fix: re-export with input_forget=0.",
            unsupported=True,
        )
    defaults = list(_RECURRENT[kind][2]) * directions
    found = node.attr("activations")
    if kind == "RNN":
        if found is not None and not (len(set(found)) == 1 and found[0] in ("Tanh", "Relu")):
            issues.add(
                node,
                f"activations={found}; PyTorch's RNN uses one nonlinearity, tanh or relu, in "
                "every direction. Fix: re-export with Tanh or Relu.",
                unsupported=True,
            )
    elif found is not None and list(found) != defaults:
        issues.add(
            node,
            f"activations={found}; PyTorch's {kind} uses {defaults}. Fix: re-export with the "
            "default activations.",
            unsupported=True,
        )


def _bias_op(shape: tuple[int, ...], size: int) -> Op | None:
    """How a stored bias of ``shape`` becomes a vector of ``size`` (None: it is no bias vector)."""
    if shape == (size,):
        return Identity()
    if len(shape) > 1 and shape[-1] == size and all(d == 1 for d in shape[:-1]):
        return Reshape(shape, (size,))
    return None


def _stored_matrix(name: str, graph: _Graph) -> tuple[str, bool] | None:
    """The stored 2-D tensor behind input ``name`` and whether a Transpose node sits in between."""
    infos = graph.source.infos
    found = graph.stored(name)
    if found is not None:
        return (found, False) if len(infos[found].shape) == 2 else None
    node = graph.producers.get(name)
    if node is not None and node.op_type == "Transpose" and node.attr("perm") in (None, [1, 0]):
        inner = graph.stored(node.input(0))
        if inner is not None and len(infos[inner].shape) == 2:
            return inner, True
    return None


def _gemm_layer(node: _Node, graph: _Graph, issues: _Issues) -> _Layer | None:
    source = graph.source
    found = _stored_matrix(node.input(1), graph)
    if found is None:
        return None
    name, transposed = found
    trans_b = bool(node.attr("transB", 0)) != transposed  # True: the stored matrix is (out, in)
    shape = source.infos[name].shape
    out_features = shape[0] if trans_b else shape[1]
    ops: dict[str, Op] = {"weight": Identity() if trans_b else Transpose((1, 0))}
    tensors = {"weight": name}
    if node.attr("transA", 0):
        issues.add(
            node,
            "transA=1 transposes the layer's input itself; nn.Linear cannot. Fix: re-export with transA=0.",
            unsupported=True,
        )
    if node.attr("alpha", 1.0) != 1.0:
        issues.add(
            node,
            f"alpha={node.attr('alpha')} scales A*B; weightport only moves values, never scales "
            "them. Fix: multiply B by alpha and set alpha=1 in the file.",
            unsupported=True,
        )
    bias = node.input(2)
    if bias:
        if node.attr("beta", 1.0) != 1.0:
            issues.add(
                node,
                f"beta={node.attr('beta')} scales C; weightport only moves values, never scales "
                "them. Fix: multiply C by beta and set beta=1 in the file.",
                unsupported=True,
            )
        stored_bias = graph.stored(bias)
        op = _bias_op(source.infos[stored_bias].shape, out_features) if stored_bias else None
        if stored_bias is None or op is None:
            issues.add(
                node,
                f"input C '{bias}' is not a stored bias vector of {out_features} values; "
                "nn.Linear adds one bias per output. Fix: re-export with a per-output bias.",
                unsupported=True,
            )
        else:
            tensors["bias"], ops["bias"] = stored_bias, op
    return _Layer(node, "Linear", tensors, ops, detail=f"ONNX Gemm node {shape}")


def _last_value(name: str, graph: _Graph, depth: int = 0) -> int | None:
    """The last entry of a 1-D integer tensor, when the file fixes it: stored, or the last stored
    part of a ``Concat`` (through ``Cast``), as exporters build a target shape from a computed batch size."""
    values = graph.ints(name)
    if values is not None:
        return values[-1] if values else None
    node = graph.producers.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Cast":
        return _last_value(node.input(0), graph, depth + 1)
    if node.op_type == "Concat" and node.attr("axis") in (0, -1) and node.inputs:
        return _last_value(node.inputs[-1], graph, depth + 1)
    return None


def _keeps_last_axis(node: _Node, size: int, graph: _Graph) -> bool:
    """Whether ``node`` only regroups the leading axes of a tensor whose last axis has ``size`` entries.

    tf2onnx writes Dense on a 3-D input as Reshape -> MatMul -> Reshape (back to the leading axes) -> Add,
    so the bias is added after the second Reshape; it is still one bias per output when that Reshape's
    target shape ends in the same ``size``.
    """
    if node.op_type == "Identity":
        return True
    if node.op_type != "Reshape":
        return False
    last = node.attr("shape", [None])[-1] if len(node.inputs) < 2 else _last_value(node.input(1), graph)
    return last == size


def _matmul_layer(node: _Node, graph: _Graph) -> _Layer | None:
    found = _stored_matrix(node.input(1), graph)
    if found is None:
        return None  # a product of two activations: no weights
    name, transposed = found
    shape = graph.source.infos[name].shape
    out_features = shape[0] if transposed else shape[1]
    tensors = {"weight": name}
    ops: dict[str, Op] = {"weight": Identity() if transposed else Transpose((1, 0))}
    result, after = node, graph.only_consumer(node)
    while after is not None and after.op_type != "Add" and _keeps_last_axis(after, out_features, graph):
        result, after = after, graph.only_consumer(after)
    if after is not None and after.op_type == "Add" and after.index not in graph.fused:
        others = [n for n in after.inputs if n != result.outputs[0]]
        bias = graph.stored(others[0]) if len(others) == 1 else None
        op = _bias_op(graph.source.infos[bias].shape, out_features) if bias else None
        if bias is not None and op is not None:
            tensors["bias"], ops["bias"] = bias, op
            graph.fused.add(after.index)
    return _Layer(node, "Linear", tensors, ops, detail=f"ONNX MatMul node {shape}")


def _raw_axes(node: _Node, graph: _Graph) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze: an attribute before opset 13, a stored input since."""
    axes = node.attr("axes") if len(node.inputs) < 2 else graph.ints(node.input(1))
    return list(axes) if axes else None  # Squeeze without axes drops whatever unit axes the input has


def _axes(node: _Node, graph: _Graph, rank: int) -> list[int] | None:
    """Those axes made non-negative; ``rank``: the Squeeze's input rank, the Unsqueeze's output rank."""
    axes = _raw_axes(node, graph)
    if axes is None:
        return None
    normalized = [a + rank if a < 0 else a for a in axes]
    return normalized if all(0 <= a < rank for a in normalized) else None


def _unit_axis_from_unsqueeze(name: str, axis: int, rank: int, graph: _Graph) -> bool:
    """Whether axis ``axis`` of input ``name`` (rank ``rank``) was put there by an ``Unsqueeze``,
    followed back through ``Transpose`` and ``Identity`` nodes: then it has one entry."""
    for _ in range(16):
        node = graph.producers.get(name)
        if node is None:
            return False
        if node.op_type == "Identity":
            name = node.input(0)
        elif node.op_type == "Transpose":
            perm = node.attr("perm") or list(range(rank))[::-1]
            if sorted(perm) != list(range(rank)):
                return False
            axis, name = perm[axis], node.input(0)
        elif node.op_type == "Unsqueeze":
            return axis in (_axes(node, graph, rank) or [])
        else:
            return False
    return False


def _conv_spatial(node: _Node, shape: tuple[int, ...], graph: _Graph) -> tuple[int, ...] | None:
    """The spatial axes of a Conv that really convolve, when the others run over a unit axis.

    tf2onnx writes Keras Conv1D as TensorFlow does: Unsqueeze the input to 2-D, a Conv with a kernel of
    height 1, Squeeze. Along an axis the Unsqueeze made, with kernel 1, stride 1 and no padding, that Conv
    is a Conv1d (None: every axis convolves).
    """
    dims = len(shape) - 2
    kernel = tuple(shape[2:])
    strides = node.attr("strides") or [1] * dims
    dilations = node.attr("dilations") or [1] * dims
    begin, end = _onnx_pads(node, kernel, tuple(dilations), dims)
    unit = [
        s
        for s in range(dims)
        if kernel[s] == 1
        and strides[s] == 1
        and begin[s] == end[s] == 0
        and _unit_axis_from_unsqueeze(node.input(0), 2 + s, len(shape), graph)
    ]
    kept = tuple(s for s in range(dims) if s not in unit)
    return kept if unit and kept else None


def _channel_bias(node: _Node, channels: int, rank: int, graph: _Graph) -> tuple[str, Op] | None:
    """A stored per-channel bias added after the Conv (tf2onnx adds it after the Squeeze of a Conv1D).

    The channel axis is followed through ``Squeeze``/``Unsqueeze``/``Transpose``/``Identity`` to an
    ``Add`` of a stored tensor that has ``channels`` entries on that axis and one on every other.
    """
    axis, current, after = 1, node, graph.only_consumer(node)
    while after is not None and after.op_type != "Add":
        if after.op_type in ("Squeeze", "Unsqueeze"):
            squeeze = after.op_type == "Squeeze"
            raw = _raw_axes(after, graph) or []
            axes = _axes(after, graph, rank if squeeze else rank + len(raw))
            if axes is None or (squeeze and axis in axes):
                return None
            if squeeze:
                axis, rank = axis - sum(a < axis for a in axes), rank - len(axes)
            else:
                rank += len(axes)
                for a in sorted(axes):
                    axis += a <= axis
        elif after.op_type == "Transpose":
            perm = after.attr("perm") or list(range(rank))[::-1]
            if sorted(perm) != list(range(rank)):
                return None
            axis = perm.index(axis)
        elif after.op_type != "Identity":
            return None
        current, after = after, graph.only_consumer(after)
    if after is None or after.index in graph.fused:
        return None
    others = [n for n in after.inputs if n != current.outputs[0]]
    bias = graph.stored(others[0]) if len(others) == 1 else None
    if bias is None:
        return None
    shape = graph.source.infos[bias].shape
    aligned = axis - (rank - len(shape))  # the bias axis facing the channels (broadcasting aligns right)
    if len(shape) > rank or not 0 <= aligned < len(shape) or shape[aligned] != channels:
        return None
    if any(d != 1 for i, d in enumerate(shape) if i != aligned):
        return None
    graph.fused.add(after.index)
    return bias, Identity() if shape == (channels,) else Reshape(shape, (channels,))


def _conv_layer(node: _Node, graph: _Graph, issues: _Issues) -> _Layer | None:
    source = graph.source
    weight = graph.stored(node.input(1))
    if weight is None or len(source.infos[weight].shape) not in _CONV_KINDS:
        return None
    shape = source.infos[weight].shape
    tensors = {"weight": weight}
    ops: dict[str, Op] = {}
    spatial = _conv_spatial(node, shape, graph)
    kind, detail = _CONV_KINDS[len(shape)], f"ONNX Conv node {shape}"
    if spatial is not None:
        target = (*shape[:2], *(shape[2 + s] for s in spatial))
        kind, detail = _CONV_KINDS[len(target)], f"{detail} over unit axes (a {_CONV_KINDS[len(target)]})"
        ops["weight"] = Reshape(shape, target)
    pad = _pad_before(node, graph, len(shape) - 2, spatial)
    bias = node.input(2)
    stored_bias = graph.stored(bias)
    if bias and stored_bias is None:
        _computed(node, "B", bias, issues)
    elif stored_bias is not None:
        tensors["bias"] = stored_bias
    else:
        added = _channel_bias(node, shape[0], len(shape), graph)
        if added is not None:
            tensors["bias"], ops["bias"] = added
    return _Layer(node, kind, tensors, ops, detail=detail, spatial=spatial, pad=pad)


def _gather_layer(node: _Node, graph: _Graph) -> _Layer | None:
    """``Gather(data=stored matrix, indices)`` along axis 0: an embedding lookup."""
    table = graph.stored(node.input(0))
    infos = graph.source.infos
    if table is None or len(infos[table].shape) != 2 or node.attr("axis", 0) != 0:
        return None  # indexing activations or shapes, not a table of weights
    if not _is_float(infos[table].dtype):
        return None  # an integer lookup table is graph code
    shape = infos[table].shape
    return _Layer(node, "Embedding", {"weight": table}, detail=f"ONNX Gather node {shape}")


def _norm_layer(node: _Node, graph: _Graph, issues: _Issues) -> _Layer | None:
    """BatchNormalization (scale, B, mean, var) or LayerNormalization (Scale, B) with stored inputs."""
    inputs = [
        (role, position, onnx_name) for position, (role, onnx_name) in enumerate(_NORMS[node.op_type], 1)
    ]
    tensors = _stored_inputs(node, inputs, graph, issues)
    if tensors is None or "weight" not in tensors:
        return None
    kind = _KIND_OF_NORM_OP[node.op_type]
    shape = graph.source.infos[tensors["weight"]].shape
    if node.op_type == "BatchNormalization" and node.attr("spatial", 1) == 0:
        issues.add(
            node,
            "spatial=0 (opset 7-8) keeps one mean and variance per channel and position, while "
            "nn.BatchNorm*d keeps one per channel. Fix: re-export with spatial=1 (opset 9 or later).",
            unsupported=True,
        )
        return None
    detail = f"ONNX {node.op_type} node {shape}"
    if node.attr("training_mode", 0):
        detail += ", training_mode=1: normalizes with the batch's statistics, as the module does in train()"
    return _Layer(node, kind, tensors, detail=detail)


# --- rules for a paired layer --------------------------------------------------------------------------


def _origin(source: Source, layer: _Layer, role: str, name: str) -> str:
    return f"{source.description} node '{layer.node.label}' input {role} '{name}'"


def _recurrent_rules(
    layer: _Layer, pair: Paired, source: Source, issues: _Issues, validated: set[str]
) -> list[Rule]:
    node, slot = layer.node, pair.slot
    module: Any = slot.module  # nn.RNNBase or nn.RNNCellBase
    blocks, order, _ = _RECURRENT[layer.kind]
    hidden = int(module.hidden_size)
    bidirectional = bool(getattr(module, "bidirectional", False))
    if node.synthetic:
        w_shape = source.infos[layer.tensors["W"]].shape
        direction = "bidirectional" if w_shape and w_shape[0] == 2 else "forward"
    else:
        direction = node.attr("direction", "forward")
        _check_recurrent_module(node, slot, pair.how, direction, issues)
    directions = 2 if direction == "bidirectional" else 1
    if direction != "reverse" and (directions == 2) != bidirectional:
        issues.add(
            node,
            f"direction={direction}, but it is paired with {slot.describe()}. Fix: build the "
            f"module with bidirectional={directions == 2}.",
        )
    if getattr(module, "proj_size", 0):
        issues.add(
            node,
            f"'{slot.label}' has proj_size={module.proj_size}; ONNX's LSTM has no projection. "
            "Fix: build the LSTM with proj_size=0.",
            unsupported=True,
        )
    bias = layer.tensors.get("B")
    if bias is not None and not module.bias:
        if not _all_zero(source, bias):
            issues.add(
                node,
                f"input B '{bias}' holds biases but '{slot.label}' was built with bias=False. "
                "Fix: build it with bias=True.",
            )
            return []
        validated.add(bias)
        bias = None
    reorder: tuple[Op, ...] = (ReorderBlocks(0, order),) if blocks > 1 else ()
    rules = []
    for d in range(directions):
        select = Select(d, directions)
        reverse = d == 1

        def rule(param: str, role: str, name: str, *ops: Op, reverse: bool = reverse) -> Rule:
            return Rule(
                slot.name(param, reverse=reverse), (name,), Chain(*ops), _origin(source, layer, role, name)
            )

        rules.append(rule("weight_ih", "W", layer.tensors["W"], select, *reorder))
        rules.append(rule("weight_hh", "R", layer.tensors["R"], select, *reorder))
        if not module.bias:
            continue
        if bias is None:
            for param in ("bias_ih", "bias_hh"):
                rules.append(
                    Rule(
                        slot.name(param, reverse=reverse),
                        (),
                        Zeros((blocks * hidden,)),
                        f"{source.description} node '{node.label}' has no B: zeros",
                    )
                )
        else:
            rules.append(rule("bias_ih", "B", bias, select, SliceBlocks(0, 0, 2), *reorder))
            rules.append(rule("bias_hh", "B", bias, select, SliceBlocks(0, 1, 2), *reorder))
    return rules


def _check_recurrent_module(node: _Node, slot: Slot, how: str, direction: str, issues: _Issues) -> None:
    module: Any = slot.module
    if direction == "reverse":
        if how != "mapping=":
            issues.add(
                node,
                "direction=reverse runs over the sequence backwards and PyTorch has no "
                "reverse-only layer. Fix: if the model flips its input and output in time "
                f"(y = flip(layer(flip(x)))), pass mapping={{'{node.label}': 'module.path'}} to load "
                "it into that forward layer.",
                unsupported=True,
            )
        elif getattr(module, "bidirectional", False):
            issues.add(
                node,
                f"direction=reverse cannot fill '{slot.label}', a bidirectional layer: it would "
                "become its forward half. Fix: map it to a unidirectional layer run on the "
                "time-flipped input.",
            )
    hidden = node.attr("hidden_size")
    if hidden is not None and hidden != module.hidden_size:
        issues.add(
            node,
            f"hidden_size={hidden}, but it is paired with {slot.describe()}. Fix: build it with "
            f"hidden_size={hidden}.",
        )
    if node.op_type == "RNN":
        found = (node.attr("activations") or ["Tanh"])[0]
        expected = "Relu" if module.nonlinearity == "relu" else "Tanh"
        if found in ("Tanh", "Relu") and found != expected:
            issues.add(
                node,
                f"activation {found} but '{slot.label}' uses nonlinearity='{module.nonlinearity}'. "
                f"Fix: build it with nonlinearity='{found.lower()}'.",
            )


def _plain_rules(
    layer: _Layer,
    pair: Paired,
    source: Source,
    issues: _Issues,
    validated: set[str],
    unchecked: list[str],
) -> list[Rule]:
    slot, node = pair.slot, layer.node
    module: Any = slot.module
    if layer.kind.startswith("Conv") and not node.synthetic:
        _check_conv(node, layer, slot, source, issues, unchecked)
    rules = [
        Rule(
            slot.name("weight"),
            (layer.tensors["weight"],),
            layer.ops.get("weight", Identity()),
            _origin(source, layer, _WEIGHT_INPUT.get(layer.kind, "W"), layer.tensors["weight"]),
        )
    ]
    bias = layer.tensors.get("bias")
    has_bias = getattr(module, "bias", None) is not None
    if bias is not None and not has_bias:
        if _all_zero(source, bias):
            validated.add(bias)
        else:
            issues.add(
                node,
                f"has a bias '{bias}' but '{slot.label}' was built with bias=False. "
                "Fix: build it with bias=True.",
            )
    elif bias is not None:
        rules.append(
            Rule(
                slot.name("bias"),
                (bias,),
                layer.ops.get("bias", Identity()),
                _origin(source, layer, "bias", bias),
            )
        )
    elif has_bias:
        rules.append(
            Rule(
                slot.name("bias"),
                (),
                Zeros(tuple(module.bias.shape)),
                f"{source.description} node '{node.label}' has no bias: zeros",
            )
        )
    return rules


def _norm_rules(
    layer: _Layer, pair: Paired, source: Source, issues: _Issues, validated: set[str]
) -> list[Rule]:
    """BatchNormalization -> nn.BatchNorm*d, LayerNormalization -> nn.LayerNorm, values as they are."""
    node, slot = layer.node, pair.slot
    module: Any = slot.module
    if not node.synthetic:
        _check_norm(node, layer, slot, source, issues)
    inputs = dict(_NORMS[node.op_type])
    rules: list[Rule] = []
    for role, name in layer.tensors.items():
        if getattr(module, role, None) is not None:
            rules.append(
                Rule(slot.name(role), (name,), Identity(), _origin(source, layer, inputs[role], name))
            )
            continue
        neutral = {"weight": 1.0, "bias": 0.0}.get(role)
        if neutral is not None and bool(np.all(source.read(name) == neutral)):
            validated.add(name)  # ones / zeros: what a module without that parameter computes
            continue
        setting = _NORM_SETTING[layer.kind, role]
        issues.add(
            node,
            f"input {inputs[role]} '{name}' holds values but '{slot.label}' was built with {setting}=False. "
            f"Fix: build it with {setting}=True.",
        )
    bias = getattr(module, "bias", None)
    if "bias" not in layer.tensors and bias is not None:
        rules.append(
            Rule(
                slot.name("bias"),
                (),
                Zeros(tuple(bias.shape)),
                f"{source.description} node '{node.label}' has no B: zeros",
            )
        )
    if layer.kind == "BatchNorm" and getattr(module, "num_batches_tracked", None) is not None:
        rules.append(
            Rule(
                slot.name("num_batches_tracked"),
                (),
                Zeros(()),
                f"{source.description} node '{node.label}': ONNX counts no batches; 0",
            )
        )
    return rules


def _check_norm(node: _Node, layer: _Layer, slot: Slot, source: Source, issues: _Issues) -> None:
    module: Any = slot.module
    epsilon = float(node.attr("epsilon", 1e-5))
    if not math.isclose(epsilon, float(module.eps), rel_tol=1e-6):
        issues.add(
            node,
            f"epsilon={epsilon:g} but '{slot.label}' was built with eps={module.eps:g}; the normalization "
            f"divides by sqrt(var + eps). Fix: build it with eps={epsilon:g}.",
        )
    if layer.kind == "LayerNorm":
        rank = len(source.infos[layer.tensors["weight"]].shape)
        axis = int(node.attr("axis", -1))
        if axis < 0 and axis != -rank:
            issues.add(
                node,
                f"axis={axis} normalizes over the last {-axis} axes, but its Scale has {rank}; nn.LayerNorm "
                "normalizes over exactly the axes its weight covers. Fix: re-export so Scale covers every "
                "normalized axis.",
                unsupported=True,
            )


def _check_conv(
    node: _Node, layer: _Layer, slot: Slot, source: Source, issues: _Issues, unchecked: list[str]
) -> None:
    module: Any = slot.module
    dims = len(module.kernel_size)
    # The node's own axes (it may convolve over more, unit ones: see _conv_spatial), then the module's.
    node_dims = len(source.infos[layer.tensors["weight"]].shape) - 2
    axes = layer.spatial if layer.spatial is not None else tuple(range(node_dims))
    node_kernel = tuple(source.infos[layer.tensors["weight"]].shape[2:])
    declared = node.attr("kernel_shape")
    if declared is not None and tuple(declared) != node_kernel:
        issues.add(
            node,
            f"kernel_shape={list(declared)} but its weight W has kernel {list(node_kernel)}; the graph is "
            "malformed (onnxruntime refuses it). Fix: re-export the model.",
        )
        return
    strides = node.attr("strides") or [1] * node_dims
    dilations = node.attr("dilations") or [1] * node_dims
    found = {
        "strides": tuple(strides[a] for a in axes),
        "dilations": tuple(dilations[a] for a in axes),
        "group": node.attr("group", 1),
    }
    expected = {"strides": tuple(module.stride), "dilations": tuple(module.dilation), "group": module.groups}
    for key, value in found.items():
        if value != expected[key]:
            issues.add(
                node,
                f"{key}={value} but '{slot.label}' has {expected[key]}. Fix: build the "
                f"{type(module).__name__} to match.",
            )
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER") and any(s != 1 for s in found["strides"]):
        issues.add(
            node,
            f"auto_pad={auto} with strides={found['strides']} pads each input so the output has "
            "ceil(length / stride) steps: how much depends on the input's length, while PyTorch's Conv pads "
            "a fixed amount. Fix: re-export with explicit pads (the input's shape fixed), or pad the input "
            "yourself (F.pad) before a Conv with padding=0.",
            unsupported=True,
        )
        return
    kernel = tuple(module.kernel_size)
    node_begin, node_end = _onnx_pads(node, node_kernel, tuple(dilations), node_dims)
    begin, end = tuple(node_begin[a] for a in axes), tuple(node_end[a] for a in axes)
    name = type(module).__name__
    if module.padding_mode != "zeros" and any(_torch_pads(module, kernel, dims)[0]):
        _check_pad_before(node, layer, slot, (begin, end), issues, unchecked)
        return
    if (begin, end) == _torch_pads(module, kernel, dims):
        return
    stride_one = all(s == 1 for s in found["strides"])
    if stride_one and (begin, end) == _same_pads(kernel, tuple(module.dilation), upper=True):
        issues.add(
            node,
            f"pads begin {begin}, end {end} (auto_pad={auto}) are what padding='same' pads, but '{slot.label}' "
            f"has padding={module.padding}. Fix: build it with padding='same'.",
        )
    elif begin != end:
        issues.add(
            node,
            f"pads begin {begin}, end {end}: PyTorch's Conv pads both sides equally (padding='same' puts "
            f"the odd one at the end, only with stride 1). Fix: put an explicit zero padding (F.pad) "
            f"before a {name}(padding=0).",
            unsupported=True,
        )
    else:
        issues.add(
            node,
            f"pads {begin} (with zeros) but '{slot.label}' has padding={module.padding}. Fix: build it "
            f"with padding={begin}.",
        )


# ONNX Pad modes and the PyTorch padding_mode that pads the same way
_PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _check_pad_before(
    node: _Node,
    layer: _Layer,
    slot: Slot,
    conv_pads: tuple[tuple[int, ...], tuple[int, ...]],
    issues: _Issues,
    unchecked: list[str],
) -> None:
    """A module with padding_mode other than 'zeros': the graph must pad that way in a Pad node before the
    Conv (what torch.onnx.export writes), the Conv itself not at all."""
    module: Any = slot.module
    padding, mode = tuple(module.padding), module.padding_mode
    if any(conv_pads[0] + conv_pads[1]) or layer.pad is None or layer.pad[0] != mode:
        how = (
            f"the Conv pads {conv_pads[0]} with zeros"
            if any(conv_pads[0] + conv_pads[1])
            else "no Pad node before it"
            if layer.pad is None
            else f"the Pad node before it pads as padding_mode='{layer.pad[0]}'"
        )
        issues.add(
            node,
            f"{how}, but '{slot.label}' has padding={padding}, padding_mode='{mode}'. Fix: build it with "
            f"the graph's padding (padding_mode='zeros' and the Conv's pads, or the Pad node's mode).",
        )
        return
    if layer.pad[1] is None:
        unchecked.append(
            f"how much the graph pads before Conv '{node.label}' (it computes the amounts); taken to be "
            f"'{slot.label}''s padding={padding}"
        )
    elif layer.pad[1] != (padding, padding):
        issues.add(
            node,
            f"the Pad node before it pads begin {layer.pad[1][0]}, end {layer.pad[1][1]}, but '{slot.label}' "
            f"has padding={padding}. Fix: build it with the Pad node's amounts (equal on both sides).",
            unsupported=layer.pad[1][0] != layer.pad[1][1],
        )


def _pad_before(node: _Node, graph: _Graph, dims: int, spatial: tuple[int, ...] | None) -> Any:
    """The Pad node that makes a Conv's input, as _Layer.pad holds it (None: no Pad, or one PyTorch cannot
    fold into a Conv: non-zero constant, or padding along the batch or channel axes)."""
    pad = graph.producers.get(node.input(0))
    while pad is not None and pad.op_type == "Identity":
        pad = graph.producers.get(pad.input(0))
    if pad is not None and pad.op_type == "Concat":
        return "circular", None  # torch.onnx.export wraps the input around with Slice and Concat
    if pad is None or pad.op_type != "Pad":
        return None
    raw_mode = pad.attr("mode", "constant")
    mode = _PAD_MODES.get(raw_mode.decode() if isinstance(raw_mode, bytes) else str(raw_mode))
    value = pad.attr("value", 0.0) if len(pad.inputs) < 3 else None
    if mode is None or (mode == "zeros" and value != 0.0):
        return None
    pads = pad.attr("pads") if len(pad.inputs) < 2 else graph.ints(pad.input(1))
    if len(pad.inputs) > 3 and pad.input(3):  # opset 18 axes: not followed
        pads = None
    rank = dims + 2
    if pads is None or len(pads) != 2 * rank:
        return mode, None
    if any(pads[a] or pads[a + rank] for a in (0, 1)):
        return None
    axes = spatial if spatial is not None else tuple(range(dims))
    return mode, (tuple(pads[2 + a] for a in axes), tuple(pads[2 + rank + a] for a in axes))


def _same_pads(kernel: tuple[int, ...], dilation: tuple[int, ...], upper: bool) -> tuple[tuple, tuple]:
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    small = tuple(t // 2 for t in totals)
    large = tuple(t - t // 2 for t in totals)
    return (small, large) if upper else (large, small)


def _onnx_pads(
    node: _Node, kernel: tuple[int, ...], dilation: tuple[int, ...], dims: int
) -> tuple[tuple, tuple]:
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(kernel, dilation, auto == "SAME_UPPER")
    if auto == "VALID":
        return (0,) * dims, (0,) * dims
    pads = tuple(node.attr("pads", [0] * 2 * dims))
    return pads[:dims], pads[dims:]


def _torch_pads(module: Any, kernel: tuple[int, ...], dims: int) -> tuple[tuple, tuple]:
    if module.padding == "valid":
        return (0,) * dims, (0,) * dims
    if module.padding == "same":
        return _same_pads(kernel, tuple(module.dilation), upper=True)
    return tuple(module.padding), tuple(module.padding)


# --- arrays without a graph: export() and its key scheme ------------------------------------------------


def _nodes_from_keys(module: nn.Module, source: Source) -> tuple[list[_Node], dict[str, str]]:
    """Nodes for a mapping in export()'s key scheme, and a mapping that pins each to its slot."""
    slots = {slot.label: slot for slot in module_slots(module)}
    groups: dict[str, dict[str, str]] = {}
    for name in source.infos:
        label, _, role = name.rpartition("/")
        groups.setdefault(label, {})[role] = name
    unknown = [label for label in groups if label not in slots]
    if unknown:
        raise LayoutError(
            f"{source.description} has no ONNX graph, so its keys must be '<layer>/<ONNX input>' as "
            f"weightport.layouts.onnx.export writes them; {', '.join(repr(u) for u in unknown)} name no layer of "
            f"{type(module).__name__}. Its layers: {', '.join(repr(s) for s in slots) or 'none'}."
        )
    nodes: list[_Node] = []
    for label, roles in groups.items():
        kind = slots[label].kind
        inputs: tuple[str, ...]
        if kind in _RECURRENT:
            op, inputs = kind, ("", roles.get("W", ""), roles.get("R", ""), roles.get("B", ""))
        elif kind == "Linear":
            op, inputs = "Gemm", ("", roles.get("B", ""), roles.get("C", ""))
        elif kind in _CONV_KINDS.values():
            op, inputs = "Conv", ("", roles.get("W", ""), roles.get("B", ""))
        elif kind == "Embedding":
            op, inputs = "Gather", (roles.get("data", ""), "")
        elif kind in _NORM_OPS:
            op = _NORM_OPS[kind]
            inputs = ("", *(roles.get(name, "") for _, name in _NORMS[op]))
        else:
            continue  # no ONNX node: its arrays stay unmatched
        attributes = {"transB": 1} if op == "Gemm" else {}
        nodes.append(_Node(len(nodes), op, label, inputs, (), attributes, synthetic=True))
    return nodes, {node.label: node.name for node in nodes}


def export(module: nn.Module) -> dict[str, np.ndarray]:
    """``module``'s weights as ONNX-layout arrays, keyed ``"<slot>/<ONNX input>"`` (see the module doc).

    Raises:
        LayoutError: a layer has no ONNX node here (only RNN/LSTM/GRU and their
            cells, Linear, Conv1d/2d/3d, Embedding, BatchNorm and LayerNorm are exported).
    """
    from weightport.tensors import numpy_of

    state = module.state_dict()
    arrays: dict[str, np.ndarray] = {}
    refused = []
    for slot in module_slots(module):
        prefix = f"{slot.label}/" if slot.label else ""
        sub = slot.module
        if slot.kind in _RECURRENT and not getattr(sub, "proj_size", 0):
            order = _RECURRENT[slot.kind][1]
            back = ReorderBlocks(0, order).inverse()
            directions = (False, True) if slot.bidirectional else (False,)

            def get(param: str, reverse: bool) -> np.ndarray:
                return back(numpy_of(state[slot.name(param, reverse=reverse)], copy=True))  # noqa: B023

            arrays[prefix + "W"] = np.stack([get("weight_ih", r) for r in directions])
            arrays[prefix + "R"] = np.stack([get("weight_hh", r) for r in directions])
            if sub.bias:
                arrays[prefix + "B"] = np.stack(
                    [np.concatenate([get("bias_ih", r), get("bias_hh", r)]) for r in directions]
                )
        elif slot.kind == "Linear":
            arrays[prefix + "B"] = numpy_of(state[slot.name("weight")], copy=True)
            if sub.bias is not None:
                arrays[prefix + "C"] = numpy_of(state[slot.name("bias")], copy=True)
        elif slot.kind in _CONV_KINDS.values():
            arrays[prefix + "W"] = numpy_of(state[slot.name("weight")], copy=True)
            if sub.bias is not None:
                arrays[prefix + "B"] = numpy_of(state[slot.name("bias")], copy=True)
        elif slot.kind == "Embedding":
            arrays[prefix + "data"] = numpy_of(state[slot.name("weight")], copy=True)
        elif slot.kind in _NORM_OPS:
            # ONNX requires the scale (and BatchNormalization its B): a module without them computes ones/zeros
            norm: Any = sub
            size = (norm.num_features,) if slot.kind == "BatchNorm" else tuple(norm.normalized_shape)
            neutral = {"weight": np.ones(size, np.float32), "bias": np.zeros(size, np.float32)}
            for role, name in _NORMS[_NORM_OPS[slot.kind]]:
                if slot.name(role) in state:
                    arrays[prefix + name] = numpy_of(state[slot.name(role)], copy=True)
                elif role == "weight" or (role == "bias" and slot.kind == "BatchNorm"):
                    arrays[prefix + name] = neutral[role]
        else:
            refused.append(slot.describe())
    if refused:
        raise LayoutError(
            f"cannot export {type(module).__name__} to the ONNX layout: {', '.join(refused)} have no ONNX "
            "node weightport maps (RNN, LSTM, GRU and their cells without proj_size, Linear, Conv1d/2d/3d, "
            "Embedding, BatchNorm, LayerNorm). "
            "Fix: export those layers with weightport.to_numpy instead."
        )
    return arrays


def describe(source: Source) -> list[dict[str, Any]]:
    """The weight-holding ONNX nodes: name, op, attributes and tensors (for ``weightport inspect``)."""
    nodes = _nodes(list(source.metadata.get("nodes", [])))
    layers = _find_layers(nodes, source, _Issues(source.description), set())
    return [
        {
            "name": layer.node.label,
            "kind": layer.node.op_type,
            "config": layer.node.attributes,
            "tensors": list(layer.tensors.values()),
        }
        for layer in layers
    ]
