"""Flax attention and ``DenseGeneral``: a matmul after a reshape, into ``nn.MultiheadAttention`` or Linears.

A linen ``MultiHeadDotProductAttention`` (nnx ``MultiHeadAttention``) holds four ``DenseGeneral``
layers: ``query``, ``key``, ``value`` with kernels ``(d_in, heads, head_dim)`` and biases
``(heads, head_dim)``, and ``out`` with kernel ``(heads, head_dim, d_out)`` and bias ``(d_out,)``.
Flax scales queries by ``1/sqrt(head_dim)`` as PyTorch does, so into one ``nn.MultiheadAttention``
(one slot, with its ``out_proj``) the kernels reshape to matrices and transpose::

    in_proj_weight  = concat(q, k, v kernels on the heads axis).reshape(E, 3E).T     (3E, E)
    in_proj_bias    = concat(q, k, v biases).reshape(3E)
    q/k/v_proj_weight (kdim, vdim != E) = kernel.reshape(d_in, E).T
    out_proj.weight = out kernel.reshape(E, E).T;  out_proj.bias = out bias

PyTorch's module needs ``num_heads`` equal to Flax's heads and query input, ``heads * head_dim`` and
output all ``embed_dim`` wide: anything else is refused with the sizes (load into separate Linear
modules instead), and so is ``normalize_qk`` (``query_ln``/``key_ln``: PyTorch's module has none).
Where the model has no ``nn.MultiheadAttention`` the four are ``DenseGeneral`` layers, each into
an ``nn.Linear`` of any size: ``weight = kernel.reshape(in, out).T``, where ``in`` is the product of
the kernel's leading axes and ``out`` of the rest, split where the Linear's sizes say.

>>> split_at((32, 4, 8), 32, 32), split_at((4, 8, 32), 32, 32), split_at((3, 5), 4, 4)
(1, 2, None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import Rule
from weightport.layouts.flax.facts import FRAMEWORK, T
from weightport.layouts.flax.tree import Tree
from weightport.sources.base import Source
from weightport.transforms import Chain, Concat, Identity, Op, Reshape

if TYPE_CHECKING:
    from weightport.layouts.flax.layers import Layer
    from weightport.layouts.slots import Paired

__all__ = [
    "ATTENTION",
    "PROJECTIONS",
    "HEAD_COUNTS",
    "HEAD_SIZES",
    "Heads",
    "attention_node",
    "split_at",
    "dense_general_rules",
    "attention_rules",
]

ATTENTION = "MultiheadAttention"  # the slot kind
PROJECTIONS = ("query", "key", "value", "out")
_QK_NORMS = ("query_ln", "key_ln")  # normalize_qk=True
# what an attention module's own code calls its head count and size (PyTorch's, transformers', timm's)
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "nhead", "heads")
HEAD_SIZES = ("head_dim", "attention_head_size", "head_size")


@dataclass(frozen=True, eq=False)  # one per attention: its parts' notes group by it
class Heads:
    """How a Flax attention splits its projections' features (its kernels record it: query ``(in, heads,
    head_dim)``), for one of them loaded into an ``nn.Linear``, which cannot record it; and what the model
    declares: each Linear's path -> the head count or size its parent module holds (``num_heads=4``)."""

    attention: str
    count: int
    size: int
    declared: Mapping[str, tuple[tuple[str, int], ...]]

    def check(self, slot_path: str, label: str) -> None:
        """Refuse a parent module that splits the Linear's features into other heads than Flax's."""
        for attribute, value in self.declared.get(slot_path, ()):
            expected = self.count if attribute in HEAD_COUNTS else self.size
            if value != expected:
                parent = slot_path.rpartition(".")[0]
                owner = f"'{parent}'" if parent else "the model"
                raise UnsupportedConfigError(
                    f"{FRAMEWORK} attention '{self.attention}' splits its projections into {self.count} heads of "
                    f"{self.size} (its kernels record them), but {owner}, which holds '{label}', has "
                    f"{attribute}={value}: the weights fit, the outputs would not. Fix: build {owner} with "
                    f"{attribute}={expected}, or pass mapping= to pair the layers yourself."
                )


def attention_node(node: Tree, source: Source) -> dict[str, str] | None:
    """The leaves (``query/kernel`` -> source name) of an attention node, or None if ``node`` is not one."""
    if not set(PROJECTIONS) <= set(node) or not set(node) <= {*PROJECTIONS, *_QK_NORMS}:
        return None
    leaves: dict[str, str] = {}
    for part in node:
        child = node[part]
        if not isinstance(child, dict) or any(isinstance(v, dict) for v in child.values()):
            return None
        for role, name in child.items():
            leaves[f"{part}/{role}"] = name  # type: ignore[assignment]
    for part in PROJECTIONS:
        kernel = leaves.get(f"{part}/kernel")
        if (
            kernel is None
            or len(source.infos[kernel].shape) != 3
            or not set(node[part]) <= {"kernel", "bias"}
        ):
            return None
    return leaves


def split_at(kernel: tuple[int, ...], in_features: int, out_features: int) -> int | None:
    """The axis where a DenseGeneral kernel's input axes end, for a Linear of these sizes (None: none fits).

    Splits that fit differ only by axes of size 1, which reshape the same.
    """
    for at in range(1, len(kernel)):
        if math.prod(kernel[:at]) == in_features and math.prod(kernel[at:]) == out_features:
            return at
    return None


def _shape(source: Source, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in source.infos[name].shape)


def _as_matrix(kernel: tuple[int, ...], at: int) -> Op:
    """A DenseGeneral kernel as a PyTorch weight: reshape to (in, out), then transpose."""
    return Chain(Reshape(kernel, (math.prod(kernel[:at]), math.prod(kernel[at:]))), T)


def dense_general_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """A DenseGeneral (kernel of rank 3 or more) into an ``nn.Linear``: a matmul after a reshape."""
    slot = pair.slot
    origin = f"{FRAMEWORK} '{layer.name}' (DenseGeneral)"
    if layer.heads is not None:
        layer.heads.check(slot.path, slot.label)
    kernel = _shape(source, layer.leaves["kernel"])
    size_in, size_out = getattr(slot.module, "in_features", 0), getattr(slot.module, "out_features", 0)
    bias = layer.leaves.get("bias")
    if bias is None:
        at = split_at(kernel, size_in, size_out)
    else:  # the bias has the feature axes' shape: it says where the split is
        at = len(kernel) - len(_shape(source, bias))
        fits = at > 0 and kernel[at:] == _shape(source, bias)
        at = at if fits and (math.prod(kernel[:at]), math.prod(kernel[at:])) == (size_in, size_out) else None
    if at is None:
        raise LayoutError(
            f"{FRAMEWORK} DenseGeneral '{layer.name}' has kernel {kernel}"
            + (f" and bias {_shape(source, bias)}" if bias else "")
            + f", which no split into (in, out) makes the {size_in} -> {size_out} of '{slot.label}' "
            f"({slot.describe()}). Fix: build it as nn.Linear(in, out) with in the product of the kernel's "
            "input axes and out of its feature axes, or pass mapping= to pair the layers yourself."
        )
    rules = [Rule(slot.name("weight"), (layer.leaves["kernel"],), _as_matrix(kernel, at), origin)]
    if bias is not None:
        shape = _shape(source, bias)
        op: Op = Identity() if len(shape) == 1 else Reshape(shape, (math.prod(shape),))
        rules.append(Rule(slot.name("bias"), (bias,), op, origin))
    return rules


def attention_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """A Flax attention layer into one ``nn.MultiheadAttention``, after checking it computes the same."""
    slot = pair.slot
    module = slot.module
    leaves = layer.leaves
    origin = f"{FRAMEWORK} '{layer.name}' ({layer.detail})"
    q, k, v, o = (_shape(source, leaves[f"{p}/kernel"]) for p in PROJECTIONS)
    heads, head_dim = q[1], q[2]
    embed = int(getattr(module, "embed_dim", 0))
    where = f"{FRAMEWORK} attention '{layer.name}' -> '{slot.label}'"
    norms = [n for n in _QK_NORMS if any(leaf.startswith(n + "/") for leaf in leaves)]
    if norms:
        raise UnsupportedConfigError(
            f"{where}: the Flax layer normalizes queries and keys ({', '.join(norms)}: normalize_qk=True), which "
            "nn.MultiheadAttention cannot. Fix: load its query/key/value/out into nn.Linear modules and apply "
            "the norms in your own attention."
        )
    extras = [f"{a}=True" for a in ("add_zero_attn",) if getattr(module, a, False)]
    extras += ["add_bias_kv=True"] if getattr(module, "bias_k", None) is not None else []
    if extras:
        raise UnsupportedConfigError(
            f"{where}: the module has {' and '.join(extras)}, which Flax's attention has no counterpart for "
            "(an extra attended position). Fix: build nn.MultiheadAttention without it."
        )
    sizes = f"query input {q[0]}, {heads} heads x {head_dim} = {heads * head_dim} features, output {o[2]}"
    if not (q[0] == heads * head_dim == o[2] == embed) or k[1:] != q[1:] or v[1:] != q[1:] or o[:2] != q[1:]:
        raise UnsupportedConfigError(
            f"{where}: Flax's has {sizes}; nn.MultiheadAttention(embed_dim={embed}) takes queries, computes "
            f"features and returns outputs all {embed} wide. Fix: build nn.MultiheadAttention({q[0]}, {heads}) "
            "if the sizes agree, else load query/key/value/out into nn.Linear modules of those sizes."
        )
    if int(getattr(module, "num_heads", 0)) != heads:
        raise UnsupportedConfigError(
            f"{where}: Flax's splits {embed} features into {heads} heads of {head_dim}, the module into "
            f"num_heads={module.num_heads}: the weights fit, the outputs would not. "
            f"Fix: build nn.MultiheadAttention({embed}, {heads})."
        )
    packed = bool(module._qkv_same_embed_dim)
    if packed and (k[0] != embed or v[0] != embed):
        raise LayoutError(
            f"{where}: Flax's keys come in {k[0]} wide and values {v[0]}, the module's (no kdim/vdim) {embed}. "
            f"Fix: build nn.MultiheadAttention({embed}, {heads}, kdim={k[0]}, vdim={v[0]})."
        )
    name = slot.name
    kernels = tuple(leaves[f"{p}/kernel"] for p in PROJECTIONS[:3])
    if packed:
        fused = (embed, 3 * heads, head_dim)
        rules = [Rule(name("in_proj_weight"), kernels, Chain(Concat(1, 3), _as_matrix(fused, 1)), origin)]
    else:
        rules = [
            Rule(name(f"{p[0]}_proj_weight"), (kernel,), _as_matrix(shape, 1), origin)
            for p, kernel, shape in zip(PROJECTIONS, kernels, (q, k, v))
        ]
    biases = tuple(leaves[f"{p}/bias"] for p in PROJECTIONS[:3] if f"{p}/bias" in leaves)
    if biases:
        together = Chain(
            Concat(0, len(biases)), Reshape((len(biases) * heads, head_dim), (len(biases) * embed,))
        )
        rules.append(Rule(name("in_proj_bias"), biases, together, origin))
    rules.append(Rule(name("out_proj.weight"), (leaves["out/kernel"],), _as_matrix(o, 2), origin))
    if "out/bias" in leaves:
        rules.append(Rule(name("out_proj.bias"), (leaves["out/bias"],), Identity(), origin))
    return rules
