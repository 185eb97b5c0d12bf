"""Flax's recurrent cells: each flavor's params, and the rules between them and PyTorch's, both ways.

A cell is known by its children's names (``ii if ig io hi hf hg ho`` for a linen
``LSTMCell``, ``dense_i dense_h`` for nnx's fused cells); cells PyTorch has no layer
for (``MGUCell``, ``ConvLSTMCell``) are listed so that they are refused by name.

>>> [spec.flavor for spec in CELLS if spec.kind == "GRU"]
['linen GRUCell', 'nnx GRUCell']
>>> sorted(EXPORT_CELLS["nnx"]["LSTM"].children)
['hf', 'hg', 'hi', 'ho', 'if_', 'ig', 'ii', 'io']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from weightport.layouts.flax.facts import T
from weightport.torch_facts import RNN_GATE_COUNT
from weightport.transforms import Chain, Concat, Identity, Op, PadBlocks, SliceBlocks, Sum, Zeros

__all__ = ["CellSpec", "OpOrSized", "CELLS", "EXPORT_CELLS", "UNSUPPORTED_CELLS", "GATE_NAME", "with_article"]

OpOrSized = Op | Callable[[int], Op]  # an op, or one made from the hidden size


def _zeros(blocks: int) -> Callable[[int], Op]:
    def make(hidden: int) -> Op:
        return Zeros((blocks * hidden,))

    return make


def _gates_in(names: Sequence[str], leaf: str, blocks: int) -> tuple[tuple[str, ...], Op]:
    """Rule parts for a PyTorch tensor made of one Flax Dense per gate: kernels or biases, concatenated."""
    op: Op = Chain(Concat(1, blocks), T) if leaf == "kernel" else Concat(0, blocks)
    return tuple(f"{n}/{leaf}" for n in names), op


@dataclass(frozen=True)
class CellSpec:
    """One Flax recurrent cell: its params, and rules both ways.

    ``load``: PyTorch param -> (Flax leaves relative to the cell, op or op-of-hidden-size).
    ``export``: Flax leaf -> (PyTorch params, op). ``fused``: the hidden kernel is
    (H, blocks*H). ``zero_for_export``: PyTorch blocks the Flax cell cannot hold.
    """

    flavor: str
    kind: str
    blocks: int
    load: dict[str, tuple[tuple[str, ...], OpOrSized]]
    export: dict[str, tuple[tuple[str, ...], Op]]
    hidden: str
    fused: bool = False
    zero_for_export: tuple[tuple[str, int], ...] = ()

    @property
    def leaves(self) -> frozenset[str]:
        return frozenset(self.export)

    @property
    def children(self) -> frozenset[str]:
        return frozenset(leaf.split("/")[0] for leaf in self.export)


def _per_gate_lstm(flavor: str, forget: str) -> CellSpec:
    blocks = RNN_GATE_COUNT["LSTM"]
    i_side = ("ii", forget, "ig", "io")
    h_side = ("hi", "hf", "hg", "ho")
    export: dict[str, tuple[tuple[str, ...], Op]] = {}
    for k, (i, h) in enumerate(zip(i_side, h_side)):
        export[f"{i}/kernel"] = (("weight_ih",), Chain(SliceBlocks(0, k, blocks), T))
        export[f"{h}/kernel"] = (("weight_hh",), Chain(SliceBlocks(0, k, blocks), T))
        export[f"{h}/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, k, blocks)))
    return CellSpec(
        flavor,
        "LSTM",
        blocks,
        load={
            "weight_ih": _gates_in(i_side, "kernel", blocks),
            "weight_hh": _gates_in(h_side, "kernel", blocks),
            "bias_ih": ((), _zeros(blocks)),
            "bias_hh": _gates_in(h_side, "bias", blocks),
        },
        export=export,
        hidden="hi/kernel",
    )


def _linen_gru() -> CellSpec:
    blocks = RNN_GATE_COUNT["GRU"]
    i_side, h_side = ("ir", "iz", "in"), ("hr", "hz", "hn")
    export: dict[str, tuple[tuple[str, ...], Op]] = {}
    for k, (i, h) in enumerate(zip(i_side, h_side)):
        export[f"{i}/kernel"] = (("weight_ih",), Chain(SliceBlocks(0, k, blocks), T))
        export[f"{h}/kernel"] = (("weight_hh",), Chain(SliceBlocks(0, k, blocks), T))
    export["ir/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, 0, blocks)))
    export["iz/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, 1, blocks)))
    export["in/bias"] = (("bias_ih",), SliceBlocks(0, 2, blocks))
    export["hn/bias"] = (("bias_hh",), SliceBlocks(0, 2, blocks))
    return CellSpec(
        "linen GRUCell",
        "GRU",
        blocks,
        load={
            "weight_ih": _gates_in(i_side, "kernel", blocks),
            "weight_hh": _gates_in(h_side, "kernel", blocks),
            "bias_ih": _gates_in(i_side, "bias", blocks),
            "bias_hh": (("hn/bias",), PadBlocks(0, 2, blocks)),
        },
        export=export,
        hidden="hr/kernel",
    )


def _fused(flavor: str, kind: str, i: str, h: str, bias_on_h: bool) -> CellSpec:
    """A cell with one Dense for the input side and one for the hidden side (nnx; linen SimpleCell)."""
    blocks = RNN_GATE_COUNT[kind]
    load: dict[str, tuple[tuple[str, ...], OpOrSized]] = {
        "weight_ih": ((f"{i}/kernel",), T),
        "weight_hh": ((f"{h}/kernel",), T),
    }
    export: dict[str, tuple[tuple[str, ...], Op]] = {
        f"{i}/kernel": (("weight_ih",), T),
        f"{h}/kernel": (("weight_hh",), T),
    }
    zero: tuple[tuple[str, int], ...] = ()
    if bias_on_h:
        load["bias_ih"], load["bias_hh"] = ((), _zeros(blocks)), ((f"{h}/bias",), Identity())
        export[f"{h}/bias"] = (("bias_ih", "bias_hh"), Sum(2))
    else:
        load["bias_ih"], load["bias_hh"] = ((f"{i}/bias",), Identity()), ((), _zeros(blocks))
        export[f"{i}/bias"] = (("bias_ih", "bias_hh"), Sum(2))
        if kind == "GRU":
            zero = (("bias_hh", 2),)  # b_hn sits inside r * (...): it cannot move to the input side
    return CellSpec(
        flavor, kind, blocks, load, export, hidden=f"{h}/kernel", fused=True, zero_for_export=zero
    )


CELLS: tuple[CellSpec, ...] = (
    _per_gate_lstm("linen LSTMCell", "if"),
    _per_gate_lstm("nnx LSTMCell", "if_"),
    _linen_gru(),
    _fused("linen SimpleCell", "RNN", "i", "h", bias_on_h=False),
    _fused("nnx OptimizedLSTMCell", "LSTM", "dense_i", "dense_h", bias_on_h=True),
    _fused("nnx GRUCell", "GRU", "dense_i", "dense_h", bias_on_h=False),
    _fused("nnx SimpleCell", "RNN", "dense_i", "dense_h", bias_on_h=False),
)
EXPORT_CELLS = {  # the cell export writes, per api and kind
    "linen": {"LSTM": CELLS[0], "GRU": CELLS[2], "RNN": CELLS[3]},
    "nnx": {"LSTM": CELLS[1], "GRU": CELLS[5], "RNN": CELLS[6]},
}
UNSUPPORTED_CELLS = {
    frozenset({"if", "in", "hf", "hn"}): "linen MGUCell (a minimal gated unit: PyTorch has no such layer)",
    frozenset({"ih", "hh"}): "ConvLSTMCell (a convolutional LSTM: PyTorch has no such layer)",
}
GATE_NAME = re.compile(r"^(?:[ih][a-z]?_?|dense_[ih])$")  # a child name a cell's gate Dense may have


def with_article(flavor: str) -> str:
    """``"a linen GRUCell"``, ``"an nnx GRUCell"``: a flavor as messages name it."""
    return f"{'an' if flavor.startswith('nnx') else 'a'} {flavor}"
