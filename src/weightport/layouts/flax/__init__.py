"""The Flax layout: linen and nnx params (``(in, out)`` kernels, one Dense per gate) into PyTorch.

A Flax pytree (from a msgpack file, a flat ``.npz`` with ``/``-joined keys, or ``.``-joined where
:func:`.tree.separator` says, a nested dict / ``FrozenDict``, or an nnx ``State``) is walked in its own order and
each layer is recognised by the names of its children, wherever it sits:
``<attr>/cell/...`` for ``nn.RNN(cell)`` attributes, ``LSTMCell_0/...`` for cells
bound inside ``@nn.compact``, with or without the ``params/`` and
``batch_stats/`` collection prefixes (which are merged); a ``TrainState``'s
``opt_state`` and ``step`` are listed as ignored (training state, not weights),
and other top-level entries are left unmatched.
An nnx ``State`` saved as a pytree holds each array one level down, as the
variable's attribute (``kernel/value``; ``kernel/raw_value`` in Flax 0.8): such a
node reads as its array.
Layers pair with the module's as :func:`~weightport.layouts.pairing.pair_layers` proves
(by name, by a unique kind and shape, or Flax's ``Dense_0, Dense_1`` numbers against the
call order), or as ``mapping={"<layer name>": "module.path[layer]"}`` says; a layer's name is
its path without the collection prefix, e.g. ``"encoder/cell"``, ``"Dense_0"``.
The phases, one module each: :mod:`.tree` (the pytree), :mod:`.layers` (the layers in it,
with :mod:`.cells` for recurrent cells), :mod:`.settle` (kinds the params leave open, settled by
the names both sides use), :mod:`.rules` (rules per kind, with :mod:`.attention` and
:mod:`.convolutions`), :mod:`.loose` (a model's own params, by name), :mod:`.exporting`
(PyTorch -> Flax); :mod:`.facts` holds Flax's names shared by them.

=================================================  ==============  =========================================
Flax children                                      kind            PyTorch
=================================================  ==============  =========================================
linen ``LSTMCell``/``OptimizedLSTMCell``:          LSTM            ``weight_ih = concat(ii..io kernels).T``,
``ii if ig io`` (kernel), ``hi hf hg ho``                          ``weight_hh`` likewise, ``bias_hh =``
(kernel, bias); nnx ``LSTMCell`` has ``if_``                       ``concat(hi..ho biases)``, ``bias_ih = 0``
nnx ``OptimizedLSTMCell``: ``dense_i`` (F,4H),     LSTM            ``.T`` of each, gate order i,f,g,o kept;
``dense_h`` (H,4H) + bias                                          ``bias_hh = dense_h bias``, ``bias_ih = 0``
linen ``GRUCell``: ``ir iz in`` (kernel, bias),    GRU             ``bias_ih = [b_ir, b_iz, b_in]``,
``hr hz`` (kernel), ``hn`` (kernel, bias)                          ``bias_hh = [0, 0, b_hn]``
nnx ``GRUCell``: ``dense_i`` (F,3H) + bias,        GRU             ``bias_ih = dense_i bias``, ``bias_hh = 0``
``dense_h`` (H,3H)
linen ``SimpleCell``: ``i`` (kernel, bias), ``h``  RNN             ``bias_ih = i bias``, ``bias_hh = 0``
(kernel); nnx: ``dense_i`` + bias, ``dense_h``
``Bidirectional``: ``forward_rnn``,                as its cell     forward -> ``_l<k>``, backward ->
``backward_rnn``                                                   ``_l<k>_reverse``
``Dense``/``Linear``: kernel (in,out), bias        Linear          ``weight = kernel.T``
``DenseGeneral``: kernel (in..., out...), bias     Linear          ``weight = kernel.reshape(in, out).T``
(out...) (:mod:`.attention`)
transformers' ``FlaxConv1D``: kernel (out, in)     Conv1D          ``weight = kernel.T`` (transformers'
(named as the module's Conv1D: :mod:`.settle`)                     ``Conv1D`` keeps (in, out))
``MultiHeadDotProductAttention``: query, key,      Multihead-      ``in_proj_weight``, ``out_proj``
value, out (DenseGeneral) (:mod:`.attention`)      Attention       (or its parts into Linears)
``Conv``: kernel (k..., in, out), bias             Conv1d/2d/3d    ``weight`` axes (out, in, k...);
                                                                   ``feature_group_count`` is ``groups``
``ConvTranspose``: kernel (k..., in, out), bias    ConvTranspose   flipped spatially, axes (in, out,
(:mod:`.convolutions`)                             1d/2d/3d        k...); ``transpose_kernel``: no flip
``GroupNorm``: scale, bias                         GroupNorm       ``weight = scale``
a model's own ``self.param`` (ViT's cls_token)     (by its name)   as is (:mod:`.loose`)
``Embed``: embedding (V,D)                         Embedding       as is
``LayerNorm``: scale, bias                         LayerNorm       ``weight = scale``
``BatchNorm``: scale, bias + batch_stats mean, var BatchNorm       ``running_mean/var``; batch count 0
=================================================  ==============  =========================================

Flax's equations were checked against PyTorch's: linen's GRU computes
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` as PyTorch does; nnx's GRU has
no ``b_hn``. Flax LSTM cells have one bias per gate, which goes to ``bias_hh``
(export sums ``bias_ih + bias_hh`` back into it, so export -> load -> export is
the identity). Cells PyTorch cannot express (``MGUCell``, ``ConvLSTMCell``, or
gate Dense layers of any other shape) are refused with
:class:`~weightport.errors.UnsupportedConfigError`. Params carry no settings,
so activation functions, epsilons and Conv padding are listed as unchecked.

Order: msgpack files and linen variables keep the module definition order
(cells run by ``nn.RNN`` list their gates sorted, which does not matter here);
trees that went through ``jax.tree_util`` and nnx ``State`` are sorted by name.
Numbered siblings (``Dense_2``, ``Dense_10``; list indices) are put in numeric
order either way; for other names, check the pairing in the report or pass
``mapping=``.

>>> import numpy as np, torch
>>> from weightport.sources import open_source
>>> src = open_source({"params": {"Dense_0": {"kernel": np.ones((3, 2), np.float32),
...                                           "bias": np.zeros(2, np.float32)}}})
>>> [r.describe() for r in plan(torch.nn.Linear(3, 2), src).rules]
['params/Dense_0/kernel -> weight (transpose)', 'params/Dense_0/bias -> bias (as is)']
>>> sorted(export(torch.nn.Linear(3, 2)))
['params/Linear/bias', 'params/Linear/kernel']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from weightport.call_order import CallOrder
from weightport.layouts.base import LayoutPlan, Rule
from weightport.layouts.flattening import (
    MAP_KINDS,
    flatten_unchecked,
    map_readers,
    unrecorded_flatten,
    unshown_flatten,
)
from weightport.layouts.flax.convolutions import torch_padding
from weightport.layouts.flax.exporting import export
from weightport.layouts.flax.facts import APIS, COLLECTIONS, FRAMEWORK, ROOT, STATS, TRAINING_STATE
from weightport.layouts.flax.layers import Layer, layers_in
from weightport.layouts.flax.loose import loose_rules
from weightport.layouts.flax.rules import MISSING_STATS, layer_rules, unchecked
from weightport.layouts.flax.settle import (
    settle_attention,
    settle_by_name,
    settle_conv1d,
    settle_lone_bias,
    settle_norm_kinds,
)
from weightport.layouts.flax.tree import base_model_part, name_paths, recorded_order, separator
from weightport.layouts.pairing import (
    Paired,
    Slot,
    SourceLayer,
    as_pairings,
    fits_by_rules,
    pair_layers,
    wrapped_scope,
)
from weightport.sources.base import Source

__all__ = ["NAME", "plan", "export", "describe", "torch_padding", "APIS", "COLLECTIONS", "ROOT"]

NAME = "flax"


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: CallOrder | None = None,
) -> LayoutPlan:
    """Rules for ``module`` from the Flax layers found in ``source`` (see the module doc).

    Raises:
        UnsupportedConfigError: a layer computes something the PyTorch module cannot.
        LayoutError: layers and the module's slots do not pair, or differ in direction.
    """
    names = list(source.infos)
    layers, inside = base_model_part(module, layers_in(source))
    settle_attention(layers, module, mapping)
    settle_by_name(layers, module, mapping)
    settle_lone_bias(layers, module, mapping)
    settle_norm_kinds(layers, module, mapping, source.description)
    settle_conv1d(layers, module, mapping)
    orders = _orders(layers, names)
    wanted = [
        SourceLayer(
            layer.name,
            layer.kind,
            layer.detail,
            paths=name_paths(layer.name),
            order=order,
            unordered="" if order is not None or recorded_order(layer.name) is None else _CONTRADICTED,
        )
        for layer, order in zip(layers, orders)
    ]

    def rules_for(i: int, slot: Slot) -> list[Rule]:
        return layer_rules(layers[i], Paired(wanted[i], slot, ""), source)

    found = pair_layers(
        module,
        wanted,
        mapping,
        framework=FRAMEWORK,
        fits=fits_by_rules(module, source, rules_for),
        call_order=call_order,
        where=source.description,
        sides=True,
        leave_out=True,
    )
    # a layer the model has no module of its kind left for stays unread (strict=False ignores it)
    left_hints = {leaf: found.left_out[i] for i in found.left_out for leaf in layers[i].leaves.values()}
    layers, paired = [layer for layer, pair in zip(layers, found) if pair is not None], found.placed()
    rules: list[Rule] = []
    convs = any(layer.kind in MAP_KINDS for layer in layers)
    readers = map_readers(module) if convs and call_order is None else None
    flat_notes: list[str] = []
    for layer, pair in zip(layers, paired):
        rules += layer_rules(layer, pair, source)
        if layer.kind == "Linear" and convs:
            said = f"Flax Dense '{layer.name}'"
            unrecorded_flatten(
                source.description,
                said,
                pair.slot,
                call_order,
                "a Flax checkpoint does not record whether it read a map, or how the Flax model reshaped it",
                "if the Flax model reshaped its (height, width, channels) map, permute the PyTorch one "
                "channels-last before flattening (x.permute(0, 2, 3, 1).flatten(1)), as the Flax model "
                "computes it",
            )
            if readers is not None and unshown_flatten(
                source.description,
                said,
                readers,
                pair.slot,
                "a Flax checkpoint does not record whether it read a map",
                "permute the PyTorch model's map channels-last before flattening (x.permute(0, 2, 3, 1)"
                ".flatten(1)) where the Flax model reshaped its (height, width, channels) map",
            ):
                flat_notes.append(flatten_unchecked(said))
    own, own_pairings = loose_rules(module, source, {s for rule in rules for s in rule.sources}, inside)
    rules += own
    used = {s for rule in rules for s in rule.sources}
    sep = separator(names)
    training = [n for n in names if n not in used and n.split(sep, 1)[0] in TRAINING_STATE]
    settings, snapshot = unchecked(list(zip(layers, paired))), "snapshot_config" in source.metadata
    return LayoutPlan(
        name=NAME,
        rules=rules,
        pairings=as_pairings(paired) + own_pairings,
        scope=wrapped_scope(paired),
        unmatched=[n for n in names if n not in used and n not in training],
        unmatched_hints={n: hint for n, hint in left_hints.items() if n not in used},
        not_weights=[f"{n} (training state)" for n in training],
        # a transformers snapshot's config.json records the layers' settings (held against the model's own)
        unchecked=flat_notes if snapshot else settings + flat_notes,
        config_unchecked=settings if snapshot else [],
        missing_hints={
            pair.slot.path: MISSING_STATS
            for layer, pair in zip(layers, paired)
            if layer.kind == "BatchNorm" and not set(STATS) & set(layer.leaves)
        },
    )


_CONTRADICTED = (
    "the file lists these layers in another order than their numbers (Flax numbers a submodule when it is "
    "built, and a params dict holds it where it was first called), so neither says the order they run in"
)


def _orders(layers: list[Layer], names: list[str]) -> list[Any]:
    """Each layer's recorded order (Flax numbers a compact module's submodules as they are built), except
    where the file's own order of the layers contradicts it: a params dict not sorted since (by a
    ``tree_map``) holds the layers in the order they were first called, so a file listing ``Dense_1``
    before ``Dense_0`` shows ``Dense_1`` built second but run first (or numbers an author chose), and
    no order of that group is taken."""
    orders = [recorded_order(layer.name) for layer in layers]
    place = {name: i for i, name in enumerate(names)}
    first = [min((place[leaf] for leaf in layer.leaves.values()), default=0) for layer in layers]
    groups: dict[Any, list[int]] = {}
    for i, order in enumerate(orders):
        if order is not None:
            groups.setdefault(order[0], []).append(i)
    for members in groups.values():
        in_file = sorted(members, key=first.__getitem__)
        by_number = sorted(members, key=lambda i: orders[i][1])  # type: ignore[index]
        by_text = sorted(members, key=lambda i: layers[i].name.split("/"))
        if in_file != by_number and in_file != by_text:
            for i in members:
                orders[i] = None
    return orders


def describe(source: Source) -> list[dict[str, Any]]:
    """The Flax layers recognised in ``source``: name, kind and tensors (for ``weightport inspect``)."""
    return [
        {"name": layer.name, "kind": layer.detail or layer.kind, "tensors": sorted(layer.leaves.values())}
        for layer in layers_in(source)
    ]
