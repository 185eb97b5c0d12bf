"""The Flax layers a tree holds: each recognised by its children's names, wherever it sits.

A node whose children are a known cell's gates is a recurrent cell (a ``Bidirectional``
node pairs its ``forward_rnn`` and ``backward_rnn`` cells); a node whose children are all
arrays is a Dense, Conv, Embed, LayerNorm or BatchNorm, by their names and the kernel's rank.

>>> import numpy as np
>>> from weightport.sources import open_source
>>> src = open_source({"params": {"Dense_0": {"kernel": np.ones((3, 2), np.float32)},
...                               "Embed_0": {"embedding": np.ones((5, 2), np.float32)}}})
>>> [(layer.name, layer.kind) for layer in layers_in(src)]
[('Dense_0', 'Linear'), ('Embed_0', 'Embedding')]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from weightport.errors import UnsupportedConfigError
from weightport.layouts.flax.attention import ATTENTION, PROJECTIONS, attention_node
from weightport.layouts.flax.cells import CELLS, GATE_NAME, UNSUPPORTED_CELLS, CellSpec, with_article
from weightport.layouts.flax.facts import ROOT, STATS
from weightport.layouts.flax.tree import Tree, leaves_of, model_tree, ordered, tree_of
from weightport.sources.base import Source

__all__ = ["Layer", "layers_in", "DENSE_GENERAL"]

DENSE_GENERAL = "DenseGeneral"
_DENSE_GENERAL = re.compile(r"^(DenseGeneral|LinearGeneral)_\d+$")  # linen's auto names


def layers_in(source: Source) -> list[Layer]:
    """The Flax layers of ``source``, in the tree's order (numbered siblings in numeric order)."""
    layers: list[Layer] = []
    _find_layers(model_tree(tree_of(list(source.infos))), "", source, layers)
    return layers


@dataclass
class Layer:
    """One recognised Flax layer: name, kind, and its leaves by role."""

    name: str
    kind: str
    detail: str
    leaves: dict[str, str] = field(default_factory=dict)  # leaf relative to the layer -> source name
    cell: CellSpec | None = None
    backward: tuple[CellSpec, dict[str, str]] | None = None  # a Bidirectional's backward cell
    parts: list[Layer] = field(default_factory=list)  # an attention layer's own layers, where it is split


def _cell(path: str, node: Tree, source: Source) -> tuple[CellSpec, dict[str, str]] | None:
    """The cell spec ``node`` is, or None; UnsupportedConfigError for a cell PyTorch has no match for."""
    children = frozenset(node)
    if not children or not all(isinstance(v, dict) for v in node.values()):
        return None
    leaves = leaves_of(node)
    kernels = [tuple(source.infos[v].shape) for k, v in leaves.items() if k.endswith("kernel")]
    if len({k[-1:] for k in kernels}) > 1:
        return None  # each gate of a cell, input or hidden side, has H (or blocks * H) outputs: not a cell
    if children == {"ih", "hh"} and all(len(k) == 2 for k in kernels):
        return None  # a ConvLSTMCell's ih/hh are convolutions: two Dense layers of that name are no cell
    found = ", ".join(f"{k} {tuple(source.infos[v].shape)}" for k, v in leaves.items())
    if children in UNSUPPORTED_CELLS:
        raise UnsupportedConfigError(
            f"{source.description}: Flax layer '{path}' is a {UNSUPPORTED_CELLS[children]}; found {found}. "
            "Fix: port it by hand, or leave it out of the source."
        )
    candidates = [spec for spec in CELLS if spec.children == children]
    for spec in candidates:
        if spec.leaves != frozenset(leaves):
            continue
        hidden = source.infos[leaves[spec.hidden]].shape
        if spec.fused and (len(hidden) != 2 or hidden[1] != spec.blocks * hidden[0]):
            continue
        return spec, leaves
    if candidates or (len(children) > 1 and all(GATE_NAME.match(c) for c in children)):
        if candidates:
            expected = "; ".join(_difference(spec, leaves, source) for spec in candidates)
        else:
            expected = "one of: " + "; ".join(f"{s.flavor} ({', '.join(sorted(s.leaves))})" for s in CELLS)
        raise UnsupportedConfigError(
            f"{source.description}: Flax layer '{path}' looks like a recurrent cell but matches none PyTorch "
            f"can run; found {found}. Expected {expected}. Fix: port it by hand, or leave it out of the source."
        )
    return None


def _difference(spec: CellSpec, leaves: Mapping[str, str], source: Source) -> str:
    """How ``leaves`` differ from what ``spec`` needs, for messages."""
    missing = sorted(spec.leaves - set(leaves))
    extra = sorted(set(leaves) - spec.leaves)
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unexpected {', '.join(extra)}"] if extra else []
    if not parts:
        shape = tuple(source.infos[leaves[spec.hidden]].shape)
        parts = [f"{spec.hidden} of shape (H, {spec.blocks}*H), not {shape}"]
    return f"{with_article(spec.flavor)} ({'; '.join(parts)})"


def _rnn_cell(path: str, node: object, source: Source) -> tuple[CellSpec, dict[str, str]] | None:
    """The cell of an ``nn.RNN`` node (``node/cell``), or of a bare cell node."""
    if not isinstance(node, dict):
        return None
    found = _cell(path, node, source)
    if found is None and isinstance(node.get("cell"), dict):
        found = _cell(f"{path}/cell", node["cell"], source)  # type: ignore[arg-type]
    return found


def _refuse_stacked(path: str, leaves: Mapping[str, str], source: Source) -> None:
    """Refuse a Dense or Conv stacked along a new axis 0 (``nn.scan``/``nn.vmap`` over ``params``): its bias
    ``(layers, out)`` is not the kernel's trailing (feature) axes, as a DenseGeneral's bias is."""
    if "bias" not in leaves:
        return
    kernel = tuple(source.infos[leaves["kernel"]].shape)
    bias = tuple(source.infos[leaves["bias"]].shape)
    if len(bias) < 2 or bias == kernel[-len(bias) :] or len(kernel) < 3:
        return
    if bias[0] != kernel[0] or bias[1:] != kernel[len(kernel) - len(bias) + 1 :]:
        return
    raise UnsupportedConfigError(
        f"{source.description}: Flax layer '{path}' has kernel {kernel} and bias {bias}: {bias[0]} layers "
        f"stacked along axis 0 (by nn.scan or nn.vmap over 'params'), each a kernel {kernel[1:]} and a bias "
        f"{bias[1:]}; a DenseGeneral's bias would be the kernel's last axes. weightport does not unstack "
        "scanned layers. Fix: unstack the arrays along axis 0 into one entry per layer "
        "(array[i] for layer i), convert them to PyTorch's layout, and load them by name."
    )


def _plain(path: str, node: Tree, source: Source) -> Layer | None:
    """A layer whose children are all arrays: Dense, Conv, Embed, LayerNorm, BatchNorm."""
    if not node or any(isinstance(v, dict) for v in node.values()):
        return None
    leaves: dict[str, str] = dict(node)  # type: ignore[arg-type]
    names = frozenset(leaves)
    if "kernel" in names and names <= {"kernel", "bias"}:
        rank = len(source.infos[leaves["kernel"]].shape)
        _refuse_stacked(path, leaves, source)
        if rank == 2:
            return Layer(path, "Linear", "Dense", leaves)
        bias_rank = len(source.infos[leaves["bias"]].shape) if "bias" in leaves else 1
        if rank > 2 and (bias_rank > 1 or _DENSE_GENERAL.match(path.rsplit("/", 1)[-1])):
            return Layer(path, "Linear", DENSE_GENERAL, leaves)  # a Conv's bias is (out,); its name is Conv_#
        if 3 <= rank <= 5:
            return Layer(path, f"Conv{rank - 2}d", f"Conv ({rank - 2}-D)", leaves)
        return None
    if names == {"embedding"}:
        return Layer(path, "Embedding", "Embed", leaves)
    if set(STATS) <= names <= {"scale", "bias", *STATS}:
        return Layer(path, "BatchNorm", "BatchNorm", leaves)
    if names and names <= {"scale", "bias"}:
        is_batch = path.rsplit("/", 1)[-1].startswith("BatchNorm")
        return Layer(
            path, "BatchNorm" if is_batch else "LayerNorm", "BatchNorm" if is_batch else "LayerNorm", leaves
        )
    return None


def _attention(name: str, node: Tree, source: Source) -> Layer | None:
    """A Flax attention node: one layer, with its query/key/value/out (and q/k norms) as its parts."""
    leaves = attention_node(node, source)
    if leaves is None:
        return None
    parts = []
    for key in node:
        part = _plain(f"{name}/{key}", node[key], source)  # type: ignore[arg-type]
        if part is None:
            return None
        if key in PROJECTIONS:
            part.kind, part.detail = "Linear", DENSE_GENERAL
        parts.append(part)
    return Layer(name, ATTENTION, "MultiHeadDotProductAttention", leaves, parts=parts)


def _find_layers(node: Tree, path: str, source: Source, out: list[Layer]) -> None:
    name = path or ROOT
    attention = _attention(name, node, source)
    if attention is not None:
        out.append(attention)
        return
    found = _cell(name, node, source)
    if found is not None:
        spec, leaves = found
        out.append(Layer(name, spec.kind, spec.flavor, leaves, spec))
        return
    layer = _plain(name, node, source)
    if layer is not None:
        out.append(layer)
        return
    keys = ordered(list(node))
    if "forward_rnn" in node and "backward_rnn" in node:
        forward = _rnn_cell(f"{path}/forward_rnn".lstrip("/"), node["forward_rnn"], source)
        backward = _rnn_cell(f"{path}/backward_rnn".lstrip("/"), node["backward_rnn"], source)
        if forward and backward and forward[0].kind == backward[0].kind:
            flavors = dict.fromkeys((forward[0].flavor, backward[0].flavor))
            out.append(
                Layer(
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
