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

Refused, with the reason (:class:`UnsupportedConfigError`): GRU
``linear_before_reset=0`` (the ONNX default), non-zero peepholes ``P`` (all-zero
``P`` is accepted), ``clip``, ``input_forget=1``, activations other than
PyTorch's (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh, RNN Tanh or Relu), Gemm
``alpha``/``beta`` other than 1 (the transforms only move values; fold the
factors into ``B`` and ``C`` first), ``transA=1``, asymmetric Conv pads. The
RNN ``layout`` attribute only says how inputs and outputs are laid out (batch or
time first), not the weights, so it is accepted whatever it is.

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

from weightport.dtypes import BFLOAT16
from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import LayoutPlan, Rule
from weightport.layouts.pairing import (
    Paired,
    Slot,
    SourceLayer,
    as_pairings,
    module_slots,
    pair_layers,
    slot_kind,
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


def plan(module: nn.Module, source: Source, mapping: Mapping[str, str] | None = None) -> LayoutPlan:
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
    try:
        paired = pair_layers(
            module,
            [SourceLayer(lay.node.label, lay.kind, lay.detail) for lay in layers],
            mapping,
            framework=FRAMEWORK,
        )
    except LayoutError as e:
        _explain_unrolled_recurrence(module, layers, source.description, e)
        raise
    rules: list[Rule] = []
    for layer, pair in zip(layers, paired):
        if layer.kind in _RECURRENT:
            rules += _recurrent_rules(layer, pair, source, issues, validated)
        elif layer.node.op_type in _NORMS:
            rules += _norm_rules(layer, pair, source, issues, validated)
        else:
            rules += _plain_rules(layer, pair, source, issues, validated)
    issues.raise_if_any(target)
    used = {s for rule in rules for s in rule.sources} | validated
    hints = {}
    if "nodes" in source.metadata and not any(layer.kind == "BatchNorm" for layer in layers):
        for slot in module_slots(module):
            if slot.kind == "BatchNorm":
                hints[slot.path] = (
                    "the graph has no BatchNormalization node: exporters fold an eval-mode BatchNorm into "
                    "the Conv or Gemm before it, so the file holds only the fused weights. Load into a model "
                    "without this BatchNorm (the layer before it with bias=True), or export with the "
                    "BatchNormalization nodes kept (e.g. in training mode)"
                )
    return LayoutPlan(
        layout=NAME,
        rules=rules,
        pairings=as_pairings(paired),
        unmatched=[n for n in _weight_names(source) if n not in used],
        unchecked=unchecked,
        missing_hints=hints,
    )


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
    exporter does so for nn.RNN) leave nothing that maps back to the module's weights.
    """
    found = {layer.kind for layer in layers}
    for path, sub in module.named_modules():
        kind = slot_kind(sub)
        if isinstance(sub, nn.RNNBase) and kind in _RECURRENT and kind not in found:
            raise LayoutError(
                f"{where} has no ONNX {kind} node for '{path}' ({type(sub).__name__}): the graph computes "
                "the recurrence some other way (an exporter that unrolls it into per-step MatMul and Add "
                "nodes, as torch.onnx.export's dynamo exporter does for nn.RNN), and those nodes do not "
                f"map back to the module's weights. Fix: export with torch.onnx.export(..., dynamo=False), "
                f"which writes {kind} nodes, or save the PyTorch weights themselves (weightport.save). "
                f"(Pairing said: {error})"
            ) from error


def _weight_names(source: Source) -> list[str]:
    """Tensors that must be placed: floating-point initializers (Constant values are graph code)."""
    names = source.metadata.get("initializers", list(source.infos))
    return [n for n in names if n in source.infos and _is_float(source.infos[n].dtype)]


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or dtype == BFLOAT16


def _all_zero(source: Source, name: str) -> bool:
    return not np.any(source.read(name))


# --- finding the layers --------------------------------------------------------------------------------


def _find_layers(nodes: list[_Node], source: Source, issues: _Issues, validated: set[str]) -> list[_Layer]:
    stored = set(source.infos)
    producers = {out: node for node in nodes for out in node.outputs}
    consumers: dict[str, list[_Node]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    fused: set[int] = set()
    layers: list[_Layer] = []
    for node in nodes:
        if node.op_type in _RECURRENT:
            layer = _recurrent_layer(node, stored, source, issues, validated)
        elif node.op_type == "Gemm":
            layer = _gemm_layer(node, stored, producers, source, issues)
        elif node.op_type == "MatMul":
            layer = _matmul_layer(node, stored, producers, consumers, source, fused)
        elif node.op_type == "Conv":
            layer = _conv_layer(node, stored, source, issues)
        elif node.op_type == "Gather":
            layer = _gather_layer(node, stored, source)
        elif node.op_type in _NORMS:
            layer = _norm_layer(node, stored, source, issues)
        else:
            layer = None
        if layer is not None:
            layers.append(layer)
    return layers


def _recurrent_layer(
    node: _Node, stored: set[str], source: Source, issues: _Issues, validated: set[str]
) -> _Layer | None:
    kind = node.op_type
    tensors = {}
    for role, position in (("W", 1), ("R", 2), ("B", 3), ("P", 7)):
        name = node.input(position)
        if not name or (kind != "LSTM" and role == "P"):
            continue
        if name not in stored:
            issues.add(
                node,
                f"input {role} '{name}' is computed by the graph, not stored in the file. "
                f"Fix: {_FIX_COMPUTED}.",
            )
            return None
        tensors[role] = name
    if "W" not in tensors or "R" not in tensors:
        issues.add(node, "has no W or R input; the graph is malformed. Fix: re-export the model.")
        return None
    if node.synthetic:
        return _Layer(node, kind, tensors, detail=f"ONNX {kind} arrays")
    _check_recurrent_node(node, tensors, source, issues, validated)
    direction = node.attr("direction", "forward")
    return _Layer(
        node,
        kind,
        tensors,
        detail=f"ONNX {kind} node (hidden_size={node.attr('hidden_size')}, direction={direction})",
    )


def _check_initial_states(node: _Node, source: Source, issues: _Issues, validated: set[str]) -> None:
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
        name = node.input(position)
        if not name or name not in source.infos:
            continue
        if _all_zero(source, name):
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
    node: _Node, tensors: dict[str, str], source: Source, issues: _Issues, validated: set[str]
) -> None:
    kind = node.op_type
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
    _check_initial_states(node, source, issues, validated)
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


def _stored_matrix(
    name: str, stored: set[str], producers: dict[str, _Node], source: Source
) -> tuple[str, bool] | None:
    """The stored 2-D tensor behind input ``name`` and whether a Transpose node sits in between."""
    if name in stored and len(source.infos[name].shape) == 2:
        return name, False
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose" and node.attr("perm") in (None, [1, 0]):
        inner = node.input(0)
        if inner in stored and len(source.infos[inner].shape) == 2:
            return inner, True
    return None


def _gemm_layer(
    node: _Node, stored: set[str], producers: dict[str, _Node], source: Source, issues: _Issues
) -> _Layer | None:
    found = _stored_matrix(node.input(1), stored, producers, source)
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
        op = _bias_op(source.infos[bias].shape, out_features) if bias in stored else None
        if op is None:
            issues.add(
                node,
                f"input C '{bias}' is not a stored bias vector of {out_features} values; "
                "nn.Linear adds one bias per output. Fix: re-export with a per-output bias.",
                unsupported=True,
            )
        else:
            tensors["bias"], ops["bias"] = bias, op
    return _Layer(node, "Linear", tensors, ops, detail=f"ONNX Gemm node {shape}")


def _matmul_layer(
    node: _Node,
    stored: set[str],
    producers: dict[str, _Node],
    consumers: dict[str, list[_Node]],
    source: Source,
    fused: set[int],
) -> _Layer | None:
    found = _stored_matrix(node.input(1), stored, producers, source)
    if found is None:
        return None  # a product of two activations: no weights
    name, transposed = found
    shape = source.infos[name].shape
    out_features = shape[0] if transposed else shape[1]
    tensors = {"weight": name}
    ops: dict[str, Op] = {"weight": Identity() if transposed else Transpose((1, 0))}
    after = consumers.get(node.outputs[0], []) if node.outputs else []
    if len(after) == 1 and after[0].op_type == "Add" and after[0].index not in fused:
        add = after[0]
        others = [n for n in add.inputs if n != node.outputs[0]]
        if len(others) == 1 and others[0] in stored:
            op = _bias_op(source.infos[others[0]].shape, out_features)
            if op is not None:
                tensors["bias"], ops["bias"] = others[0], op
                fused.add(add.index)
    return _Layer(node, "Linear", tensors, ops, detail=f"ONNX MatMul node {shape}")


def _conv_layer(node: _Node, stored: set[str], source: Source, issues: _Issues) -> _Layer | None:
    weight, bias = node.input(1), node.input(2)
    if weight not in stored or len(source.infos[weight].shape) not in _CONV_KINDS:
        return None
    tensors = {"weight": weight}
    if bias and bias not in stored:
        issues.add(
            node, f"input B '{bias}' is computed by the graph, not stored in the file. Fix: {_FIX_COMPUTED}."
        )
    elif bias:
        tensors["bias"] = bias
    shape = source.infos[weight].shape
    return _Layer(node, _CONV_KINDS[len(shape)], tensors, detail=f"ONNX Conv node {shape}")


def _gather_layer(node: _Node, stored: set[str], source: Source) -> _Layer | None:
    """``Gather(data=stored matrix, indices)`` along axis 0: an embedding lookup."""
    table = node.input(0)
    if table not in stored or len(source.infos[table].shape) != 2 or node.attr("axis", 0) != 0:
        return None  # indexing activations or shapes, not a table of weights
    if source.infos[table].dtype.kind not in "fc" and source.infos[table].dtype.name != "bfloat16":
        return None  # an integer lookup table is graph code
    shape = source.infos[table].shape
    return _Layer(node, "Embedding", {"weight": table}, detail=f"ONNX Gather node {shape}")


def _norm_layer(node: _Node, stored: set[str], source: Source, issues: _Issues) -> _Layer | None:
    """BatchNormalization (scale, B, mean, var) or LayerNormalization (Scale, B) with stored inputs."""
    tensors = {}
    for position, (role, onnx_name) in enumerate(_NORMS[node.op_type], start=1):
        name = node.input(position)
        if not name:
            continue
        if name not in stored:
            issues.add(
                node,
                f"input {onnx_name} '{name}' is computed by the graph, not stored in the file. "
                f"Fix: {_FIX_COMPUTED}.",
            )
            return None
        tensors[role] = name
    if "weight" not in tensors:
        return None
    kind = _KIND_OF_NORM_OP[node.op_type]
    shape = source.infos[tensors["weight"]].shape
    return _Layer(node, kind, tensors, detail=f"ONNX {node.op_type} node {shape}")


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
    layer: _Layer, pair: Paired, source: Source, issues: _Issues, validated: set[str]
) -> list[Rule]:
    slot, node = pair.slot, layer.node
    module: Any = slot.module
    if layer.kind.startswith("Conv") and not node.synthetic:
        _check_conv(node, slot, issues)
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


def _check_conv(node: _Node, slot: Slot, issues: _Issues) -> None:
    module: Any = slot.module
    dims = len(module.kernel_size)
    kernel = tuple(module.kernel_size)
    found = {
        "strides": tuple(node.attr("strides", [1] * dims)),
        "dilations": tuple(node.attr("dilations", [1] * dims)),
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
    begin, end = _onnx_pads(node, kernel, found["dilations"], dims)
    if begin != end:
        issues.add(
            node,
            f"pads begin {begin}, end {end}: PyTorch's Conv pads both sides equally. Fix: put "
            f"an explicit zero padding before a {type(module).__name__}(padding=0).",
            unsupported=True,
        )
    elif module.padding_mode != "zeros" or (begin, end) != _torch_pads(module, kernel, dims):
        issues.add(
            node,
            f"pads {begin} (with zeros) but '{slot.label}' has padding={module.padding}, "
            f"padding_mode='{module.padding_mode}'. Fix: build it with padding={begin}, "
            "padding_mode='zeros'.",
        )


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
    from weightport.export import tensor_to_numpy

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
                return back(tensor_to_numpy(state[slot.name(param, reverse=reverse)]))  # noqa: B023

            arrays[prefix + "W"] = np.stack([get("weight_ih", r) for r in directions])
            arrays[prefix + "R"] = np.stack([get("weight_hh", r) for r in directions])
            if sub.bias:
                arrays[prefix + "B"] = np.stack(
                    [np.concatenate([get("bias_ih", r), get("bias_hh", r)]) for r in directions]
                )
        elif slot.kind == "Linear":
            arrays[prefix + "B"] = tensor_to_numpy(state[slot.name("weight")])
            if sub.bias is not None:
                arrays[prefix + "C"] = tensor_to_numpy(state[slot.name("bias")])
        elif slot.kind in _CONV_KINDS.values():
            arrays[prefix + "W"] = tensor_to_numpy(state[slot.name("weight")])
            if sub.bias is not None:
                arrays[prefix + "B"] = tensor_to_numpy(state[slot.name("bias")])
        elif slot.kind == "Embedding":
            arrays[prefix + "data"] = tensor_to_numpy(state[slot.name("weight")])
        elif slot.kind in _NORM_OPS:
            # ONNX requires the scale (and BatchNormalization its B): a module without them computes ones/zeros
            norm: Any = sub
            size = (norm.num_features,) if slot.kind == "BatchNorm" else tuple(norm.normalized_shape)
            neutral = {"weight": np.ones(size, np.float32), "bias": np.zeros(size, np.float32)}
            for role, name in _NORMS[_NORM_OPS[slot.kind]]:
                if slot.name(role) in state:
                    arrays[prefix + name] = tensor_to_numpy(state[slot.name(role)])
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
