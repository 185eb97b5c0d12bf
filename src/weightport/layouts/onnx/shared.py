"""Modules that take the values one stored tensor gives several nodes.

An exporter stores equal values once: the dynamo exporter has every LayerNorm of a freshly built model
read one pair of initializers (ones and zeros), named after the first. Such a layer is found once, with
the nodes that apply it (:attr:`~weightport.layouts.onnx.graph.Layer.uses`); one module called twice
looks the same. The dynamo exporter records the module each node ran in: where those are as many
modules as nodes, each of this layer's kind and fit for its tensors, and nothing else fills them, each
takes the same values.

>>> from weightport.layouts.onnx.graph import Layer, Node
>>> Layer(Node(0, "LayerNormalization", "ln", (), (), {}), "LayerNorm", {}).uses
1
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from weightport.layouts.base import Pairing, Rule
from weightport.layouts.onnx.graph import Layer
from weightport.layouts.pairing import Paired, Slot, SourceLayer, module_slots
from weightport.torch_facts import RNN_KINDS

__all__ = ["shared_rules"]


def shared_rules(
    module: nn.Module,
    layers: list[Layer],
    wanted: list[SourceLayer],
    rules: list[Rule],
    fits: Callable[[int, Slot], bool],
    rules_of: Callable[[int, Paired], list[Rule]],
) -> tuple[list[Rule], list[Pairing]]:
    """Rules and pairings for the modules that take a layer applied by several nodes (see the module doc);
    ``rules_of(i, pair)`` gives layer ``i``'s rules in a slot."""
    filled = {rule.target for rule in rules}
    free = [
        slot
        for slot in module_slots(module)
        if not slot.kind.startswith("other:")
        and slot.kind not in RNN_KINDS
        and not any(slot.name(p) in filled for p, _ in slot.module.named_parameters(recurse=False))
    ]
    more: list[Rule] = []
    pairings: list[Pairing] = []
    for i, layer in enumerate(layers):
        ran_in = set(layer.modules)
        if layer.uses < 2 or layer.kind in RNN_KINDS or None in ran_in or len(ran_in) != layer.uses:
            continue  # one module called twice, or no record of where the nodes ran
        takers = [slot for slot in free if slot.path in ran_in and slot.kind == layer.kind and fits(i, slot)]
        if len(takers) != layer.uses - 1:
            continue  # the recorded modules are not all free modules of this kind: nothing proven
        how = f"by equal values (the graph applies these stored tensors {layer.uses} times)"
        for slot in takers:
            more += rules_of(i, Paired(wanted[i], slot, how))
            pairings.append(
                Pairing(
                    layer.node.label, layer.detail or layer.kind, slot.label, type(slot.module).__name__, how
                )
            )
            free.remove(slot)
    return more, pairings
