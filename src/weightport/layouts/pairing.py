"""Pairing source layers with a PyTorch module's layers, by order and kind, or as told.

A PyTorch model is seen as a list of *slots*: each module with parameters of its
own is one slot, except a multi-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU``, which is
one slot per layer (so stacked Keras LSTMs fill one ``nn.LSTM(num_layers=k)``).
A ``mapping`` pins any source layer first (``{"lstm_1": "encoder[1]"}`` names layer 1
of ``encoder``); then a source layer whose own name is a module's path (``fc1``;
``encoder/cell`` is ``encoder.cell``; an ONNX node's ``head.weight`` tensors name
``head``) takes that module when it is of its kind; the rest of a kind take the free
slots of that kind in model order. Unequal counts are an error that lists the
candidates: never a guess.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.LSTM(3, 4, num_layers=2), torch.nn.Linear(4, 2))
>>> [s.label for s in module_slots(model)]
['0[0]', '0[1]', '1']
>>> pairs = pair_layers(model, [SourceLayer("lstm", "LSTM"), SourceLayer("lstm_1", "LSTM"),
...                             SourceLayer("dense", "Linear")], None, framework="Keras")
>>> [(p.source.name, p.slot.label) for p in pairs]
[('lstm', '0[0]'), ('lstm_1', '0[1]'), ('dense', '1')]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from weightport.errors import LayoutError
from weightport.layouts.base import Pairing

__all__ = ["Slot", "SourceLayer", "Paired", "module_slots", "pair_layers", "slot_kind", "as_pairings"]

_RNN_KINDS = {nn.RNN: "RNN", nn.LSTM: "LSTM", nn.GRU: "GRU"}
_CELL_KINDS = {nn.RNNCell: "RNN", nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}
_NORM_KINDS = (
    (nn.modules.batchnorm._BatchNorm, "BatchNorm"),
    (nn.LayerNorm, "LayerNorm"),
)


def slot_kind(module: nn.Module) -> str:
    """The kind a source layer must have to fill ``module``: ``LSTM``, ``Linear``, ``Conv2d``, ..."""
    for cls, kind in {**_RNN_KINDS, **_CELL_KINDS}.items():
        if type(module) is cls:
            return kind
    for cls, kind in _NORM_KINDS:
        if isinstance(module, cls):
            return kind
    return type(module).__name__


@dataclass(frozen=True)
class Slot:
    """One place to put one source layer: a module, and for RNNs one of its layers."""

    path: str
    module: nn.Module
    kind: str
    layer: int | None = None

    @property
    def label(self) -> str:
        return self.path if self.layer is None else f"{self.path}[{self.layer}]"

    @property
    def bidirectional(self) -> bool:
        return bool(getattr(self.module, "bidirectional", False))

    def name(self, param: str, *, reverse: bool = False) -> str:
        """The state-dict name of ``param`` (``weight_ih``, ``bias``...) in this slot.

        >>> Slot("rnn", nn.GRU(2, 3, num_layers=2), "GRU", 1).name("bias_hh", reverse=True)
        'rnn.bias_hh_l1_reverse'
        """
        local = param if self.layer is None else f"{param}_l{self.layer}{'_reverse' if reverse else ''}"
        return f"{self.path}.{local}" if self.path else local

    def describe(self) -> str:
        m = self.module
        if isinstance(m, nn.RNNBase):
            extra = ", bidirectional" if m.bidirectional else ""
            return f"{self.label} ({type(m).__name__}(input_size={m.input_size}, hidden_size={m.hidden_size}){extra})"
        return f"{self.label} ({type(m).__name__})"


@dataclass(frozen=True)
class SourceLayer:
    """One layer of the source: its name there, the slot kind it fills, and how to show it."""

    name: str
    kind: str
    detail: str = ""
    paths: tuple[str, ...] = ()  # module paths the source's own names suggest (besides ``name`` itself)


@dataclass(frozen=True)
class Paired:
    source: SourceLayer
    slot: Slot
    how: str


def module_slots(model: nn.Module) -> list[Slot]:
    """Every slot of ``model`` in registration order (the order ``named_modules`` gives)."""
    slots: list[Slot] = []
    for path, module in model.named_modules():
        holds_stats = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        if not holds_stats and not any(True for _ in module.parameters(recurse=False)):
            continue  # nothing to fill (a BatchNorm with affine=False still holds its running statistics)
        kind = slot_kind(module)
        if isinstance(module, nn.RNNBase):
            slots += [Slot(path, module, kind, layer) for layer in range(module.num_layers)]
        else:
            slots.append(Slot(path, module, kind))
    return slots


_TARGET = re.compile(r"^(?P<path>[\w.]*?)(?:\[(?P<layer>\d+)\])?$")


def _resolve(target: str, slots: list[Slot], source: SourceLayer) -> Slot:
    match = _TARGET.match(target)
    if match:
        path = match["path"]
        layer = None if match["layer"] is None else int(match["layer"])
        found = [s for s in slots if s.path == path and (layer is None or s.layer == layer)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise LayoutError(
                f"mapping '{source.name}' -> '{target}': '{target}' has {len(found)} layers. "
                f"Fix: name one, e.g. '{path}[0]' ... '{path}[{len(found) - 1}]'."
            )
    candidates = ", ".join(s.label for s in slots if s.kind == source.kind) or "none"
    raise LayoutError(
        f"mapping '{source.name}' -> '{target}': no module with parameters at '{target}'. "
        f"Candidates of kind {source.kind}: {candidates}."
    )


def pair_layers(
    model: nn.Module,
    layers: list[SourceLayer],
    mapping: Mapping[str, str] | None,
    *,
    framework: str,
) -> list[Paired]:
    """Pair each source layer with one slot: ``mapping`` first, then by name, then by order within each kind."""
    slots = module_slots(model)
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - {layer.name for layer in layers})
    if unknown:
        raise LayoutError(
            f"mapping names {', '.join(repr(u) for u in unknown)}, which the {framework} source does not have. "
            f"Its layers: {', '.join(layer.name for layer in layers) or 'none'}."
        )
    taken: dict[str, Paired] = {}
    result: dict[str, Paired] = {}
    for layer in layers:
        if layer.name in mapping:
            slot = _resolve(mapping[layer.name], slots, layer)
            if slot.kind != layer.kind:
                raise LayoutError(
                    f"mapping '{layer.name}' -> '{slot.label}': {framework} layer '{layer.name}' is "
                    f"{layer.detail or layer.kind} but '{slot.label}' is {type(slot.module).__name__}. "
                    f"Fix: map it to a {layer.kind} module."
                )
            if slot.label in taken:
                raise LayoutError(
                    f"mapping sends both '{taken[slot.label].source.name}' and '{layer.name}' to '{slot.label}'"
                )
            taken[slot.label] = result[layer.name] = Paired(layer, slot, "mapping=")
    by_path: dict[str, list[Slot]] = {}
    for slot in slots:
        by_path.setdefault(slot.path, []).append(slot)
    for layer in layers:  # a name that is a module's path outranks order (a model may declare in any order)
        if layer.name in result:
            continue
        for path in (layer.name.replace("/", "."), *layer.paths):
            found = by_path.get(path, [])
            if len(found) == 1 and found[0].kind == layer.kind and found[0].label not in taken:
                taken[found[0].label] = result[layer.name] = Paired(layer, found[0], "by name")
                break
    for kind in dict.fromkeys(layer.kind for layer in layers):
        waiting = [layer for layer in layers if layer.kind == kind and layer.name not in result]
        free = [s for s in slots if s.kind == kind and s.label not in taken]
        if not waiting:
            continue
        if len(waiting) != len(free):
            raise LayoutError(
                f"cannot pair {framework} layers with the model by order and kind: the source has "
                f"{len(waiting)} unpaired {kind} layer(s) ({', '.join(w.name for w in waiting)}) but the model "
                f"has {len(free)} free {kind} slot(s) ({', '.join(s.describe() for s in free) or 'none'}). "
                f"Fix: pass mapping={{'{waiting[0].name}': 'module.path'}} to pair them yourself."
            )
        for layer, slot in zip(waiting, free):
            taken[slot.label] = result[layer.name] = Paired(layer, slot, "by order and kind")
    return [result[layer.name] for layer in layers]


def as_pairings(pairs: list[Paired]) -> list[Pairing]:
    """What a :class:`~weightport.layouts.base.LayoutPlan` reports of each pair."""
    return [
        Pairing(
            p.source.name, p.source.detail or p.source.kind, p.slot.label, type(p.slot.module).__name__, p.how
        )
        for p in pairs
    ]
