"""What every framework layout is and produces: the :class:`Layout` contract, and rules from source
tensors to target tensors.

A layout (a module or package per framework under ``weightport.layouts``) is a :class:`Layout`:

- ``NAME``: its registry name (``"torch"``, ``"keras"``, ...);
- ``plan(module, source, mapping, *, call_order=None) -> LayoutPlan``: the rules for this
  module (``call_order``: module path -> position of its first call, from ``example_inputs=``);
- ``export(module, ...) -> dict[str, np.ndarray]``: the reverse direction;
- ``describe(source) -> list[dict]``: the layers it recognises in a source (for ``inspect``).

Rules are data: which source keys feed which target, through which
:mod:`weightport.transforms` op. The planner checks them; layouts never write.

>>> from weightport.transforms import Transpose
>>> Rule("fc.weight", ("dense/kernel",), Transpose((1, 0))).describe()
'dense/kernel -> fc.weight (transpose)'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from weightport.transforms import Identity, Op

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from weightport.call_order import CallOrder
    from weightport.sources.base import Source

__all__ = ["Layout", "Rule", "Pairing", "LayoutPlan", "base_model_prefix", "ExportedArrays"]


class ExportedArrays(dict[str, np.ndarray]):
    """A layout's exported arrays by its own keys, with ``notes``: what the export changed that a load back
    shows (an LSTM's two biases summed into the one bias Keras and Flax keep)."""

    notes: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.notes = []


def base_model_prefix(module: Any) -> str | None:
    """The name under which transformers files ``module``'s own tensors in a checkpoint of a model with a head
    (``bert`` for ``BertModel``: ``BertForMaskedLM`` saves ``bert.embeddings...`` beside ``cls...``), where
    ``module`` is that base model itself (its ``base_model_prefix``, and no child of that name); else None.
    transformers' own loading drops that prefix to load such a checkpoint into the base model.

    >>> from torch import nn
    >>> base_model_prefix(nn.Linear(1, 1)) is None
    True
    """
    prefix = getattr(module, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or hasattr(module, prefix):
        return None
    return prefix


@dataclass(frozen=True)
class Rule:
    """Target tensor ``target`` is ``op(*source tensors)``; ``origin`` says where it came from."""

    target: str
    sources: tuple[str, ...]
    op: Op = field(default_factory=Identity)
    origin: str = ""

    def describe(self) -> str:
        return f"{', '.join(self.sources) or '(none)'} -> {self.target} ({self.op.describe()})"


@dataclass(frozen=True)
class Pairing:
    """One source layer paired with one module, and why (``"by order and kind"``, ``"mapping="``)."""

    source_layer: str
    source_kind: str
    module_path: str
    module_kind: str
    how: str


@dataclass
class LayoutPlan:
    """A layout's answer for one module: the rules, how layers were paired, what it left unchecked.

    ``unmatched`` lists source tensors no rule reads (reported as ignored with
    ``strict=False``, an error otherwise); ``unchecked`` lists settings the source
    did not carry, so they could not be held against the module; ``missing_hints``
    says, per module path, why the source has nothing for that module; ``forward_notes``
    what the model's ``forward`` must do around a module (weights alike, outputs not).
    """

    name: str  # the layout's registry name ("keras")
    rules: list[Rule]
    pairings: list[Pairing] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    # settings a transformers snapshot keeps in config.json rather than in its weights file: unchecked, unless
    # that config.json was held against the model's own configuration (weightport.snapshot_config)
    config_unchecked: list[str] = field(default_factory=list)
    # a submodule inside which every source layer pairs by name (a wrapped model): the load goes into it
    scope: str = ""
    # module path -> why the source has nothing for that module and what to do (for its missing tensors)
    missing_hints: dict[str, str] = field(default_factory=dict)
    # source tensor -> why no rule reads it and what to do, where the layout knows (a Keras layer of a class
    # it has no rule for, whose weights change the outputs: strict=False alone would drop them)
    unmatched_hints: dict[str, str] = field(default_factory=dict)
    # source tensors that are not weights (a training state's optimizer moments): always ignored, with why
    not_weights: list[str] = field(default_factory=list)
    # what the model's forward must do around a module for the source's outputs (an activation after it, a
    # flipped input), each saying the module and source layer it is about: warned, reported, and repeated
    # by weightport.verify beside a failure
    forward_notes: list[str] = field(default_factory=list)
    # module tensors the source is not meant to hold (the base model's, where the source is a PEFT adapter and the
    # module that model with the adapter's layers): left as they are and reported missing, whatever strict says
    kept: list[str] = field(default_factory=list)


class Layout(Protocol):
    """The contract of a framework layout (each ``weightport.layouts`` module or package meets it).

    One member is optional, so that a layout registered from outside need not have it:
    ``weight_names(source) -> list[str]``, the tensors that are weights where a file also holds
    graph constants (the ONNX layout has it); ``weightport inspect`` takes every tensor for a weight
    where a layout has none.
    """

    NAME: str

    def plan(
        self,
        module: nn.Module,
        source: Source,
        mapping: Mapping[str, str] | None,
        *,
        call_order: CallOrder | None = None,
    ) -> LayoutPlan: ...

    def export(self, module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]: ...

    def describe(self, source: Source) -> list[dict[str, Any]]: ...
