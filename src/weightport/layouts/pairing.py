"""Pairing source layers with a PyTorch module's layers: only where the pairing is proven.

A PyTorch model is seen as a list of *slots* (:mod:`weightport.layouts.slots`): each
module with parameters of its own is one slot, except a multi-layer ``nn.RNN``/``nn.LSTM``/
``nn.GRU``, which is one slot per layer; a slot's *kind* is what its module is
(``isinstance``); a module of no known kind never takes a source layer.

Each source layer takes a slot by one of these proofs, tried in turn; the report
says which:

1. ``mapping=``: the user said so (``{"lstm_1": "encoder[1]"}`` names layer 1 of ``encoder``;
   ``"encoder[0]:reverse"`` its reverse direction, where the layout pairs one-way cells with sides);
2. **by name**: the slot's path is the layer's own name under its framework's naming
   rules (``encoder/cell`` is ``encoder.cell``); when every layer pairs by name inside
   one submodule and none at the root (a model wrapped as ``self.m``), inside it;
3. **by a unique kind and shape**: among the layers and slots left, only one
   assignment fits every layer (kinds equal, every converted shape equal);
4. **by recorded order**: where several assignments fit, the source's own recorded
   order (a ``.keras`` config, an ONNX graph's node order, Flax's ``Dense_0, Dense_1``
   numbers; never a file's key order) matched with the model's *call* order: an
   ``nn.Sequential``'s order and a multi-layer RNN's layer index by construction,
   any other module's from ``example_inputs=`` (see :mod:`weightport.call_order`);
   3 and 4 are :mod:`weightport.layouts.proof`'s.

Anything else is refused with the interchangeable layers on both sides listed:
a refusal costs a minute, a crossed pairing days. A layer for which the model has no free module
of its kind at all is refused too, or left out (``None``, with why in ``Pairs.left_out``) where the
layout passes ``leave_out=True``: its arrays stay unread, refused unless ``strict=False``.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.LSTM(3, 4, num_layers=2), torch.nn.Linear(4, 2))
>>> [s.label for s in module_slots(model)]
['0[0]', '0[1]', '1']
>>> pairs = pair_layers(model, [SourceLayer("lstm", "LSTM", order=("model", 0)),
...                             SourceLayer("lstm_1", "LSTM", order=("model", 1)),
...                             SourceLayer("dense", "Linear", order=("model", 2))], None, framework="Keras")
>>> [(p.source.name, p.slot.label, p.how) for p in pairs]  # doctest: +NORMALIZE_WHITESPACE
[('lstm', '0[0]', 'by recorded order (Keras) and call order (the layer index)'),
 ('lstm_1', '0[1]', 'by recorded order (Keras) and call order (the layer index)'),
 ('dense', '1', 'by a unique kind and shape')]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping

from torch import nn

from weightport.call_order import CallOrder
from weightport.errors import LayoutError, WeightportError, a_or_an
from weightport.layouts.base import Pairing, Rule
from weightport.layouts.proof import Fits, Prover, Settings
from weightport.layouts.slots import (
    KNOWN_KINDS,
    Paired,
    Slot,
    SourceLayer,
    module_slots,
    slot_kind,
    target_shapes,
    torch_class,
)
from weightport.sources.base import Source

__all__ = [
    "Pairs",
    "Slot",
    "SourceLayer",
    "Paired",
    "Fits",
    "Settings",
    "module_slots",
    "pair_layers",
    "slot_kind",
    "as_pairings",
    "rules_fit",
    "fits_by_rules",
    "target_shapes",
    "torch_class",
    "wrapped_scope",
    "KNOWN_KINDS",
]


def fits_by_rules(
    model: nn.Module, source: Source, rules_for: Callable[[int, Slot], list[Rule] | None]
) -> Fits:
    """A ``fits`` for :func:`pair_layers` from a layout's own rule builder: layer ``i`` fits ``slot``
    where its rules there build (``None`` or a :class:`WeightportError`: they do not) and give every
    target its shape."""
    shapes = target_shapes(model)

    def fits(i: int, slot: Slot) -> bool:
        try:
            rules = rules_for(i, slot)
        except WeightportError:
            return False
        return rules is not None and rules_fit(rules, source, shapes)

    return fits


def rules_fit(rules: Iterable[Rule], source: Source, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every rule's result has the shape of the module tensor it targets.

    Targets the module lacks are not held against the fit: the plan reports them.
    """
    for rule in rules:
        want = shapes.get(rule.target)
        if want is None:
            continue
        try:
            got = tuple(rule.op.out_shape([tuple(source.infos[s].shape) for s in rule.sources]))
        except Exception:  # an op that cannot take these shapes does not fit
            return False
        if got != tuple(want):
            return False
    return True


class Pairs(list[Paired | None]):
    """What :func:`pair_layers` found: each source layer's :class:`Paired`, or ``None`` for a layer left
    out (``leave_out=True``: no free module of its kind at all), with ``left_out``: that layer's index ->
    why, and the fix (the hint of a ``strict=True`` refusal of its arrays)."""

    def __init__(self, pairs: Iterable[Paired | None], left_out: Mapping[int, str]) -> None:
        super().__init__(pairs)
        self.left_out = dict(left_out)

    def placed(self) -> list[Paired]:
        """The layers that were paired, in source order."""
        return [p for p in self if p is not None]


_TARGET = re.compile(r"^(?P<path>[\w.]*?)(?:\[(?P<layer>\d+)\])?$")
SIDES = ("forward", "reverse")


def _side(target: str, layer: SourceLayer, framework: str, sides: bool) -> tuple[str, str]:
    """``target`` without a ``:forward``/``:reverse`` suffix, and that side ("" for none)."""
    path, colon, side = target.rpartition(":")
    if not colon:
        return target, ""
    if side not in SIDES:
        raise LayoutError(
            f"mapping '{layer.name}' -> '{target}': '{side}' is no direction. Fix: end the target with "
            "':forward' or ':reverse' (one direction of a bidirectional RNN), or with nothing."
        )
    if not sides:
        raise LayoutError(
            f"mapping '{layer.name}' -> '{target}': {framework} layers fill both directions of a bidirectional "
            f"RNN themselves. Fix: map it to '{path}' without ':{side}'."
        )
    return path, side


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
    candidates = [s.label for s in slots if s.kind == source.kind]
    fix = (
        f"map it to one of those, by its path: mapping={{'{source.name}': '{candidates[0]}'}}"
        if candidates
        else f"build the model with the {torch_class(source.kind)} this layer needs"
    )
    raise LayoutError(
        f"mapping '{source.name}' -> '{target}': no module with parameters at '{target}'. "
        f"Candidates of kind {source.kind}: {', '.join(candidates) or 'none'}. Fix: {fix}."
    )


def pair_layers(
    model: nn.Module,
    layers: list[SourceLayer],
    mapping: Mapping[str, str] | None,
    *,
    framework: str,
    fits: Fits | None = None,
    call_order: CallOrder | None = None,
    where: str = "",
    sides: bool = False,
    fit_context: Callable[[Slot], Hashable] | None = None,
    folded_constants: bool = False,
    slots: list[Slot] | None = None,
    leave_out: bool = False,
    settings: Settings | None = None,
) -> Pairs:
    """Pair each source layer with one slot, each by a proof (see the module doc), or refuse.

    Args:
        model: the module being loaded (the scope).
        layers: the source's layers.
        mapping: ``{source layer name: "module.path" or "module.path[layer]"}``, pinned first.
        framework: how messages name the source's framework.
        fits: ``fits(i, slot)``: whether layer ``i``'s converted shapes are the slot's.
        call_order: module path -> the position of its first call (``example_inputs=``).
        where: how messages name the source.
        sides: whether ``mapping=`` may name one direction of a bidirectional RNN (``"rnn[0]:reverse"``):
            for layouts whose one-way cells can fill a side each.
        fit_context: what ``fits`` reads of a slot besides the slot's own kind, tensors and settings (the
            ONNX layout: whether a BatchNorm follows it); slots alike in all of these fit alike.
        folded_constants: the source may hold constants an exporter computed from parameters (ONNX): with
            ``call_order``, a module whose forward changes its own weight before use takes no layer by
            structure, since its layer's tensor may be that change folded in.
        slots: the model's slots as the layout sees them (default :func:`module_slots`; the Keras layout
            gives its layer-scale modules a kind of their own).
        leave_out: a layer no free module of its kind is left for is left out (``None``, why in
            ``Pairs.left_out``) rather than refused; the layout leaves its arrays unread.
        settings: ``settings(i, slot)``: the problems the layout's settings checks find between layer ``i``
            and ``slot`` that no forward code makes up for (a bias, an eps; not padding); never a proof, but
            where neither proof settles a part, a difference every candidate shares is said first in the
            refusal, as one no ``mapping=`` would cure (see :mod:`weightport.layouts.proof`).
    """
    slots = module_slots(model) if slots is None else slots
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - {layer.name for layer in layers})
    if unknown:
        raise LayoutError(
            f"mapping names {', '.join(repr(u) for u in unknown)}, which is not one of the layers of "
            f"{where or f'the {framework} source'} that weightport maps: "
            f"{', '.join(layer.name for layer in layers) or 'none'}. Fix: key mapping= by those names "
            "(weightport inspect FILE lists the source's layers); a layer of a class weightport has no rule "
            "for cannot be mapped: load its arrays yourself, under the module's names."
        )
    taken: set[str] = set()
    result: dict[int, Paired] = {}
    for i, layer in enumerate(layers):
        if layer.name in mapping:
            target, side = _side(mapping[layer.name], layer, framework, sides)
            slot = _resolve(target, slots, layer)
            if slot.kind != layer.kind:
                raise LayoutError(
                    f"mapping '{layer.name}' -> '{slot.label}': {framework} layer '{layer.name}' is "
                    f"{layer.detail or layer.kind} but '{slot.label}' is {type(slot.module).__name__}. "
                    f"Fix: map it to {a_or_an(torch_class(layer.kind))} module."
                )
            if side and not slot.bidirectional:
                raise LayoutError(
                    f"mapping '{layer.name}' -> '{mapping[layer.name]}': '{slot.label}' runs one direction. Fix: "
                    f"map it to '{slot.label}' without ':{side}', or build the module with bidirectional=True."
                )
            others = [p for p in result.values() if p.slot.label == slot.label]
            if any(not side or not p.side or p.side == side for p in others):
                shown = f"{slot.label}:{side}" if side else slot.label
                raise LayoutError(
                    f"mapping sends both '{others[0].source.name}' and '{layer.name}' to '{shown}'. "
                    "Fix: map each source layer to a module of its own (or each to one side of a "
                    "bidirectional RNN: 'rnn[0]:forward' and 'rnn[0]:reverse')."
                )
            taken.add(slot.label)
            result[i] = Paired(layer, slot, f"mapping= ({side} direction)" if side else "mapping=", side)
    _pair_by_name(layers, slots, result, taken, "")
    if not mapping and not result and layers:
        inside = _wrapped_scopes(layers, slots)
        if len(inside) > 1:
            shown = ", ".join(f"'{p}'" for p in inside[:8])
            raise LayoutError(
                f"every layer of {where or f'the {framework} source'} pairs by name inside each of the "
                f"submodules {shown}: they have the same structure, so the source could fill any of them. "
                f"Fix: pass prefix='{inside[0]}.' (or another of them) to say which."
            )
        if inside:
            _pair_by_name(layers, slots, result, taken, inside[0])
    # as the proof: a module whose forward changes its weight takes no layer by structure
    changed = call_order.changes if call_order is not None and folded_constants else None
    _pair_within(layers, slots, result, taken, fits, changed)
    prover = Prover(
        model,
        layers,
        slots,
        result,
        taken,
        framework,
        fits,
        call_order,
        where,
        sides,
        fit_context,
        folded_constants,
        leave_out,
        settings,
    )
    prover.run()
    return Pairs((result.get(i) for i in range(len(layers))), prover.left_out)


def _name_paths(layer: SourceLayer, layers: list[SourceLayer]) -> tuple[str, ...]:
    """The module paths ``layer``'s names say: its own name, then the paths its source gives it, except
    one ending in another layer's name (a Keras file files layer 'first' as 'layers/dense', while another
    layer is named 'dense': that path names the other layer's module, not this one's)."""
    own = layer.name.replace("/", ".")
    # other layers' own names of one component (Keras names; a hierarchical Flax name repeats its last part)
    others = {n for x in layers if x is not layer and "." not in (n := x.name.replace("/", "."))}
    named = own not in layer.paths  # a name that is its file path (two Keras layers of one name) is a path
    last = own.rsplit(".", 1)[-1]

    def other_layers(path: str) -> bool:  # its last part is not this layer's name but another layer's
        end = path.rsplit(".", 1)[-1]
        return end in others and (end != last or not named)

    return (*([own] if named else []), *(p for p in layer.paths if not other_layers(p)))


def _pair_by_name(
    layers: list[SourceLayer], slots: list[Slot], result: dict[int, Paired], taken: set[str], inside: str
) -> None:
    """A name that is a module's path (under ``inside``) outranks everything but ``mapping=``."""
    by_path: dict[str, list[Slot]] = {}
    for slot in slots:
        by_path.setdefault(slot.path, []).append(slot)
        if slot.layer is not None:
            by_path[slot.label] = [slot]  # one layer of an RNN, named as mapping= names it: 'rnn[1]'
    how = f"by name inside '{inside}'" if inside else "by name"
    for i, layer in enumerate(layers):
        if i in result:
            continue
        for path in _name_paths(layer, layers):
            found = by_path.get(f"{inside}.{path}" if inside else path, [])
            if len(found) == 1 and found[0].kind == layer.kind and found[0].label not in taken:
                taken.add(found[0].label)
                result[i] = Paired(layer, found[0], how)
                break


def _pair_within(
    layers: list[SourceLayer],
    slots: list[Slot],
    result: dict[int, Paired],
    taken: set[str],
    fits: Fits | None,
    changed: Callable[[str], bool] | None,
) -> None:
    """A layer the source records running in module ``m`` (whose forward applies a child's weight itself:
    ``F.linear(x, self.proj.weight)``) takes the one free slot inside ``m`` it fits, where no other such
    layer could take that slot."""
    wanted: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        if i in result or not layer.within:
            continue
        inside = [
            slot
            for slot in slots
            if slot.path.startswith(layer.within + ".")
            and slot.label not in taken
            and slot.kind == layer.kind
            and (fits is None or fits(i, slot))
            and not (changed is not None and changed(slot.path))  # asked last: it runs the forward pass
        ]
        if len(inside) == 1:
            wanted.setdefault(inside[0].label, []).append(i)
    by_label = {slot.label: slot for slot in slots}
    for label, takers in wanted.items():
        if len(takers) == 1:
            (i,) = takers
            taken.add(label)
            how = f"by the module it ran in ('{layers[i].within}'), the one inside it that fits"
            result[i] = Paired(layers[i], by_label[label], how)


def _wrapped_scopes(layers: list[SourceLayer], slots: list[Slot]) -> list[str]:
    """The submodules inside which every layer pairs by name (``self.m = BertModel(...)``)."""
    layers_at = {slot.path: 0 for slot in slots}
    for slot in slots:
        layers_at[slot.path] += 1
    scopes: set[str] | None = None
    for layer in layers:
        here: set[str] = set()
        for path in _name_paths(layer, layers):
            for slot in slots:
                named = slot.label if layers_at[slot.path] > 1 else slot.path  # 'rnn[1]' in a stack
                if slot.kind == layer.kind and named.endswith("." + path):
                    here.add(named[: -len(path) - 1])
        scopes = here if scopes is None else scopes & here
        if not scopes:
            return []
    return sorted(scopes or ())


def wrapped_scope(pairs: list[Paired]) -> str:
    """The submodule every layer paired by name inside (a wrapped model), else ``""``."""
    found = {p.how.split("'")[1] for p in pairs if p.how.startswith("by name inside '")}
    return found.pop() if len(found) == 1 and len(pairs) else ""


def as_pairings(pairs: list[Paired]) -> list[Pairing]:
    """What a :class:`~weightport.layouts.base.LayoutPlan` reports of each pair."""
    return [
        Pairing(
            p.source.name, p.source.detail or p.source.kind, p.slot.label, type(p.slot.module).__name__, p.how
        )
        for p in pairs
    ]
