"""The ONNX graph as this layout reads it: nodes, their wiring, and values followed through them.

Values are followed, never computed: a stored tensor through ``Identity`` and exact ``Cast`` nodes,
small integer constants (axes, shapes), and where a unit axis came from. A :class:`Layer` is what a
weight-holding node becomes.

>>> nodes = read_nodes([{"op_type": "Gemm", "inputs": ["x", "w"], "outputs": ["y"]}])
>>> nodes[0].label, nodes[0].input(2)
('Gemm#0', '')
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightport.dtypes import is_ml_float
from weightport.sources.base import Source
from weightport.transforms import Op

__all__ = [
    "Node",
    "Layer",
    "Graph",
    "read_nodes",
    "stored_matrix",
    "last_value",
    "keeps_last_axis",
    "raw_axes",
    "normalized_axes",
    "unit_axis_from_unsqueeze",
    "weight_names",
    "zero_filled",
    "is_float",
    "all_zero",
]


@dataclass
class Node:
    index: int
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any]
    synthetic: bool = False  # made from export()'s keys: no attributes to check
    label: str = ""  # how messages and mapping= name it: its name, made unique
    module: str | None = None  # the module it ran in, where the exporter recorded it (dynamo)
    # the module path its name spells, where it is torch.onnx.export's (dynamo=False) '/blocks.0/attn/MatMul'
    name_scope: str | None = None

    def __post_init__(self) -> None:
        self.label = self.label or self.name or f"{self.op_type}#{self.index}"

    def input(self, position: int) -> str:
        return self.inputs[position] if position < len(self.inputs) else ""

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)


@dataclass
class Layer:
    """One node that holds weights: what it fills, and its stored tensors by role."""

    node: Node
    kind: str
    tensors: dict[str, str]
    ops: dict[str, Op] = field(default_factory=dict)  # Linear: how the stored tensor becomes weight/bias
    detail: str = ""
    spatial: tuple[int, ...] | None = None  # Conv: the node's spatial axes the module's are (None: all)
    # Conv: a Pad node right before it, as (PyTorch padding_mode, its pads on the node's spatial axes as
    # (begin, end), or None where the graph computes them); torch.onnx.export writes one for padding_mode
    # other than 'zeros'.
    pad: tuple[str, tuple[tuple[int, ...], tuple[int, ...]] | None] | None = None
    owner: str | None = None  # the module path its stored names prove, where they name one (attention)
    # what the model's forward must do around the module for the graph's outputs (LayoutPlan.forward_notes)
    forward_notes: tuple[str, ...] = ()
    # role -> the parameter name the node reads a stored tensor under (an exporter that stores equal values
    # once gives the others an Identity of it named as their own parameter)
    aliases: dict[str, str] = field(default_factory=dict)
    # the module each node that applies these very stored tensors ran in, where recorded (one module
    # called twice, or equal values stored once)
    modules: list[str | None] = field(default_factory=list)

    @property
    def uses(self) -> int:
        """The nodes that apply these stored tensors."""
        return max(1, len(self.modules))


def read_nodes(raw_nodes: list[Mapping[str, Any]]) -> list[Node]:
    """The reader's node dicts as nodes; a name that is empty or not unique gets ``#index``."""
    names = Counter(raw.get("name", "") for raw in raw_nodes)
    nodes = []
    for index, raw in enumerate(raw_nodes):
        domain, op, name = raw.get("domain", ""), raw["op_type"], raw.get("name", "")
        nodes.append(
            Node(
                index,
                op if domain in ("", "ai.onnx") else f"{domain}.{op}",
                name,
                tuple(raw["inputs"]),
                tuple(raw["outputs"]),
                dict(raw.get("attributes", {})),
                label="" if names[name] == 1 else f"{name or op}#{index}",
                module=raw["module"] if isinstance(raw.get("module"), str) else None,
                name_scope=_name_scope(name),
            )
        )
    return nodes


# the segment onnxruntime's optimizer adds to the name of a node it made by fusing others ('MatMulAddFusion',
# made unique as 'MatMulAddFusion_token_3' where taken)
_FUSED = re.compile(r"\w+Fusion(_token_\d+|_\d+)?")


def _name_scope(name: str) -> str | None:
    """The module path in a node name of torch.onnx.export's TorchScript exporter, which names each node by
    the modules it ran in and its op (``'/blocks.0/attn/proj/MatMul'``: ``blocks.0.attn.proj``; a module
    called again gets ``_1``, which names no module; ``''``: the model's own forward). A child of an
    ``nn.Sequential`` is named by its path from the Sequential's own parent (``'/layer1/layer1.0/conv1/Conv'``:
    ``layer1.0.conv1``).

    >>> _name_scope("/encoder/layer.0/attention/self/query/MatMul"), _name_scope("/MatMul"), _name_scope("fc")
    ('encoder.layer.0.attention.self.query', '', None)
    >>> _name_scope("/layer1/layer1.0/downsample/downsample.0/Conv")
    'layer1.0.downsample.0'

    onnxruntime's optimizer names a node it fuses after the one it started from, adding a segment of its
    own (``'/encoder/layer.0/attention/attention/key/MatMul/MatMulAddFusion'``), which names no module:

    >>> _name_scope("/encoder/layer.0/output/dense/MatMul/MatMulAddFusion")
    'encoder.layer.0.output.dense'
    """
    parts = name.split("/")
    while len(parts) > 2 and _FUSED.fullmatch(parts[-1]):
        parts.pop()
    if len(parts) < 2 or parts[0] or not all(parts[1:]):
        return None
    path: list[str] = []
    for part in parts[1:-1]:
        # a dotted segment is named from an ancestor's attribute on: it replaces the path's end it repeats
        ends = [k for k in range(len(path)) if part.startswith(".".join(path[k:]) + ".")]
        path = path[: ends[0]] + part.split(".") if ends else path + part.split(".")
    return ".".join(path)


# ONNX Cast ``to`` codes and the stored dtypes each widens exactly (every value kept): such a Cast
# between a stored tensor and a node (float16 storage read as float32) changes no value.
_EXACT_CASTS = {
    1: ("float16", "bfloat16", "float32"),
    11: ("float16", "bfloat16", "float32", "float64"),
    10: ("float16",),
}
_PASS_THROUGH = ("Identity", "Cast")  # the ops a stored tensor is followed through


@dataclass
class Graph:
    """The nodes' wiring, and which inputs are stored tensors (followed through Identity and exact Casts)."""

    source: Source
    producers: dict[str, Node]
    consumers: dict[str, list[Node]]
    fused: set[int] = field(default_factory=set)  # Add nodes already taken as some layer's bias

    @classmethod
    def of(cls, nodes: list[Node], source: Source) -> Graph:
        consumers: dict[str, list[Node]] = {}
        for node in nodes:
            for name in node.inputs:
                consumers.setdefault(name, []).append(node)
        return cls(source, {out: node for node in nodes for out in node.outputs}, consumers)

    def stored_operand(self, node: Node, beside: str) -> str | None:
        """The stored tensor a two-input ``node`` (an ``Add``, a ``Mul``) combines with its input ``beside``,
        or None where that other input is computed (or both are ``beside``)."""
        others = [name for name in node.inputs if name != beside]
        return self.stored(others[0]) if len(others) == 1 else None

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

    def only_consumer(self, node: Node) -> Node | None:
        after = self.consumers.get(node.outputs[0], []) if node.outputs else []
        return after[0] if len(after) == 1 else None


def stored_matrix(name: str, graph: Graph) -> tuple[str, bool] | None:
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


def last_value(name: str, graph: Graph, depth: int = 0) -> int | None:
    """The last entry of a 1-D integer tensor, when the file fixes it: stored, or the last stored
    part of a ``Concat`` (through ``Cast``), as exporters build a target shape from a computed batch size."""
    values = graph.ints(name)
    if values is not None:
        return values[-1] if values else None
    node = graph.producers.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Cast":
        return last_value(node.input(0), graph, depth + 1)
    if node.op_type == "Concat" and node.attr("axis") in (0, -1) and node.inputs:
        return last_value(node.inputs[-1], graph, depth + 1)
    return None


def keeps_last_axis(node: Node, size: int, graph: Graph) -> bool:
    """Whether ``node`` only regroups the leading axes of a tensor whose last axis has ``size`` entries.

    tf2onnx writes Dense on a 3-D input as Reshape -> MatMul -> Reshape (back to the leading axes) -> Add,
    so the bias is added after the second Reshape; it is still one bias per output when that Reshape's
    target shape ends in the same ``size``.
    """
    if node.op_type == "Identity":
        return True
    if node.op_type != "Reshape":
        return False
    last = node.attr("shape", [None])[-1] if len(node.inputs) < 2 else last_value(node.input(1), graph)
    return last == size


def raw_axes(node: Node, graph: Graph) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze: an attribute before opset 13, a stored input since."""
    axes = node.attr("axes") if len(node.inputs) < 2 else graph.ints(node.input(1))
    return list(axes) if axes else None  # Squeeze without axes drops whatever unit axes the input has


def normalized_axes(node: Node, graph: Graph, rank: int) -> list[int] | None:
    """Those axes made non-negative; ``rank``: the Squeeze's input rank, the Unsqueeze's output rank."""
    axes = raw_axes(node, graph)
    if axes is None:
        return None
    normalized = [a + rank if a < 0 else a for a in axes]
    return normalized if all(0 <= a < rank for a in normalized) else None


def unit_axis_from_unsqueeze(name: str, axis: int, rank: int, graph: Graph) -> bool:
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
            return axis in (normalized_axes(node, graph, rank) or [])
        else:
            return False
    return False


def zero_filled(name: str, graph: Graph) -> bool:
    """Whether input ``name`` is zeros the graph spreads out: an ``Expand`` of a stored scalar zero (through
    ``CastLike``, ``Cast``, ``Identity``). The dynamo exporter without optimization writes a Conv built with
    ``bias=False`` so, its bias ``Expand(CastLike(0, x), shape)``: the same as no bias."""
    node = graph.producers.get(name)
    if node is None or node.op_type != "Expand":
        return False
    inner = node.input(0)
    for _ in range(8):
        step = graph.producers.get(inner)
        if step is None or step.op_type not in ("CastLike", "Cast", "Identity"):
            break
        inner = step.input(0)
    found = graph.stored(inner)
    return (
        found is not None
        and math.prod(graph.source.infos[found].shape) == 1
        and all_zero(graph.source, found)
    )


def weight_names(source: Source) -> list[str]:
    """Tensors that must be placed: floating-point initializers with at least one axis.

    Constant values are graph code, and so are scalars: no weight of a layer this layout maps is a
    0-d tensor, while exporters that keep every constant as an initializer (tf2onnx) store the scalar
    zero their initial states are expanded from, or a loop's bounds, that way.
    """
    names = source.metadata.get("initializers", list(source.infos))
    scales = _scalar_constants(source) | _operands(source)
    return [
        n
        for n in names
        if n in source.infos and is_float(source.infos[n].dtype) and source.infos[n].shape and n not in scales
    ]


_ARITHMETIC = frozenset({"Mul", "Div", "Add", "Sub", "Pow"})
_LAYERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})  # the nodes a bias is added after
_RESHAPING = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _scalar_constants(source: Source) -> set[str]:
    """One-element initializers that only arithmetic nodes read: graph code, as scalars are (the dynamo
    exporter stores attention's ``1/sqrt(sqrt(head_dim))`` as a ``(1,)`` tensor multiplying q and k).
    One added to a layer's output (a ``Linear(n, 1)``'s bias, kept out of the layer by a reshape in
    between) is a weight like any other: placed, or refused where nothing takes it."""
    nodes = source.metadata.get("nodes", [])
    made_by = {out: node for node in nodes for out in node.get("outputs", ())}
    readers: dict[str, set[str]] = {}
    biases: set[str] = set()
    for node in nodes:
        for name in node["inputs"]:
            readers.setdefault(name, set()).add(node["op_type"])
        if node["op_type"] in ("Add", "Sub") and len(node["inputs"]) == 2:
            for name, other in (node["inputs"], node["inputs"][::-1]):
                if _after_layer(other, made_by):
                    biases.add(name)
    return {
        name
        for name, ops in readers.items()
        if name in source.infos
        and math.prod(source.infos[name].shape) == 1
        and ops <= _ARITHMETIC
        and name not in biases
    }


# (op, input position) of float inputs that say how an op runs, not what it computes with: Resize's roi and
# scales (the dynamo exporter stores an upsampling's scales as an initializer), Upsample's scales, Pad's value
_OPERANDS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Pad", 2)})


def _operands(source: Source) -> set[str]:
    """Initializers read only as the operands of :data:`_OPERANDS`: graph code, not weights."""
    places: dict[str, set[tuple[str, int]]] = {}
    for node in source.metadata.get("nodes", []):
        for position, name in enumerate(node["inputs"]):
            places.setdefault(name, set()).add((node["op_type"], position))
    return {name for name, where in places.items() if where <= _OPERANDS}


def _after_layer(name: str, made_by: dict[str, Any]) -> bool:
    """Whether tensor ``name`` is a layer node's output, through reshaping nodes only."""
    for _ in range(8):  # a short chain: Reshape, Transpose, ... between the layer and the add
        node = made_by.get(name)
        if node is None:
            return False
        if node["op_type"] in _LAYERS:
            return True
        if node["op_type"] not in _RESHAPING or not node["inputs"]:
            return False
        name = node["inputs"][0]
    return False


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or is_ml_float(dtype)


def all_zero(source: Source, name: str) -> bool:
    return not np.any(source.read(name))
