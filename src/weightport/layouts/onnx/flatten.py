"""A Linear node that reads a flattened channels-last feature map: which input column is which.

A channels-last framework's graph (tf2onnx's of a Keras model) runs ``Conv`` on NCHW between two
``Transpose`` nodes and flattens the map after moving the channels last again: ``Transpose(perm=[0, 2, 3,
1])``, ``Reshape`` to ``(batch, -1)``, ``MatMul``. The weight's input columns then run (positions,
channels). A PyTorch model that flattens its NCHW map (``torch.flatten(x, 1)``) numbers them (channels,
positions); one that permutes channels-last first (``x.permute(0, 2, 3, 1).flatten(1)``, or the model
``torch.onnx.export`` wrote this graph from) numbers them as the graph does. The weights fit both and the
outputs differ, so the forward pass on ``example_inputs=`` decides (:meth:`CallOrder.flattened`), and without
it the load is refused with both readings.

>>> from weightport.layouts.onnx.graph import Node
>>> node = Node(0, "Transpose", "t", ("x",), ("y",), {"perm": [0, 2, 3, 1]})
>>> _moves_channels_last(node)
True
"""

from __future__ import annotations

import math
from dataclasses import replace

from weightport.call_order import CallOrder
from weightport.errors import LayoutError
from weightport.layouts.base import Rule
from weightport.layouts.flattening import rows_as_channels_first, shown_flatten
from weightport.layouts.onnx.graph import Graph, Layer, Node, raw_axes
from weightport.layouts.pairing import Paired
from weightport.transforms import Chain, Transpose

__all__ = ["channels_last_flatten", "flattened_rules", "reorder_flattened"]

# ops whose output has the channels of their first input, the channel axis where it was
_KEEP_CHANNELS = frozenset(
    {
        "Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Softplus",
        "Gelu", "Mish", "PRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "LpPool",
        "BatchNormalization", "InstanceNormalization", "Cast", "Add", "Mul", "Sub", "Div",
    }
)  # fmt: skip
_AXES_OPS = frozenset({"Squeeze", "Unsqueeze"})  # keep the channel axis where their axes leave 0 and 1 alone
_MAX_STEPS = 64


def _moves_channels_last(node: Node) -> bool:
    """A Transpose that moves axis 1 (NCHW's channels) last and keeps the others in order."""
    perm = list(node.attr("perm") or [])
    return node.op_type == "Transpose" and len(perm) >= 3 and perm == [0, *range(2, len(perm)), 1]


def _flattens(node: Node, graph: Graph) -> bool:
    """A Flatten at axis 1, or a Reshape to two axes: every axis after the batch merged into one. The target
    shape may be computed (tf2onnx's for a dynamic batch: ``Concat`` of the batch, ``Gather``-ed and
    ``Slice``-d from ``Shape(x)``, and a stored ``-1``): its length, the output's rank, is still fixed."""
    if node.op_type == "Flatten":
        return node.attr("axis", 1) == 1
    return node.op_type == "Reshape" and _length(node.input(1), graph) == 2


def _length(name: str, graph: Graph, depth: int = 0) -> int | None:
    """How many entries the 1-D integer tensor ``name`` has, where the graph fixes it: stored, or built by
    ``Shape``, ``Gather``, ``Slice``, ``Unsqueeze``, ``Concat`` and ``Cast`` from tensors whose lengths are
    fixed (their values may depend on the input); None otherwise (or for a scalar)."""
    shape = _int_shape(name, graph, depth)
    return shape[0] if shape is not None and len(shape) == 1 else None


def _int_shape(name: str, graph: Graph, depth: int) -> tuple[int, ...] | None:
    """The shape of the small integer tensor ``name`` (a target shape being built), or None."""
    stored = graph.stored(name)
    if stored is not None:
        return tuple(int(n) for n in graph.source.infos[stored].shape)
    node = graph.producers.get(name)
    if node is None or depth > _MAX_STEPS:
        return None
    first = _int_shape(node.input(0), graph, depth + 1) if node.op_type != "Shape" else None
    if node.op_type in ("Cast", "Identity"):
        return first
    if node.op_type == "Shape":
        rank = _rank(node.input(0), graph)
        kept = None if rank is None else range(rank)[node.attr("start", 0) : node.attr("end", rank)]
        return None if kept is None else (len(kept),)
    if node.op_type == "Concat" and node.attr("axis") in (0, -1):
        parts = [_int_shape(part, graph, depth + 1) for part in node.inputs]
        if all(part is not None and len(part) == 1 for part in parts):
            return (sum(part[0] for part in parts if part is not None),)
        return None
    if node.op_type == "Gather" and first is not None and len(first) == 1 and node.attr("axis", 0) in (0, -1):
        indices = graph.stored(node.input(1))
        return None if indices is None else tuple(int(n) for n in graph.source.infos[indices].shape)
    if node.op_type == "Unsqueeze" and first == () and raw_axes(node, graph) in ([0], [-1]):
        return (1,)
    if node.op_type == "Slice" and first is not None and len(first) == 1:
        starts, ends = graph.ints(node.input(1)), graph.ints(node.input(2))
        axes = graph.ints(node.input(3)) if node.input(3) else [0]
        steps = graph.ints(node.input(4)) if node.input(4) else [1]
        if starts is None or ends is None or axes not in ([0], [-1]) or steps is None or 0 in steps:
            return None
        return (len(range(first[0])[starts[0] : ends[0] : steps[0]]),)  # ONNX clamps as Python slices do
    return None


def _rank(name: str, graph: Graph) -> int | None:
    """The rank of ``name`` where the graph fixes it: stored, a Conv's output (its weight's rank), or through
    a Transpose or ops that keep their first input's axes; else None."""
    for _ in range(_MAX_STEPS):
        stored = graph.stored(name)
        if stored is not None:
            return len(graph.source.infos[stored].shape)
        node = graph.producers.get(name)
        if node is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = graph.stored(node.input(1))
            return None if weight is None else len(graph.source.infos[weight].shape)
        if node.op_type == "Transpose" and node.attr("perm"):
            return len(node.attr("perm"))
        if node.op_type not in _KEEP_CHANNELS or node.op_type in ("Add", "Mul", "Sub", "Div", "PRelu"):
            return None  # a binary op broadcasts: its rank may be its other input's
        name = node.input(0)
    return None


def _channels(node: Node, graph: Graph) -> int | None:
    """The channels of the NCHW map ``node`` (the Transpose) reads: from the Conv (or BatchNormalization)
    that made it, through ops that keep the channel axis (activations, pooling, a bias added, tf2onnx's
    Squeeze of a Conv1D run as a 2-D Conv); None where no such node is reached."""
    current: Node | None = graph.producers.get(node.input(0))
    for _ in range(_MAX_STEPS):
        if current is None:
            return None
        if current.op_type in ("Conv", "ConvTranspose", "BatchNormalization"):
            stored = graph.stored(current.input(1))
            if stored is None:
                return None
            shape = graph.source.infos[stored].shape
            if current.op_type == "ConvTranspose":
                return int(shape[1]) * int(current.attr("group", 1))
            return int(shape[0])
        if current.op_type in _AXES_OPS:
            axes = current.attr("axes") or graph.ints(current.input(1)) or []
            if not axes or any(a in (0, 1) for a in axes):
                return None  # negative axes: which they are depends on the rank, which the graph does not say
        elif current.op_type not in _KEEP_CHANNELS:
            return None
        current = graph.producers.get(current.input(0))
    return None


def channels_last_flatten(layer: Layer, graph: Graph) -> tuple[str, int | None] | None:
    """Where Linear ``layer``'s node reads a flattened channels-last map: the Transpose's label and the map's
    channels (None where the graph does not show them); else None."""
    node: Node | None = graph.producers.get(layer.node.input(0))
    for _ in range(_MAX_STEPS):  # Identity or Cast between the flatten and the node change nothing
        if node is None or node.op_type not in ("Identity", "Cast"):
            break
        node = graph.producers.get(node.input(0))
    if node is None or not _flattens(node, graph):
        return None
    moved = graph.producers.get(node.input(0))
    if moved is None or not _moves_channels_last(moved):
        return None
    return moved.label, _channels(moved, graph)


def flattened_rules(
    layer: Layer,
    pair: Paired,
    rules: list[Rule],
    flat: tuple[str, int | None],
    call_order: CallOrder | None,
    source: str,
) -> list[Rule]:
    """``rules`` of Linear ``layer`` (paired as ``pair``; of the file ``source`` describes) that reads
    Transpose ``flat[0]``'s flattened channels-last map of ``flat[1]`` channels, its weight's columns in the
    order the model flattens in; a LayoutError where that order is not shown, or differs from the graph's."""
    slot = pair.slot
    weight = next((r for r in rules if r.target == slot.name("weight")), None)
    columns = getattr(slot.module, "in_features", None)
    if weight is None or not isinstance(columns, int):
        return rules
    moved, channels = flat
    if channels is not None and columns == channels:
        return rules  # a map of one position: both orders are the same
    where = f"{source} node '{layer.node.label}' ({layer.node.op_type})"
    readings = (
        f"{where} reads a flattened channels-last map (Transpose '{moved}' moves the channels last, then the "
        f"map is flattened): its {columns} input columns run (positions, channels"
        f"{'' if channels is None else f': {channels}'}), as a channels-last framework flattens (tf2onnx's "
        "graph of a Keras model). A PyTorch model that flattens its NCHW map (torch.flatten(x, 1)) reads them "
        "(channels, positions), one that permutes channels-last first (x.permute(0, 2, 3, 1).flatten(1)) as "
        f"the graph does; the weights fit {slot.said} both ways and the outputs differ"
    )
    channels_last, shape = shown_flatten(call_order, slot, readings, "columns", "as the graph does")
    if channels_last:
        return rules
    found = int(shape[0])
    positions = math.prod(shape[1:])
    if (channels is not None and channels != found) or found * positions != columns:
        raise LayoutError(
            f"{readings}. The forward pass on example_inputs= flattens a map {shape} into {slot.said}, which is "
            f"not that map. Fix: pass example_inputs= of the size the graph was exported for."
        )
    if positions == 1:
        return rules
    out = int(getattr(slot.module, "out_features", 0))
    reordered = replace(
        weight,
        op=Chain(weight.op, Transpose((1, 0)), rows_as_channels_first((positions, found), out)),
        origin=f"{weight.origin} (columns reordered from the graph's (positions, channels) to the model's "
        "(channels, positions))",
    )
    return [reordered if r is weight else r for r in rules]


def reorder_flattened(
    layers: list[Layer], paired: list[Paired], rules: list[Rule], graph: Graph, call_order: CallOrder | None
) -> list[Rule]:
    """``rules`` with the weight of each Linear layer (of ``layers``, paired as ``paired``) that reads a
    flattened channels-last map in the order the model flattens in (:func:`flattened_rules`)."""
    for layer, pair in zip(layers, paired):
        flat = channels_last_flatten(layer, graph) if layer.kind == "Linear" else None
        if flat is not None:
            rules = flattened_rules(layer, pair, rules, flat, call_order, graph.source.description)
    return rules
