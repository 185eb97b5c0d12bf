"""The Flax layout: linen and nnx params (``(in, out)`` kernels, one Dense per gate) into PyTorch.

A Flax pytree (from a msgpack file, a flat ``.npz`` with ``/``-joined keys, a
nested dict / ``FrozenDict``, or an nnx ``State``) is walked in its own order and
each layer is recognised by the names of its children, wherever it sits:
``<attr>/cell/...`` for ``nn.RNN(cell)`` attributes, ``LSTMCell_0/...`` for cells
bound inside ``@nn.compact``, with or without the ``params/`` and
``batch_stats/`` collection prefixes (which are merged); a ``TrainState``'s
``opt_state`` and ``step`` are listed as ignored (training state, not weights),
and other top-level entries are left unmatched.
An nnx ``State`` saved as a pytree holds each array one level down, as the
variable's attribute (``kernel/value``; ``kernel/raw_value`` in Flax 0.8): such a
node reads as its array.
Layers pair with the module's by order within kind (``pairing.pair_layers``), or
as ``mapping={"<layer name>": "module.path[layer]"}`` says; a layer's name is
its path without the collection prefix, e.g. ``"encoder/cell"``, ``"Dense_0"``.

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
``Conv``: kernel (k..., in, out), bias             Conv1d/2d/3d    ``weight`` axes (out, in, k...)
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

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import LayoutPlan, Rule
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
from weightport.sources.base import Source
from weightport.transforms import (
    Chain,
    Concat,
    Identity,
    Op,
    PadBlocks,
    SliceBlocks,
    Sum,
    Transpose,
    Zeros,
)

__all__ = ["NAME", "claims", "plan", "export", "APIS", "COLLECTIONS"]

NAME = "flax"
FRAMEWORK = "Flax"
APIS = ("linen", "nnx")
COLLECTIONS = ("params", "batch_stats")
# A flax.training TrainState's other top-level fields: optimizer moments and the step, never weights.
TRAINING_STATE = ("opt_state", "step")
ROOT = "(root)"  # the name of a layer whose params sit at the top of the tree
_STATS = ("mean", "var")
_RECURRENT = ("LSTM", "GRU", "RNN")

_T = Transpose((1, 0))
Tree = dict[str, "Tree | str"]  # a node's children; a leaf is its full source name
OpOrSized = Op | Callable[[int], Op]  # an op, or one made from the hidden size


def _zeros(blocks: int) -> Callable[[int], Op]:
    def make(hidden: int) -> Op:
        return Zeros((blocks * hidden,))

    return make


def _gates_in(names: Sequence[str], leaf: str, blocks: int) -> tuple[tuple[str, ...], Op]:
    """Rule parts for a PyTorch tensor made of one Flax Dense per gate: kernels or biases, concatenated."""
    op: Op = Chain(Concat(1, blocks), _T) if leaf == "kernel" else Concat(0, blocks)
    return tuple(f"{n}/{leaf}" for n in names), op


@dataclass(frozen=True)
class _CellSpec:
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


def _per_gate_lstm(flavor: str, forget: str) -> _CellSpec:
    i_side = ("ii", forget, "ig", "io")
    h_side = ("hi", "hf", "hg", "ho")
    export: dict[str, tuple[tuple[str, ...], Op]] = {}
    for k, (i, h) in enumerate(zip(i_side, h_side)):
        export[f"{i}/kernel"] = (("weight_ih",), Chain(SliceBlocks(0, k, 4), _T))
        export[f"{h}/kernel"] = (("weight_hh",), Chain(SliceBlocks(0, k, 4), _T))
        export[f"{h}/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, k, 4)))
    return _CellSpec(
        flavor,
        "LSTM",
        4,
        load={
            "weight_ih": _gates_in(i_side, "kernel", 4),
            "weight_hh": _gates_in(h_side, "kernel", 4),
            "bias_ih": ((), _zeros(4)),
            "bias_hh": _gates_in(h_side, "bias", 4),
        },
        export=export,
        hidden="hi/kernel",
    )


def _linen_gru() -> _CellSpec:
    i_side, h_side = ("ir", "iz", "in"), ("hr", "hz", "hn")
    export: dict[str, tuple[tuple[str, ...], Op]] = {}
    for k, (i, h) in enumerate(zip(i_side, h_side)):
        export[f"{i}/kernel"] = (("weight_ih",), Chain(SliceBlocks(0, k, 3), _T))
        export[f"{h}/kernel"] = (("weight_hh",), Chain(SliceBlocks(0, k, 3), _T))
    export["ir/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, 0, 3)))
    export["iz/bias"] = (("bias_ih", "bias_hh"), Chain(Sum(2), SliceBlocks(0, 1, 3)))
    export["in/bias"] = (("bias_ih",), SliceBlocks(0, 2, 3))
    export["hn/bias"] = (("bias_hh",), SliceBlocks(0, 2, 3))
    return _CellSpec(
        "linen GRUCell",
        "GRU",
        3,
        load={
            "weight_ih": _gates_in(i_side, "kernel", 3),
            "weight_hh": _gates_in(h_side, "kernel", 3),
            "bias_ih": _gates_in(i_side, "bias", 3),
            "bias_hh": (("hn/bias",), PadBlocks(0, 2, 3)),
        },
        export=export,
        hidden="hr/kernel",
    )


def _fused(flavor: str, kind: str, blocks: int, i: str, h: str, bias_on_h: bool) -> _CellSpec:
    """A cell with one Dense for the input side and one for the hidden side (nnx; linen SimpleCell)."""
    load: dict[str, tuple[tuple[str, ...], OpOrSized]] = {
        "weight_ih": ((f"{i}/kernel",), _T),
        "weight_hh": ((f"{h}/kernel",), _T),
    }
    export: dict[str, tuple[tuple[str, ...], Op]] = {
        f"{i}/kernel": (("weight_ih",), _T),
        f"{h}/kernel": (("weight_hh",), _T),
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
    return _CellSpec(
        flavor, kind, blocks, load, export, hidden=f"{h}/kernel", fused=True, zero_for_export=zero
    )


_CELLS: tuple[_CellSpec, ...] = (
    _per_gate_lstm("linen LSTMCell", "if"),
    _per_gate_lstm("nnx LSTMCell", "if_"),
    _linen_gru(),
    _fused("linen SimpleCell", "RNN", 1, "i", "h", bias_on_h=False),
    _fused("nnx OptimizedLSTMCell", "LSTM", 4, "dense_i", "dense_h", bias_on_h=True),
    _fused("nnx GRUCell", "GRU", 3, "dense_i", "dense_h", bias_on_h=False),
    _fused("nnx SimpleCell", "RNN", 1, "dense_i", "dense_h", bias_on_h=False),
)
_EXPORT_CELLS = {
    "linen": {"LSTM": _CELLS[0], "GRU": _CELLS[2], "RNN": _CELLS[3]},
    "nnx": {"LSTM": _CELLS[1], "GRU": _CELLS[5], "RNN": _CELLS[6]},
}
_UNSUPPORTED_CELLS = {
    frozenset({"if", "in", "hf", "hn"}): "linen MGUCell (a minimal gated unit: PyTorch has no such layer)",
    frozenset({"ih", "hh"}): "ConvLSTMCell (a convolutional LSTM: PyTorch has no such layer)",
}
_GATE_NAME = re.compile(r"^(?:[ih][a-z]?_?|dense_[ih])$")


def claims(source: Source) -> bool:
    return source.metadata.get("layout") == NAME


# --- reading the tree ------------------------------------------------------------------------------------


def _tree(names: Sequence[str]) -> Tree:
    """Nested dicts from ``/``-joined names, in order; a name clashing with a folder is left out.

    nnx variables stored as their own pytree (``kernel/value``) become leaves (see :func:`_unwrap`).
    """
    root: Tree = {}
    for name in names:
        node = root
        parts = name.split("/")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node.setdefault(parts[-1], name)
    return _unwrap(root)


_VARIABLE_VALUES = ("value", "raw_value")
"""The attribute an nnx ``Variable`` / ``VariableState`` holds its array in, as its pytree key."""


def _unwrap(node: Tree) -> Tree:
    """``{"kernel": {"value": leaf}}`` -> ``{"kernel": leaf}``, everywhere in the tree.

    An nnx ``State`` saved as a pytree (orbax, or any checkpointer that nests by
    ``jax.tree_util`` key paths) stores each variable as a node whose one child is
    its array, under the variable's attribute: ``value`` (``raw_value`` in Flax 0.8).
    The pure-dict form (``State.to_pure_dict()``) has the array there already.

    >>> _unwrap({"Dense": {"kernel": {"value": "Dense/kernel/value"}, "bias": "Dense/bias"}})
    {'Dense': {'kernel': 'Dense/kernel/value', 'bias': 'Dense/bias'}}
    """
    for key, child in node.items():
        if not isinstance(child, dict):
            continue
        if len(child) == 1:
            ((attribute, leaf),) = child.items()
            if attribute in _VARIABLE_VALUES and isinstance(leaf, str):
                node[key] = leaf
                continue
        _unwrap(child)
    return node


def _merge(into: Tree, other: Tree) -> None:
    for key, value in other.items():
        here = into.get(key)
        if here is None:
            into[key] = value
        elif isinstance(here, dict) and isinstance(value, dict):
            _merge(here, value)
        # a clash keeps the first; the other stays unmatched


def _model_tree(root: Tree) -> Tree:
    """The module tree: ``params`` and ``batch_stats`` merged when the tree is a variables dict."""
    collections = [root[c] for c in COLLECTIONS if isinstance(root.get(c), dict)]
    if not collections:
        return root
    merged: Tree = {}
    for tree in collections:
        _merge(merged, tree)  # type: ignore[arg-type]
    return merged


_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_AUTO_NAMED = re.compile(r"^([A-Z]\w*?)_(\d+)$")  # Flax names a compact submodule {Class}_{n}, n per class


def _recorded_order(path: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """Flax's creation order, where its own numbering records it: ``Block_1/Dense_0`` comes after
    ``Block_0/Dense_3`` (group ``Block_#/Dense_#``, position (1, 0)); a name given by the model's
    author (``query``, ``layer/0``) records none.

    >>> _recorded_order("Block_1/Dense_10"), _recorded_order("attention/query")
    ((('Block_#', 'Dense_#'), (1, 10)), None)
    """
    group, position = [], []
    for part in path.split("/"):
        auto = _AUTO_NAMED.match(part)
        group.append(f"{auto[1]}_#" if auto else part)
        if auto:
            position.append(int(auto[2]))
    return (tuple(group), tuple(position)) if position else None


def _name_paths(path: str) -> tuple[str, ...]:
    """Module paths a Flax path may name besides its ``/``-to-``.`` form: linen's ``nn.Sequential``
    files its layers as ``layers_0``, ``layers_1`` where PyTorch's has ``layers.0``.

    >>> _name_paths("rnn/layers_1/cell"), _name_paths("mlp/layers_0")
    (('rnn[1]', 'rnn.layers.1'), ('mlp[0]', 'mlp.layers.0'))
    """
    stacked = _STACKED.match(path)
    # one layer of a stack of RNNs, as export() files it: 'rnn/layers_1/cell' is 'rnn[1]'
    layer = (f"{stacked[1].replace('/', '.')}[{stacked[2]}]",) if stacked else ()
    listed = re.sub(r"_(\d+)(?=/|$)", r".\1", path.removesuffix("/cell")).replace("/", ".")
    return (*layer, listed) if listed != path.replace("/", ".") else layer


_STACKED = re.compile(r"^(.+)/layers_(\d+)(?:/cell)?$")


def _ordered(keys: list[str]) -> list[str]:
    """``keys`` with numbered siblings (``Dense_2``, ``Dense_10``; ``2``, ``10``) in numeric order.

    >>> _ordered(["Dense_0", "Dense_10", "LSTMCell_0", "Dense_2", "head"])
    ['Dense_0', 'Dense_2', 'LSTMCell_0', 'Dense_10', 'head']
    """
    groups: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        match = _NUMBERED.match(key)
        if match:
            groups.setdefault(match[1], []).append(position)
    result = list(keys)
    for positions in groups.values():
        numbered = sorted((keys[p] for p in positions), key=lambda k: int(_NUMBERED.match(k)[2]))  # type: ignore[index]
        for position, key in zip(positions, numbered):
            result[position] = key
    return result


@dataclass
class _Layer:
    """One recognised Flax layer: name, kind, and its leaves by role."""

    name: str
    kind: str
    detail: str
    leaves: dict[str, str] = field(default_factory=dict)  # leaf relative to the layer -> source name
    cell: _CellSpec | None = None
    backward: tuple[_CellSpec, dict[str, str]] | None = None  # a Bidirectional's backward cell


def _leaves(node: Tree, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def _cell(path: str, node: Tree, source: Source) -> tuple[_CellSpec, dict[str, str]] | None:
    """The cell spec ``node`` is, or None; UnsupportedConfigError for a cell PyTorch has no match for."""
    children = frozenset(node)
    if not children or not all(isinstance(v, dict) for v in node.values()):
        return None
    leaves = _leaves(node)
    found = ", ".join(f"{k} {tuple(source.infos[v].shape)}" for k, v in leaves.items())
    if children in _UNSUPPORTED_CELLS:
        raise UnsupportedConfigError(
            f"{source.description}: Flax layer '{path}' is a {_UNSUPPORTED_CELLS[children]}; found {found}. "
            "Fix: port it by hand, or leave it out of the source."
        )
    candidates = [spec for spec in _CELLS if spec.children == children]
    for spec in candidates:
        if spec.leaves != frozenset(leaves):
            continue
        hidden = source.infos[leaves[spec.hidden]].shape
        if spec.fused and (len(hidden) != 2 or hidden[1] != spec.blocks * hidden[0]):
            continue
        return spec, leaves
    if candidates or (len(children) > 1 and all(_GATE_NAME.match(c) for c in children)):
        if candidates:
            expected = "; ".join(_difference(spec, leaves, source) for spec in candidates)
        else:
            expected = "one of: " + "; ".join(f"{s.flavor} ({', '.join(sorted(s.leaves))})" for s in _CELLS)
        raise UnsupportedConfigError(
            f"{source.description}: Flax layer '{path}' looks like a recurrent cell but matches none PyTorch "
            f"can run; found {found}. Expected {expected}. Fix: port it by hand, or leave it out of the source."
        )
    return None


def _difference(spec: _CellSpec, leaves: Mapping[str, str], source: Source) -> str:
    """How ``leaves`` differ from what ``spec`` needs, for messages."""
    missing = sorted(spec.leaves - set(leaves))
    extra = sorted(set(leaves) - spec.leaves)
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unexpected {', '.join(extra)}"] if extra else []
    if not parts:
        shape = tuple(source.infos[leaves[spec.hidden]].shape)
        parts = [f"{spec.hidden} of shape (H, {spec.blocks}*H), not {shape}"]
    return f"{_a(spec.flavor)} ({'; '.join(parts)})"


def _a(flavor: str) -> str:
    return f"{'an' if flavor.startswith('nnx') else 'a'} {flavor}"


def _rnn_cell(path: str, node: object, source: Source) -> tuple[_CellSpec, dict[str, str]] | None:
    """The cell of an ``nn.RNN`` node (``node/cell``), or of a bare cell node."""
    if not isinstance(node, dict):
        return None
    found = _cell(path, node, source)
    if found is None and isinstance(node.get("cell"), dict):
        found = _cell(f"{path}/cell", node["cell"], source)  # type: ignore[arg-type]
    return found


def _plain(path: str, node: Tree, source: Source) -> _Layer | None:
    """A layer whose children are all arrays: Dense, Conv, Embed, LayerNorm, BatchNorm."""
    if not node or any(isinstance(v, dict) for v in node.values()):
        return None
    leaves: dict[str, str] = dict(node)  # type: ignore[arg-type]
    names = frozenset(leaves)
    if "kernel" in names and names <= {"kernel", "bias"}:
        rank = len(source.infos[leaves["kernel"]].shape)
        if rank == 2:
            return _Layer(path, "Linear", "Dense", leaves)
        if 3 <= rank <= 5:
            return _Layer(path, f"Conv{rank - 2}d", f"Conv ({rank - 2}-D)", leaves)
        return None
    if names == {"embedding"}:
        return _Layer(path, "Embedding", "Embed", leaves)
    if set(_STATS) <= names <= {"scale", "bias", *_STATS}:
        return _Layer(path, "BatchNorm", "BatchNorm", leaves)
    if names and names <= {"scale", "bias"}:
        is_batch = path.rsplit("/", 1)[-1].startswith("BatchNorm")
        return _Layer(
            path, "BatchNorm" if is_batch else "LayerNorm", "BatchNorm" if is_batch else "LayerNorm", leaves
        )
    return None


def _find_layers(node: Tree, path: str, source: Source, out: list[_Layer]) -> None:
    name = path or ROOT
    found = _cell(name, node, source)
    if found is not None:
        spec, leaves = found
        out.append(_Layer(name, spec.kind, spec.flavor, leaves, spec))
        return
    layer = _plain(name, node, source)
    if layer is not None:
        out.append(layer)
        return
    keys = _ordered(list(node))
    if "forward_rnn" in node and "backward_rnn" in node:
        forward = _rnn_cell(f"{path}/forward_rnn".lstrip("/"), node["forward_rnn"], source)
        backward = _rnn_cell(f"{path}/backward_rnn".lstrip("/"), node["backward_rnn"], source)
        if forward and backward and forward[0].kind == backward[0].kind:
            flavors = dict.fromkeys((forward[0].flavor, backward[0].flavor))
            out.append(
                _Layer(
                    name,
                    forward[0].kind,
                    f"Bidirectional {' / '.join(flavors)}",
                    forward[1],
                    forward[0],
                    backward,
                )
            )
            keys = [k for k in keys if k not in ("forward_rnn", "backward_rnn")]
    for key in keys:
        child = node[key]
        if isinstance(child, dict):
            _find_layers(child, f"{path}/{key}" if path else key, source, out)


# --- rules -----------------------------------------------------------------------------------------------


def _cell_rules(layer: _Layer, pair: Paired, source: Source) -> list[Rule]:
    slot = pair.slot
    module = slot.module
    if getattr(module, "proj_size", 0):
        raise UnsupportedConfigError(
            f"Flax layer '{layer.name}' -> '{slot.label}': {slot.describe()} has proj_size={module.proj_size}, "
            "which Flax LSTM cells do not have. Fix: build the LSTM with proj_size=0."
        )
    bidirectional = layer.backward is not None
    if bidirectional != slot.bidirectional:
        have = "is bidirectional (forward_rnn and backward_rnn)" if bidirectional else "runs one direction"
        fix = "bidirectional=True" if bidirectional else "bidirectional=False"
        raise LayoutError(
            f"Flax layer '{layer.name}' {have} but '{slot.label}' is {slot.describe()}. "
            f"Fix: build it with {fix}, or pass mapping= to pair the layers yourself."
        )
    assert layer.cell is not None
    directions = [(False, layer.cell, layer.leaves)]
    if layer.backward is not None:
        directions.append((True, *layer.backward))
    rules = []
    for reverse, spec, leaves in directions:
        hidden = int(source.infos[leaves[spec.hidden]].shape[0])
        where = "backward_rnn of " if reverse else ""
        for param, (roles, make) in spec.load.items():
            op = make if isinstance(make, Op) else make(hidden)
            rules.append(
                Rule(
                    slot.name(param, reverse=reverse),
                    tuple(leaves[r] for r in roles),
                    op,
                    origin=f"{FRAMEWORK} {where}'{layer.name}' ({spec.flavor})",
                )
            )
    return rules


def _conv_axes(rank: int) -> tuple[int, ...]:
    """Flax (k..., in, out) -> PyTorch (out, in, k...)."""
    return (rank - 1, rank - 2, *range(rank - 2))


def _plain_rules(layer: _Layer, pair: Paired, source: Source) -> list[Rule]:
    slot = pair.slot
    origin = f"{FRAMEWORK} '{layer.name}' ({layer.detail})"
    rules = []
    for role, name in layer.leaves.items():
        if role == "kernel":
            rank = len(source.infos[name].shape)
            op: Op = _T if rank == 2 else Transpose(_conv_axes(rank))
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


def _unchecked(pairs: list[tuple[_Layer, Paired]]) -> list[str]:
    notes = []
    gated = [p.slot.label for lay, p in pairs if lay.kind in ("LSTM", "GRU")]
    if gated:
        notes.append(
            f"Flax cells' gate_fn and activation_fn ({', '.join(gated)}): PyTorch computes sigmoid gates and "
            "tanh, Flax's defaults; a cell built with others computes something else"
        )
    for lay, p in pairs:
        module = p.slot.module
        if lay.kind == "RNN":
            notes.append(
                f"'{p.slot.label}': Flax SimpleCell's activation_fn (tanh by default) must be the module's "
                f"nonlinearity='{getattr(module, 'nonlinearity', 'tanh')}', and residual=False"
            )
        elif lay.kind == "LayerNorm":
            notes.append(
                f"'{p.slot.label}': the module has eps={getattr(module, 'eps', '?')}; Flax LayerNorm's epsilon "
                "is 1e-6 unless the Flax model set another (transformers: config.layer_norm_eps), and the "
                "module must use the same"
            )
        elif lay.kind == "BatchNorm":
            notes.append(
                f"'{p.slot.label}': Flax BatchNorm's epsilon (1e-5 by default) must equal the module's "
                f"eps={getattr(module, 'eps', '?')}; PyTorch's momentum is 1 - Flax's (0.01 for Flax's 0.99)"
            )
        elif lay.kind.startswith("Conv"):
            notes.append(
                f"'{p.slot.label}': Flax Conv's padding ('SAME' by default; the module has "
                f"padding={getattr(module, 'padding', '?')}), strides and dilation; Flax takes channels-last "
                "inputs, so permute them (and a Dense after a flatten sees channels-last order)"
            )
    return notes


def _settle_norm_kinds(layers: list[_Layer], module: nn.Module) -> None:
    """A scale-and-bias layer not named ``BatchNorm_*`` reads as a LayerNorm, but a BatchNorm saved
    without its ``batch_stats`` (``state.params`` alone, or an nnx ``Param`` filter) looks the same:
    where the module has BatchNorms and no LayerNorm, such layers are BatchNorms (their running
    statistics are then missing, and said to be)."""
    kinds = {slot.kind for slot in module_slots(module)}
    if "LayerNorm" in kinds or "BatchNorm" not in kinds:
        return
    for layer in layers:
        if layer.kind == "LayerNorm":
            layer.kind = layer.detail = "BatchNorm"


def plan(
    module: nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: Mapping[str, int] | None = None,
) -> LayoutPlan:
    """Rules for ``module`` from the Flax layers found in ``source`` (see the module doc).

    Raises:
        UnsupportedConfigError: a layer computes something the PyTorch module cannot.
        LayoutError: layers and the module's slots do not pair, or differ in direction.
    """
    names = list(source.infos)
    layers: list[_Layer] = []
    _find_layers(_model_tree(_tree(names)), "", source, layers)
    _settle_norm_kinds(layers, module)
    wanted = [
        SourceLayer(
            layer.name,
            layer.kind,
            layer.detail,
            paths=_name_paths(layer.name),
            order=_recorded_order(layer.name),
        )
        for layer in layers
    ]

    def rules_for(i: int, slot: Slot) -> list[Rule]:
        layer, pair = layers[i], Paired(wanted[i], slot, "")
        return (
            _cell_rules(layer, pair, source) if layer.cell is not None else _plain_rules(layer, pair, source)
        )

    paired = pair_layers(
        module,
        wanted,
        mapping,
        framework=FRAMEWORK,
        fits=fits_by_rules(module, source, rules_for),
        call_order=call_order,
        where=source.description,
    )
    rules: list[Rule] = []
    for layer, pair in zip(layers, paired):
        if layer.cell is not None:
            rules += _cell_rules(layer, pair, source)
        else:
            rules += _plain_rules(layer, pair, source)
    used = {s for rule in rules for s in rule.sources}
    training = [n for n in names if n not in used and n.split("/", 1)[0] in TRAINING_STATE]
    return LayoutPlan(
        name=NAME,
        rules=rules,
        pairings=as_pairings(paired),
        scope=wrapped_scope(paired),
        unmatched=[n for n in names if n not in used and n not in training],
        not_weights=[f"{n} (training state)" for n in training],
        unchecked=_unchecked(list(zip(layers, paired))),
        missing_hints={
            pair.slot.path: "Flax keeps a BatchNorm's running statistics in the batch_stats collection, which "
            "this source lacks: save the whole variables dict ({'params': ..., 'batch_stats': ...}); only if "
            "the Flax model's were never updated (both start at mean 0, var 1), pass strict=False to keep the "
            "module's own"
            for layer, pair in zip(layers, paired)
            if layer.kind == "BatchNorm" and not set(_STATS) & set(layer.leaves)
        },
    )


# --- export ----------------------------------------------------------------------------------------------


def _layer_path(slot: Slot, names: Mapping[str, str]) -> str:
    if slot.label in names:
        return names[slot.label].strip("/")
    base = slot.path.replace(".", "/") or slot.kind
    if slot.layer is None:
        return base  # a cell or a plain layer: its params sit right here
    num_layers = getattr(slot.module, "num_layers", 1)
    layer = f"{base}/layers_{slot.layer}" if num_layers > 1 else base
    return layer if slot.bidirectional else f"{layer}/cell"


def _export_cell(
    slot: Slot, state: Mapping[str, np.ndarray], api: str, path: str, out: dict[str, np.ndarray]
) -> None:
    module = slot.module
    if getattr(module, "proj_size", 0):
        raise UnsupportedConfigError(
            f"cannot export '{slot.label}' ({slot.describe()}) to Flax: proj_size={module.proj_size} has no "
            "Flax equivalent. Fix: export a model built with proj_size=0."
        )
    spec = _EXPORT_CELLS[api][slot.kind]
    params = "params/" if api == "linen" else ""
    directions = (
        [(False, f"{path}/forward_rnn/cell"), (True, f"{path}/backward_rnn/cell")]
        if slot.bidirectional
        else [(False, path)]
    )
    for reverse, cell_path in directions:
        env: dict[str, np.ndarray] = {}
        for param in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            name = slot.name(param, reverse=reverse)
            env[param] = (
                state[name] if name in state else np.zeros(len(env["weight_hh"]), env["weight_hh"].dtype)
            )
        for param, block in spec.zero_for_export:
            part = SliceBlocks(0, block, spec.blocks)(env[param])
            if np.any(part):
                raise UnsupportedConfigError(
                    f"cannot export '{slot.name(param, reverse=reverse)}' to {_a(spec.flavor)}: its block "
                    f"{block + 1} of {spec.blocks} is non-zero, and that cell has no place for it (b_hn is "
                    "multiplied by the reset gate). Fix: export with api='linen', whose GRUCell has it."
                )
        for leaf, (params_in, op) in spec.export.items():
            out[f"{params}{cell_path}/{leaf}"] = np.ascontiguousarray(op(*(env[p] for p in params_in)))


_PLAIN_EXPORT = {  # PyTorch param -> (Flax leaf, collection in linen)
    "weight": ("kernel", "params"),
    "bias": ("bias", "params"),
    "running_mean": ("mean", "batch_stats"),
    "running_var": ("var", "batch_stats"),
}


def _export_plain(
    slot: Slot, state: Mapping[str, np.ndarray], api: str, path: str, out: dict[str, np.ndarray]
) -> None:
    kind = slot.kind
    module = slot.module
    if kind == "LayerNorm" and len(getattr(module, "normalized_shape", ())) != 1:
        raise UnsupportedConfigError(
            f"cannot export '{slot.label}' ({slot.describe()}) to Flax: LayerNorm over "
            f"{module.normalized_shape} is not a Flax LayerNorm's (one feature axis) scale."
        )
    for param, (leaf, collection) in _PLAIN_EXPORT.items():
        name = slot.name(param)
        if name not in state:
            continue
        array = state[name]
        if param == "weight":
            if kind == "Linear":
                array = _T(array)
            elif kind.startswith("Conv"):
                array = Transpose(_conv_axes(array.ndim)).inverse()(array)
            leaf = {"Embedding": "embedding", "LayerNorm": "scale", "BatchNorm": "scale"}.get(kind, leaf)
        prefix = f"{collection}/" if api == "linen" else ""
        out[f"{prefix}{path}/{leaf}"] = np.ascontiguousarray(array)


_PLAIN_KINDS = {"Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "LayerNorm", "BatchNorm"}


def export(
    module: nn.Module, *, api: str = "linen", names: Mapping[str, str] | None = None
) -> dict[str, np.ndarray]:
    """``module``'s weights as Flax params, by ``/``-joined name; loading them back is the identity.

    Args:
        module: layers of the kinds in the module doc (recurrent ones as cells).
        api: ``"linen"`` (names under ``params/`` and ``batch_stats/``, linen cell
            names) or ``"nnx"`` (no collections; nnx cells, ``LSTMCell`` for LSTMs).
        names: slot label -> Flax layer path (as ``plan`` names layers: the cell
            node, e.g. ``{"lstm[0]": "encoder/cell", "fc": "Dense_0"}``; for a
            bidirectional layer the node holding ``forward_rnn``/``backward_rnn``).
            By default paths follow the module's (``lstm/layers_1/cell``).

    Flax cells have one bias per gate: LSTM biases export as ``bias_ih + bias_hh``,
    linen GRU r/z biases likewise. Loading the result puts them in ``bias_hh``
    (LSTM) or ``bias_ih`` (GRU r/z), so ``export(load(x)) == x`` exactly and the
    module computes the same.

    Raises:
        UnsupportedConfigError: a layer has no Flax equivalent (proj_size, an nnx
            GRU with a non-zero ``b_hn``, other module types).
    """
    from weightport.tensors import numpy_of

    if api not in APIS:
        raise LayoutError(f"unknown Flax api '{api}'; choose one of {', '.join(APIS)}")
    names = dict(names or {})
    slots = module_slots(module)
    unknown = sorted(set(names) - {s.label for s in slots})
    if unknown:
        raise LayoutError(
            f"names= has {', '.join(repr(u) for u in unknown)}, which {type(module).__name__} does not have. "
            f"Its layers: {', '.join(s.label for s in slots) or 'none'}."
        )
    refused = [s.describe() for s in slots if s.kind not in _PLAIN_KINDS and s.kind not in _RECURRENT]
    if refused:
        raise UnsupportedConfigError(
            f"cannot export {type(module).__name__} to the Flax layout: {', '.join(refused)} have no Flax "
            "layer weightport maps (LSTM, GRU, RNN and their cells, Linear, Conv1d/2d/3d, Embedding, "
            "LayerNorm, BatchNorm). Fix: export those layers with weightport.to_numpy instead."
        )
    state = {name: numpy_of(t, copy=True) for name, t in module.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    for slot in slots:
        path = _layer_path(slot, names)
        if slot.kind in _RECURRENT:
            _export_cell(slot, state, api, path, out)
        else:
            _export_plain(slot, state, api, path, out)
    return out


def describe(source: Source) -> list[dict[str, Any]]:
    """The Flax layers recognised in ``source``: name, kind and tensors (for ``weightport inspect``)."""
    layers: list[_Layer] = []
    _find_layers(_model_tree(_tree(list(source.infos))), "", source, layers)
    return [
        {"name": layer.name, "kind": layer.detail or layer.kind, "tensors": sorted(layer.leaves.values())}
        for layer in layers
    ]
