"""The rules per kind: which Keras variable fills which PyTorch parameter, through which op.

Kernels are transposed (Dense, recurrent) or permuted (Conv); GRU gate blocks z,r,h become PyTorch's
r,z,n; a SimpleRNN/LSTM's one bias fills ``bias_ih`` with ``bias_hh = 0``. :data:`EXPORT` holds the
same facts the other way round, for export.

>>> [(param, var) for param, var, _ in RULES["Linear"]]
[('weight', 'kernel'), ('bias', 'bias')]
"""

from __future__ import annotations

from weightport.errors import LayoutError
from weightport.layouts.base import Rule
from weightport.layouts.keras.attention import attention_rules
from weightport.layouts.keras.layers import Part, Resolved
from weightport.layouts.keras.pointwise import PLAIN_CONVS
from weightport.layouts.keras.scale import scale_rule
from weightport.layouts.pairing import Slot
from weightport.layouts.slots import LAYER_SCALE
from weightport.sources.base import Source
from weightport.torch_facts import RNN_KINDS
from weightport.transforms import (
    Chain,
    Full,
    Identity,
    Op,
    ReorderBlocks,
    Reshape,
    Select,
    Stack,
    Sum,
    Transpose,
    Zeros,
)

__all__ = ["RULES", "EXPORT", "part_rules", "depthwise_op"]

_T = Transpose((1, 0))
_GRU_KERNEL = Chain(ReorderBlocks(1, (1, 0, 2)), _T)  # Keras z,r,h (columns) -> PyTorch r,z,n (rows)
_GRU_BIAS = ReorderBlocks(0, (1, 0, 2))

# kind -> (PyTorch parameter, Keras variable, op). Recurrent biases are handled in part_rules.
RULES: dict[str, list[tuple[str, str, Op]]] = {
    "RNN": [
        ("weight_ih", "kernel", _T),
        ("weight_hh", "recurrent_kernel", _T),
        ("bias_ih", "bias", Identity()),
    ],
    "GRU": [
        ("weight_ih", "kernel", _GRU_KERNEL),
        ("weight_hh", "recurrent_kernel", _GRU_KERNEL),
        ("bias_ih", "bias", Chain(Select(0, 2), _GRU_BIAS)),
        ("bias_hh", "bias", Chain(Select(1, 2), _GRU_BIAS)),
    ],
    "Linear": [("weight", "kernel", _T), ("bias", "bias", Identity())],
    "Conv1d": [("weight", "kernel", Transpose((2, 1, 0))), ("bias", "bias", Identity())],
    "Conv2d": [("weight", "kernel", Transpose((3, 2, 0, 1))), ("bias", "bias", Identity())],
    "Embedding": [("weight", "embeddings", Identity())],
    "BatchNorm": [
        ("weight", "gamma", Identity()),
        ("bias", "beta", Identity()),
        ("running_mean", "moving_mean", Identity()),
        ("running_var", "moving_variance", Identity()),
    ],
    "LayerNorm": [("weight", "gamma", Identity()), ("bias", "beta", Identity())],
    # Keras keeps a transposed conv's kernel as (k..., out, in) and PyTorch as (in, out/groups, k...): the
    # same axis moves as a Conv's (kernel (k..., in, out) into (out, in/groups, k...))
    "ConvTranspose1d": [("weight", "kernel", Transpose((2, 1, 0))), ("bias", "bias", Identity())],
    "ConvTranspose2d": [("weight", "kernel", Transpose((3, 2, 0, 1))), ("bias", "bias", Identity())],
    "GroupNorm": [("weight", "gamma", Identity()), ("bias", "beta", Identity())],
}
RULES["LSTM"] = RULES["RNN"]

# kind -> (Keras variable, PyTorch parameters, op): the reverse, for export.
EXPORT: dict[str, list[tuple[str, tuple[str, ...], Op]]] = {
    "RNN": [
        ("kernel", ("weight_ih",), _T),
        ("recurrent_kernel", ("weight_hh",), _T),
        ("bias", ("bias_ih", "bias_hh"), Sum(2)),
    ],
    "GRU": [
        ("kernel", ("weight_ih",), _GRU_KERNEL.inverse()),
        ("recurrent_kernel", ("weight_hh",), _GRU_KERNEL.inverse()),
        ("bias", ("bias_ih", "bias_hh"), Chain(Stack(2), ReorderBlocks(1, (1, 0, 2)))),
    ],
    **{k: [(var, (p,), op.inverse()) for p, var, op in RULES[k]] for k in RULES if k not in RNN_KINDS},
}
EXPORT["LSTM"] = EXPORT["RNN"]


def depthwise_op(shape: tuple[int, ...]) -> Op:
    """A ``DepthwiseConv1D``/``DepthwiseConv2D`` kernel ``(*k, in, multiplier)`` as a ``Conv(groups=in)``
    weight ``(in * multiplier, 1, *k)``: Keras's output channel ``i * multiplier + m`` reads input channel
    ``i`` (``tf.nn.depthwise_conv2d``), so the kernel goes to ``(in, multiplier, *k)``, then reshapes.

    >>> depthwise_op((3, 3, 4, 2)).out_shape([(3, 3, 4, 2)])
    (8, 1, 3, 3)
    >>> depthwise_op((5, 4, 2)).out_shape([(5, 4, 2)])
    (8, 1, 5)
    """
    *kernel, channels, multiplier = shape
    spatial = tuple(range(len(kernel)))
    return Chain(
        Transpose((len(kernel), len(kernel) + 1, *spatial)),
        Reshape((channels, multiplier, *kernel), (channels * multiplier, 1, *kernel)),
    )


def _table(kind: str, part: Part, source: Source) -> list[tuple[str, str, Op]]:
    """The (parameter, variable, op) rows for ``part``: its kind's, but a depthwise kernel's own op."""
    kernel = part.vars.get("kernel")
    if part.cls == "EinsumDense" and (part.config or {}).get("kernel_out_in"):  # stored as nn.Linear keeps it
        return [("weight", "kernel", Identity()), ("bias", "bias", Identity())]
    if kind == "Linear" and kernel is not None and part.cls in PLAIN_CONVS:
        shape = tuple(source.infos[kernel].shape)  # (1, ..., 1, in, out): a 1 x 1 conv as a Linear
        return [("weight", "kernel", Chain(Reshape(shape, shape[-2:]), _T)), ("bias", "bias", Identity())]
    rank = {"DepthwiseConv1D": 3, "DepthwiseConv2D": 4}.get(part.cls or "")
    if rank is not None and kernel is not None and len(source.infos[kernel].shape) == rank:
        return [
            ("weight", "kernel", depthwise_op(tuple(source.infos[kernel].shape))),
            ("bias", "bias", Identity()),
        ]
    return RULES[kind]


def part_rules(found: Resolved, part: Part, slot: Slot, source: Source) -> list[Rule]:
    """The rules that fill ``slot``'s parameters (one direction of them) from ``part``'s variables."""
    kind = found.kind
    rules = []
    layer = f"Keras {found.detail} '{found.layer.name}'"
    # a live layer's source is that layer ("the Keras Dense 'dense'"): its name is said once
    origin = (
        source.description
        if source.description.endswith(f"'{found.layer.name}'") and not found.layer.path
        else f"{source.description} {layer}"
    )
    side = (" backward_layer" if part.reverse else " forward_layer") if len(found.parts) > 1 else ""
    if kind == "MultiheadAttention":
        return attention_rules(part, slot, origin)
    if kind == LAYER_SCALE:
        # its one vector: 'gamma', or what Keras 3's legacy .h5 names an unnamed weight ('variable_3')
        held = list(part.vars.items())
        var, gamma = (
            ("gamma", part.vars["gamma"]) if "gamma" in part.vars else held[0] if len(held) == 1 else ("", "")
        )
        if not gamma:
            raise LayoutError(
                f"{origin}: a LayerScale holds one vector (gamma); found {sorted(part.vars) or 'none'}. "
                "Fix: re-save the model (model.save('model.keras')), or load its arrays by name."
            )
        return [scale_rule(gamma, tuple(source.infos[gamma].shape), slot, f"{origin} {var}")]
    for param, var, op in _table(kind, part, source):
        if var not in part.vars:
            continue
        note = ""
        if var in ("moving_mean", "moving_variance") and part.config and "momentum" in part.config:
            momentum = float(part.config["momentum"])
            note = f" (Keras momentum {momentum:g} is PyTorch momentum={1 - momentum:g}; it affects training only)"
        rules.append(
            Rule(slot.name(param, reverse=part.reverse), (part.vars[var],), op, f"{origin}{side} {var}{note}")
        )
    if kind in ("RNN", "LSTM") and "bias" in part.vars:
        size = source.infos[part.vars["bias"]].shape
        rules.append(
            Rule(
                slot.name("bias_hh", reverse=part.reverse),
                (),
                Zeros(tuple(size)),
                f"{origin}: Keras has one bias; bias_hh = 0",
            )
        )
    no_beta = (
        kind in ("BatchNorm", "LayerNorm", "GroupNorm") and "gamma" in part.vars and "beta" not in part.vars
    )
    if no_beta and getattr(slot.module, "bias", None) is not None:
        size = source.infos[part.vars["gamma"]].shape
        rules.append(Rule(slot.name("bias"), (), Zeros(tuple(size)), f"{origin}: center=False, so bias = 0"))
    no_gamma = (
        kind in ("BatchNorm", "LayerNorm", "GroupNorm") and "beta" in part.vars and "gamma" not in part.vars
    )
    if no_gamma and getattr(slot.module, "weight", None) is not None:
        size = source.infos[part.vars["beta"]].shape
        rules.append(
            Rule(slot.name("weight"), (), Full(tuple(size), 1.0), f"{origin}: scale=False, so weight = 1")
        )
    if kind == "BatchNorm" and getattr(slot.module, "track_running_stats", False):
        rules.append(
            Rule(slot.name("num_batches_tracked"), (), Zeros(()), f"{origin}: Keras counts no batches; 0")
        )
    return rules
