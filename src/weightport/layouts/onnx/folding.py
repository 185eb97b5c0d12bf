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
from weightport.layouts.onnx.graph import Graph, Layer, Node
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.pairing import Paired, Slot, module_slots
from weightport.sources.base import Source
from weightport.transforms import Chain, Full, Identity, Op, Shape, Zeros

__all__ = ["FOLDS_INTO", "Negate", "followers", "fold_rules", "statistics_note", "refuse_dropped_arithmetic"]

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
    made(
        "running_var",
        Full(size, 1.0 - float(module.eps), dtype),
        f"1 - eps (eps={module.eps:g}): divides by 1",
    )
    if getattr(module, "num_batches_tracked", None) is not None:
        made("num_batches_tracked", Zeros(()), "ONNX counts no batches; 0")
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


def statistics_note(folded: list[str]) -> str:
    """The unchecked setting of the folded BatchNorms: their training statistics are not in the file."""
    listed = ", ".join(f"'{path}'" for path in folded[:_LISTED])
    if len(folded) > _LISTED:
        listed += f" and {len(folded) - _LISTED} more"
    return (
        f"the running statistics of the BatchNorms the exporter folded into the layer before them ({listed}): "
        "the file holds only their eval-mode effect, loaded as weight 1, running_mean 0, running_var 1 - eps "
        "and the folded bias, so outputs in eval() are the file's, but train() normalizes each batch with "
        "its own statistics and updates these, unlike the original model"
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


def arithmetic_after(layer: Layer, graph: Graph, size: int, unplaced: set[str], limit: int = 8) -> list[Node]:
    """The nodes of the element-wise run after ``layer``'s node that scale or shift by a stored tensor of
    ``size`` values no rule places: what a BatchNorm written as arithmetic is (tf2onnx writes a Keras
    BatchNormalization after an activation as ``Mul`` and ``Add``)."""
    found: list[Node] = []
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
            frontier.extend(user.outputs)
    return found


def refuse_dropped_arithmetic(
    folds: list[tuple[Layer, Slot, Slot]], graph: Graph, unplaced: set[str], issues: Issues
) -> None:
    """An issue for each BatchNorm taken as folded into its layer where arithmetic by unplaced per-channel
    tensors follows that layer: the BatchNorm may be that arithmetic, whose values the fold would drop."""
    for layer, conv, bn in folds:
        size = int(getattr(bn.module, "num_features", 0))
        found = arithmetic_after(layer, graph, size, unplaced)
        if not found:
            continue
        nodes = ", ".join(f"'{node.label}' ({node.op_type})" for node in found)
        tensors = sorted({s for node in found for i in node.inputs if (s := graph.stored(i)) in unplaced})
        issues.add(
            layer.node,
            f"'{bn.label}' would be taken as a BatchNorm the exporter folded into '{conv.label}' (no "
            f"BatchNormalization node follows it), but node {nodes} after it scale or shift by stored tensors "
            f"of {size} values that no layer takes ({', '.join(repr(t) for t in tensors)}): they may be this "
            "BatchNorm written as arithmetic (tf2onnx writes a Keras BatchNormalization after an activation "
            "so), whose values the fold would drop. Two readings, and nothing in the file proves which. Fix: "
            "load the file the model was converted from (a Keras model's .keras or .weights.h5), or give "
            f"'{bn.label}' the values those nodes apply by name (weight = the Mul's vector, bias = the Add's, "
            "running_mean = 0, running_var = 1 - eps) together with the other layers' weights, as a dict",
        )
