"""The epsilon of a normalization the graph computes from basic ops, checked against the module's.

An exporter writes a norm that has no ONNX node of its own (``nn.LayerNorm`` below opset 17, ``nn.RMSNorm``,
transformers' ``T5LayerNorm`` and ``LlamaRMSNorm``: ``x * rsqrt(mean(x^2) + eps) * weight``) as the arithmetic
itself: its weight is read by a ``Mul``, and the eps is the stored scalar an ``Add`` puts on the variance (a
``ReduceMean``) before ``Sqrt`` (then ``Reciprocal`` or a ``Div``) or ``Pow(-0.5)``. Followed from the ``Mul``
back through that arithmetic (and ``Cast``, ``Identity``, reshapes), the nearest such ``Add`` is the norm's
(an ``InstanceNormalization``, as ``nn.GroupNorm`` goes out, carries it as ``epsilon``; one whose scale is
``nn.InstanceNorm*d``'s weight itself too). Values are read, never computed; where two different ones are
equally near, none is taken. An ``InstanceNormalization`` also says over how many groups of channels it
normalizes (its stored scale's size), held against the module's ``num_groups`` (a channel each for
``nn.InstanceNorm*d``, which must not use running statistics); where the graph computes that scale, or the
norm is basic ops, a group norm's count of groups is reported unchecked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.layouts.onnx.graph import Graph, Node
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.slots import Slot

__all__ = ["GraphEps", "graph_epsilon", "module_epsilon", "check_norm_eps"]

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")  # torch's norms; transformers' own; others
_FORWARD = frozenset(
    {"Identity", "Cast", "CastLike", "Unsqueeze", "Reshape", "Squeeze", "Expand"}
)  # weight -> its Mul
# what lies between the weight's Mul and the eps's Sqrt: the normalization's own arithmetic, reshapes, casts
_BETWEEN = frozenset(
    {
        "Mul",
        "Div",
        "Reciprocal",
        "Sub",
        "Cast",
        "CastLike",
        "Identity",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Transpose",
        "Expand",
    }
)
_GROUPED = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)  # norms over groups of channels
_VARIANCE = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare"})
_DEPTH = 8


@dataclass(frozen=True)
class GraphEps:
    """An eps the graph normalizes with: its value (as the node uses it), the node holding it, and the dtypes
    it is rounded through (stored, then each Cast)."""

    value: float
    node: Node
    dtypes: tuple[np.dtype, ...]

    def holds(self, eps: float) -> bool:
        """Whether ``eps`` is this value, up to the rounding of its storage (float32, float16)."""
        rounded = np.asarray(eps, dtype=np.float64)
        for dtype in self.dtypes:
            rounded = rounded.astype(dtype)
        return float(rounded) == self.value or math.isclose(self.value, eps, rel_tol=1e-6, abs_tol=0.0)


def _scalar(name: str, graph: Graph) -> tuple[float, tuple[np.dtype, ...]] | None:
    """The value of a stored one-element float tensor behind ``name`` (through Identity and any Cast)."""
    casts: list[np.dtype] = []
    for _ in range(8):
        info = graph.source.infos.get(name)
        if info is not None:
            if info.dtype.kind != "f" or math.prod(info.shape) != 1:
                return None
            value = np.asarray(graph.source.read(name)).reshape(-1)[:1]
            dtypes = (np.dtype(info.dtype), *casts)
            for dtype in casts:
                value = value.astype(dtype)
            return float(value[0]), dtypes
        node = graph.producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast"):
            return None
        if node.op_type == "Cast":
            to = _CAST_TO.get(node.attr("to"))
            if to is None:
                return None
            casts.insert(0, np.dtype(to))
        name = node.input(0)
    return None


_CAST_TO = {1: "float32", 10: "float16", 11: "float64"}


def _is_variance(name: str, graph: Graph) -> bool:
    """Whether ``name`` is a mean of squares: a Reduce node, through Cast, Identity, or a Div/Mul by a count."""
    for _ in range(4):
        node = graph.producers.get(name)
        if node is None:
            return False
        if node.op_type in _VARIANCE:
            return True
        if node.op_type not in ("Cast", "Identity", "Div", "Mul"):
            return False
        name = node.input(0)
    return False


def _added_eps(name: str, graph: Graph) -> GraphEps | None:
    """The eps where ``name`` is ``Add(variance, eps)``."""
    node = graph.producers.get(name)
    if node is None or node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for eps, variance in (node.inputs, node.inputs[::-1]):
        found = _scalar(eps, graph)
        if found is not None and _is_variance(variance, graph):
            return GraphEps(found[0], node, found[1])
    return None


def _eps_at(node: Node, graph: Graph) -> GraphEps | None:
    if node.op_type == "Sqrt":
        return _added_eps(node.input(0), graph)
    if node.op_type == "Pow":
        exponent = _scalar(node.input(1), graph)
        return _added_eps(node.input(0), graph) if exponent is not None and exponent[0] == -0.5 else None
    if node.op_type == "InstanceNormalization":
        return GraphEps(float(node.attr("epsilon", 1e-5)), node, (np.dtype("float32"),))
    return None


def _recorded(node: Node) -> str | None:
    return node.module if node.module is not None else node.name_scope


def graph_epsilon(weight: str, graph: Graph, path: str | None = None) -> GraphEps | None:
    """The eps of the normalization whose output a ``Mul`` by stored ``weight`` scales, or None.

    ``path``: the module holding the weight; an eps the exporter records as computed in another module (not
    it, inside it, or one of its parents) is not its."""
    muls: list[tuple[Node, str]] = []
    names, seen = [weight], set[str]()
    for _ in range(4):
        step = []
        for name in names:
            for reader in graph.consumers.get(name, []):
                if reader.op_type == "InstanceNormalization" and reader.input(1) == name:
                    if _belongs(reader, path):  # nn.InstanceNorm*d(affine=True): the weight is its scale
                        return _eps_at(reader, graph)
                elif reader.op_type == "Mul":
                    muls.extend((reader, other) for other in reader.inputs if other != name)
                elif reader.op_type in _FORWARD and reader.outputs and reader.outputs[0] not in seen:
                    seen.add(reader.outputs[0])
                    step.append(reader.outputs[0])
        names = step
    level = [other for _, other in muls]
    visited: set[str] = set()
    for _ in range(_DEPTH):
        found: dict[float, GraphEps] = {}
        after: list[str] = []
        for name in level:
            node = graph.producers.get(name)
            if name in visited or node is None:
                continue
            visited.add(name)
            eps = _eps_at(node, graph)
            if eps is not None and _belongs(eps.node, path):
                found.setdefault(eps.value, eps)
            elif node.op_type in _BETWEEN:
                after.extend(node.inputs)
        if found:
            return next(iter(found.values())) if len(found) == 1 else None
        level = after
    return None


def _belongs(node: Node, path: str | None) -> bool:
    scope = _recorded(node)
    if path is None or scope is None:
        return True
    return scope == path or scope.startswith(f"{path}.") or not scope or path.startswith(f"{scope}.")


def module_epsilon(module: nn.Module) -> tuple[str, float] | None:
    """The eps a norm module adds (attribute and value): ``eps`` of torch's norms (``nn.RMSNorm(eps=None)`` uses
    its computation type's machine epsilon: float32's for float16/bfloat16/float32, float64's for float64),
    transformers' ``variance_epsilon``, or an ``epsilon``."""
    for attribute in EPS_ATTRIBUTES:
        value: Any = getattr(module, attribute, None)
        if isinstance(value, Real) and not isinstance(value, bool):
            return attribute, float(value)
        if attribute == "eps" and value is None and isinstance(module, nn.RMSNorm):
            weight = getattr(module, "weight", None)
            wide = weight is not None and weight.dtype == torch.float64
            return attribute, float(torch.finfo(torch.float64 if wide else torch.float32).eps)
    return None


def check_norm_eps(slot: Slot, params: list[str], graph: Graph, issues: Issues) -> str | None:
    """Check the eps the graph normalizes with (found from the Mul by any of ``params``, full names) against
    ``slot``'s module. Returns None (no eps in the graph), ``"equal"``, ``"refused"`` (an issue added), or a
    note for the plan's unchecked settings (the module holds no eps weightport knows)."""
    read = next(((p, e) for p in params if (e := graph_epsilon(p, graph, slot.path)) is not None), None)
    if read is None:
        return None
    param, found = read
    kind = type(slot.module).__name__
    own = module_epsilon(slot.module)
    if own is None:
        return (
            f"the eps of '{slot.label}' ({kind}): the graph normalizes with eps={found.value:g} ("
            f"{found.node.op_type} '{found.node.label}'), and the module holds no eps weightport knows "
            f"({', '.join(EPS_ATTRIBUTES)})"
        )
    if found.node.op_type == "InstanceNormalization":
        groups = _groups_match(slot, found.node, graph, issues)
    else:  # normalized by basic ops: over how many groups is not read
        groups = None if isinstance(slot.module, _GROUPED) else True
    if groups is False:
        return "refused"
    attribute, eps = own
    if found.holds(eps) and groups is None:
        return (
            f"the groups of '{slot.label}' ({kind}): the graph normalizes it ({found.node.op_type} "
            f"'{found.node.label}') over groups of channels it computes, so how many is not checked"
        )
    if found.holds(eps):
        return "equal"
    where = (
        f"epsilon={found.value:g}"
        if found.node.op_type == "InstanceNormalization"
        else f"adds eps={found.value:g} to the variance before its square root"
    )
    config = (
        " (in transformers, the config's layer_norm_epsilon or rms_norm_eps)" if attribute != "eps" else ""
    )
    issues.add(
        found.node,
        f"{where}, normalizing for '{slot.label}' ({kind}, whose '{param}' the graph multiplies by "
        f"the result), but the module was built with {attribute}={eps:g}; the outputs differ. Fix: build it with "
        f"{attribute}={found.value:g}{config}.",
    )
    return "refused"


def _groups_match(slot: Slot, node: Node, graph: Graph, issues: Issues) -> bool | None:
    """Whether ``slot``'s module normalizes each sample over the groups an ``InstanceNormalization`` node does
    (one per entry of its scale: each channel, or each group where the exporter reshaped ``nn.GroupNorm``'s
    input to ``(N, groups, -1)``), with each input's own statistics in eval() too; an issue where not; None
    where the graph computes its scale (how many groups is not read)."""
    scale = graph.stored(node.input(1))
    groups = math.prod(graph.source.infos[scale].shape) if scale is not None else None
    module: Any = slot.module
    kind = type(module).__name__
    if isinstance(module, nn.GroupNorm):
        own, how = int(module.num_groups), f"num_groups={module.num_groups}"
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        own, how = int(module.num_features), f"one group per channel ({module.num_features})"
        if module.track_running_stats:
            issues.add(
                node,
                f"normalizes each input with its own statistics, but '{slot.label}' ({kind}) was built with "
                "track_running_stats=True, which in eval() normalizes with running statistics instead. Fix: "
                f"build it with track_running_stats=False (the default).",
            )
            return False
    else:
        own, how = None, "statistics of its own kind"
    if own == groups:
        return True
    if groups is None:
        return None
    issues.add(
        node,
        f"normalizes each sample over {groups} groups of channels (InstanceNormalization, its scale of "
        f"{groups}), but '{slot.label}' ({kind}) normalizes with {how}; the outputs differ. Fix: build it as "
        f"nn.GroupNorm({groups}, channels) (nn.InstanceNorm*d(affine=True) where each channel is a group).",
    )
    return False
