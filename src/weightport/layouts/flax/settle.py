"""Kinds the params alone leave open, settled against the module by the names both sides use.

A rank-2 ``kernel`` is a Flax ``Dense`` ``(in, out)`` or transformers' ``FlaxConv1D``, which stores
its kernel ``(features, in)`` (``self.param("kernel", init, (features, in))``, applied as
``inputs @ kernel.T``). Both go into PyTorch through one transpose: a Dense's into ``nn.Linear``'s
``(out, in)``, a FlaxConv1D's into transformers' ``Conv1D``'s ``(in, out)``. Which one a layer is
cannot be read from its params, so a Dense-like layer is a FlaxConv1D where its name is a
``Conv1D``'s path in the module (``h/0/attn/c_attn`` -> ``h.0.attn.c_attn``, also inside a wrapped
model), where ``mapping=`` sends it to one, or where the module has ``Conv1D`` modules and no
``nn.Linear`` at all (GPT-2's transformer).

>>> import torch
>>> from weightport.layouts.flax.layers import Layer
>>> layers = [Layer("fc", "Linear", "Dense")]
>>> settle_conv1d(layers, torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
>>> layers[0].kind
'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from weightport.errors import LayoutError
from weightport.layouts.flax.attention import ATTENTION, HEAD_COUNTS, HEAD_SIZES, PROJECTIONS, Heads
from weightport.layouts.flax.layers import DENSE_GENERAL, Layer
from weightport.layouts.flax.tree import name_paths
from weightport.layouts.slots import Slot, module_slots

__all__ = [
    "settle_conv1d",
    "settle_attention",
    "settle_by_name",
    "settle_lone_bias",
    "settle_norm_kinds",
    "named_slots",
    "declared_heads",
    "CONV1D",
    "CONV1D_DETAIL",
]

CONV1D = "Conv1D"  # the slot kind of transformers' Conv1D (see layouts.slots)
CONV1D_DETAIL = "FlaxConv1D"


def named_slots(layer_name: str, slots: list[Slot], mapping: Mapping[str, str] | None) -> list[Slot]:
    """The slots ``layer_name`` names: through ``mapping=``, its own path, or that path inside a wrapper."""
    target = (mapping or {}).get(layer_name)
    if target is not None:
        path = target.split("[", 1)[0]
        return [s for s in slots if s.path == path]
    paths = (layer_name.replace("/", "."), *name_paths(layer_name))
    return [s for s in slots for p in paths if s.path == p or s.path.endswith("." + p)]


def settle_conv1d(layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None) -> None:
    """Dense-like layers that are transformers' FlaxConv1D become kind ``Conv1D`` (see the module doc)."""
    slots = module_slots(module)
    kinds = {slot.kind for slot in slots}
    if CONV1D not in kinds:
        return
    only_conv1d = "Linear" not in kinds
    for layer in layers:
        if layer.kind != "Linear" or layer.detail != "Dense":
            continue
        named = {slot.kind for slot in named_slots(layer.name, slots, mapping)}
        if named == {CONV1D} or (only_conv1d and not named):
            layer.kind, layer.detail = CONV1D, CONV1D_DETAIL


def settle_attention(layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None) -> None:
    """Each Flax attention layer stays one (into an ``nn.MultiheadAttention``) or becomes its parts
    (``DenseGeneral`` query/key/value/out into Linears, q/k norms into LayerNorms): one where its name is
    an ``nn.MultiheadAttention``'s path, its parts where their names are modules' paths (or mapping=
    names them), else one where the module has an ``nn.MultiheadAttention``, its parts where it has none.

    A rank-3 or higher kernel read as a Conv becomes a DenseGeneral where its name is an ``nn.Linear``'s
    path (a Conv's kernel (k, in, out) and a DenseGeneral's (in..., out) look alike). Split parts carry
    the heads the kernels record, and what the model's modules declare (:func:`declared_heads`).
    """
    slots = module_slots(module)
    has_attention = ATTENTION in {slot.kind for slot in slots}
    declared: dict[str, tuple[tuple[str, int], ...]] | None = None
    settled: list[Layer] = []
    for layer in layers:
        conv = layer.kind.startswith("Conv") and layer.kind != CONV1D
        if conv and {slot.kind for slot in named_slots(layer.name, slots, mapping)} == {"Linear"}:
            layer.kind, layer.detail = "Linear", DENSE_GENERAL
        if layer.kind != ATTENTION:
            settled.append(layer)
            continue
        whole = {slot.kind for slot in named_slots(layer.name, slots, mapping)}
        parts = any(named_slots(part.name, slots, mapping) for part in layer.parts)
        keep = ATTENTION in whole or (not parts and has_attention)
        if not keep:
            declared = declared_heads(module, slots) if declared is None else declared
            _split_heads(layer, declared)
        settled += [layer] if keep else layer.parts
    layers[:] = settled


def declared_heads(module: nn.Module, slots: list[Slot]) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each ``nn.Linear``'s path -> the head count and size its parent module holds as attributes
    (``num_heads``, transformers' ``num_attention_heads`` and ``attention_head_size``, ...): what an
    attention written with separate Linears splits their features into.

    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.num_heads, self.query = 2, nn.Linear(8, 8)
    >>> model = nn.Sequential(Attention())
    >>> declared_heads(model, module_slots(model))
    {'0.query': (('num_heads', 2),)}
    """
    declared = {}
    for slot in slots:
        if slot.kind != "Linear":
            continue
        parent = module.get_submodule(slot.path.rpartition(".")[0])
        found = tuple(
            (name, value)
            for name in (*HEAD_COUNTS, *HEAD_SIZES)
            if isinstance(value := getattr(parent, name, None), int) and not isinstance(value, bool)
        )
        if found:
            declared[slot.path] = found
    return declared


def _split_heads(layer: Layer, declared: dict[str, tuple[tuple[str, int], ...]]) -> None:
    """Give an attention's projections, split into Linears, the heads its query kernel records."""
    query = next(part for part in layer.parts if part.name.endswith("/query"))
    _, count, size = query.shapes["kernel"]
    heads = Heads(layer.name, count, size, declared)
    for part in layer.parts:
        if part.name.rsplit("/", 1)[-1] in PROJECTIONS:
            part.heads = heads


_LOOK_ALIKE = {  # a kind the params read as -> kinds with the same params, told apart by names
    "LayerNorm": ("GroupNorm", "RMSNorm"),  # scale and bias; RMSNorm: a scale alone
    "Conv1d": ("ConvTranspose1d",),  # kernel (k..., in, out) and bias
    "Conv2d": ("ConvTranspose2d",),
    "Conv3d": ("ConvTranspose3d",),
}
_AUTO = {
    "GroupNorm": "GroupNorm_",
    "RMSNorm": "RMSNorm_",
    "ConvTranspose1d": "ConvTranspose_",
    "ConvTranspose2d": "ConvTranspose_",
}
_DETAIL = {"GroupNorm": "GroupNorm", "RMSNorm": "RMSNorm"}  # any other: ConvTranspose
_AUTO["ConvTranspose3d"] = "ConvTranspose_"


def settle_by_name(layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None) -> None:
    """Layers whose params look like another kind's (a GroupNorm's are a LayerNorm's, a ConvTranspose's a
    Conv's) take the other kind where Flax's own name says so (``GroupNorm_0``, ``ConvTranspose_1``),
    where their name is such a module's path or ``mapping=`` sends them to one, or where the module has
    that kind and not the one the params read as (unless Flax named the layer ``LayerNorm_0``/``Conv_0``:
    then the model differs from the Flax one, and the pairing refuses it)."""
    slots = module_slots(module)
    kinds = {slot.kind for slot in slots}
    for layer in layers:
        for other in _LOOK_ALIKE.get(layer.kind, ()):
            named = {slot.kind for slot in named_slots(layer.name, slots, mapping)}
            last = layer.name.rsplit("/", 1)[-1]
            auto = last.startswith(_AUTO[other])
            own = last.startswith(("LayerNorm_", "Conv_"))  # Flax's own name says it is what it reads as
            alone = not named and not own and other in kinds and layer.kind not in kinds
            if named == {other} or (auto and not named) or alone:
                layer.kind = other
                layer.detail = _DETAIL.get(other, "ConvTranspose")


def settle_lone_bias(layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None) -> None:
    """A layer of a ``bias`` alone reads as a LayerNorm without scale, but is a Dense's bias where its name
    (or ``mapping=``) is an ``nn.Linear``: a Dense whose kernel lives elsewhere (DistilBERT's
    ``vocab_projector``, ``x @ embedding.T + bias``; PyTorch ties the weight). No other reading fills that
    ``nn.Linear``, so this one is no guess; where its weight is not tied, the load says it has no value."""
    slots = module_slots(module)
    for layer in layers:
        if layer.kind != "LayerNorm" or set(layer.leaves) != {"bias"}:
            continue
        named = named_slots(layer.name, slots, mapping)
        if len(named) == 1 and named[0].kind == "Linear":
            layer.kind, layer.detail = "Linear", "a Dense's bias alone"


def settle_norm_kinds(
    layers: list[Layer], module: nn.Module, mapping: Mapping[str, str] | None, where: str
) -> None:
    """A scale-and-bias layer not named ``BatchNorm_*`` reads as a LayerNorm, but a BatchNorm saved
    without its ``batch_stats`` (``state.params`` alone, or an nnx ``Param`` filter) looks the same.
    The module's modules settle it: the one its name or ``mapping=`` names, else the only kind of the two
    the module has (a BatchNorm's running statistics are then missing, and said to be). A layer of a
    name of its own (nnx's attribute names) in a module with both kinds is refused, listing both."""
    slots = module_slots(module)
    kinds = {slot.kind for slot in slots}
    for layer in layers:
        if layer.kind != "LayerNorm" or set(layer.leaves) - {"scale", "bias"}:
            continue
        named = {slot.kind for slot in named_slots(layer.name, slots, mapping)} & {"LayerNorm", "BatchNorm"}
        if len(named) == 1:
            layer.kind = layer.detail = named.pop()
        elif "BatchNorm" in kinds and "LayerNorm" not in kinds:
            layer.kind = layer.detail = "BatchNorm"
        elif {"BatchNorm", "LayerNorm"} <= kinds and not layer.name.rsplit("/", 1)[-1].startswith(
            "LayerNorm"
        ):
            raise LayoutError(
                f"{where}: Flax layer '{layer.name}' ({', '.join(sorted(layer.leaves))}) reads as a LayerNorm, or "
                "as a BatchNorm saved without its batch statistics, and the model has both kinds: no name says "
                f"which. Fix: pass mapping={{'{layer.name}': 'module.path'}} (its kind follows the module's), or "
                "save the statistics with it (linen: {'params': ..., 'batch_stats': ...}; nnx: nnx.state(model), "
                "not its nnx.Param part alone)."
            )
