"""The refusals of one plan: each names its node, and all of them are raised together."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from weightport.errors import LayoutError, UnsupportedConfigError, counted
from weightport.layouts.onnx.graph import Graph, Node

__all__ = ["Issues", "computed"]

_FIX_COMPUTED = (
    "re-export with do_constant_folding=True (torch.onnx.export's default), which stores each weight; "
    "a model exported with do_constant_folding=False keeps PyTorch's own parameter names, so "
    "weightport.load(model, path, layout='torch', strict=False) reads it directly"
)


@dataclass
class Issues:
    """Every refusal of one plan, raised together (UnsupportedConfigError if any is one)."""

    where: str
    messages: list[str] = field(default_factory=list)
    unsupported: bool = False

    def add(self, node: Node, message: str, *, unsupported: bool = False) -> None:
        self.messages.append(f"{self.where} node '{node.label}' ({node.op_type}): {message}")
        self.unsupported = self.unsupported or unsupported

    def raise_if_any(self, target: str) -> None:
        if not self.messages:
            return
        cls = UnsupportedConfigError if self.unsupported else LayoutError
        if len(self.messages) == 1:
            raise cls(self.messages[0])
        lines = "\n".join(f"  - {m}" for m in self.messages)
        raise cls(
            f"{self.where} cannot be loaded into {target}: {counted(len(self.messages), 'problem')}:\n{lines}"
        )


def computed(node: Node, role: str, name: str, issues: Issues, graph: Graph | None = None) -> None:
    """Refuse ``node``'s input ``name``, which the graph computes; where stored tensors go into it, say which
    and through what: a forward that changes its weight before use (standardized, weight-normed, scaled)."""
    found = _computed_from(name, graph) if graph is not None else None
    if found:
        stored, ops = found
        shown = ", ".join(f"'{s}'" for s in stored[:4]) + (" ..." if len(stored) > 4 else "")
        issues.add(
            node,
            f"input {role} '{name}' is computed by the graph from the stored {shown} (through "
            f"{', '.join(ops[:6])}{' ...' if len(ops) > 6 else ''}): the exporter left that computation in "
            "the graph (do_constant_folding=False), or the model's forward changes the weight before use "
            "(weight standardization, weight norm, a scale), which no folding stores; weightport places stored "
            f"tensors and runs no graph. Fix: {_FIX_COMPUTED}.",
        )
        return
    issues.add(
        node, f"input {role} '{name}' is computed by the graph, not stored in the file. Fix: {_FIX_COMPUTED}."
    )


def _computed_from(name: str, graph: Graph, limit: int = 64) -> tuple[list[str], list[str]] | None:
    """The stored tensors (non-scalar floats) that go into computed ``name``, and the ops in between."""
    stored: list[str] = []
    ops: list[str] = []
    stack, seen = [name], set[str]()
    while stack and len(seen) < limit:
        current = stack.pop()
        if not current or current in seen:
            continue
        seen.add(current)
        info = graph.source.infos.get(current)
        if info is not None:
            if info.dtype.kind == "f" and math.prod(info.shape) > 1:
                stored.append(current)
            continue
        producer = graph.producers.get(current)
        if producer is None:
            continue
        if producer.op_type not in ops:
            ops.append(producer.op_type)
        stack.extend(producer.inputs)
    return (stored, ops) if stored else None
