"""The refusals of one plan: each names its node, and all of them are raised together."""

from __future__ import annotations

from dataclasses import dataclass, field

from weightport.errors import LayoutError, UnsupportedConfigError, counted
from weightport.layouts.onnx.graph import Node

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


def computed(node: Node, role: str, name: str, issues: Issues) -> None:
    issues.add(
        node, f"input {role} '{name}' is computed by the graph, not stored in the file. Fix: {_FIX_COMPUTED}."
    )
