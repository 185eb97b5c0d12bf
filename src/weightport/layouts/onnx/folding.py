"""BatchNorms an exporter folded into the Conv or Gemm before them, loaded as their exact eval-mode equivalent.

``torch.onnx.export`` (both exporters, by default) fuses each eval-mode BatchNorm into the layer before it:
the node's weight is ``W * gamma / sqrt(var + eps)`` and its bias ``(b - mean) * gamma / sqrt(var + eps) +
beta``; no BatchNormalization node is left. The model being loaded still has the BatchNorm. What the file
holds loads exactly all the same: the layer takes the fused weight, and the BatchNorm becomes the
identity plus the fused bias: weight 1, bias the fused bias (or 0, where the layer was built with
``bias=True`` and keeps the bias itself, or the file has none), running_mean 0, running_var ``1 - eps``
(so ``sqrt(var + eps)`` is exactly 1), ``num_batches_tracked`` 0, as for a BatchNormalization node (ONNX
counts no batches; with ``momentum=None`` the first batch of training then replaces these statistics
instead of averaging with them). A BatchNorm built with ``affine=False`` takes the bias as
``running_mean = -bias`` (``x - (-b)`` is ``x + b`` exactly). In ``eval()`` the outputs are the file's;
the training statistics are not in the file, so ``train()`` differs from the original model: the plan says
so as an unchecked setting (an :class:`~weightport.UncheckedConfigWarning` and a row of the report).

Which BatchNorm follows which layer is the model's own structure: the BatchNorm registered right after the
Conv or Linear among the modules that hold tensors (and called right after it, where ``example_inputs=``
gave the call order), with one feature per output channel, that no BatchNormalization node of the graph
fills. A BatchNorm with ``track_running_stats=False`` normalizes with each batch's statistics even in
``eval()``: nothing in it can equal the file's layer, so it is refused.

tf2onnx folds a Keras BatchNormalization only into a layer without a bias; after one with a bias (and after
a depthwise conv, or a Dense without bias, where its folding does not apply) it writes the BatchNorm in eval
form as arithmetic right after the layer's node: ``Mul`` by one vector, ``Add`` of another, one value a
channel. Where the model calls a BatchNorm right after that layer, those nodes are that BatchNorm
(:func:`written_batchnorm`): weight the Mul's vector, bias the Add's, running_mean 0, running_var ``1 - eps``.
Taken as folded instead, the BatchNorm would hold the layer's bias (its folded shift) and the vectors would
be applied by nothing; that reading stands only where the module's layer has no bias and the file's has one
(an exporter that folds always writes the shift). Where both stand (the file's bias all zeros) the load is
refused with both; where only the folded one does, it is refused saying what the model needs for the other.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2))
>>> {conv: (bn.path, how) for conv, (bn, how) in followers(model, None).items()}
{'0': ('1', 'registered right after it')}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.layouts.base import Pairing, Rule
from weightport.layouts.onnx.graph import Graph, Layer, Node, all_zero, keeps_last_axis
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.pairing import Paired, Slot, module_slots
from weightport.sources.base import Source
from weightport.transforms import Chain, Full, Identity, Op, Reshape, Shape, Zeros

__all__ = [
    "FOLDS_INTO",
    "Negate",
    "Written",
    "followers",
    "fold_rules",
    "statistics_note",
    "refuse_dropped_arithmetic",
    "written_after",
    "written_batchnorm",
    "written_rules",
]

FOLDS_INTO = frozenset({"Conv1d", "Conv2d", "Conv3d", "Linear"})  # the layers exporters fuse a BatchNorm into
_LISTED = 8


@dataclass(frozen=True)
class Negate(Op):
    """``-x``: exact in floating point (a BatchNorm with ``affine=False`` adds ``b`` as ``x - (-b)``)."""

    value_preserving = False

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.negative(arrays[0])

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return tuple(shapes[0])

    def inverse(self) -> Op:
        return Negate()

    def describe(self) -> str:
        return "negated"


def _outputs(module: Any) -> int | None:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return int(module.out_channels) if hasattr(module, "out_channels") else None


def followers(module: nn.Module, call_order: Mapping[str, int] | None) -> dict[str, tuple[Slot, str]]:
    """Conv/Linear slot label -> the BatchNorm slot that follows it in ``module``, and how that is known:
    the next slot the forward pass calls, where ``call_order`` has the layer, else the next registered."""
    slots = module_slots(module)
    if not any(s.kind == "BatchNorm" for s in slots):
        return {}  # nothing to fold into: the call order (a forward pass) is not needed
    order = call_order or {}
    called = sorted((s for s in slots if s.path in order), key=lambda s: order[s.path])
    next_called = dict(pairwise(called))
    next_registered = dict(pairwise(slots))
    found = {}
    for before in slots:
        if before.kind not in FOLDS_INTO:
            continue
        if before.path in order:
            after, how = next_called.get(before), "called right after it"
        else:
            after, how = next_registered.get(before), "registered right after it"
        if after is None or after.kind != "BatchNorm":
            continue
        if getattr(after.module, "num_features", None) == _outputs(before.module):
            found[before.label] = (after, how)
    return found


def fold_rules(
    layer: Layer, pair: Paired, bn: Slot, how: str, source: Source, issues: Issues
) -> tuple[list[Rule], Pairing | None]:
    """The rules that make ``bn`` the identity plus the bias of ``layer`` (paired as ``pair``), and the
    pairing the report shows; none (and an issue) where the BatchNorm cannot be made so."""
    module: Any = bn.module
    node, conv = layer.node, pair.slot
    if not module.track_running_stats:
        issues.add(
            node,
            f"'{conv.label}' is followed by '{bn.label}' ({type(module).__name__}(track_running_stats=False)), "
            "which the graph does not have: the exporter folded a BatchNorm's running statistics into this "
            "node (or the exported model had none there), while this BatchNorm normalizes with each batch's "
            "own statistics even in eval(), which no weights can undo. Fix: build it with "
            "track_running_stats=True, or put nn.Identity() in its place and build "
            f"'{conv.label}' with bias=True.",
            unsupported=True,
        )
        return [], None
    size = (int(module.num_features),)
    dtype = "float64" if module.running_var.dtype == torch.float64 else "float32"
    bias = layer.tensors.get("bias")
    keeps_bias = getattr(conv.module, "bias", None) is not None  # the layer adds the bias itself
    given = bias if bias is not None and not keeps_bias else None
    where = f"{source.description} node '{node.label}'"
    folded = f"a BatchNorm folded into '{conv.label}' by the exporter"
    rules = []

    def made(param: str, op: Op, why: str) -> None:
        rules.append(Rule(bn.name(param), (), op, f"{where}: {folded}; {why}"))

    if module.affine:
        made("weight", Full(size, 1.0, dtype), "1")
        if given is not None:
            rules.append(
                Rule(
                    bn.name("bias"),
                    (given,),
                    layer.ops.get("bias", Identity()),
                    f"{where} bias '{given}' ({folded})",
                )
            )
        else:
            made(
                "bias",
                Zeros(size),
                "0 (the bias stays in the layer)" if keeps_bias else "0 (the file has none)",
            )
        made("running_mean", Zeros(size), "0")
    elif given is not None:
        op = layer.ops.get("bias", Identity())
        chain: Op = Negate() if isinstance(op, Identity) else Chain(op, Negate())
        rules.append(
            Rule(
                bn.name("running_mean"),
                (given,),
                chain,
                f"{where} bias '{given}', negated ({folded}, affine=False)",
            )
        )
    else:
        made("running_mean", Zeros(size), "0")
    for param, op, why in _neutral_statistics(module):
        made(param, op, why)
    pairing = Pairing(
        node.label,
        "BatchNorm folded into the node",
        bn.label,
        type(module).__name__,
        f"folded into '{conv.label}' by the exporter (the BatchNorm {how}): its exact "
        "eval-mode equivalent, weight 1, running_mean 0, running_var 1 - eps"
        + (", bias the folded one" if given is not None else ""),
    )
    return rules, pairing


def _neutral_statistics(module: Any) -> list[tuple[str, Op, str]]:
    """running_var ``1 - eps`` (``sqrt(var + eps)`` is exactly 1) and num_batches_tracked 0, as rules' parts."""
    dtype = "float64" if module.running_var.dtype == torch.float64 else "float32"
    made: list[tuple[str, Op, str]] = [
        (
            "running_var",
            Full((int(module.num_features),), 1.0 - float(module.eps), dtype),
            f"1 - eps (eps={module.eps:g}): divides by 1",
        )
    ]
    if getattr(module, "num_batches_tracked", None) is not None:
        made.append(("num_batches_tracked", Zeros(()), "ONNX counts no batches; 0"))
    return made


def statistics_note(folded: list[str], written: list[str] | None = None) -> str:
    """The unchecked setting of the BatchNorms folded into the layer before them (``folded``) or written as
    ``Mul`` and ``Add`` (``written``): their training statistics are not in the file."""
    parts = []
    for paths, how, loaded in (
        (folded, "the exporter folded into the layer before them", "weight 1, running_mean 0, running_var "
         "1 - eps and the folded bias"),
        (written or [], "the file writes as Mul and Add after their layer", "weight the Mul's vector, bias "
         "the Add's, running_mean 0, running_var 1 - eps"),
    ):  # fmt: skip
        if paths:
            listed = ", ".join(f"'{path}'" for path in paths[:_LISTED])
            if len(paths) > _LISTED:
                listed += f" and {len(paths) - _LISTED} more"
            parts.append(f"of the BatchNorms {how} ({listed}), loaded as {loaded}")
    return (
        f"the running statistics {'; and '.join(parts)}: the file holds only their eval-mode effect, so "
        "outputs in eval() are the file's, but train() normalizes each batch with its own statistics and "
        "updates these, unlike the original model"
    )


# ops between a layer and a BatchNorm written as arithmetic (its bias, an activation, reshapes)
_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "Tanh", "Clip",
        "Elu", "Selu", "Celu", "Softplus", "HardSwish", "Gelu", "Identity", "Cast",
        "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten",  # a Dense on 3-D input, as tf2onnx writes it
    }
)  # fmt: skip
_SCALE_OR_SHIFT = frozenset({"Add", "Sub", "Mul", "Div"})
_MOVES = _SCALE_OR_SHIFT | {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}


@dataclass(frozen=True)
class Written:
    """A BatchNorm in eval form written right after a layer's node: ``Mul`` by the stored ``scale``, then
    ``Add`` of the stored ``shift``, one value a channel (tf2onnx's form of a Keras BatchNormalization)."""

    scale: str
    shift: str
    nodes: tuple[Node, Node]


def _per_channel(name: str, graph: Graph, size: int, rank: int | None) -> bool:
    """Whether stored ``name`` holds ``size`` values broadcast one a channel: along axis 1 of a Conv's output
    of ``rank`` axes, along the last axis of a Linear's (``rank`` None)."""
    shape = tuple(graph.source.infos[name].shape)
    if not shape or math.prod(shape) != size:
        return False
    if rank is None:
        return shape[-1] == size
    return len(shape) <= rank and all(n == 1 for i, n in enumerate(shape) if rank - len(shape) + i != 1)


def written_after(layer: Layer, graph: Graph, size: int, limit: int = 8) -> Written | None:
    """The ``Mul`` and ``Add`` by stored per-channel tensors of ``size`` values right after ``layer``'s node
    (only ``Identity``, the layer's own bias ``Add`` and, after a Linear, a ``Reshape`` that keeps the last
    axis between), each the only reader of what it reads: a BatchNorm in eval form; None where there are none.
    """
    weight = layer.tensors.get("weight")
    rank = len(graph.source.infos[weight].shape) if weight and layer.kind != "Linear" else None
    bias = layer.tensors.get("bias")
    current = layer.node.outputs[0] if layer.node.outputs else ""
    mul: Node | None = None
    scale = ""
    for _ in range(limit):
        users = graph.consumers.get(current, [])
        if len(users) != 1 or not users[0].outputs:
            return None
        user = users[0]
        operand = graph.stored_operand(user, current) if len(user.inputs) == 2 else None
        per_channel = operand is not None and _per_channel(operand, graph, size, rank)
        if mul is None and (
            user.op_type == "Identity"
            or (user.op_type == "Add" and operand is not None and operand == bias)
            or (rank is None and user.op_type == "Reshape" and keeps_last_axis(user, size, graph))
        ):
            pass  # the layer's own output still
        elif user.op_type == "Identity":
            pass
        elif user.op_type == "Mul" and mul is None and per_channel and operand is not None:
            mul, scale = user, operand
        elif user.op_type == "Add" and mul is not None and per_channel and operand is not None:
            return Written(scale, operand, (mul, user))
        else:
            return None
        current = user.outputs[0]
    return None


def written_batchnorm(layer: Layer, conv: Slot, bn: Slot, graph: Graph, issues: Issues) -> Written | None:
    """The ``Mul`` and ``Add`` right after ``layer``'s node (paired with ``conv``) that are ``bn`` in eval
    form, where that reading stands; None where it does not, or where only the folded reading does (the
    layer's bias can go only to ``bn``: :func:`refuse_dropped_arithmetic` then says what the other needs).
    Where both stand, an issue naming both."""
    module: Any = bn.module
    written = written_after(layer, graph, int(getattr(module, "num_features", 0)))
    if written is None or not module.affine or not module.track_running_stats:
        return None
    bias = layer.tensors.get("bias")
    if bias is None or getattr(conv.module, "bias", None) is not None:
        return written  # taken as folded, bn would hold nothing of the file: the Mul and Add are it
    if not all_zero(graph.source, bias):
        return None
    mul, add = written.nodes
    issues.add(
        layer.node,
        f"'{bn.label}', the BatchNorm after '{conv.label}', reads two ways: as node '{mul.label}' (Mul) and "
        f"'{add.label}' (Add) right after it, a BatchNorm in eval form (weight '{written.scale}', bias "
        f"'{written.shift}'), or as a BatchNorm the exporter folded into '{conv.label}' whose shift is the "
        f"node's all-zero bias '{bias}', those nodes then being arithmetic of the model's own. The weights fit "
        "both and the outputs differ; nothing in the file proves which. Fix: build "
        f"'{conv.label}' with bias=True for the first (it takes the zero bias, '{bn.label}' the vectors), or "
        "load the file the model was converted from (a Keras model's .keras or .weights.h5)",
    )
    return written


def written_rules(
    layer: Layer, bn: Slot, how: str, written: Written, source: Source
) -> tuple[list[Rule], Pairing]:
    """The rules that make ``bn`` the ``Mul`` and ``Add`` after ``layer``'s node, and the pairing to show."""
    module: Any = bn.module
    size = (int(module.num_features),)
    mul, add = written.nodes
    where = f"{source.description} node"
    rules = [
        Rule(
            bn.name(param),
            (stored,),
            Identity()
            if source.infos[stored].shape == size
            else Reshape(tuple(source.infos[stored].shape), size),
            f"{where} '{node.label}' ({node.op_type}) input '{stored}' (a BatchNorm in eval form)",
        )
        for param, stored, node in (("weight", written.scale, mul), ("bias", written.shift, add))
    ]
    rules.append(
        Rule(bn.name("running_mean"), (), Zeros(size), f"{where} '{mul.label}': a BatchNorm in eval form; 0")
    )
    rules += [
        Rule(bn.name(param), (), op, f"{where} '{mul.label}': a BatchNorm in eval form; {why}")
        for param, op, why in _neutral_statistics(module)
    ]
    pairing = Pairing(
        f"{mul.label} + {add.label}",
        "BatchNorm as Mul and Add",
        bn.label,
        type(module).__name__,
        f"written right after node '{layer.node.label}' (the BatchNorm {how}): its exact eval-mode "
        "equivalent, weight the Mul's vector, bias the Add's, running_mean 0, running_var 1 - eps",
    )
    return rules, pairing


def arithmetic_after(
    layer: Layer, graph: Graph, size: int, unplaced: set[str], limit: int = 8
) -> tuple[list[Node], list[Node]]:
    """The nodes of the element-wise run after ``layer``'s node that scale or shift by a stored tensor of
    ``size`` values no rule places (what a BatchNorm written as arithmetic is: tf2onnx writes a Keras
    BatchNormalization after an activation as ``Mul`` and ``Add``), and the other nodes of the run before
    them (the activation)."""
    found: list[Node] = []
    passed: list[Node] = []
    seen: set[int] = set()
    frontier = list(layer.node.outputs)
    while frontier and len(seen) < limit:
        for user in graph.consumers.get(frontier.pop(0), []):
            if user.index in seen or user.op_type not in _ELEMENTWISE:
                continue
            seen.add(user.index)
            if user.op_type in _SCALE_OR_SHIFT and any(
                (stored := graph.stored(name)) in unplaced
                and math.prod(graph.source.infos[stored].shape) == size
                for name in user.inputs
            ):
                found.append(user)
            elif not found and user.op_type not in _MOVES:
                passed.append(user)
            frontier.extend(user.outputs)
    return found, passed


def refuse_dropped_arithmetic(
    folds: list[tuple[Layer, Slot, Slot]], graph: Graph, unplaced: set[str], issues: Issues
) -> None:
    """An issue for each BatchNorm taken as folded into its layer where arithmetic by unplaced per-channel
    tensors follows that layer: the BatchNorm may be that arithmetic, whose values the fold would drop."""
    for layer, conv, bn in folds:
        size = int(getattr(bn.module, "num_features", 0))
        found, passed = arithmetic_after(layer, graph, size, unplaced)
        if not found:
            continue
        nodes = ", ".join(f"'{node.label}' ({node.op_type})" for node in found)
        tensors = sorted({s for node in found for i in node.inputs if (s := graph.stored(i)) in unplaced})
        said = ", ".join(repr(t) for t in tensors)
        start = (
            f"'{bn.label}' would be taken as a BatchNorm the exporter folded into '{conv.label}' (no "
            "BatchNormalization node follows it), but node"
        )
        module: Any = bn.module
        bias = layer.tensors.get("bias")
        needs = {}  # what to build -> why the other reading needs it
        if not module.affine:
            needs[f"'{bn.label}' with affine=True"] = f"'{bn.label}' must hold a weight and a bias"
        if bias is not None and getattr(conv.module, "bias", None) is None:
            needs[f"'{conv.label}' with bias=True"] = (
                f"'{conv.label}' must add the node's bias '{bias}' itself"
            )
        if needs and written_after(layer, graph, size) is not None:
            issues.add(
                layer.node,
                f"{start} {nodes} right after it scale and shift by stored tensors of {size} values that no "
                f"layer takes ({said}): a BatchNorm in eval form, as tf2onnx writes a Keras "
                "BatchNormalization it does not fold into the layer before it. Taken as "
                f"folded, '{bn.label}' would drop those values; taken as those nodes, "
                + " and ".join(needs.values())
                + f". Fix: build {' and '.join(needs)}: the load then gives '{bn.label}' those nodes' values "
                "(weight the Mul's vector, bias the Add's, running_mean 0, running_var 1 - eps)",
            )
            continue
        after = ", ".join(f"'{node.label}' ({node.op_type})" for node in passed)
        issues.add(
            layer.node,
            f"{start} {nodes} after it{f', past {after},' if after else ''} scale or shift by stored tensors "
            f"of {size} values that no layer takes ({said}): they may be this BatchNorm written as arithmetic"
            + (
                " after the activation (tf2onnx writes a Keras BatchNormalization placed after an activation "
                "so; the model's modules cannot show whether it calls its BatchNorm before the activation or "
                "after)"
                if passed
                else ""
            )
            + ", whose values the fold would drop, or arithmetic of the model's own. Two readings, and nothing "
            "in the file proves which. Fix: load the file the model was converted from (a Keras model's "
            ".keras or .weights.h5), or load, instead of this file, a dict of every tensor of the model by name "
            f"(with '{bn.label}' weight = the Mul's vector, bias = the Add's, running_mean = 0, "
            "running_var = 1 - eps)",
        )
