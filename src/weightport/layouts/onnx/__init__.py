"""The ONNX layout: weights of LSTM, GRU, RNN, Gemm, MatMul(+Add), Conv, Gather (embeddings),
BatchNormalization and LayerNormalization nodes into PyTorch.

Weights are found by a node's input position, not by name (``torch.onnx.export``
names them ``onnx::LSTM_201``), from the node list the ONNX reader puts in
``source.metadata["nodes"]``. Each node that holds weights is one source layer,
paired with the module's layers by order within kind (``mapping={node name:
"module.path[layer]"}`` pairs by hand); stacked recurrent nodes fill the layers
of one multi-layer ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (or cells).

What maps, and how:

- LSTM ``W (D,4H,F)``, ``R (D,4H,H)``, ``B (D,8H) = [Wb, Rb]``: gates i,o,f,c are
  reordered to PyTorch's i,f,g,o; direction index 1 goes to ``_reverse``. GRU
  gates z,r,h become r,z,n; RNN blocks stay. A missing ``B`` means zero biases.
- ``Gemm`` (``transA=0``; ``transB`` either way) and ``MatMul`` by a stored
  matrix, with the ``Add`` of a stored bias that follows it, become ``nn.Linear``
  (``weight = B.T`` for ``MatMul``). ``Conv`` becomes ``nn.Conv1d/2d/3d`` as is.
- ``Gather`` of a stored float matrix along axis 0 becomes ``nn.Embedding``;
  ``BatchNormalization`` (scale, B, mean, var) ``nn.BatchNorm*d`` and
  ``LayerNormalization`` (Scale, B) ``nn.LayerNorm``, with ``epsilon`` checked
  against ``eps``. Exporters fold an eval-mode BatchNorm into the Conv or Gemm
  before it: a module's BatchNorm with no node, right after the layer it was folded
  into, loads as its exact eval-mode equivalent (:mod:`.folding`), and the plan says
  its training statistics are not in the file; one tf2onnx writes as ``Mul`` and ``Add`` by
  per-channel vectors right after the layer loads from those. A Conv bias the graph expands from a
  stored zero (the dynamo exporter without ``optimize``) is no bias.
- ``nn.MultiheadAttention`` (one slot with its ``out_proj``): the packed in_proj ``MatMul``(+``Add``) and
  the out_proj ``Gemm``, tied by their stored names ``<path>.in_proj_bias`` and ``<path>.out_proj.weight``
  (:mod:`.attention`); ``num_heads`` and ``batch_first`` are reported unchecked. Parameters of modules of
  no known kind (a ViT's ``class_token``) take the initializer of their exact name and shape.

A weight may reach its node through ``Identity`` nodes (exporters write one for a tensor used twice)
and ``Cast`` nodes that widen exactly (float16 storage read as float32); nothing else is evaluated.
tf2onnx's forms are recognised: a Dense on a 3-D input adds its bias after a ``Reshape`` back to the
leading axes (followed when the target shape's stored last entry is the output size), and a Keras
Conv1D is a 2-D ``Conv`` over an axis an ``Unsqueeze`` made (kernel 1, stride 1, no padding there),
which fills an ``nn.Conv1d``, with its bias added per channel after the ``Squeeze``. A node applied
twice to the same stored tensors is one layer. Scalar initializers are graph constants, not weights.
A recurrence left in a ``Loop``/``Scan`` (tf2onnx's SimpleRNN) maps nothing; the missing module says so.

Refused, with the reason (:class:`UnsupportedConfigError`): GRU
``linear_before_reset=0`` (the ONNX default), non-zero peepholes ``P`` (all-zero
``P`` is accepted), ``clip``, ``input_forget=1``, activations other than
PyTorch's (LSTM Sigmoid/Tanh/Tanh, GRU Sigmoid/Tanh, RNN Tanh or Relu), Gemm
``alpha``/``beta`` other than 1 (the transforms only move values; fold the
factors into ``B`` and ``C`` first), ``transA=1``, asymmetric Conv pads (except padding='same''s, stride 1),
``auto_pad=SAME_*`` with a stride above 1 (the padding depends on the input's
length), BatchNormalization ``spatial=0``. Accepted, as they change no weight:
the RNN ``layout`` (batch- or time-first inputs and outputs; noted in the
pairing), ``sequence_lens`` (ONNX zeroes steps past each length, as PyTorch does
for a packed input; noted), ``activation_alpha``/``activation_beta`` of Sigmoid
and Tanh (which take none), BatchNormalization ``momentum`` and ``training_mode``,
LayerNormalization ``stash_type``. A module with ``padding_mode`` other than
'zeros' matches a ``Pad`` node before the Conv (torch.onnx.export's form); amounts
the graph computes are reported as unchecked.

A ``direction="reverse"`` node runs over the sequence backwards; PyTorch has no
reverse-only layer, so it is refused unless ``mapping=`` names the
unidirectional layer (or cell) it goes into: its weights are then that layer's,
and the model must flip its input and output in time
(``y = flip(layer(flip(x)))``).

Settings the node carries are checked against the module: ``hidden_size``,
direction vs ``bidirectional``, the RNN activation vs ``nonlinearity``, a stored
bias vs ``bias=`` (an all-zero one also fits ``bias=False``), Conv strides,
pads, dilations and groups.

:func:`export` writes the reverse: ONNX-layout arrays under keys
``"<slot>/<ONNX input name>"``, where ``<slot>`` is the layer's label in
:func:`~weightport.layouts.pairing.module_slots` (``"lstm[0]"``, ``"fc"``; the
root module's is ``""`` or ``"[0]"``, and a root key is just the input name).
Recurrent layers give ``W``, ``R``, ``B`` (no ``B`` with ``bias=False``), Linear
gives Gemm's ``B`` (``transB=1``, so ``(out, in)``) and ``C``, Conv gives ``W``
and ``B``, Embedding ``data``, BatchNorm ``scale``, ``B``, ``input_mean``,
``input_var``, LayerNorm ``Scale`` and ``B``. Planned without a graph (a plain mapping with ``layout="onnx"``),
keys of that scheme are read back as identity; node attributes are then taken
from the module and reported as unchecked.

The package, one phase a module (each imports only those before it): ``ops`` (what each ONNX op is in
PyTorch), ``graph`` (nodes, wiring, values followed), ``issues`` (refusals), ``pads``, ``checks`` (node
settings), ``norm_eps`` (the eps of a norm written as basic ops), ``attention`` (MultiheadAttention and named
parameters), ``groupnorm`` (a GroupNorm's unnamed weight and bias), ``layers`` (finding the layers), ``rules`` (rules for a paired layer), ``folding`` (BatchNorms folded
into the layer before them), ``hints`` (why a module layer got nothing) and ``arrays`` (export() and its
key scheme).

>>> import torch
>>> sorted((k, v.shape) for k, v in export(torch.nn.GRU(2, 3)).items())
[('[0]/B', (1, 18)), ('[0]/R', (1, 9, 3)), ('[0]/W', (1, 9, 2))]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from weightport.call_order import CallOrder
from weightport.errors import LayoutError
from weightport.layouts.base import LayoutPlan, Rule
from weightport.layouts.onnx.arrays import export, nodes_from_keys
from weightport.layouts.onnx.attention import explain_unnamed_attention, named_parameter_rules
from weightport.layouts.onnx.flatten import reorder_flattened
from weightport.layouts.onnx.folding import (
    FOLDS_INTO,
    fold_rules,
    followers,
    refuse_dropped_arithmetic,
    statistics_note,
    written_batchnorm,
    written_rules,
)
from weightport.layouts.onnx.graph import Graph, Layer, read_nodes, weight_names
from weightport.layouts.onnx.groupnorm import GROUP_NORM, check_group_norm
from weightport.layouts.onnx.hints import (
    explain_unrolled_recurrence,
    loop_hints,
    unmapped_hints,
    unread_hints,
)
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.onnx.layers import find_layers, named_path, owner_path, ran_in_module
from weightport.layouts.onnx.rules import layer_rules
from weightport.layouts.onnx.runtime import refuse_runtime_graphs
from weightport.layouts.onnx.shared import shared_rules
from weightport.layouts.pairing import (
    Paired,
    Slot,
    SourceLayer,
    as_pairings,
    fits_by_rules,
    module_slots,
    pair_layers,
    wrapped_scope,
)
from weightport.layouts.slots import TRANSFORMERS_CONV1D, slot_kind
from weightport.sources.base import Source
from weightport.transforms import Identity, Transpose

__all__ = ["NAME", "plan", "export", "describe"]

NAME = "onnx"
FRAMEWORK = "ONNX"


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: CallOrder | None = None,
) -> LayoutPlan:
    """Rules for ``module`` from the weight-holding nodes of an ONNX graph (or export()'s keys).

    Raises:
        UnsupportedConfigError: a node computes something PyTorch's module cannot.
        LayoutError: nodes and module layers do not pair, or their settings differ.
    """
    issues = Issues(source.description)
    target = type(module).__name__
    if "nodes" in source.metadata:
        nodes = read_nodes(source.metadata["nodes"])
        graph: Graph | None = Graph.of(nodes, source)  # the wiring, for the checks after pairing
        unchecked: list[str] = []
        follow = followers(module, call_order)  # Conv/Linear -> the BatchNorm after it, which may be folded
    else:
        follow = {}
        nodes, pins = nodes_from_keys(module, source)
        graph = None
        mapping = {**pins, **(mapping or {})}
        unchecked = [
            "ONNX node attributes (activations, clip, linear_before_reset, Conv strides and pads): "
            "plain arrays carry no graph, so they are taken to match the module"
        ]
    validated: set[str] = set()
    refuse_runtime_graphs(nodes, source)
    layers, by_name = _not_layers(module, find_layers(nodes, source, issues, validated), source)
    _name_conv1d(module, layers)
    issues.raise_if_any(target)
    wanted = [
        SourceLayer(
            lay.node.label,
            lay.kind,
            lay.detail,
            named_path(lay, lambda path: _changes_own(module, path, call_order)),
            order=None if lay.node.synthetic else ("graph", lay.node.index),  # nodes are in topological order
            within=ran_in_module(lay),
        )
        for lay in layers
    ]

    def rules_for(i: int, slot: Slot) -> list[Rule] | None:
        trial = Issues(source.description)
        folds = layers[i].kind in FOLDS_INTO and slot.label in follow
        rules = layer_rules(layers[i], Paired(wanted[i], slot, ""), source, trial, set(), [], folds=folds)
        return None if trial.messages else rules

    fits = fits_by_rules(module, source, rules_for)
    try:
        paired = pair_layers(
            module,
            wanted,
            mapping,
            framework=FRAMEWORK,
            fits=fits,
            call_order=call_order,
            where=source.description,
            fit_context=lambda slot: slot.label in follow,
            folded_constants=True,
        ).placed()  # every layer: none is left out here
    except LayoutError as e:
        explain_unrolled_recurrence(module, layers, source.description, e)
        explain_unnamed_attention(module, layers, source, e)
        raise
    rules: list[Rule] = list(by_name)
    pairings = as_pairings(paired)
    # a BatchNorm that a BatchNormalization node fills is no folded one
    taken = {pair.slot.label for pair in paired}
    folded: list[str] = []
    written: list[str] = []  # BatchNorms the graph writes as Mul and Add
    folds: list[tuple[Layer, Slot, Slot]] = []  # (layer, its slot, the BatchNorm taken as folded into it)
    forward_notes = [
        f"{pair.slot.said} <- ONNX {layer.kind} node '{layer.node.label}': {note}"
        for layer, pair in zip(layers, paired)
        for note in layer.forward_notes
    ]
    own_names = frozenset(name for name, _ in module.named_parameters()) | frozenset(
        n for n, _ in module.named_buffers()
    )

    def uses(path: str) -> bool | None:
        return None if call_order is None else call_order.changes(path)

    def padded(path: str) -> tuple[int, ...] | None:
        return None if call_order is None else call_order.padded_input(path)

    for layer, pair in zip(layers, paired):
        bn, how = follow.get(pair.slot.label, (None, "")) if layer.kind in FOLDS_INTO else (None, "")
        bn = bn if bn is not None and bn.label not in taken else None
        # a BatchNorm the graph writes as Mul and Add right after the layer (tf2onnx) is those nodes, not folded
        arithmetic = (
            None if bn is None or graph is None else written_batchnorm(layer, pair.slot, bn, graph, issues)
        )
        rules += layer_rules(
            layer,
            pair,
            source,
            issues,
            validated,
            unchecked,
            folds=bn is not None and arithmetic is None,
            named=own_names,
            uses=uses,
            padded=padded,
        )
        if graph is not None:
            check_group_norm(layer, pair.slot, graph, issues, unchecked)
        if bn is not None and arithmetic is not None:
            more, shown = written_rules(layer, bn, how, arithmetic, source)
            rules += more
            pairings.append(shown)
            written.append(bn.label)
        elif bn is not None:
            more, pairing = fold_rules(layer, pair, bn, how, source, issues)
            rules += more
            if pairing is not None:
                pairings.append(pairing)
                folded.append(bn.label)
                folds.append((layer, pair.slot, bn))
    if graph is not None:
        rules = reorder_flattened(layers, paired, rules, graph, call_order)
    more, shared = shared_rules(
        module,
        layers,
        wanted,
        rules,
        fits,
        lambda i, pair: layer_rules(
            layers[i], pair, source, issues, validated, unchecked, named=own_names, uses=uses, padded=padded
        ),
    )
    rules, pairings = rules + more, pairings + shared
    issues.raise_if_any(target)
    if folded or written:
        unchecked.append(statistics_note(folded, written))
    if call_order is None:
        unchecked += _own_forwards(layers, paired)
    used = {s for rule in rules for s in rule.sources} | validated
    hints = loop_hints(module, layers, nodes, source) if "nodes" in source.metadata else {}
    if graph is not None:
        unmapped_hints(module, layers, nodes, source, hints)
        filled = {rule.target for rule in rules}
        reads = call_order.reads if call_order is not None else None
        more, named, why = named_parameter_rules(
            module, source, used, filled, unchecked, reads, graph, issues
        )
        issues.raise_if_any(target)
        rules, pairings, used = (
            rules + more,
            pairings + named,
            used | {s for rule in more for s in rule.sources},
        )
        for path, hint in why.items():
            hints.setdefault(path, hint)
    unplaced = [n for n in weight_names(source) if n not in used]
    if graph is not None and folds:
        refuse_dropped_arithmetic(folds, graph, set(unplaced), issues)
        issues.raise_if_any(target)
    return LayoutPlan(
        name=NAME,
        rules=rules,
        pairings=pairings,
        scope=wrapped_scope(paired),
        unmatched=unplaced,
        unmatched_hints=unread_hints(unplaced, nodes, graph) if graph is not None else {},
        unchecked=unchecked,
        missing_hints=hints,
        forward_notes=forward_notes,
    )


def _name_conv1d(module: nn.Module, layers: list[Layer]) -> None:
    """A Linear layer whose stored names (or the module its node ran in) name a transformers ``Conv1D`` fills
    it as one: GPT-2's ``x @ weight + bias``, with the weight ``(in, out)`` as the node reads it. Shapes
    cannot tell it from a Linear's transposed weight (a square one), so only names make it one."""
    conv1d = {slot.path for slot in module_slots(module) if slot.kind == TRANSFORMERS_CONV1D}
    if not conv1d:
        return
    for layer in layers:
        if layer.kind == "Linear" and (named_path(layer) or ("",))[0] in conv1d:
            transposed = isinstance(layer.ops.get("weight"), Transpose)  # the node reads it as (in, out)
            layer.kind = TRANSFORMERS_CONV1D
            layer.ops["weight"] = Identity() if transposed else Transpose((1, 0))
            layer.detail += " (transformers' Conv1D by its name: weight (in, out))"


def _not_layers(module: nn.Module, layers: list[Layer], source: Source) -> tuple[list[Layer], list[Rule]]:
    """The layers to pair, without those whose weight is stored under the name of a tensor the model keeps
    in a module of no layer kind (a relative-position table a Gather reads, BlurPool's filter a Conv reads):
    that tensor is the module's own, filled by its name (a buffer here; a parameter by the named-parameter
    rules), not a layer for a module of the node's kind."""
    owned: dict[str, tuple[nn.Module, bool]] = {}  # tensor name -> its module, and whether it is a buffer
    for path, owner in module.named_modules():
        for tensors, buffer in (
            (owner.named_parameters(recurse=False), False),
            (owner.named_buffers(recurse=False), True),
        ):
            for local, _ in tensors:
                owned[f"{path}.{local}" if path else local] = (owner, buffer)
    kept: list[Layer] = []
    rules: list[Rule] = []
    group_norms = any(isinstance(m, nn.GroupNorm) for m in module.modules())
    for layer in layers:
        if layer.kind == GROUP_NORM and (
            not group_norms
            or any(
                name in owned and not isinstance(owned[name][0], nn.GroupNorm)
                for name in layer.tensors.values()
            )
        ):
            continue  # an InstanceNorm and the model's own scale and shift (by name, or folded): no GroupNorm's
        weight = layer.tensors.get("weight", "")
        owner, buffer = owned.get(weight, (None, False))
        if owner is None or len(layer.tensors) != 1 or not slot_kind(owner).startswith("other:"):
            kept.append(layer)
        elif buffer:
            rules.append(Rule(weight, (weight,), Identity(), f"{source.description} initializer '{weight}'"))
    return kept, rules


def _own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class overrides the ``forward`` of the PyTorch layer it is (it may change its
    weight before use), rather than keeping torch's, which uses each tensor as it is."""
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.")), None)
    return base is not None and type(module).forward is not getattr(base, "forward", None)


def _changes_own(model: nn.Module, path: str, call_order: CallOrder | None) -> bool:
    """Whether the forward pass on ``example_inputs=`` shows module ``path`` changing its own weight before
    use; asked only of a module with a forward of its own, so that the pass runs only where it can tell."""
    if call_order is None:
        return False
    try:
        found = model.get_submodule(path)
    except AttributeError:
        return False
    return _own_forward(found) and call_order.changes(path)


def _own_forwards(layers: list[Layer], paired: list[Paired]) -> list[str]:
    """A note for modules paired by structure (or by the module a node ran in) whose class overrides its
    PyTorch layer's ``forward``: if that forward changes the weight before use (standardizes or scales it),
    the exporter folded the change into the stored constant, and the module applies it again;
    ``example_inputs=`` has that checked."""
    own = []
    for layer, pair in zip(layers, paired):
        module = pair.slot.module
        if (
            pair.how.startswith("mapping=")
            or (pair.how.startswith("by name") and owner_path(layer))
            or not _own_forward(module)
        ):
            continue
        own.append(f"'{pair.slot.label}' ({type(module).__name__})")
    if not own:
        return []
    return [
        f"{', '.join(own[:6])}{' ...' if len(own) > 6 else ''}: a subclass whose forward is its own, paired by "
        "structure: if that forward changes its weight before use (standardizes or scales it), the exporter "
        "folded the change into the stored tensor and the module applies it again; pass example_inputs= to "
        "have that checked (such a module is then refused)"
    ]


def describe(source: Source) -> list[dict[str, Any]]:
    """The weight-holding ONNX nodes: name, op, attributes and tensors (for ``weightport inspect``)."""
    nodes = read_nodes(list(source.metadata.get("nodes", [])))
    layers = find_layers(nodes, source, Issues(source.description), set())
    return [
        {
            "name": layer.node.label,
            "kind": layer.node.op_type,
            "config": layer.node.attributes,
            "tensors": list(layer.tensors.values()),
        }
        for layer in layers
    ]
