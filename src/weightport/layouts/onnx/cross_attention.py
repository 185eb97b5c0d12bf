"""``nn.MultiheadAttention`` called with a query other than its key and value (cross-attention, as in
``nn.TransformerDecoderLayer``), as torch.onnx.export writes it: its packed in_proj goes out in two parts.

PyTorch splits the packed ``in_proj_weight`` ``(3d, d)`` into the query's rows ``[0:d]`` and the key's
and value's ``[d:3d]`` (``F._in_projection_packed``, when ``key is value``), and projects each input by
its part. The exporters write that two ways:

- the dynamo exporter keeps ``<path>.in_proj_weight`` (and ``.in_proj_bias``) under their names and
  splits them in the graph with ``Split`` (axis 0): the stored tensor is the parameter, as is;
- the legacy exporter folds the split into two unnamed ``MatMul`` weights, ``(d, d)`` and ``(d, 2d)``
  stored transposed, each with its bias ``Add``. Their names prove nothing, so the graph's dataflow
  does: following the out_proj's input back through every node that computes values (not shapes),
  the first layers reached must be exactly two ``Linear`` layers, one of ``d`` and one of ``2d``
  outputs, both reading ``d`` features. They are the query's and the key-value's projections; the
  in_proj is their concatenation, query rows first. (A self-attention whose packed in_proj no name
  gives, built with ``bias=False``, is proven the same way: one ``Linear`` of ``3d`` outputs.)

Anything else reached (three projections of ``d``: a key other than the value; another kind of layer)
proves nothing, and the attention stays unpaired (the missing module's hint says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weightport.layouts.onnx.graph import Graph, Layer
from weightport.sources.base import Source
from weightport.transforms import ConcatAfter, Identity, Op

__all__ = ["InProj", "split_in_proj", "dataflow_in_proj", "in_proj_roles", "linear_shape"]

# inputs that give a node's sizes, axes or indices, not values flowing into its output
_SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "Resize": (1, 2, 3),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "CumSum": (1,),
    "TopK": (1,),
    "Gather": (1,),
}
_SIZES_ONLY = ("Shape", "Size", "ConstantOfShape", "Range", "EyeLike")  # outputs that carry no input values


@dataclass
class InProj:
    """An attention's in_proj as the graph holds it: stored tensors and ops by role, and the Linear layers
    it was found as (taken out of the layer list)."""

    tensors: dict[str, str]
    ops: dict[str, Op]
    detail: str
    parts: tuple[Layer, ...] = field(default_factory=tuple)


def in_proj_roles(layer: Layer) -> dict[str, tuple[tuple[str, ...], Op]]:
    """``{in_proj_weight/in_proj_bias: (stored tensors, op)}`` of an attention layer, its parts joined."""
    out: dict[str, tuple[tuple[str, ...], Op]] = {}
    for role in ("in_proj_weight", "in_proj_bias"):
        if role in layer.tensors:
            out[role] = ((layer.tensors[role],), layer.ops.get(role, Identity()))
        elif f"{role}/q" in layer.tensors and f"{role}/kv" in layer.tensors:
            parts = [f"{role}/q", f"{role}/kv"]
            ops = tuple(layer.ops.get(p, Identity()) for p in parts)
            out[role] = (tuple(layer.tensors[p] for p in parts), ConcatAfter(ops))
    return out


def split_in_proj(owner: str, width: int, graph: Graph) -> InProj | None:
    """The in_proj of the attention at ``owner`` (out_proj ``width`` wide), where the graph splits
    ``<owner>.in_proj_weight`` itself."""
    infos = graph.source.infos
    prefix = f"{owner}." if owner else ""
    weight, bias = f"{prefix}in_proj_weight", f"{prefix}in_proj_bias"
    if (
        weight not in infos
        or tuple(infos[weight].shape) != (3 * width, width)
        or not _split_rows(weight, graph)
    ):
        return None
    tensors = {"in_proj_weight": weight}
    if bias in infos:
        if tuple(infos[bias].shape) != (3 * width,) or not _split_rows(bias, graph):
            return None
        tensors["in_proj_bias"] = bias
    return InProj(tensors, {}, f"in_proj '{weight}' split by the graph")


def _split_rows(name: str, graph: Graph) -> bool:
    """Whether every node reading stored ``name`` is a ``Split`` of its rows (axis 0)."""
    readers = graph.consumers.get(name, [])
    return bool(readers) and all(
        node.op_type == "Split" and node.attr("axis", 0) == 0 and node.input(0) == name for node in readers
    )


def dataflow_in_proj(out: Layer, width: int, layers: list[Layer], graph: Graph) -> InProj | None:
    """The attention whose out_proj is ``out``, from the two unnamed projections its input is computed
    from (see the module doc), or None where the dataflow proves no such pair."""
    found = _feeding(out, layers, graph)
    if len(found) not in (1, 2) or any(layer.kind != "Linear" for layer in found):
        return None
    sizes = [linear_shape(layer, graph.source) for layer in found]
    if any(size is None or size[1] != width for size in sizes):
        return None
    by_rows = {size[0]: layer for size, layer in zip(sizes, found) if size is not None}
    packed = by_rows.get(3 * width)
    if packed is not None and len(found) == 1:  # self-attention whose in_proj no name gives (bias=False)
        tensors = {f"in_proj_{role}": name for role, name in packed.tensors.items()}
        ops = {f"in_proj_{role}": op for role, op in packed.ops.items()}
        return InProj(tensors, ops, f"packed in_proj '{packed.node.label}'", (packed,))
    q, kv = by_rows.get(width), by_rows.get(2 * width)
    if len(found) != 2 or q is None or kv is None or ("bias" in q.tensors) != ("bias" in kv.tensors):
        return None
    tensors, ops = {}, {}
    for role, param in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        for part, layer in (("q", q), ("kv", kv)):
            if role in layer.tensors:
                tensors[f"{param}/{part}"] = layer.tensors[role]
                ops[f"{param}/{part}"] = layer.ops.get(role, Identity())
    detail = f"query '{q.node.label}' and key-value '{kv.node.label}' projections"
    return InProj(tensors, ops, detail, (q, kv))


def _feeding(out: Layer, layers: list[Layer], graph: Graph) -> list[Layer]:
    """The layers first reached following ``out``'s data input back through value-carrying inputs."""
    at_node = {id(layer.node): layer for layer in layers}
    found: dict[int, Layer] = {}
    stack, seen = [out.node.input(0)], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in graph.source.infos:
            continue
        seen.add(name)
        node = graph.producers.get(name)
        if node is None or node.op_type in _SIZES_ONLY:
            continue  # a graph input, or sizes only
        layer = at_node.get(id(node))
        if layer is not None:
            found[id(layer)] = layer
            continue
        skip = _SHAPE_OPERANDS.get(node.op_type, ())
        stack.extend(name for position, name in enumerate(node.inputs) if position not in skip)
    return list(found.values())


def linear_shape(layer: Layer, source: Source) -> tuple[int, int] | None:
    """A Linear layer's weight shape ``(out, in)`` after its op."""
    shape = tuple(source.infos[layer.tensors["weight"]].shape)
    try:
        matrix = layer.ops.get("weight", Identity()).out_shape([shape])
    except ValueError:
        return None
    return (int(matrix[0]), int(matrix[1])) if len(matrix) == 2 else None
