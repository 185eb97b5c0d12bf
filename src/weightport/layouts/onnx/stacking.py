"""How a recurrent node is wired: what feeds its ``X``, where its ``Y`` goes, and which way round they are.

A multi-layer ``nn.LSTM`` goes out as one node per layer, each reading the one below's ``Y``
``(T, D, B, H)`` regrouped to ``(T, B, D*H)`` by the exporters' shape ops (``Squeeze``, or ``Transpose``
and ``Reshape``). Those ops are followed here with each axis named (``T`` steps, ``B`` batch, ``D``
directions, ``H`` hidden), never run: layer k+1 is stacked on layer k only where its ``X`` is that exact
regrouping. ``batch_first=True`` shows as a ``Transpose(perm=[1, 0, 2])`` into ``X`` (or ``layout=1``) and
a ``(B, T, D*H)`` output; ``X`` that another op made as it is shows a time-first module.

>>> _reshape([("T",), ("B",), ("D",), ("H",)], [0, 0, -1], {"D": 2, "H": 3})
[('T',), ('B',), ('D', 'H')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from weightport.layouts.onnx.graph import Graph, Layer, Node
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.pairing import Slot
from weightport.torch_facts import RNN_KINDS

__all__ = ["Wiring", "RecurrentLayer", "wiring", "check_stacking"]

Axes = list[tuple[str, ...]]  # each axis named by the atoms it holds, outermost first
_SHAPE_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze"})
_SHAPE_READERS = frozenset({"Shape", "Size"})  # read only a tensor's shape (initial states are sized so)
_UNKNOWN = ("T", "B")  # sizes the graph fixes only for one input, if at all


@dataclass
class Wiring:
    """A recurrent node's neighbours: ``below``/``above``, the recurrent node whose ``Y`` is exactly its ``X``
    / that reads its ``Y`` as exactly its ``X`` (None: none, and ``below_why``/``above_why`` say what is
    there instead); ``x_batch_first``/``y_batch_first``, the convention its input and output show (None:
    they show none); ``count``, the recurrent nodes of its kind in the graph; ``position``, its place
    among them."""

    below: str | None = None
    below_why: str = ""
    above: str | None = None
    above_why: str = ""
    x_batch_first: bool | None = None
    y_batch_first: bool | None = None
    count: int = 1
    position: int = 0


@dataclass
class RecurrentLayer(Layer):
    """A recurrent node's layer, with its :class:`Wiring` (None: arrays without a graph)."""

    wiring: Wiring | None = field(default=None)


def wiring(node: Node, graph: Graph) -> Wiring:
    """What :class:`Wiring` says of ``node`` in ``graph``; the convention of a node chained to another (the
    exporter dropped the transposes between two batch-first modules) is that of the chain's end."""
    same = {n.index: n for n in graph.producers.values() if n.op_type == node.op_type}
    found = Wiring(count=len(same), position=sorted(same).index(node.index))
    above, axes, found.above_why = _follow_output(node, graph)
    below, found.below_why = _below(node, graph)
    found.above = above.label if above is not None else None
    found.below = below.label if below is not None else None
    top = node
    for _ in range(len(graph.producers)):
        if above is None:
            break
        top, (above, axes, _) = above, _follow_output(above, graph)
    found.y_batch_first = _convention(axes, top, graph)
    bottom = node
    for _ in range(len(graph.producers)):
        if below is None:
            break
        bottom, (below, _) = below, _below(below, graph)
    found.x_batch_first = _input_convention(bottom, graph)
    return found


def _input_convention(node: Node, graph: Graph) -> bool | None:
    """True where ``X`` is batch-first (``layout=1``, or a ``Transpose(perm=[1, 0, 2])`` makes it: what the
    exporters write for batch_first=True), False where it is the graph's input as given; None otherwise (an
    op between may have taken the exporter's transposes into its own, as tf2onnx and the optimizers do)."""
    if node.attr("layout", 0):
        return True
    producer = _through_identity(node.input(0), graph)
    if producer is None:
        return False
    return (
        True if producer.op_type == "Transpose" and list(producer.attr("perm") or []) == [1, 0, 2] else None
    )


def _sizes(node: Node) -> dict[str, int]:
    return {
        "D": 2 if node.attr("direction", "forward") == "bidirectional" else 1,
        "H": int(node.attr("hidden_size", 0)),
    }


def _y_axes(node: Node) -> Axes:
    return [("B",), ("T",), ("D",), ("H",)] if node.attr("layout", 0) else [("T",), ("D",), ("B",), ("H",)]


def _x_axes(node: Node) -> Axes:
    """The axes a node's ``X`` must have to be the layer below's ``Y`` (features: directions, then hidden)."""
    return [("B",), ("T",), ("D", "H")] if node.attr("layout", 0) else [("T",), ("B",), ("D", "H")]


def _normal(axes: Axes, sizes: dict[str, int]) -> Axes:
    """The axes without atoms of one entry (a single direction, a unit axis): equal data, equal form."""
    kept = [tuple(a for a in axis if sizes.get(a, 0) != 1 and a != "1") for axis in axes]
    return [axis for axis in kept if axis]


def _convention(axes: Axes | None, node: Node, graph: Graph) -> bool | None:
    """True where the shape ops after ``node`` end in ``(B, T, D*H)``; False where they end in ``(T, B, D*H)``
    as the graph's output; None otherwise (no shape op, or one that reads them time-first)."""
    if axes is None:
        return None
    sizes = _sizes(node)
    found = _normal(axes, sizes)
    if found == _normal([("B",), ("T",), ("D", "H")], sizes):
        return True
    end = _end_of(node, graph)
    if found == _normal([("T",), ("B",), ("D", "H")], sizes) and not graph.consumers.get(end):
        return False
    return None


def _end_of(node: Node, graph: Graph) -> str:
    """The tensor where the shape ops after ``node``'s ``Y`` end."""
    name = node.outputs[0] if node.outputs else ""
    for _ in range(16):
        readers = [n for n in graph.consumers.get(name, []) if n.op_type not in _SHAPE_READERS]
        if len(readers) != 1 or readers[0].op_type not in _SHAPE_OPS or not readers[0].outputs:
            return name
        name = readers[0].outputs[0]
    return name


def _follow_output(node: Node, graph: Graph) -> tuple[Node | None, Axes | None, str]:
    """The recurrent node whose ``X`` is exactly ``node``'s ``Y`` regrouped; else None, the axes where the
    shape ops end (None where none was followed), and what is there."""
    name, axes, sizes, steps = node.outputs[0] if node.outputs else "", _y_axes(node), _sizes(node), 0
    for _ in range(16):
        readers = [n for n in graph.consumers.get(name, []) if n.op_type not in _SHAPE_READERS]
        if len(readers) != 1:
            shown = ", ".join(f"'{n.label}' ({n.op_type})" for n in readers[:3])
            why = f"is read by {shown}" if readers else "is no other node's input"
            return None, axes if steps else None, why
        reader = readers[0]
        if reader.op_type in RNN_KINDS and reader.input(0) == name:
            wanted = _normal(_x_axes(reader), {**sizes, "H": -1})
            if _normal(axes, {**sizes, "H": -1}) == wanted:
                return reader, axes, ""
            return (
                None,
                None,
                f"reaches node '{reader.label}' regrouped as {axes}, not as its X {_x_axes(reader)}",
            )
        moved = (
            _step(reader, axes, sizes, graph)
            if reader.op_type in _SHAPE_OPS and reader.input(0) == name
            else None
        )
        if moved is None:
            return None, axes if steps else None, f"goes into node '{reader.label}' ({reader.op_type})"
        name, axes, steps = reader.outputs[0], moved, steps + 1
    return None, None, "goes through more shape ops than are followed"


def _step(node: Node, axes: Axes, sizes: dict[str, int], graph: Graph) -> Axes | None:
    """``axes`` after one shape op (None: one not followed)."""
    if node.op_type == "Identity":
        return axes
    if node.op_type == "Transpose":
        perm = node.attr("perm") or list(range(len(axes)))[::-1]
        return [axes[p] for p in perm] if sorted(perm) == list(range(len(axes))) else None
    if node.op_type in ("Squeeze", "Unsqueeze"):
        raw = node.attr("axes") if len(node.inputs) < 2 else graph.ints(node.input(1))
        if not raw:
            return None
        if node.op_type == "Squeeze":
            drop = {a % len(axes) for a in raw}
            if any(_normal([axes[a]], sizes) for a in drop):
                return None  # not a unit axis
            return [axis for i, axis in enumerate(axes) if i not in drop]
        out = list(axes)
        for a in sorted(a % (len(axes) + len(raw)) for a in raw):
            out.insert(a, ("1",))
        return out
    target = node.attr("shape") if len(node.inputs) < 2 else graph.ints(node.input(1))
    return (
        _reshape(axes, list(target), sizes) if target is not None and not node.attr("allowzero", 0) else None
    )


def _reshape(axes: Axes, target: list[int], sizes: dict[str, int]) -> Axes | None:
    """``axes`` regrouped by a Reshape to ``target`` (0: the input's axis there; -1, last only: the rest;
    a number: the next atom of a size the graph does not fix, as an exporter writes it, or atoms of that
    product); None where the target does not regroup them so."""
    atoms = [a for axis in axes for a in axis if a != "1"]
    out: Axes = []
    cursor = 0
    for position, value in enumerate(target):
        if value == 0:
            if (
                position >= len(axes)
                or [a for axis in axes[:position] for a in axis if a != "1"] != atoms[:cursor]
            ):
                return None
            group = tuple(a for a in axes[position] if a != "1")
        elif value == -1:
            if position != len(target) - 1:
                return None
            group = tuple(atoms[cursor:])
        elif cursor < len(atoms) and atoms[cursor] in _UNKNOWN:
            group = (atoms[cursor],)
        else:
            taken: list[str] = []
            product = 1
            while (
                cursor + len(taken) < len(atoms)
                and product < value
                and atoms[cursor + len(taken)] not in _UNKNOWN
            ):
                product *= sizes[atoms[cursor + len(taken)]]
                taken.append(atoms[cursor + len(taken)])
            if product != value:
                return None
            group = tuple(taken) or ("1",)
        out.append(group)
        cursor += len([a for a in group if a != "1"])
    return out if cursor == len(atoms) else None


def _through_identity(name: str, graph: Graph) -> Node | None:
    producer = graph.producers.get(name)
    while producer is not None and producer.op_type == "Identity":
        producer = graph.producers.get(producer.input(0))
    return producer


def _below(node: Node, graph: Graph) -> tuple[Node | None, str]:
    """The recurrent node whose ``Y`` is exactly ``node``'s ``X``, else None and what ``X`` is instead."""
    name = node.input(0)
    for _ in range(16):
        producer = graph.producers.get(name)
        if producer is not None and producer.op_type in RNN_KINDS and producer.outputs[0] == name:
            above, _, why = _follow_output(producer, graph)
            if above is not None and above.index == node.index:
                return producer, ""
            return None, f"is node '{producer.label}''s Y, whose way here {why}"
        joined = _joined_directions(producer, graph) if producer is not None else None
        if joined is not None:
            return joined, ""
        if producer is None or producer.op_type not in _SHAPE_OPS:
            break
        name = producer.input(0)
    others = [
        n.label for n in graph.consumers.get(name, []) if n.op_type in RNN_KINDS and n.index != node.index
    ]
    side = (
        f", which node {', '.join(repr(o) for o in others[:3])} reads too (they run side by side)"
        if others
        else ""
    )
    if producer is None:
        return None, f"is the graph's input '{name}'{side}"
    return None, f"is made by node '{producer.label}' ({producer.op_type}){side}"


# --- the wiring against the paired module ----------------------------------------------------------------


def check_stacking(layer: Layer, slot: Slot, how: str, issues: Issues, unchecked: list[str] | None) -> None:
    """Refuse a node in a layer of a multi-layer module that the graph does not stack there, or whose input or
    output is the other way round from the module's ``batch_first``. ``unchecked`` None: only trying whether
    the node fits the slot, where only its place in the graph's order counts (a node with fewer recurrent
    nodes of its kind before it than the slot's layer cannot be that layer)."""
    found: Wiring | None = getattr(layer, "wiring", None)
    if found is None:
        return
    node, module = layer.node, slot.module
    layers, k = int(getattr(module, "num_layers", 1)), slot.layer or 0
    if unchecked is None:
        if k > found.position:
            issues.add(node, f"has {found.position} {node.op_type} node(s) before it, so it is no layer {k}.")
        return
    counted = (
        f"; the file has {_nodes(found.count, node.op_type)} and {_said(slot)} has {layers} layers. Fix: build "
        f"it with num_layers={found.count}, or load a file exported from a model with {layers} layers."
        if found.count < layers
        else ". Fix: build the model as the graph computes (single-layer modules, with what the graph does "
        "between them in forward()), or load a file exported from a model with one stacked module."
    )
    name = type(module).__name__
    if k > 0 and found.below is None:
        issues.add(
            node,
            f"fills layer {k} of {_said(slot)} ({name}, num_layers={layers}), which reads layer {k - 1}'s output "
            f"as it is, but its X {found.below_why}{counted}",
        )
    if k < layers - 1 and found.above is None:
        issues.add(
            node,
            f"fills layer {k} of {_said(slot)} ({name}, num_layers={layers}), whose output layer {k + 1} reads "
            f"as it is, but its Y {found.above_why}{counted}",
        )
    if isinstance(module, nn.RNNBase):
        _check_batch_first(node, slot, how, found, issues, unchecked, k == 0, k == layers - 1)


def _check_batch_first(
    node: Node,
    slot: Slot,
    how: str,
    found: Wiring,
    issues: Issues,
    unchecked: list[str],
    first: bool,
    last: bool,
) -> None:
    module: Any = slot.module
    own = bool(module.batch_first)
    seen = [
        (side, value)
        for side, value, shown in (("X", found.x_batch_first, first), ("Y", found.y_batch_first, last))
        if shown and value is not None
    ]
    if len({value for _, value in seen}) > 1 or (first and not seen):
        what = (
            "shows X and Y the other way round from each other, so it does not show"
            if seen
            else "does not show"
        )
        unchecked.append(
            f"whether {_said(slot)} takes batch-first or time-first input: the graph around node "
            f"'{node.label}' {what} it; taken to be batch_first={own}"
        )
    if len({value for _, value in seen}) != 1:
        return
    side, value = seen[0]
    if value == own:
        return
    form = "batch-first (batch, steps, features)" if value else "time-first (steps, batch, features)"
    evidence = {
        ("X", True): "layout=1" if node.attr("layout", 0) else "a Transpose(perm=[1, 0, 2]) makes it",
        ("X", False): "the node reads it as the graph made it",
        ("Y", True): "it leaves the node as (batch, steps, features)",
        ("Y", False): "it leaves the node as (steps, batch, features)",
    }[side, value]
    if how.startswith("mapping="):
        unchecked.append(
            f"{_said(slot)} (batch_first={own}), paired by mapping= with node '{node.label}', whose {side} is "
            f"{form}: the model's forward must transpose around it"
        )
        return
    issues.add(
        node,
        f"its {side} is {form} ({evidence}), but {_said(slot)} was built with batch_first={own}: it would take "
        f"the steps for the batch. Fix: build it with batch_first={value}; or, if the model's forward "
        f"transposes around it itself (x.transpose(0, 1)), pass mapping={{'{node.label}': '{slot.label}'}} to "
        "pair it as it is.",
    )


def _said(slot: Slot) -> str:
    """The module, as messages about its layers name it: ``'encoder.rnn'``, or ``the model``."""
    return f"'{slot.path}'" if slot.path else "the model"


def _nodes(count: int, op: str) -> str:
    return f"{count} {op} node" + ("" if count == 1 else "s")


def _joined_directions(node: Node, graph: Graph) -> Node | None:
    """The bidirectional node whose ``Y`` a ``Concat`` joins on its last axis, one direction after the other,
    each a ``Slice`` of that direction squeezed (tf2onnx's form between two stacked layers), else None."""
    if node.op_type != "Concat" or node.attr("axis") not in (2, -1) or len(node.inputs) != 2:
        return None
    found: list[Node] = []
    for direction, name in enumerate(node.inputs):
        squeeze = graph.producers.get(name)
        axes = None
        if squeeze is not None and squeeze.op_type == "Squeeze":
            axes = squeeze.attr("axes") if len(squeeze.inputs) < 2 else graph.ints(squeeze.input(1))
        part = (
            graph.producers.get(squeeze.input(0)) if squeeze is not None and list(axes or []) == [1] else None
        )
        if part is None or part.op_type != "Slice" or _slice(part, graph) != (direction, direction + 1, 1):
            return None
        recurrent = graph.producers.get(part.input(0))
        if recurrent is None or recurrent.op_type not in RNN_KINDS or recurrent.outputs[0] != part.input(0):
            return None
        found.append(recurrent)
    first, second = found
    bidirectional = first.attr("direction", "forward") == "bidirectional" and not first.attr("layout", 0)
    return first if first.index == second.index and bidirectional else None


def _slice(node: Node, graph: Graph) -> tuple[int, int, int] | None:
    """A one-axis Slice's (start, end, axis), with step 1; None for any other."""
    steps: list[int] | None = [1]
    if len(node.inputs) < 2:  # opset 9: attributes
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    else:
        starts, ends = graph.ints(node.input(1)), graph.ints(node.input(2))
        axes = graph.ints(node.input(3)) if node.input(3) else [0]
        steps = graph.ints(node.input(4)) if node.input(4) else [1]
    if not starts or not ends or not axes or steps != [1] or not len(starts) == len(ends) == len(axes) == 1:
        return None
    return int(starts[0]), int(ends[0]), int(axes[0])
