"""The Flax pytree as it comes: nested by ``/``-joined names (``.``-joined where :func:`separator` says), nnx variables unwrapped, collections merged,
and what its names record (Flax's creation order; the module paths they may name).

>>> tree = tree_of(["params/Dense_0/kernel", "params/Dense_0/bias", "batch_stats/BatchNorm_0/mean"])
>>> model_tree(tree)["Dense_0"], list(model_tree(tree))
({'kernel': 'params/Dense_0/kernel', 'bias': 'params/Dense_0/bias'}, ['Dense_0', 'BatchNorm_0'])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from weightport.layouts.base import base_model_prefix
from weightport.layouts.flax.facts import COLLECTIONS, leaves_framework

__all__ = [
    "Tree",
    "separator",
    "tree_of",
    "model_tree",
    "recorded_order",
    "name_paths",
    "ordered",
    "leaves_of",
    "base_model_part",
]

Tree = dict[str, "Tree | str"]  # a node's children; a leaf is its full source name


def separator(names: Sequence[str]) -> str:
    """What joins the paths of ``names``: ``/`` (Flax's own files, weightport's flat ``.npz``), or ``.``
    where no name holds a ``/`` and the ``.``-joined names end in Flax's own leaves, no other framework's
    (``flax.traverse_util.flatten_dict(params, sep=".")``: ``fc1.kernel``, ``ln.scale``). A ``/``-less
    reading would make every such name a parameter of the root module named ``fc1.kernel``.

    >>> separator(["fc1.kernel", "fc1.bias"]), separator(["fc1.weight", "fc1.bias"]), separator(["a.b/kernel"])
    ('.', '/', '/')
    """
    if any("/" in name for name in names) or not any("." in name for name in names):
        return "/"
    return "." if leaves_framework(names) == "flax" else "/"


def tree_of(names: Sequence[str], sep: str = "/") -> Tree:
    """Nested dicts from names joined by ``sep``, in order; a name clashing with a folder is left out.

    nnx variables stored as their own pytree (``kernel/value``) become leaves (see :func:`_unwrap`).
    """
    root: Tree = {}
    for name in names:
        node = root
        parts = name.split(sep)
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


def model_tree(root: Tree) -> Tree:
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


def recorded_order(path: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """Flax's creation order, where its own numbering records it: ``Block_1/Dense_0`` comes after
    ``Block_0/Dense_3`` (group ``Block_#/Dense_#``, position (1, 0)); a name given by the model's
    author (``query``, ``layer/0``) records none.

    >>> recorded_order("Block_1/Dense_10"), recorded_order("attention/query")
    ((('Block_#', 'Dense_#'), (1, 10)), None)
    """
    group, position = [], []
    for part in path.split("/"):
        auto = _AUTO_NAMED.match(part)
        group.append(f"{auto[1]}_#" if auto else part)
        if auto:
            position.append(int(auto[2]))
    return (tuple(group), tuple(position)) if position else None


def name_paths(path: str) -> tuple[str, ...]:
    """Module paths a Flax path may name besides its ``/``-to-``.`` form: linen's ``nn.Sequential``
    files its layers as ``layers_0``, ``layers_1`` where PyTorch's has ``layers.0``; a module holding a list
    attribute of its own name (transformers' Flax ResNet: ``layer/layer_0``) is PyTorch's ``layer.0``.

    >>> name_paths("rnn/layers_1/cell"), name_paths("mlp/layers_0")
    (('rnn[1]', 'rnn.layers.1'), ('mlp[0]', 'mlp.layers.0'))
    >>> name_paths("stages/0/layer/layer_1/convolution")
    ('stages.0.layer.layer.1.convolution', 'stages.0.layer.1.convolution')
    """
    stacked = _STACKED.match(path)
    # one layer of a stack of RNNs, as export() files it: 'rnn/layers_1/cell' is 'rnn[1]'
    layer = (f"{stacked[1].replace('/', '.')}[{stacked[2]}]",) if stacked else ()
    own = path.removesuffix("/cell")
    listed = re.sub(r"_(\d+)(?=/|$)", r".\1", own).replace("/", ".")
    wrapped = re.sub(r"(?:^|(?<=/))([^/]+)/\1_(\d+)(?=/|$)", r"\1/\2", own)
    unwrapped = (wrapped.replace("/", "."),) if wrapped != own else ()
    return (*layer, listed, *unwrapped) if listed != path.replace("/", ".") else layer


_STACKED = re.compile(r"^(.+)/layers_(\d+)(?:/cell)?$")


def ordered(keys: list[str]) -> list[str]:
    """``keys`` with numbered siblings (``Dense_2``, ``Dense_10``; ``2``, ``10``) in numeric order.

    >>> ordered(["Dense_0", "Dense_10", "LSTMCell_0", "Dense_2", "head"])
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


def leaves_of(node: Tree, prefix: str = "") -> dict[str, str]:
    """Every leaf under ``node``: its path relative to ``node`` -> its source name."""
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves_of(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def base_model_part(module: Any, layers: list[Any]) -> tuple[list[Any], str]:
    """transformers' checkpoint of a model with a head (``FlaxBertForMaskedLM``: ``bert/...`` and
    ``cls/...``) loaded into its base model (``BertModel``, whose ``base_model_prefix`` is ``bert`` and
    which has no ``bert`` child): the layers under that prefix, named without it, as transformers' own
    loading takes them, and the prefix; the head's layers are left out (their arrays stay unplaced). Any
    other model's layers are returned as they are, with ``""``."""
    prefix = base_model_prefix(module)
    if prefix is None:
        return layers, ""
    inside = [layer for layer in layers if layer.name.startswith(prefix + "/")]
    if not inside:
        return layers, ""
    for layer in inside:
        layer.name = layer.name[len(prefix) + 1 :]
    return inside, prefix
