"""An ``nn.GroupNorm`` whose weight and bias the default exports store unnamed, after its normalization.

Both exporters write ``nn.GroupNorm`` as a ``Reshape`` to ``(N, groups, -1)``, an ``InstanceNormalization``
with a scale of ones and a bias of zeros (one each per group), the ``Reshape`` back (which the dynamo
exporter's optimizer drops where each channel is a group of a 1-D map), then a ``Mul`` by the
weight and an ``Add`` of the bias, each broadcast per channel as ``(C, 1, ...)``. Constant folding (the legacy
exporter's default, the dynamo exporter's optimizer) stores those two as unnamed constants; followed from the
``InstanceNormalization`` down that exact chain, they are the module's weight and bias. The eps and the
groups (the size of the node's scale) are then checked against the module (:mod:`.norm_eps`).
"""

from __future__ import annotations

import math

import numpy as np

from weightport.layouts.onnx.graph import Graph, Layer, Node
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.onnx.norm_eps import check_norm_eps
from weightport.layouts.slots import Slot
from weightport.transforms import Reshape

__all__ = ["GROUP_NORM", "group_norm_layer", "check_group_norm"]

GROUP_NORM = "GroupNorm"


def group_norm_layer(node: Node, graph: Graph, validated: set[str]) -> Layer | None:
    """The ``nn.GroupNorm`` an ``InstanceNormalization`` followed by the reshape back and a per-channel
    ``Mul`` and ``Add`` of stored tensors is (None where it is not exactly that); its own scale of ones and
    bias of zeros, which change nothing, go into ``validated``."""
    source = graph.source
    scale, shift = graph.stored(node.input(1)), graph.stored(node.input(2))
    if scale is None or shift is None:
        return None
    ones, zeros = np.asarray(source.read(scale)), np.asarray(source.read(shift))
    if not (np.all(ones == 1) and not np.any(zeros)):
        return None  # a scale of its own: nn.InstanceNorm*d(affine=True), or no plain GroupNorm
    back = graph.only_consumer(node)
    if back is not None and back.op_type != "Reshape":
        back = node  # a group per channel over one axis: the optimizer dropped the reshape back, a no-op
    if back is None:
        return None
    mul = graph.only_consumer(back)
    weight = _per_channel(mul, "Mul", back, graph)
    add = graph.only_consumer(mul) if mul is not None else None
    bias = _per_channel(add, "Add", mul, graph) if mul is not None else None
    if weight is None or bias is None:
        return None
    shape = source.infos[weight].shape
    groups = math.prod(source.infos[scale].shape)
    if source.infos[bias].shape != shape or shape[0] % groups or (back is node and shape[0] != groups):
        return None
    validated.update((scale, shift))
    flat = Reshape(shape, (shape[0],))
    return Layer(
        node,
        GROUP_NORM,
        {"weight": weight, "bias": bias},
        {"weight": flat, "bias": flat},
        detail=f"ONNX InstanceNormalization node over {groups} groups, then Mul and Add per channel {shape}",
    )


def _per_channel(node: Node | None, op: str, before: Node, graph: Graph) -> str | None:
    """The stored tensor ``node`` (an ``op`` on ``before``'s output) combines with, where it is one value per
    channel broadcast over the axes after the channels: shape ``(C, 1, ...)``, as the exporters write it."""
    if node is None or node.op_type != op or len(node.inputs) != 2 or not before.outputs:
        return None
    stored = graph.stored_operand(node, before.outputs[0])
    if stored is None:
        return None
    shape = graph.source.infos[stored].shape
    return stored if len(shape) >= 2 and all(d == 1 for d in shape[1:]) else None


def check_group_norm(layer: Layer, slot: Slot, graph: Graph, issues: Issues, unchecked: list[str]) -> None:
    """Hold a :func:`group_norm_layer`'s eps and groups (its node's) against the module it fills."""
    if layer.kind != GROUP_NORM:
        return
    note = check_norm_eps(slot, [layer.tensors["weight"]], graph, issues)
    if note is None:
        unchecked.append(f"the eps and groups of '{slot.label}' (GroupNorm): not found in the graph")
    elif note not in ("equal", "refused"):
        unchecked.append(note)
