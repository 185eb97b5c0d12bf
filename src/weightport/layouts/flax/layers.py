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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from weightport.errors import UnsupportedConfigError
from weightport.layouts.flax.attention import ATTENTION, PROJECTIONS, Heads, attention_node
from weightport.layouts.flax.cells import CELLS, GATE_NAME, UNSUPPORTED_CELLS, CellSpec, with_article
from weightport.layouts.flax.facts import ROOT, STATS
from weightport.layouts.flax.tree import Tree, leaves_of, model_tree, ordered, separator, tree_of
from weightport.sources.base import Source

__all__ = ["Layer", "layers_in", "DENSE_GENERAL"]

DENSE_GENERAL = "DenseGeneral"
_DENSE_GENERAL = re.compile(r"^(DenseGeneral|LinearGeneral)_\d+$")  # linen's auto names
_DENSE = re.compile(r"^Dense_\d+$")  # linen's auto name of an nn.Dense, whose kernel is (in, out)
_LIFTED = re.compile(r"^(Scan|Vmap)[A-Z]\w*_\d+$")  # linen's auto name of nn.scan(Block) / nn.vmap(Block)


def layers_in(source: Source) -> list[Layer]:
    """The Flax layers of ``source``, in the tree's order (numbered siblings in numeric order)."""
    layers: list[Layer] = []
    names = list(source.infos)
    _find_layers(model_tree(tree_of(names, separator(names))), "", source, layers)
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
    shapes: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # a plain layer's leaves' shapes, by role
    heads: Heads | None = None  # an attention's projection, split into a Linear: the heads its kernel records


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


def _stack_axes(kernel: tuple[int, ...], bias: tuple[int, ...]) -> int:
    """How many leading axes ``bias`` shares with ``kernel`` before its feature axes (0: none, as a Dense's or a
    DenseGeneral's bias is the kernel's trailing axes): a stack's, or a DenseGeneral's ``batch_dims``."""
    if len(bias) < 2 or len(kernel) <= len(bias) or bias == kernel[len(kernel) - len(bias) :]:
        return 0
    for lead in range(1, len(bias)):
        if bias[:lead] == kernel[:lead] and bias[lead:] == kernel[len(kernel) - len(bias) + lead :]:
            return lead
    return 0


def _stack_reading(kernel: tuple[int, ...], bias: tuple[int, ...] | None, lead: int) -> str:
    """``3 layers stacked along axis 0 (by nn.scan or nn.vmap over 'params'), each a kernel (6, 4) ...``."""
    axes = "axis 0" if lead == 1 else f"axes 0-{lead - 1} {kernel[:lead]}"
    each = f"a kernel {kernel[lead:]}" + (f" and a bias {bias[lead:]}" if bias else "")
    return f"{math.prod(kernel[:lead])} layers stacked along {axes} (by nn.scan or nn.vmap over 'params'), each {each}"


_UNSTACK = (
    "unstack the arrays along the stacked axes into one entry per layer (array[i] for layer i), convert them to "
    "PyTorch's layout, and load them by name"
)
_BATCHED = (
    "compute it in PyTorch with the arrays as they are (batch_dims=(0,): torch.einsum('b...i,bio->b...o', x, "
    "kernel), plus bias[b] on entry b), and leave its entries out of the source you load"
)


def _scanned(path: str, kernel_name: str) -> str:
    """Why a stacked layer is refused, and the lines that load it: its scanned module's arrays unstacked into
    one entry per layer (``layers/0/Dense_0``, as a loop of modules names them), loaded with layout='flax'.
    The scanned module is the one linen named ``ScanBlock_0`` (or ``Vmap...``), else the layer's parent."""
    parts = path.split("/")
    lifted = [n for n, part in enumerate(parts[:-1]) if _LIFTED.match(part)]
    end = lifted[-1] + 1 if lifted else len(parts) - 1
    at = kernel_name.rfind(path)
    if end == 0 or at < 0:
        return "weightport does not unstack scanned layers. Fix: " + _UNSTACK
    scan = kernel_name[:at] + "/".join(parts[:end])
    return (
        f"weightport does not unstack scanned layers, but loads them unstacked. Fix: split each array of the "
        f"scanned module '{scan}' along axis 0 into one entry per layer, named '{scan}/<i>/...' as a loop of "
        "modules names them, and load that with layout='flax' (the layers then pair as any others: by name, "
        f"into e.g. a ModuleList '{parts[end - 1]}', or by kind and order; source: the file or pytree you "
        f"loaded): k = '{scan}'; s = weightport.open_source(source); arrays = {{n: s.read(n) for n in s.infos "
        f"if not n.startswith(k + '/')}}; arrays |= {{f'{{k}}/{{i}}/{{n[len(k) + 1:]}}': a for n in s.infos "
        "if n.startswith(k + '/') for i, a in enumerate(s.read(n))}; weightport.load(model, arrays, "
        "layout='flax')"
    )


_PER_ENTRY = "no nn.Linear computes that: it applies one weight to every entry. Fix: " + _BATCHED


def _refuse_stacked(path: str, leaves: Mapping[str, str], source: Source) -> None:
    """Refuse a kernel that holds several: a Dense or Conv stacked along new leading axes (``nn.scan``/
    ``nn.vmap`` over ``params``), or a DenseGeneral with ``batch_dims``. A bias that repeats the kernel's
    leading axes before its features shows either, and Flax's names tell which where Flax named the layer
    (``Dense_0``, ``DenseGeneral_0``, inside ``ScanBlock_0``); else both readings are listed. A ``Dense_#``'s
    kernel is (in, out), so one of higher rank is a stack, with a bias or without."""
    kernel = tuple(int(d) for d in source.infos[leaves["kernel"]].shape)
    bias = tuple(int(d) for d in source.infos[leaves["bias"]].shape) if "bias" in leaves else None
    last = path.rsplit("/", 1)[-1]
    where = f"{source.description}: Flax layer '{path}' has kernel {kernel}"
    where += f" and bias {bias}" if bias else ""
    lead = _stack_axes(kernel, bias) if bias else 0
    dense = _DENSE.match(last) is not None
    if dense and len(kernel) > 2 and not lead:
        reading = _stack_reading(kernel, bias, len(kernel) - 2)
        raise UnsupportedConfigError(
            f"{where}: a Flax Dense's kernel is (in, out), so this is {reading}; {_scanned(path, leaves['kernel'])}"
        )
    if not lead:
        return
    stacked, count = _stack_reading(kernel, bias, lead), math.prod(kernel[:lead])
    batched = f"a DenseGeneral with batch_dims={tuple(range(lead))}, a kernel {kernel[lead:]} and a bias "
    batched += f"{bias[lead:]} for each of the {count} entries of its input's batch axes"  # type: ignore[index]
    if _DENSE_GENERAL.match(last):
        raise UnsupportedConfigError(f"{where}: {batched}; {_PER_ENTRY}.")
    lifted = any(_LIFTED.match(part) for part in path.split("/")[:-1])
    if dense or lifted or last.startswith(("Conv_", "ConvTranspose_")):
        raise UnsupportedConfigError(f"{where}: {stacked}; {_scanned(path, leaves['kernel'])}")
    raise UnsupportedConfigError(
        f"{where}, which reads two ways, neither of which a PyTorch layer computes: {stacked}; or {batched}. "
        f"Fix: for stacked layers, {_UNSTACK}; for a DenseGeneral, {_BATCHED}."
    )


def _plain(path: str, node: Tree, source: Source) -> Layer | None:
    """A layer whose children are all arrays: Dense, Conv, Embed, LayerNorm, BatchNorm; with its shapes."""
    layer = _plain_kind(path, node, source)
    if layer is not None:
        layer.shapes = {
            role: tuple(int(d) for d in source.infos[name].shape) for role, name in layer.leaves.items()
        }
    return layer


def _plain_kind(path: str, node: Tree, source: Source) -> Layer | None:
    """The plain layer ``node`` is, by its leaves' names, the kernel's rank and Flax's name for it."""
    if not node or any(isinstance(v, dict) for v in node.values()):
        return None
    leaves: dict[str, str] = dict(node)  # type: ignore[arg-type]
    names = frozenset(leaves)
    if "kernel" in names and names <= {"kernel", "bias"}:
        rank = len(source.infos[leaves["kernel"]].shape)
        _refuse_stacked(path, leaves, source)
        if rank == 2:  # a DenseGeneral of one input and one feature axis, where linen's name says so
            detail = DENSE_GENERAL if _DENSE_GENERAL.match(path.rsplit("/", 1)[-1]) else "Dense"
            return Layer(path, "Linear", detail, leaves)
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
