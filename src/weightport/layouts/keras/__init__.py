"""The Keras layout: Keras 3 / Keras 2 weights into the equivalent PyTorch layers.

What maps, and how (each a rule over :mod:`weightport.transforms`):

- ``SimpleRNN`` -> ``nn.RNN`` (tanh or relu), ``LSTM`` -> ``nn.LSTM``:
  ``weight_ih = kernel.T``, ``weight_hh = recurrent_kernel.T``,
  ``bias_ih = bias``, ``bias_hh = 0`` (LSTM gates i,f,c,o are PyTorch's i,f,g,o).
- ``GRU`` (``reset_after=True``) -> ``nn.GRU``: gate blocks z,r,h become r,z,n,
  kernels transposed, ``bias (2, 3H)`` split into ``bias_ih = bias[0]`` and
  ``bias_hh = bias[1]``.
- ``Bidirectional``: ``forward_layer`` -> ``_l{k}``, ``backward_layer`` ->
  ``_l{k}_reverse``; stacked recurrent layers fill one multi-layer module.
- ``Dense`` -> ``nn.Linear`` (``weight = kernel.T``), ``Conv1D``/``Conv2D`` ->
  ``nn.Conv1d``/``nn.Conv2d`` (``transpose(2,1,0)`` / ``transpose(3,2,0,1)``),
  ``Embedding`` as is, ``BatchNormalization`` gamma/beta/moving_mean/
  moving_variance -> weight/bias/running_mean/running_var (``num_batches_tracked``
  is set to 0: Keras counts no batches), ``LayerNormalization`` gamma/beta.
- ``DepthwiseConv2D`` -> ``nn.Conv2d(groups=in)`` (kernel ``(kh, kw, in, m)`` to ``(in, m, kh, kw)``,
  reshaped to ``(in*m, 1, kh, kw)``; ``DepthwiseConv1D`` likewise into ``nn.Conv1d``), ``SeparableConv2D``
  -> two ``nn.Conv2d`` (its ``/depthwise`` and ``/pointwise`` halves, each paired by proof;
  ``SeparableConv1D`` into two ``nn.Conv1d``), ``Conv1DTranspose``/``Conv2DTranspose`` ->
  ``nn.ConvTranspose1d/2d``, ``GroupNormalization`` -> ``nn.GroupNorm``, ``MultiHeadAttention`` ->
  ``nn.MultiheadAttention`` (:mod:`.attention`), ConvNeXt's ``LayerScale`` -> a module's one layer-scale
  vector (:mod:`.scale`); ``Normalization``/``Rescaling`` hold no PyTorch weight and
  are reported as ignored with their values and where they apply (:mod:`.preprocessing`); padding, including a ``ZeroPadding2D``
  before a conv, is held against the module's (:mod:`.padding`, :mod:`.graph`).

Layers pair with the module's only where the pairing is proven
(:func:`~weightport.layouts.pairing.pair_layers`): by name, by a unique kind and shape, or by
the order the source records matched with the model's call order. ``mapping={keras layer:
"module.path[layer]"}`` pairs by hand, naming a Keras layer by its name or its group path.
Where the source records no class (a subclassed model's weights), the kind follows from the
variables' shapes (three with a square-ish recurrent kernel: recurrent, 4H/3H/H columns for
LSTM/GRU/SimpleRNN; a 2-D kernel and a bias: Dense; 3-D/4-D kernels: Conv; four vectors:
BatchNormalization); shapes that fit two kinds (a lone 2-D array: Dense without bias or
Embedding) are settled by the kinds the module has, else refused with the candidates. Layers of
other classes (attention, custom layers) are left unread (``unmatched``) unless ``mapping=``
pairs them.

Order. ``.keras`` files, legacy ``.h5`` files and live models record the model order. A bare
Keras 3 ``.weights.h5`` records less: it files each layer under its class name numbered per
class in model order (``dense``, ``dense_1``, ..., ``dense_10``; HDF5 lists groups
alphabetically), so positions compare only within one class and container. Layers filed under
attribute names (subclassed models) record none: they pair by name or by a unique fit.

Refused (:class:`~weightport.errors.UnsupportedConfigError`): GRU ``reset_after=False``,
``recurrent_activation`` other than sigmoid, LSTM/GRU ``activation`` other than
tanh, SimpleRNN ``activation`` other than tanh/relu, LayerNormalization
``rms_scaling``, a ``Bidirectional`` around a layer with ``go_backwards=True`` (its halves come
out swapped). A norm with ``scale=False`` loads with the weight 1, one with ``center=False`` with
the bias 0; a ``.weights.h5`` norm missing one of the two is refused (:class:`~weightport.errors.LayoutError`):
its nameless variables read either way.
Settings that act on the input, the state or the output rather than inside the module load, with
a note saying what ``forward`` must do (in the pairing's "how" and ``LayoutPlan.forward_notes``, which a
load gives as a :class:`~weightport.errors.ForwardNoteWarning`): ``go_backwards`` (flip the input),
``stateful`` (pass the state on), a Dense/Conv ``activation`` (apply it: the note names the PyTorch call,
:mod:`.activations`), Conv ``padding='causal'``
and ``'same'`` with stride > 1 (pad the input; the module must have ``padding=0``), a ConvTranspose
``'same'`` crop one more after than before (crop the output), MultiHeadAttention ``attention_axes`` other
than a 3-D query's sequence (fold the query's axes), Embedding ``mask_zero`` (pack the sequences), and
layers without weights whose settings PyTorch's defaults lack (a LeakyReLU's slope, a ReLU's ``max_value``, an
``Activation('leaky_relu')``: :mod:`.weightless`). Training-only settings (dropout, initializers, ``unit_forget_bias``,
momentum) and ``unroll``, ``return_sequences``, ``return_state``, ``data_format`` load as they are.
Settings checked where the source carries a configuration (``.keras``, a full
legacy ``.h5``, a live model): activation vs ``nonlinearity``, ``use_bias`` vs
``bias=``, ``units`` vs ``hidden_size``, ``epsilon`` vs ``eps`` (Keras's default
1e-3 is not PyTorch's 1e-5), conv strides, dilation, groups and padding; a
mismatch is a :class:`~weightport.errors.LoadError` saying how to build the module.
Without a configuration they are listed in ``LayoutPlan.unchecked``.

:func:`export` is the reverse (arrays keyed as in a Keras 3 ``.weights.h5``; a
SimpleRNN/LSTM bias is ``bias_ih + bias_hh``, which computes the same outputs),
and :func:`save_weights_h5` writes them for Keras's ``model.load_weights``.

The phases live beside this module, each in its own: :mod:`.layers` (the layers a source holds and
their kinds), :mod:`.rules` (Keras variable -> PyTorch parameter, per kind), :mod:`.checks` (settings
held against the module), :mod:`.exporting` (PyTorch -> Keras arrays); :func:`plan` runs them.

>>> import torch
>>> sorted((k, v.shape) for k, v in export(torch.nn.Sequential(torch.nn.GRU(2, 3), torch.nn.Linear(3, 1))).items())
[('layers/dense/vars/0', (3, 1)), ('layers/dense/vars/1', (1,)), ('layers/gru/cell/vars/0', (2, 9)), ('layers/gru/cell/vars/1', (3, 9)), ('layers/gru/cell/vars/2', (2, 9))]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from weightport.call_order import CallOrder
from weightport.errors import LayoutError, LoadError, Problem, UnsupportedConfigError
from weightport.layouts.base import LayoutPlan, Pairing, Rule
from weightport.layouts.flattening import (
    MAP_KINDS,
    NO_CONFIG,
    flatten_unchecked,
    flattened_norm_rules,
    flattened_rules,
    map_readers,
    unshown_flatten,
)
from weightport.layouts.keras import describing, hf
from weightport.layouts.keras.checks import (
    check_config,
    check_direction,
    check_weights_only,
    notes,
    refuse_whole_model_layer,
)
from weightport.layouts.keras.einsum import why_not_a_dense
from weightport.layouts.keras.exporting import export
from weightport.layouts.keras.graph import graph_of, shared_layers
from weightport.layouts.keras.layers import (
    KINDS,
    NEEDS_CONFIG,
    UNPORTED,
    Layer,
    Resolved,
    collect,
    inner_layers,
    recorded_order,
    resolve,
    split,
    unique_names,
)
from weightport.layouts.keras.pointwise import as_linears
from weightport.layouts.keras.pooling import pooling_notes
from weightport.layouts.keras.preprocessing import reported, set_aside
from weightport.layouts.keras.rules import part_rules
from weightport.layouts.keras.scale import keras_slots
from weightport.layouts.keras.unshown import unshown_weightless
from weightport.layouts.keras.weightless import weightless_notes
from weightport.layouts.pairing import (
    Slot,
    SourceLayer,
    fits_by_rules,
    pair_layers,
    wrapped_scope,
)
from weightport.sources.base import Source
from weightport.sources.keras_h5 import write_weights_h5

__all__ = ["NAME", "plan", "export", "describe", "save_weights_h5"]

NAME = "keras"


def _refuse_no_keras_layers(source: Source) -> None:
    """``layout='keras'`` on arrays Keras did not file (a dict or ``.npz`` of ``{layer}/{weight}`` names):
    they record no layer classes or model order, so no layer can be paired; say what the layout reads."""
    shown = ", ".join(repr(n) for n in list(source.infos)[:2])
    raise LayoutError(
        f"{source.description}: layout='keras' reads the layers Keras itself records (a .weights.h5, .keras or "
        f".h5 file Keras saved, a live Keras model, or arrays keyed as weightport's Keras export writes them: "
        f"'layers/dense/vars/0'); found no Keras layer in its names ({shown}{', ...' if len(source.infos) > 2 else ''}). "
        "Fix: pass the live Keras model, weightport.load(module, keras_model), or save it with "
        "keras_model.save_weights('model.weights.h5') and load that file."
    )


# why a layer of a subclassed model has no recorded order (pairing's refusal says it)
_SUBCLASSED = (
    "the source is a subclassed Keras model, which lists its layers in the order its attributes were set, "
    "not the order it calls them in"
)


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: CallOrder | None = None,
) -> LayoutPlan:
    """Rules that put the Keras layers of ``source`` into ``module``'s layers.

    Args:
        module: the PyTorch model (or the submodule being loaded).
        source: a Keras file or live model source (``metadata["layout"] == "keras"``),
            or arrays keyed as :func:`export` writes them.
        mapping: ``{keras layer name or group path: "module.path" or "module.path[layer]"}``.
        call_order: module path -> position of its first call in a forward pass (``example_inputs=``).
    """
    where = source.description
    graph = graph_of(source.metadata.get("model_config"))
    layers, leftover = collect(source, graph)
    if not layers and source.infos and source.metadata.get("layout") != NAME:
        _refuse_no_keras_layers(source)
    if hf.claims(layers, source):  # transformers' tf_model.h5: by transformers' names
        return hf.plan(module, source, layers, leftover, mapping)
    layers, preprocessing = set_aside(layers)
    unique_names(layers)
    mapping = _translate(mapping, layers)
    slots = keras_slots(module)
    slot_kinds = {s.kind for s in slots}
    resolved: list[Resolved] = []
    unmatched = list(leftover)
    for layer in layers:
        kinds = (
            {_kind_of_target(mapping[layer.name], slots)} - {None} if layer.name in mapping else slot_kinds
        )
        holds_a_model = len(inner_layers(layer)) > 2  # one layer, or a Bidirectional's two sides, at most
        found = None if holds_a_model else resolve(layer, source, kinds, layer.name in mapping, where)  # type: ignore[arg-type]
        if found is None:
            unmatched += layer.tensors
        else:
            resolved += split(found)
    if not resolved:
        refuse_whole_model_layer(layers, where)
    resolved = as_linears(resolved, slots, {n: _kind_of_target(t, slots) for n, t in mapping.items()})

    def rules_for(i: int, slot: Slot) -> list[Rule] | None:
        found = resolved[i]
        if (len(found.parts) == 2) != slot.bidirectional:
            return None
        return [r for part in found.parts for r in part_rules(found, part, slot, source)]

    def settings(i: int, slot: Slot) -> list[Problem]:
        """What the settings checks find with layer ``i`` in ``slot`` that no forward code makes up for
        (pairing says it where no proof settles a part)."""
        found = resolved[i]
        if (len(found.parts) == 2) != slot.bidirectional:
            return []
        problems: list[Problem] = []
        for part in found.parts:
            if part.config is not None:
                problems += check_config(found, part, slot, [])
            else:
                check_weights_only(found, part, slot, source, problems, [], [])
        return [p for p in problems if _past_forward_code(p, slot.module)]

    try:
        pairs = pair_layers(
            module,
            [
                SourceLayer(
                    r.layer.name,
                    r.kind,
                    r.detail,
                    paths=(r.layer.path.replace("/", "."),) if r.layer.path else (),
                    order=recorded_order(r.layer),
                    unordered=_SUBCLASSED if r.layer.unordered else "",
                )
                for r in resolved
            ],
            mapping,
            framework="Keras",
            fits=fits_by_rules(module, source, rules_for),
            call_order=call_order,
            where=where,
            slots=slots,
            settings=settings,
        ).placed()  # every layer: none is left out here
    except LayoutError as e:
        _say_shared(e, shared_layers(source.metadata.get("model_config")))
        raise
    rules: list[Rule] = []
    pairings: list[Pairing] = []
    problems: list[Problem] = []
    refusals: list[str] = []
    unchecked: list[str] = []
    forward_notes: list[str] = []
    version = source.metadata.get(
        "keras_version"
    )  # a legacy .h5's; what some activations compute changed with it
    convs = any(found.kind in MAP_KINDS for found in resolved)
    readers = map_readers(module) if convs and call_order is None else None  # for a weights-only Dense
    for found, paired in zip(resolved, pairs):
        slot = paired.slot
        check_direction(found, slot, where)
        found.layer.built = _built_in_the_pass(found, slot, call_order) or found.layer.built
        how = paired.how
        for part in found.parts:
            made = part_rules(found, part, slot, source)
            if found.kind == "Linear":
                made = flattened_rules(found, slot, made, source, call_order)
            elif found.kind in ("BatchNorm", "LayerNorm"):
                made = flattened_norm_rules(found, slot, made, source, call_order)
            rules += made
            if part.config is None and found.kind == "Linear" and readers is not None:
                dense = f"Keras Dense '{found.layer.name}'"
                fix = "load the .keras file (it records the Flatten)"
                if unshown_flatten(where, dense, readers, slot, NO_CONFIG, fix):
                    unchecked.append(flatten_unchecked(dense))
            if part.config is not None:
                problems += check_config(found, part, slot, refusals)
                said = notes(found, part, slot, version)
                how += "".join(f"; {note}" for note, _ in said)
                forward_notes += [
                    f"{slot.said} <- Keras {part.cls} '{found.layer.name}': {n}" for n, acts in said if acts
                ]
            else:
                check_weights_only(found, part, slot, source, problems, refusals, unchecked)
        pairings.append(Pairing(found.layer.name, found.detail, slot.label, type(slot.module).__name__, how))
    if refusals:
        raise UnsupportedConfigError("\n".join(dict.fromkeys(refusals)))
    if problems:
        raise LoadError(problems, target=type(module).__name__)
    if not graph:
        unchecked += unshown_weightless(source)
    if unchecked:
        unchecked = list(dict.fromkeys(unchecked))
        unchecked.append(
            "a .keras file (model.save('model.keras')) records these settings so they can be checked"
        )
    modules = {p.source_layer: p.module_path for p in pairings}  # to say where a layer without weights sits
    used = {s for rule in rules for s in rule.sources}
    unmatched += [t for r in resolved for t in r.layer.tensors if t not in used]
    return LayoutPlan(
        unmatched_hints=_no_rule_hints(layers, resolved),
        name=NAME,
        rules=rules,
        pairings=pairings,
        unmatched=unmatched,
        unchecked=unchecked,
        scope=wrapped_scope(pairs),
        not_weights=reported(preprocessing, source, graph, modules),
        forward_notes=list(
            dict.fromkeys(forward_notes + pooling_notes(graph) + weightless_notes(graph, modules, version))
        ),
    )


def _built_in_the_pass(found: Resolved, slot: Slot, call_order: CallOrder | None) -> tuple[int, ...] | None:
    """A conv after a ZeroPadding whose file records no size it was built for (a legacy .h5) takes the size
    the forward pass on ``example_inputs=`` gives the module (a timm ``Conv2dSame`` pads that itself)."""
    layer = found.layer
    if call_order is None or layer.built is not None or not layer.padding:
        return None
    shape = call_order.input_shape(slot.path)
    if shape is None or len(shape) != 2 + len(layer.padding):
        return None
    return tuple(n + before + after for n, (before, after) in zip(shape[2:], layer.padding))


# settings no code around a module makes up for: whether it has a bias (or an affine), its eps, its groups
_PAST_FORWARD_CODE = ("bias", "affine", "elementwise_affine", "add_bias_kv", "eps", "num_groups", "groups")


def _past_forward_code(problem: Problem, module: nn.Module) -> bool:
    """Whether ``problem`` (a settings check's) is a difference no forward code around ``module`` makes up
    for: a bias, an eps, groups, or a stride or dilation where the kernel spans more than one position. A
    padding is one ``F.pad`` or slice away (a 'same' stride-2 conv is a ZeroPadding and a 'valid' one), and
    so is a stride over a kernel of 1 (a slice); a dilation over a kernel of 1 changes nothing."""
    setting = problem.expected.split("=", 1)[0]
    if setting in ("stride", "dilation"):  # along an axis the kernel spans: "stride=(2, 2) ..." vs "(1, 1)"
        wanted, has = (_numbers(problem.expected), _numbers(problem.found))
        kernel = tuple(getattr(module, "kernel_size", ()))
        if len(wanted) != len(kernel) or len(has) != len(kernel):
            return any(k > 1 for k in kernel)
        return any(k > 1 and w != h for k, w, h in zip(kernel, wanted, has))
    return setting in _PAST_FORWARD_CODE


def _numbers(said: str) -> tuple[int, ...]:
    """The tuple a settings check says first (``"stride=(2, 1) (Keras strides)"`` -> ``(2, 1)``)."""
    inside = said.partition("(")[2].partition(")")[0]
    return tuple(int(n) for n in inside.split(",") if n.strip().isdigit())


def _say_shared(error: LayoutError, shared: dict[str, int]) -> None:
    """A refusal naming a layer the Keras model calls several times raises again saying so: its one set of
    weights is one module's, called as often (two modules of the model cannot both take it)."""
    named = [name for name in shared if f"'{name}'" in str(error)]
    if named:
        said = ", ".join(f"'{n}' {shared[n]} times" for n in named)
        raise LayoutError(
            f"{error} Note: the Keras model calls {said}, with one set of weights: build the PyTorch model with "
            "one module called as often (or tie them, self.second = self.first), which then takes the layer."
        ) from None


def _no_rule_hints(layers: list[Layer], resolved: list[Resolved]) -> dict[str, str]:
    """For each tensor of a layer whose class is known but has no rule here (Attention's scale, PReLU's
    alpha): why it is left, and that dropping it with strict=False changes the outputs."""
    ported = {id(r.layer) for r in resolved}
    hints = {}
    for layer in layers:
        if layer.class_name is None or id(layer) in ported:
            continue
        why = why_not_a_dense(layer.config) if layer.class_name in NEEDS_CONFIG and layer.config else ""
        if why:
            hint = (
                f"Keras {layer.class_name} '{layer.name}' computes what no nn.Linear does ({why}): compute it in "
                "a module of your own and load this array into it by name (weightport.open_source reads it)"
            )
        elif layer.class_name in NEEDS_CONFIG:
            hint = (
                f"Keras {layer.class_name} '{layer.name}' loads only where its configuration says how its weights "
                "read (an EinsumDense's equation; a weights-only file has none, and one no nn.Linear computes has "
                "no rule): load the .keras file, or write a module for it and load this array by name"
            )
        elif layer.class_name in UNPORTED.values():
            hint = (
                f"weightport has no rule for Keras {layer.class_name} ('{layer.name}'), and its weights change what "
                "the model computes: write a module that computes it and load this array into it by name "
                "(weightport.open_source reads it); strict=False would drop it"
            )
        elif layer.class_name not in KINDS:  # a class of the user's own: it may be a known one's subclass
            hint = (
                f"weightport has no rule for the Keras class {layer.class_name} ('{layer.name}'): if it computes "
                f"what a module of the model computes (a Dense subclass into an nn.Linear), pass mapping= to place "
                f"its layer, mapping={{'{layer.name}': 'module.path'}}; otherwise write a module for it and load "
                "this array by name. strict=False would drop it, and its weights change the outputs"
            )
        else:
            continue
        hints.update(dict.fromkeys(layer.tensors, hint))
    return hints


def _translate(mapping: Mapping[str, str] | None, layers: list[Layer]) -> dict[str, str]:
    """Mapping keys given as group paths become the layer names pairing uses."""
    names = {layer.name for layer in layers}
    by_path = {layer.path: layer.name for layer in layers}
    return {(k if k in names else by_path.get(k, k)): v for k, v in (mapping or {}).items()}


def _kind_of_target(target: str, slots: list[Slot]) -> str | None:
    kinds = {s.kind for s in slots if target in (s.label, s.path)}
    return kinds.pop() if len(kinds) == 1 else None


def save_weights_h5(
    module_or_arrays: nn.Module | Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    mapping: Mapping[str, str] | None = None,
) -> Path:
    """Write a ``.weights.h5`` that Keras's ``model.load_weights(path)`` reads into the equivalent model.

    Args:
        module_or_arrays: a PyTorch module (exported with :func:`export`), or arrays
            already keyed as a Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>``).
        path: the file to write; it should end in ``.weights.h5``, as Keras requires.
        mapping: as for :func:`export`, e.g. ``{"layers/time_distributed/layer": "fc"}`` for a
            Linear that the Keras model wraps in ``TimeDistributed``.
    """
    arrays: dict[str, np.ndarray]
    if isinstance(module_or_arrays, nn.Module):
        arrays = export(module_or_arrays, mapping)
    else:
        arrays = dict(module_or_arrays)
    return write_weights_h5(arrays, path)


def describe(source: Source) -> list[dict[str, Any]]:
    """The Keras layers in ``source`` in model order where known (for ``weightport inspect``): each with
    its variables' Keras names and, where weightport cannot port it, why (:mod:`.describing`)."""
    return describing.describe(source)
