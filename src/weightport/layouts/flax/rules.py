"""The rules per kind: which Flax leaves fill which PyTorch tensor of a paired slot, through which op,
and what the params cannot say (activations, epsilons, padding), listed as unchecked by :mod:`.notes`.

>>> from weightport.layouts.flax.layers import Layer
>>> from weightport.layouts.slots import Paired, Slot, SourceLayer
>>> from weightport.sources import open_source
>>> import numpy as np, torch
>>> src = open_source({"Dense_0/kernel": np.ones((3, 2), np.float32)})
>>> layer = Layer("Dense_0", "Linear", "Dense", {"kernel": "Dense_0/kernel"})
>>> pair = Paired(SourceLayer("Dense_0", "Linear"), Slot("fc", torch.nn.Linear(3, 2), "Linear"), "by name")
>>> [r.describe() for r in layer_rules(layer, pair, src)]
['Dense_0/kernel -> fc.weight (transpose)']
"""

from __future__ import annotations

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import Rule
from weightport.layouts.flax.attention import ATTENTION, attention_rules, dense_general_rules
from weightport.layouts.flax.cells import CellSpec
from weightport.layouts.flax.convolutions import conv_transpose_rules
from weightport.layouts.flax.facts import FRAMEWORK, T, conv_axes
from weightport.layouts.flax.layers import DENSE_GENERAL, Layer
from weightport.layouts.flax.notes import unchecked
from weightport.layouts.slots import Paired
from weightport.sources.base import Source
from weightport.transforms import Identity, Op, Transpose, Zeros

__all__ = ["layer_rules", "unchecked", "MISSING_STATS"]

MISSING_STATS = (
    "Flax keeps a BatchNorm's running statistics apart from its params (linen's batch_stats collection, nnx's "
    "BatchStat variables), and this source lacks them: save the whole variables dict ({'params': ..., "
    "'batch_stats': ...}), or nnx.state(model) whole, not its nnx.Param part; only if "
    "the Flax model's were never updated (both start at mean 0, var 1), pass strict=False to keep the "
    "module's own"
)
"""Why a BatchNorm read from params alone has no running statistics, and what to do."""


def layer_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """The rules that put ``layer`` into ``pair.slot``: a cell's, an attention's, or a plain layer's."""
    if layer.cell is not None:
        return cell_rules(layer, pair, source)
    if layer.kind == ATTENTION:
        return attention_rules(layer, pair, source)
    if layer.detail == DENSE_GENERAL:
        return dense_general_rules(layer, pair, source)
    if layer.kind.startswith("ConvTranspose"):
        return conv_transpose_rules(layer, pair, source)
    return plain_rules(layer, pair, source)


def cell_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """A recurrent cell's rules (both directions of a ``Bidirectional``), after checking the slot can run it."""
    slot = pair.slot
    module = slot.module
    if getattr(module, "proj_size", 0):
        raise UnsupportedConfigError(
            f"Flax layer '{layer.name}' -> '{slot.label}': {slot.describe()} has proj_size={module.proj_size}, "
            "which Flax LSTM cells do not have. Fix: build the LSTM with proj_size=0."
        )
    bidirectional = layer.backward is not None
    if pair.side and bidirectional:
        raise LayoutError(
            f"Flax layer '{layer.name}' -> '{slot.label}:{pair.side}': the layer is bidirectional (forward_rnn and "
            f"backward_rnn) and fills both directions. Fix: map it to '{slot.label}' without ':{pair.side}'."
        )
    if pair.side:  # one direction of a bidirectional module, as mapping= says
        return _direction_rules(layer, pair, source, reverse=pair.side == "reverse")
    if bidirectional != slot.bidirectional:
        have = "is bidirectional (forward_rnn and backward_rnn)" if bidirectional else "runs one direction"
        fix = "bidirectional=True" if bidirectional else "bidirectional=False"
        raise LayoutError(
            f"Flax layer '{layer.name}' {have} but '{slot.label}' is {slot.describe()}. "
            f"Fix: build it with {fix}, or pass mapping= to pair the layers yourself."
        )
    rules = _direction_rules(layer, pair, source, reverse=False)
    if layer.backward is not None:
        rules += _direction_rules(layer, pair, source, reverse=True, cell=layer.backward)
    return rules


def _direction_rules(
    layer: Layer,
    pair: Paired,
    source: Source,
    *,
    reverse: bool,
    cell: tuple[CellSpec, dict[str, str]] | None = None,
) -> list[Rule]:
    """The rules of one direction of ``pair.slot`` from one cell: ``layer``'s own, or ``cell`` (its backward_rnn)."""
    assert layer.cell is not None
    spec, leaves = cell or (layer.cell, layer.leaves)
    hidden = int(source.infos[leaves[spec.hidden]].shape[0])
    where = "backward_rnn of " if cell is not None else ""
    rules = []
    for param, (roles, make) in spec.load.items():
        op = make if isinstance(make, Op) else make(hidden)
        rules.append(
            Rule(
                pair.slot.name(param, reverse=reverse),
                tuple(leaves[r] for r in roles),
                op,
                origin=f"{FRAMEWORK} {where}'{layer.name}' ({spec.flavor})",
            )
        )
    return rules


def plain_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """A Dense, Conv, Embed, LayerNorm or BatchNorm: one rule per leaf (and a zero batch count)."""
    slot = pair.slot
    origin = f"{FRAMEWORK} '{layer.name}' ({layer.detail})"
    rules = []
    for role, name in layer.leaves.items():
        if role == "kernel":
            rank = len(source.infos[name].shape)
            op: Op = T if rank == 2 else Transpose(conv_axes(rank))
            rules.append(Rule(slot.name("weight"), (name,), op, origin))
        else:
            param = {
                "bias": "bias",
                "embedding": "weight",
                "scale": "weight",
                "mean": "running_mean",
                "var": "running_var",
            }[role]
            rules.append(Rule(slot.name(param), (name,), Identity(), origin))
    if layer.kind == "BatchNorm" and getattr(slot.module, "num_batches_tracked", None) is not None:
        rules.append(
            Rule(slot.name("num_batches_tracked"), (), Zeros(()), f"{origin}: Flax keeps no batch count")
        )
    return rules
