"""The default initialization schemes weightport can draw from a NumPy generator, as rules per module
type: PyTorch's own (``reset_parameters``) and Keras's defaults (glorot-uniform kernels, orthogonal
recurrent kernels, zero biases, the LSTM forget-gate bias 1), with the fans each framework uses.

>>> import numpy as np, torch
>>> draw = rules_for(torch.nn.Linear(4, 2), "keras")["weight"]
>>> draw((2, 4), np.random.RandomState(0)).shape
(2, 4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.transforms import ReorderBlocks

__all__ = ["SCHEMES", "Rng", "Shape", "Draw", "ModuleInit", "NoRule", "own_tensors", "rules_for"]

Rng = np.random.Generator | np.random.RandomState
Shape = tuple[int, ...]
Draw = Callable[[Shape, Any], np.ndarray]
"""One tensor's initializer: ``(shape, rng) -> array``."""
ModuleInit = Callable[[nn.Module, Any], Mapping[str, Any]]
"""A per-module-type initializer: ``(module, rng) -> {own tensor name: array}``."""

SCHEMES = ("torch", "keras")


class NoRule(Exception):
    """A scheme has no rule for a module; the message says why."""


# Distributions. Each returns a Draw; all draw float64.


def _uniform(bound: float) -> Draw:
    return lambda shape, rng: np.asarray(rng.uniform(-bound, bound, shape), dtype=np.float64)


def _normal(std: float) -> Draw:
    return lambda shape, rng: np.asarray(rng.normal(0.0, std, shape), dtype=np.float64)


def _constant(value: float) -> Draw:
    return lambda shape, rng: np.full(shape, value, dtype=np.float64)


def _padded(draw: Draw, padding_idx: int | None) -> Draw:
    """``draw`` with row ``padding_idx`` zeroed, as ``nn.Embedding`` does."""
    if padding_idx is None:
        return draw

    def padded(shape: Shape, rng: Rng) -> np.ndarray:
        array = draw(shape, rng)
        array[padding_idx] = 0.0
        return array

    return padded


# PyTorch's fans and bounds (torch.nn.init's formulas, same float arithmetic).


def _torch_fans(shape: Shape) -> tuple[int, int]:
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _kaiming_uniform_sqrt5(shape: Shape) -> Draw:
    """``kaiming_uniform_(w, a=sqrt(5))``: Linear's and Conv's default weight init."""
    fan_in = _torch_fans(shape)[0]
    if fan_in == 0:
        return _constant(0.0)
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return _uniform(math.sqrt(3.0) * (gain / math.sqrt(fan_in)))


def _fan_in_uniform(weight_shape: Shape) -> Draw:
    """Linear's and Conv's bias: uniform(±1/sqrt(fan_in of the weight))."""
    fan_in = _torch_fans(weight_shape)[0]
    return _uniform(1 / math.sqrt(fan_in) if fan_in > 0 else 0)


def _xavier_uniform(shape: Shape) -> Draw:
    fan_in, fan_out = _torch_fans(shape)
    return _uniform(math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out)))


def _xavier_normal(shape: Shape) -> Draw:
    fan_in, fan_out = _torch_fans(shape)
    return _normal(math.sqrt(2.0 / float(fan_in + fan_out)))


# Keras's initializers, drawn in Keras's kernel shape.


def _keras_fans(shape: Shape) -> tuple[int, int]:
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _glorot_uniform(shape: Shape, rng: Rng) -> np.ndarray:
    fan_in, fan_out = _keras_fans(shape)
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    return np.asarray(rng.uniform(-limit, limit, shape), dtype=np.float64)


def _orthogonal(shape: Shape, rng: Rng) -> np.ndarray:
    """Keras's ``Orthogonal``: QR of a tall normal matrix, signs fixed by diag(R), transposed if wide.

    Of an ``(H, G*H)`` recurrent kernel the rows are orthonormal: ``Q @ Q.T == I``.
    """
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if rows == 0 or cols == 0:
        return np.zeros(shape)
    normal = np.asarray(rng.standard_normal((max(rows, cols), min(rows, cols))), dtype=np.float64)
    q, r = np.linalg.qr(normal)
    q = q * np.sign(np.diag(r))
    return (q.T if rows < cols else q).reshape(shape)


def _keras_kernel(draw: Draw, gate_order: tuple[int, ...] | None = None) -> Draw:
    """A PyTorch weight drawn as Keras's kernel and moved to PyTorch's layout.

    PyTorch ``(out, in, *k)`` is Keras ``(*k, in, out)`` (ConvTranspose: PyTorch
    ``(in, out, *k)``, Keras ``(*k, out, in)``); ``gate_order`` reorders Keras's gate
    blocks (columns) into PyTorch's.
    """

    def drawn(shape: Shape, rng: Rng) -> np.ndarray:
        kernel = draw((*shape[2:], shape[1], shape[0]), rng)
        if gate_order is not None:
            kernel = ReorderBlocks(axis=kernel.ndim - 1, order=gate_order)(kernel)
        n = len(shape) - 2
        return np.ascontiguousarray(kernel.transpose(n + 1, n, *range(n)))

    return drawn


def _stacked(draw: Draw, count: int) -> Draw:
    """``count`` independent draws of ``shape[0] // count`` rows each, one after another."""

    def drawn(shape: Shape, rng: Rng) -> np.ndarray:
        part = (shape[0] // count, *shape[1:])
        return np.concatenate([draw(part, rng) for _ in range(count)])

    return drawn


# Rules: module -> {tensor name relative to the module: Draw}.


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False)}


def _norm_rules(module: nn.Module) -> dict[str, Draw]:
    rules = {"weight": _constant(1.0), "bias": _constant(0.0)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        rules |= {"running_mean": _constant(0.0), "running_var": _constant(1.0)}
        rules["num_batches_tracked"] = lambda shape, rng: np.zeros(shape, dtype=np.int64)
    return rules


def _torch_weight_bias(module: nn.Module) -> dict[str, Draw]:
    weight = own_tensors(module).get("weight")
    if weight is None:
        raise NoRule(f"it has no 'weight' parameter, so {type(module).__name__}'s rule does not apply")
    shape = tuple(weight.shape)
    return {"weight": _kaiming_uniform_sqrt5(shape), "bias": _fan_in_uniform(shape)}


def _torch_bilinear(module: nn.Bilinear) -> dict[str, Draw]:
    bound = 1 / math.sqrt(module.in1_features)
    return {"weight": _uniform(bound), "bias": _uniform(bound)}


def _torch_rnn(module: nn.RNNBase | nn.RNNCellBase) -> dict[str, Draw]:
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    return {name: _uniform(bound) for name in own_tensors(module)}


def _torch_attention(module: nn.MultiheadAttention) -> dict[str, Draw]:
    rules = {
        n: _xavier_uniform(tuple(p.shape))
        for n, p in own_tensors(module).items()
        if n.endswith("proj_weight")
    }
    if module.in_proj_bias is not None:
        rules |= {"in_proj_bias": _constant(0.0), "out_proj.bias": _constant(0.0)}
    for name in ("bias_k", "bias_v"):
        tensor = getattr(module, name)
        if tensor is not None:
            rules[name] = _xavier_normal(tuple(tensor.shape))
    return rules


def _torch_transformer(module: nn.Transformer) -> dict[str, Draw]:
    return {n: _xavier_uniform(tuple(p.shape)) for n, p in module.named_parameters() if p.dim() > 1}


_CONV = nn.modules.conv._ConvNd
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)

_TORCH_RULES: list[tuple[Any, Callable[[Any], dict[str, Draw]]]] = [
    ((nn.RNNBase, nn.RNNCellBase), _torch_rnn),
    ((nn.Linear, _CONV), _torch_weight_bias),
    (nn.Bilinear, _torch_bilinear),
    (_EMBEDDINGS, lambda m: {"weight": _padded(_normal(1.0), m.padding_idx)}),
    (_NORMS, _norm_rules),
    (nn.MultiheadAttention, _torch_attention),
    (nn.PReLU, lambda m: {"weight": _constant(m.init)}),
    (nn.Transformer, _torch_transformer),
]

_KERAS_GRU_TO_TORCH = (1, 0, 2)  # Keras z, r, h -> PyTorch r, z, n


def _keras_rnn(module: nn.RNNBase | nn.RNNCellBase) -> dict[str, Draw]:
    if isinstance(module, nn.RNNBase):
        mode = module.mode
        if module.proj_size:
            raise NoRule(f"Keras's LSTM has no projection (proj_size={module.proj_size})")
    else:
        mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(module), "RNN_TANH")
    order = _KERAS_GRU_TO_TORCH if mode == "GRU" else None
    hidden = module.hidden_size
    rules: dict[str, Draw] = {}
    for name in own_tensors(module):
        if name.startswith("weight_ih"):
            rules[name] = _keras_kernel(_glorot_uniform, order)
        elif name.startswith("weight_hh"):
            rules[name] = _keras_kernel(_orthogonal, order)
        elif name.startswith("bias_ih") and mode == "LSTM":  # unit_forget_bias=True: f-block 1
            rules[name] = lambda shape, rng: np.repeat([0.0, 1.0, 0.0, 0.0], hidden)
        elif name.startswith("bias"):
            rules[name] = _constant(0.0)
    return rules


def _keras_dense_conv(module: nn.Module) -> dict[str, Draw]:
    if isinstance(module, _CONV) and module.transposed and module.groups > 1:
        raise NoRule(f"Keras's transposed convolutions have no groups (groups={module.groups})")
    return {"weight": _keras_kernel(_glorot_uniform), "bias": _constant(0.0)}


def _keras_attention(module: nn.MultiheadAttention) -> dict[str, Draw]:
    if module.bias_k is not None:
        raise NoRule("Keras's MultiHeadAttention has no bias_k / bias_v (add_bias_kv=True)")
    dense = _keras_kernel(_glorot_uniform)  # query, key, value kernels drawn one by one, as Keras does
    return {
        "in_proj_weight": _stacked(dense, 3),
        "q_proj_weight": dense,
        "k_proj_weight": dense,
        "v_proj_weight": dense,
        "in_proj_bias": _constant(0.0),
    }


def _keras_none(module: nn.Module) -> dict[str, Draw]:
    raise NoRule(f"Keras has no layer equivalent to {type(module).__name__}")


_KERAS_RULES: list[tuple[Any, Callable[[Any], dict[str, Draw]]]] = [
    ((nn.RNNBase, nn.RNNCellBase), _keras_rnn),
    ((nn.Linear, _CONV), _keras_dense_conv),
    (nn.Embedding, lambda m: {"weight": _padded(_uniform(0.05), m.padding_idx)}),
    (_NORMS, _norm_rules),
    (nn.MultiheadAttention, _keras_attention),
    (nn.PReLU, lambda m: {"weight": _constant(0.0)}),  # Keras PReLU: alpha_initializer="zeros"
    ((nn.Bilinear, nn.EmbeddingBag), _keras_none),
]

_RULES = {"torch": _TORCH_RULES, "keras": _KERAS_RULES}


def rules_for(module: nn.Module, scheme: str) -> dict[str, Draw] | None:
    """The draw of each of ``module``'s own tensors under ``scheme``; None for a module type the scheme
    has no rule for; raises NoRule where the scheme refuses the type (Keras has no ``nn.Bilinear``)."""
    for types, rule in _RULES[scheme]:
        if isinstance(module, types):
            return rule(module)
    return None
