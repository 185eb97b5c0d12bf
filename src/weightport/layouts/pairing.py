"""Pairing source layers with a PyTorch module's layers: only where the pairing is proven.

A PyTorch model is seen as a list of *slots*: each module with parameters of its
own is one slot, except a multi-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU``, which is
one slot per layer (so stacked Keras LSTMs fill one ``nn.LSTM(num_layers=k)``).
A slot's *kind* is what its module is (``isinstance``, so subclasses of ``nn.Linear``
count as ``Linear``); a module of no known kind never takes a source layer.

Each source layer takes a slot by one of these proofs, tried in turn; the report
says which:

1. ``mapping=``: the user said so (``{"lstm_1": "encoder[1]"}`` names layer 1 of ``encoder``);
2. **by name**: the slot's path is the layer's own name under its framework's naming
   rules (``encoder/cell`` is ``encoder.cell``); when every layer pairs by name inside
   one submodule and none at the root (a model wrapped as ``self.m``), inside it;
3. **by a unique kind and shape**: among the layers and slots left, only one
   assignment fits every layer (kinds equal, every converted shape equal);
4. **by recorded order**: where several assignments fit, the source's own recorded
   order (a ``.keras`` config, an ONNX graph's node order, Flax's ``Dense_0, Dense_1``
   numbers; never a file's key order) matched with the model's *call* order: an
   ``nn.Sequential``'s order and a multi-layer RNN's layer index by construction,
   any other module's from ``example_inputs=`` (see :mod:`weightport.call_order`).

Anything else is refused with the interchangeable layers on both sides listed:
a refusal costs a minute, a crossed pairing days.

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

import itertools
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from weightport.errors import LayoutError, WeightportError
from weightport.layouts.base import Pairing, Rule
from weightport.sources.base import Source
from weightport.torch_facts import rnn_param

__all__ = [
    "Slot",
    "SourceLayer",
    "Paired",
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

# What a module is, by isinstance, most specific first: a subclass counts as its base
# (nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear; timm's Conv2dSame a Conv2d).
_KIND_CLASSES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LSTM, "LSTM"),
    (nn.GRU, "GRU"),
    (nn.RNN, "RNN"),
    (nn.LSTMCell, "LSTM"),
    (nn.GRUCell, "GRU"),
    (nn.RNNCell, "RNN"),
    (nn.Linear, "Linear"),
    (nn.Conv1d, "Conv1d"),
    (nn.Conv2d, "Conv2d"),
    (nn.Conv3d, "Conv3d"),
    (nn.Embedding, "Embedding"),
    (nn.modules.batchnorm._BatchNorm, "BatchNorm"),
    (nn.LayerNorm, "LayerNorm"),
)
KNOWN_KINDS = frozenset(kind for _, kind in _KIND_CLASSES)
_TORCH_CLASS = {"RNN": "nn.RNN", "LSTM": "nn.LSTM", "GRU": "nn.GRU", "BatchNorm": "nn.BatchNorm1d/2d/3d"}


def slot_kind(module: nn.Module) -> str:
    """The kind a source layer must have to fill ``module``: ``LSTM``, ``Linear``, ``Conv2d``, ...

    A module of no known kind gets ``other:<class>``, which no source layer has, so it is
    never filled by shape (transformers' ``Conv1D`` keeps its weight as ``(in, out)``: filling
    it as an ``nn.Linear`` would be silently wrong).

    >>> slot_kind(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))
    'Linear'
    >>> slot_kind(nn.ConvTranspose2d(2, 2, 3))
    'other:ConvTranspose2d'
    """
    for cls, kind in _KIND_CLASSES:
        if isinstance(module, cls):
            return kind
    return f"other:{type(module).__name__}"


def torch_class(kind: str) -> str:
    """How a message names the PyTorch module of a kind: ``nn.GRU``, ``nn.Linear``."""
    return _TORCH_CLASS.get(kind, f"nn.{kind}")


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
        local = rnn_param(param, self.layer, reverse=reverse)
        return f"{self.path}.{local}" if self.path else local

    def describe(self) -> str:
        m = self.module
        if isinstance(m, nn.RNNBase):
            extra = ", bidirectional" if m.bidirectional else ""
            return f"{self.label} ({type(m).__name__}(input_size={m.input_size}, hidden_size={m.hidden_size}){extra})"
        return f"{self.label} ({type(m).__name__})"

    def describe_with_shape(self) -> str:
        """:meth:`describe` with the weight's shape, which tells two modules of one class apart."""
        shape = getattr(getattr(self.module, "weight", None), "shape", None)
        if isinstance(self.module, nn.RNNBase) or shape is None:
            return self.describe()
        return f"{self.label or '(root)'} ({type(self.module).__name__} {tuple(shape)})"


@dataclass(frozen=True)
class SourceLayer:
    """One layer of the source: its name there, the slot kind it fills, and how to show it.

    ``order`` is ``(group, position)`` where the source records its layers' order:
    positions compare only within one group (a Keras 3 ``.weights.h5`` numbers
    layers per class; Flax numbers them per class and parent). ``None``: no
    recorded order (a file's key order is not one).
    """

    name: str
    kind: str
    detail: str = ""
    paths: tuple[str, ...] = ()  # module paths the source's own names suggest (besides ``name`` itself)
    order: tuple[Hashable, int | tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Paired:
    source: SourceLayer
    slot: Slot
    how: str


Fits = Callable[[int, Slot], bool]


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


def target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``model``'s state dict (meta tensors included), by name."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


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
    call_order: Mapping[str, int] | None = None,
    where: str = "",
) -> list[Paired]:
    """Pair each source layer with one slot, each by a proof (see the module doc), or refuse.

    Args:
        model: the module being loaded (the scope).
        layers: the source's layers.
        mapping: ``{source layer name: "module.path" or "module.path[layer]"}``, pinned first.
        framework: how messages name the source's framework.
        fits: ``fits(i, slot)``: whether layer ``i``'s converted shapes are the slot's.
        call_order: module path -> the position of its first call (``example_inputs=``).
        where: how messages name the source.
    """
    slots = module_slots(model)
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
            slot = _resolve(mapping[layer.name], slots, layer)
            if slot.kind != layer.kind:
                raise LayoutError(
                    f"mapping '{layer.name}' -> '{slot.label}': {framework} layer '{layer.name}' is "
                    f"{layer.detail or layer.kind} but '{slot.label}' is {type(slot.module).__name__}. "
                    f"Fix: map it to a {torch_class(layer.kind)} module."
                )
            if slot.label in taken:
                other = next(p.source.name for p in result.values() if p.slot.label == slot.label)
                raise LayoutError(
                    f"mapping sends both '{other}' and '{layer.name}' to '{slot.label}'. "
                    "Fix: map each source layer to a module of its own."
                )
            taken.add(slot.label)
            result[i] = Paired(layer, slot, "mapping=")
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
    _Prover(model, layers, slots, result, taken, framework, fits, call_order, where).run()
    return [result[i] for i in range(len(layers))]


def _name_paths(layer: SourceLayer) -> tuple[str, ...]:
    return (layer.name.replace("/", "."), *layer.paths)


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
        for path in _name_paths(layer):
            found = by_path.get(f"{inside}.{path}" if inside else path, [])
            if len(found) == 1 and found[0].kind == layer.kind and found[0].label not in taken:
                taken.add(found[0].label)
                result[i] = Paired(layer, found[0], how)
                break


def _wrapped_scopes(layers: list[SourceLayer], slots: list[Slot]) -> list[str]:
    """The submodules inside which every layer pairs by name (``self.m = BertModel(...)``)."""
    layers_at = {slot.path: 0 for slot in slots}
    for slot in slots:
        layers_at[slot.path] += 1
    scopes: set[str] | None = None
    for layer in layers:
        here: set[str] = set()
        for path in _name_paths(layer):
            for slot in slots:
                named = slot.label if layers_at[slot.path] > 1 else slot.path  # 'rnn[1]' in a stack
                if slot.kind == layer.kind and named.endswith("." + path):
                    here.add(named[: -len(path) - 1])
        scopes = here if scopes is None else scopes & here
        if not scopes:
            return []
    return sorted(scopes or ())


class _Prover:
    """The layers no name or mapping placed: a unique fit, else recorded order against call order."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[SourceLayer],
        slots: list[Slot],
        result: dict[int, Paired],
        taken: set[str],
        framework: str,
        fits: Fits | None,
        call_order: Mapping[str, int] | None,
        where: str,
    ) -> None:
        self.model, self.layers, self.slots, self.result = model, layers, slots, result
        self.framework, self.fits, self.call_order = framework, fits, call_order
        self.where = where or f"the {framework} source"
        self.waiting = [i for i in range(len(layers)) if i not in result]
        self.free = [j for j, s in enumerate(slots) if s.label not in taken]
        self.registration = {s.label: j for j, s in enumerate(slots)}

    def run(self) -> None:
        if not self.waiting:
            return
        # free slots alike in kind and shapes fit alike: one question per layer and group, not per slot
        groups: dict[Hashable, list[int]] = {}
        for j in self.free:
            groups.setdefault((self.slots[j].kind, _signature(self.slots[j])), []).append(j)
        by_group = {i: self._candidates(i, groups) for i in self.waiting}
        homeless = [i for i in self.waiting if not by_group[i]]
        if homeless:
            raise LayoutError(self._homeless(homeless))
        edges = {i: [j for g in by_group[i] for j in groups[g]] for i in self.waiting}
        for layer_ids, group_ids in _components(by_group):
            slot_ids = sorted(j for g in group_ids for j in groups[g])
            self._settle(layer_ids, slot_ids, edges)

    def _candidates(self, i: int, groups: Mapping[Hashable, list[int]]) -> list[Hashable]:
        """The groups of free slots layer ``i`` fits; where none fits, every group of its kind (the plan
        then says which shapes differ)."""
        kind = self.layers[i].kind
        of_kind = [g for g in groups if g[0] == kind]  # type: ignore[index]
        if self.fits is None:
            return of_kind
        return [g for g in of_kind if self.fits(i, self.slots[groups[g][0]])] or of_kind

    def _settle(self, layer_ids: list[int], slot_ids: list[int], edges: dict[int, list[int]]) -> None:
        matching = _match(layer_ids, edges)
        if len(matching) < len(layer_ids):
            raise LayoutError(self._too_few(layer_ids, slot_ids))
        if _unique(layer_ids, slot_ids, edges, matching):
            for i, j in matching.items():
                self.result[i] = Paired(self.layers[i], self.slots[j], "by a unique kind and shape")
            return
        ordered = self._by_order(layer_ids, slot_ids, edges)
        if ordered is None:
            raise LayoutError(self._interchangeable(layer_ids, slot_ids))
        pairs, how = ordered
        for i, j in pairs:
            self.result[i] = Paired(self.layers[i], self.slots[j], how)

    def _by_order(
        self, layer_ids: list[int], slot_ids: list[int], edges: dict[int, list[int]]
    ) -> tuple[list[tuple[int, int]], str] | None:
        """The layers in their recorded order against the slots in call order, if both are known."""
        orders = [self.layers[i].order for i in layer_ids]
        if len(layer_ids) != len(slot_ids) or any(o is None for o in orders):
            return None
        if len({o[0] for o in orders if o is not None}) != 1:
            return None  # positions in different groups do not compare (Keras numbers per class)
        called = self._call_positions(slot_ids)
        if called is None:
            return None
        by_source = sorted(layer_ids, key=lambda i: self.layers[i].order[1])  # type: ignore[index]
        by_call = sorted(slot_ids, key=lambda j: called[0][j])
        pairs = list(zip(by_source, by_call))
        if any(j not in edges[i] for i, j in pairs):
            return None
        return pairs, f"by recorded order ({self.framework}) and call order ({called[1]})"

    def _call_positions(self, slot_ids: list[int]) -> tuple[dict[int, tuple[int, int]], str] | None:
        slots = self.slots
        if self.call_order is not None:
            if any(slots[j].path not in self.call_order for j in slot_ids):
                return None
            return {
                j: (self.call_order[slots[j].path], slots[j].layer or 0) for j in slot_ids
            }, "example_inputs"
        ids = sorted(slot_ids, key=lambda j: self.registration[slots[j].label])
        whats = set()
        for a, b in itertools.pairwise(ids):
            what = _known_order(slots[a], slots[b], self.model)
            if what is None:
                return None
            whats.add(what)
        return {j: (n, 0) for n, j in enumerate(ids)}, " and ".join(sorted(whats))

    # ---- messages ------------------------------------------------------------------------------------

    def _homeless(self, ids: list[int]) -> str:
        """Layers no free module of their kind can take, said once per kind."""
        kinds = {s.kind for s in self.slots}
        lines = []
        for kind in dict.fromkeys(self.layers[i].kind for i in ids):
            group = [self.layers[i] for i in ids if self.layers[i].kind == kind]
            details = dict.fromkeys(layer.detail or layer.kind for layer in group)
            shown = " / ".join(
                d if d.startswith(self.framework) else f"{self.framework} {d}" for d in details
            )
            names = ", ".join(f"'{layer.name}'" for layer in group[:8]) + (" ..." if len(group) > 8 else "")
            what = f"{len(group)} {shown} layer{'s' if len(group) > 1 else ''} ({names})"
            if kind not in kinds:
                others = sorted({s.kind[6:] for s in self.slots if s.kind.startswith("other:")})
                unknown = (
                    f" (it has modules of kinds weightport cannot fill by structure: {', '.join(others)})"
                    if others
                    else ""
                )
                lines.append(f"the source holds {what}; the model has no {torch_class(kind)}{unknown}")
            else:
                taken = [p.slot.label for p in self.result.values() if p.slot.kind == kind]
                lines.append(
                    f"the source holds {what} and the model has no free {torch_class(kind)} left "
                    f"(all taken: {', '.join(taken[:8])}{' ...' if len(taken) > 8 else ''})"
                )
        fix = f"Fix: build the model with the module each of these layers needs; {self._leave_out()}."
        return f"{self.where} cannot be paired with the model: " + "; ".join(lines) + ". " + fix

    def _leave_out(self) -> str:
        """How to load a source without the layers the model should not take (weightport skips none)."""
        if self.framework in ("Keras", "Flax"):
            return (
                "a layer the model should not take is left out by loading the source's other arrays as a dict "
                f"(read with weightport.open_source) with layout='{self.framework.lower()}'"
            )
        return (
            "a layer the model should not take must be left out of the source (export the model without it)"
        )

    def _too_few(self, layer_ids: list[int], slot_ids: list[int]) -> str:
        kinds = sorted({self.layers[i].kind for i in layer_ids})
        names = ", ".join(self.layers[i].name for i in layer_ids[:12])
        free = ", ".join(self.slots[j].describe_with_shape() for j in slot_ids[:12]) or "none"
        # as many free modules of their kinds as layers, some of other shapes: pairing by hand shows which differ
        waiting = [i for i in self.waiting if self.layers[i].kind in kinds]
        if len([j for j in self.free if self.slots[j].kind in kinds]) >= len(waiting):
            fix = (
                f"build the model with one module per source layer, or pass "
                f"mapping={{'{self.layers[layer_ids[0]].name}': 'module.path'}} to pair them yourself"
            )
        else:
            fix = f"build the model with one module per source layer; {self._leave_out()}"
        return (
            f"cannot pair {self.framework} layers with the model: the source has {len(layer_ids)} unpaired "
            f"{'/'.join(kinds)} layer(s) ({names}) but the model has only {len(slot_ids)} free module(s) that "
            f"can take them ({free}). Fix: {fix}."
        )

    def _interchangeable(self, layer_ids: list[int], slot_ids: list[int]) -> str:
        layers = [self.layers[i] for i in layer_ids]
        names = ", ".join(f"'{layer.name}'" for layer in layers[:12]) + (" ..." if len(layers) > 12 else "")
        slots = ", ".join(self.slots[j].describe_with_shape() for j in slot_ids[:12]) + (
            " ..." if len(slot_ids) > 12 else ""
        )
        call_order_settles = False  # only one recorded order of these layers, one module each, can be matched
        if any(layer.order is None for layer in layers):
            why = f"{self.where} does not record the order of these layers (a file's key order is not one)"
        elif len({layer.order[0] for layer in layers if layer.order is not None}) > 1:
            why = (
                f"{self.where} does not record the order of these layers as one sequence (it numbers "
                "them within parts only, such as per class and container)"
            )
        elif len(layer_ids) != len(slot_ids):
            why = f"the model has {len(slot_ids)} modules that could take these {len(layer_ids)} layers"
        elif self.call_order is not None:
            why = "the forward pass on example_inputs= does not call each of these modules in an order that fits"
        else:
            call_order_settles = True
            why = (
                "the order in which the model calls these modules is not known (only an nn.Sequential's and "
                "a multi-layer RNN's are, by construction)"
            )
        by_hand = f"mapping={{'{layers[0].name}': 'module.path', ...}} to pair them yourself"
        fix = (
            f"pass example_inputs= (inputs for one forward pass, which shows the order the model calls its "
            f"modules in), or {by_hand}"
            if call_order_settles
            else f"pass {by_hand}"
        )
        return (
            f"cannot prove which module each {self.framework} layer fills: the layers {names} and the modules "
            f"{slots} are interchangeable (same kind and shape), and {why}. Pairing them by declaration order "
            f"could cross them silently. Fix: {fix}."
        )


def _signature(slot: Slot) -> Hashable:
    """What decides whether a layer fits a slot: its kind and its own tensors' names and shapes
    (an RNN's layers differ by name, so each is its own)."""
    if slot.layer is not None:
        return slot.label, id(slot.module)
    own = [*slot.module.named_parameters(recurse=False), *slot.module.named_buffers(recurse=False)]
    return slot.kind, slot.bidirectional, tuple((name, tuple(t.shape)) for name, t in own)


def _known_order(a: Slot, b: Slot, model: nn.Module) -> str | None:
    """Why ``a`` (registered first) runs before ``b`` by construction, or None where only a forward
    pass could tell: layers of one RNN run in index order, children of an ``nn.Sequential`` (whose
    ``forward`` is not overridden) in registration order."""
    if a.path == b.path:
        return "the layer index" if a.layer is not None else None
    pa, pb = a.path.split(".") if a.path else [], b.path.split(".") if b.path else []
    common = 0
    while common < min(len(pa), len(pb)) and pa[common] == pb[common]:
        common += 1
    if common in (len(pa), len(pb)):
        return None  # one contains the other: its own forward decides
    parent = model.get_submodule(".".join(pa[:common]))
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        return "nn.Sequential"
    return None


def _components(by_group: Mapping[int, list[Hashable]]) -> list[tuple[list[int], list[Hashable]]]:
    """Connected parts of the layer-slot graph, as (layer ids in source order, slot groups)."""
    parent: dict[Hashable, Hashable] = {}

    def find(x: Hashable) -> Hashable:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, gs in by_group.items():
        for g in gs:
            parent[find(("layer", i))] = find(("group", g))
    parts: dict[Hashable, tuple[list[int], list[Hashable]]] = {}
    for i, gs in by_group.items():
        part = parts.setdefault(find(("layer", i)), ([], []))
        part[0].append(i)
        part[1].extend(g for g in gs if g not in part[1])
    return [(sorted(layers), groups) for layers, groups in parts.values()]


def _match(layer_ids: Sequence[int], edges: Mapping[int, list[int]]) -> dict[int, int]:
    """A maximum matching layer -> slot (augmenting paths; components are small)."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    for i in layer_ids:
        free = next((j for j in edges[i] if j not in owner), None)  # a free slot first: no search
        if free is not None:
            owner[free] = i
        else:
            augment(i, set())
    return {i: j for j, i in owner.items()}


def _unique(
    layer_ids: list[int], slot_ids: list[int], edges: Mapping[int, list[int]], matching: Mapping[int, int]
) -> bool:
    """Whether ``matching`` is the only way to place every layer: no layer could move to a free slot,
    and no cycle of layers could pass their slots round."""
    held = set(matching.values())
    if any(j not in held for i in layer_ids for j in edges[i]):
        return False
    owner = {j: i for i, j in matching.items()}
    # layer i -> layer owner[j] for each other slot j it fits: a cycle is a rotation of slots
    graph = {i: [owner[j] for j in edges[i] if j != matching[i]] for i in layer_ids}
    state: dict[int, int] = {}
    for start in layer_ids:
        if state.get(start):
            continue
        stack = [(start, iter(graph[start]))]
        state[start] = 1
        while stack:
            node, rest = stack[-1]
            step = next(rest, None)
            if step is None:
                state[node] = 2
                stack.pop()
            elif state.get(step) == 1:
                return False
            elif not state.get(step):
                state[step] = 1
                stack.append((step, iter(graph[step])))
    return True


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
