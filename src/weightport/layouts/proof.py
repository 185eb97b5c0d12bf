"""Pairing the layers no name or mapping placed, by proof: a unique fit, else recorded order x call order.

Among the layers and slots left, grouped into the parts that could swap (same kind,
a fitting shape), a part is settled only where one assignment fits every layer
("by a unique kind and shape"), or where the source records its layers' order and
the model's call order is known (an ``nn.Sequential``'s and a multi-layer RNN's by
construction, any other module's from ``example_inputs=``) and its modules run one
after another, each fed by the one before (modules in parallel branches may run in
either order in an equivalent model, so no recorded order tells them apart). Anything else is
refused with the interchangeable layers on both sides listed, and a fix. A layer no free module of its
kind is left for at all (the model has no such module, or all of them took other layers) is refused, or,
where the caller asks (``leave_out``), left out: nothing could cross there, and its arrays stay unread, which
the plan refuses unless ``strict=False``, with this refusal's reason as the fix.

Where a layout gives its settings checks (``settings``: the differences no forward code makes up for, a
bias, an eps, groups) and neither proof settles a part, no check pairs it: a module the checks flag may be
the one a forward pass that pads or slices around it makes right, so the refusal asks for ``mapping=``. But
a difference every candidate of a layer shares is one no ``mapping=`` cures, so the refusal says it first,
with the differences of the layers already proven.
:func:`weightport.layouts.pairing.pair_layers` runs this after ``mapping=`` and names.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence

from torch import nn

from weightport.call_order import CallOrder
from weightport.errors import LayoutError, LoadError, Problem, counted
from weightport.layouts.slots import Paired, Slot, SourceLayer, torch_class

__all__ = ["Fits", "Settings", "Prover"]

Fits = Callable[[int, Slot], bool]
"""``fits(i, slot)``: whether source layer ``i``'s converted shapes are ``slot``'s."""

Settings = Callable[[int, Slot], list[Problem]]
"""``settings(i, slot)``: what a layout's settings checks find between source layer ``i`` and ``slot`` that
no forward code makes up for (a bias, an eps, groups; not padding, which an ``F.pad`` or a slice around the
module can): the problems a load pairing them would be refused with whatever the model's forward does."""


class Prover:
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
        call_order: CallOrder | None,
        where: str,
        sides: bool = False,
        fit_context: Callable[[Slot], Hashable] | None = None,
        folded_constants: bool = False,
        leave_out: bool = False,
        settings: Settings | None = None,
    ) -> None:
        self.model, self.layers, self.slots, self.result = model, layers, slots, result
        # the layout's settings checks (differences no forward code makes up for): said, never a proof
        self.settings = settings
        self.incurable: list[Problem] = []  # differences every candidate of a waiting layer shares
        # layers no module of their kind is left for are left out (their arrays stay unread), not refused:
        # nothing could cross there, and build_plan refuses unread arrays unless strict=False
        self.leave_out = leave_out
        self.left_out: dict[int, str] = {}  # layer index -> why it was left out, and the fix
        self.fit_context = fit_context  # what else a layout's fits read of a slot (its neighbours)
        self.folded_constants = folded_constants  # the source may hold constants computed from parameters
        self.sides = sides  # mapping= may give one-way cells a side of a bidirectional RNN each
        self.framework, self.fits, self.call_order = framework, fits, call_order
        self.where = where or f"the {framework} source"
        self.waiting = [i for i in range(len(layers)) if i not in result]
        self.free = [j for j, s in enumerate(slots) if s.label not in taken]
        self.registration = {s.label: j for j, s in enumerate(slots)}
        self.parallel: tuple[Slot, Slot] | None = None  # two modules the forward pass runs side by side
        self.changed: list[int] = []  # slots whose own tensors the forward pass changes before use

    def run(self) -> None:
        if not self.waiting:
            return
        if self.call_order is not None and self.folded_constants:  # a module whose forward changes its own
            # weight takes no layer by structure: the source may hold what that computed (an exporter folds it)
            self.changed = [
                j for j in self.free if self.slots[j].path and self.call_order.changes(self.slots[j].path)
            ]
            self.free = [j for j in self.free if j not in self.changed]
        # free slots alike in kind and shapes fit alike: one question per layer and group, not per slot
        groups: dict[Hashable, list[int]] = {}
        for j in self.free:
            context = self.fit_context(self.slots[j]) if self.fit_context is not None else None
            groups.setdefault((self.slots[j].kind, _signature(self.slots[j]), context), []).append(j)
        by_group = {i: self._candidates(i, groups) for i in self.waiting}
        homeless = [i for i in self.waiting if not by_group[i]]
        # refused still: a module of its kind set aside (its forward changes its weight), one side of a
        # bidirectional module left free by mapping= (the layer may be that side's), or modules of kinds no
        # layer has, left empty (the layer may be theirs in another form: an RNN unrolled into MatMuls)
        sides: dict[str, set[str]] = {}
        for p in self.result.values():
            sides.setdefault(p.slot.label, set()).add(p.side)
        kept = {self.slots[j].kind for j in self.changed} | {
            p.slot.kind for p in self.result.values() if p.side and len(sides[p.slot.label]) == 1
        }
        if homeless and (
            not self.leave_out or any(self.layers[i].kind in kept for i in homeless) or self._left_empty()
        ):
            raise LayoutError(self._homeless(homeless))
        for i in homeless:
            self.left_out[i] = self._left_out_hint(i, homeless)
        self.waiting = [i for i in self.waiting if i not in self.left_out]
        by_group = {i: by_group[i] for i in self.waiting}
        edges = {i: [j for g in by_group[i] for j in groups[g]] for i in self.waiting}
        unsettled: list[str] = []  # every part that cannot be settled, so that one refusal lists them all
        for layer_ids, group_ids in _components(by_group):
            slot_ids = sorted(j for g in group_ids for j in groups[g])
            try:
                self._settle(layer_ids, slot_ids, edges)
            except LayoutError as e:
                unsettled.append(str(e))
        if not unsettled:
            return
        said = (
            unsettled[0]
            if len(unsettled) == 1
            else f"{len(unsettled)} groups of layers cannot be paired, each for its reason:\n"
            + "\n".join(f"  - {m}" for m in unsettled)
        )
        raise LayoutError(self._incurable() + said)

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
            self._note_shared(layer_ids, edges)
            raise LayoutError(self._interchangeable(layer_ids, slot_ids))
        pairs, how = ordered
        for i, j in pairs:
            self.result[i] = Paired(self.layers[i], self.slots[j], how)

    def _note_shared(self, layer_ids: list[int], edges: dict[int, list[int]]) -> None:
        """Where neither proof settles a part: the differences a layer has with every one of its candidates
        go to ``incurable`` (no mapping cures them). A difference only some candidates have proves nothing:
        the forward code around a module may make up for what its own settings do not say."""
        if self.settings is None:
            return
        for i in layer_ids:
            self.incurable += self._shared(i, {j: self.settings(i, self.slots[j]) for j in edges[i]})

    def _shared(self, i: int, found: Mapping[int, list[Problem]]) -> list[Problem]:
        """The differences between layer ``i`` and every one of its candidates ``found`` (slot -> problems):
        the same setting expected, and the same fix, whatever each candidate has instead."""
        keyed = [{(p.expected, p.fix): p for p in problems} for problems in found.values()]
        layer = self.layers[i]
        detail = layer.detail or layer.kind
        what = detail if detail.startswith(self.framework) else f"{self.framework} {detail}"
        shared = []
        for key in keyed[0]:
            if all(key in k for k in keyed):
                founds = " / ".join(dict.fromkeys(k[key].found for k in keyed))
                name = f"{what} '{layer.name}' in any of its {counted(len(found), 'candidate module')}"
                shared.append(Problem(name, key[0], founds, key[1]))
        return shared

    def _by_order(
        self, layer_ids: list[int], slot_ids: list[int], edges: dict[int, list[int]]
    ) -> tuple[list[tuple[int, int]], str] | None:
        """The layers in their recorded order against the slots in call order, if both are known."""
        self.parallel = None
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
            called = {j: (self.call_order[slots[j].path], slots[j].layer or 0) for j in slot_ids}
            for a, b in itertools.pairwise(sorted(slot_ids, key=called.__getitem__)):
                # the layers of one RNN run in index order; two modules, only where one feeds the other
                if slots[a].path != slots[b].path and not self.call_order.feeds(slots[a].path, slots[b].path):
                    self.parallel = (slots[a], slots[b])
                    return None
            return called, "example_inputs"
        ids = sorted(slot_ids, key=lambda j: self.registration[slots[j].label])
        whats = set()
        for a, b in itertools.pairwise(ids):
            what = _known_order(slots[a], slots[b], self.model)
            if what is None:
                return None
            whats.add(what)
        return {j: (n, 0) for n, j in enumerate(ids)}, " and ".join(sorted(whats))

    # ---- messages ------------------------------------------------------------------------------------

    def _incurable(self) -> str:
        """The differences no ``mapping=`` cures, said before a refusal that asks for one ("" for none):
        those every candidate of a waiting layer shares, and those of the layers paired by proof."""
        if self.settings is None:
            return ""
        problems = list(self.incurable)
        for i, p in self.result.items():
            if not p.how.startswith("mapping="):
                problems += self.settings(i, p.slot)
        if not problems:
            return ""
        lines = LoadError(problems).lines()
        listed = "\n".join(f"  - {line}" for line in lines[:12])
        if len(lines) > 12:
            listed += f"\n  ... and {len(lines) - 12} more"
        return (
            f"the model differs from {self.where} in {counted(len(problems), 'setting')} that no mapping= would "
            "cure (every module that could take the layer differs so, or the one its pairing is proven to): "
            f"build the model with these first (each line's fix):\n{listed}\nBesides, "
        )

    def _homeless(self, ids: list[int]) -> str:
        """Layers no free module of their kind can take, said once per kind."""
        lines = self._homeless_lines(ids)
        lines[-1] += self._left_empty()
        fix = f"Fix: build the model with the module each of these layers needs; {self._leave_out()}."
        changed = [
            self.slots[j] for j in self.changed if self.slots[j].kind in {self.layers[i].kind for i in ids}
        ]
        if changed:
            shown = ", ".join(f"'{s.label}' ({type(s.module).__name__})" for s in changed[:6])
            lines.append(
                f"{shown} {'take' if len(changed) > 1 else 'takes'} no layer by structure: in the forward pass on "
                "example_inputs its own tensors go through other operations than its layer's (a weight "
                "standardized, scaled or transposed before use), so the source's tensor may be what that "
                "computed (an exporter folds it in), and loading it there would apply it twice"
            )
            fix = (
                "Fix: load the module's own tensors by name (tensors stored under its parameter names, e.g. an "
                "export with do_constant_folding=False or the PyTorch weights themselves), or port it by hand."
            )
        return f"{self.where} cannot be paired with the model: " + "; ".join(lines) + ". " + fix

    def _left_out_hint(self, i: int, ids: list[int]) -> str:
        """The fix for each array of layer ``i``, one of the layers ``ids`` no free module of their kind can
        take (a ``strict=True`` refusal's hint): why, said for its kind, and what to do."""
        kind = self.layers[i].kind
        (line,) = self._homeless_lines([j for j in ids if self.layers[j].kind == kind])
        return (
            f"build the model with the module this layer needs, or, where the model should not take it, pass "
            f"strict=False to load the model without it (its arrays are then listed as ignored): {self.where} "
            f"cannot be paired with the model: {line}"
        )

    def _homeless_lines(self, ids: list[int]) -> list[str]:
        """What the source holds and the model lacks, one line per kind of the layers ``ids``."""
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
                    if taken
                    else f"the source holds {what} and no {torch_class(kind)} of the model can take it"
                )
        return lines

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
        both = [self.slots[j] for j in slot_ids if self.slots[j].bidirectional]
        if self.sides and both and len(layer_ids) >= 2:
            first, second = (self.layers[i].name for i in layer_ids[:2])
            fix = (
                f"a bidirectional module takes two one-way cells only through mapping=, one per direction, since "
                f"the source does not record which runs backward: mapping={{'{first}': '{both[0].label}:forward', "
                f"'{second}': '{both[0].label}:reverse'}} (check which is which against the source model's outputs); "
                f"or {fix}"
            )
        return (
            f"cannot pair {self.framework} layers with the model: the source has {len(layer_ids)} unpaired "
            f"{'/'.join(kinds)} layer(s) ({names}) but the model has only {len(slot_ids)} free module(s) that "
            f"can take them ({free}){self._misfits(layer_ids, slot_ids)}. Fix: {fix}."
        )

    def _misfits(self, layer_ids: list[int], slot_ids: list[int]) -> str:
        """Which of the layers fit none of the free modules, and the free modules of other kinds (a layer
        fills a module of its own kind: a layout takes a 1 x 1 convolution for a Linear before pairing, where
        its source proves it one)."""
        said = ""
        if self.fits is not None:
            none = [
                self.layers[i] for i in layer_ids if not any(self.fits(i, self.slots[j]) for j in slot_ids)
            ]
            if none and len(none) < len(layer_ids):
                shown = ", ".join(f"'{x.name}' ({x.detail or x.kind})" for x in none[:6])
                said += f"; of these, {shown} {'fit' if len(none) > 1 else 'fits'} none of those modules"
        return said + self._left_empty()

    def _left_empty(self) -> str:
        """The free modules of kinds no source layer has, which stay empty ("" for none)."""
        held = {layer.kind for layer in self.layers}
        others = [
            self.slots[j]
            for j in self.free
            if self.slots[j].kind not in held and not self.slots[j].kind.startswith("other:")
        ]
        if not others:
            return ""
        shown = ", ".join(s.describe_with_shape() for s in others[:6]) + (" ..." if len(others) > 6 else "")
        said = f"; the model's modules of kinds no source layer has, which stay empty: {shown}"
        if any(s.kind == "Linear" for s in others) and any(k.startswith("Conv") for k in held):
            said += (
                " (a 1 x 1 convolution fills a Linear only where the source shows it reads a map of one "
                "position: a Keras configuration records the global pooling with keepdims=True before it)"
            )
        return said

    def _interchangeable(self, layer_ids: list[int], slot_ids: list[int]) -> str:
        layers = [self.layers[i] for i in layer_ids]
        names = ", ".join(f"'{layer.name}'" for layer in layers[:12]) + (" ..." if len(layers) > 12 else "")
        slots = ", ".join(self.slots[j].describe_with_shape() for j in slot_ids[:12]) + (
            " ..." if len(slot_ids) > 12 else ""
        )
        call_order_settles = False  # only one recorded order of these layers, one module each, can be matched
        unordered = next((layer.unordered for layer in layers if layer.order is None and layer.unordered), "")
        if unordered:
            why = unordered
        elif any(layer.order is None for layer in layers):
            why = f"{self.where} does not record the order of these layers (a file's key order is not one)"
        elif len({layer.order[0] for layer in layers if layer.order is not None}) > 1:
            why = (
                f"{self.where} does not record the order of these layers as one sequence (it numbers "
                "them within parts only, such as per class and container)"
            )
        elif len(layer_ids) != len(slot_ids):
            why = f"the model has {counted(len(slot_ids), 'module')} that could take these {len(layer_ids)} layers"
        elif self.parallel is not None:
            a, b = self.parallel
            why = (
                f"in the forward pass on example_inputs= the modules '{a.label}' and '{b.label}' run in parallel "
                "branches (neither one's output reaches the other's input): an equivalent model may run them in "
                "either order, so no recorded order can say which layer each takes"
            )
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
        alike = (
            "same kind and shape"
            if len({self.slots[j].weight_shape for j in slot_ids}) == 1
            else "of one kind, each layer's tensors fitting more than one of these shapes"
        )
        return (
            f"cannot prove which module each {self.framework} layer fills: the layers {names} and the modules "
            f"{slots} are interchangeable ({alike}), and {why}. Pairing them by declaration order "
            f"could cross them silently. Fix: {fix}."
        )


def _signature(slot: Slot) -> Hashable:
    """What decides whether a layer fits a slot: its kind, its own tensors' names and shapes, and its
    settings (a conv's stride, dilation, groups and padding, which a layout's checks hold against the
    source's: two convs of one shape but other strides fit different layers); an RNN's layers differ by
    name, so each is its own."""
    if slot.layer is not None:
        return slot.label, id(slot.module)
    own = [*slot.module.named_parameters(recurse=False), *slot.module.named_buffers(recurse=False)]
    settings = f"{type(slot.module).__qualname__}({slot.module.extra_repr()})"
    return slot.kind, slot.bidirectional, tuple((name, tuple(t.shape)) for name, t in own), settings


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
