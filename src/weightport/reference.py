"""A NumPy forward pass of PyTorch's recurrent modules, with PyTorch's own equations.

It is an independent check that the weights in an ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU`` (or one of the cells) mean what a port thinks they mean: the same
numbers go through the equations of the PyTorch documentation, written out in
NumPy, one step at a time. Gate orders are PyTorch's: LSTM ``i, f, g, o``, GRU
``r, z, n``, with the GRU's ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.

Everything the modules accept is covered: several layers, both directions,
``batch_first``, unbatched input, ``bias=False``, LSTM ``proj_size``, given or zero
initial states, float32 and float64. ``dropout`` between layers is ignored, as in
``module.eval()``: compare against a module in eval mode (or with ``dropout=0``).
Packed sequences are not supported: pad them and pass the padded tensor.

>>> import numpy as np, torch
>>> _ = torch.manual_seed(0)
>>> gru = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)
>>> x = np.random.default_rng(0).standard_normal((2, 5, 3), dtype=np.float32)
>>> out, h_n = forward(gru, x)
>>> out.shape, h_n.shape, out.dtype
((2, 5, 8), (4, 2, 4), dtype('float32'))
>>> expected, _ = gru(torch.from_numpy(x))
>>> bool(np.abs(out - expected.detach().numpy()).max() < 1e-5)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.errors import LayoutError, a_or_an
from weightport.tensors import unwrap
from weightport.torch_facts import rnn_param

__all__ = ["forward", "SUPPORTED"]

SUPPORTED = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")
"""The module types :func:`forward` runs (and their subclasses)."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

State = tuple[np.ndarray, ...]
"""``(h,)`` for RNN and GRU, ``(h, c)`` for LSTM; each of shape (batch, features)."""


@dataclass(frozen=True)
class _Weights:
    """The parameters of one layer in one direction (or of one cell), as NumPy arrays."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray | None = None
    b_hh: np.ndarray | None = None
    w_hr: np.ndarray | None = None

    def input_part(self, x: np.ndarray) -> np.ndarray:
        """``W_ih x + b_ih`` for every leading index of ``x`` at once."""
        gates = x @ self.w_ih.T
        return gates if self.b_ih is None else gates + self.b_ih

    def hidden_part(self, h: np.ndarray) -> np.ndarray:
        """``W_hh h + b_hh``."""
        gates = h @ self.w_hh.T
        return gates if self.b_hh is None else gates + self.b_hh


# ---------------------------------------------------------------- one step per kind


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large negative inputs."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _rnn_tanh_step(gi: np.ndarray, state: State, w: _Weights) -> State:
    """``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``; ``gi`` is the input part."""
    (h,) = state
    return (np.tanh(gi + w.hidden_part(h)),)


def _rnn_relu_step(gi: np.ndarray, state: State, w: _Weights) -> State:
    """``h' = relu(W_ih x + b_ih + W_hh h + b_hh)``."""
    (h,) = state
    return (np.maximum(gi + w.hidden_part(h), 0),)


def _lstm_step(gi: np.ndarray, state: State, w: _Weights) -> State:
    """Gates ``i, f, g, o``; ``c' = f c + i g``; ``h' = o tanh(c')``, then ``W_hr h'`` if projected."""
    h, c = state
    i, f, g, o = np.split(gi + w.hidden_part(h), 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    if w.w_hr is not None:
        h = h @ w.w_hr.T
    return h, c


def _gru_step(gi: np.ndarray, state: State, w: _Weights) -> State:
    """Gates ``r, z, n``; ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``; ``h' = (1 - z) n + z h``."""
    (h,) = state
    i_r, i_z, i_n = np.split(gi, 3, axis=-1)
    h_r, h_z, h_n = np.split(w.hidden_part(h), 3, axis=-1)
    r = _sigmoid(i_r + h_r)
    z = _sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


Step = Callable[[np.ndarray, State, _Weights], State]

_STEPS: dict[str, Step] = {
    "RNN_TANH": _rnn_tanh_step,
    "RNN_RELU": _rnn_relu_step,
    "LSTM": _lstm_step,
    "GRU": _gru_step,
}


# ---------------------------------------------------------------- public entry point


def forward(module: nn.Module, x: Any, hx: Any = None) -> Any:
    """Run ``module`` (an RNN, LSTM, GRU or one of their cells) in NumPy.

    The module's current parameters are copied to NumPy and put through PyTorch's
    equations; the module itself is not called and not changed. Computation is in
    the parameters' dtype (float32 or float64); inputs of another dtype are cast.
    ``dropout`` is ignored, as in eval mode.

    Args:
        module: ``nn.RNN`` (tanh or relu), ``nn.LSTM`` (``proj_size`` too), ``nn.GRU``,
            ``nn.RNNCell``, ``nn.LSTMCell`` or ``nn.GRUCell``, also under
            ``torch.compile`` or ``nn.DataParallel`` (the wrapped module is read).
        x: the input, a NumPy array or torch tensor shaped as the module expects:
            ``(T, B, F)`` (``(B, T, F)`` with ``batch_first``) or unbatched ``(T, F)``;
            for a cell ``(B, F)`` or unbatched ``(F,)``.
        hx: the initial state as the module takes it: ``h0``, or ``(h0, c0)`` for
            LSTMs; zeros when None.

    Returns:
        What the module returns, as NumPy arrays of the same shapes:
        ``(output, h_n)``, ``(output, (h_n, c_n))`` for LSTMs, ``h`` for
        ``RNNCell``/``GRUCell`` and ``(h, c)`` for ``LSTMCell``.

    Raises:
        LayoutError: the module is not one of :data:`SUPPORTED`, its parameters are
            not float32/float64 on a real device, or ``x``/``hx`` have the wrong shape.

    >>> import numpy as np, torch
    >>> cell = torch.nn.LSTMCell(3, 2)
    >>> h, c = forward(cell, np.ones((4, 3), dtype=np.float32))
    >>> h.shape, c.shape
    ((4, 2), (4, 2))
    """
    module = unwrap(module)
    if isinstance(module, nn.RNNBase) and module.mode in _STEPS:
        return _forward_sequence(module, x, hx)
    if isinstance(module, (nn.RNNCell, nn.LSTMCell, nn.GRUCell)):
        return _forward_cell(module, x, hx)
    raise LayoutError(
        f"weightport.reference.forward cannot run {type(module).__name__}: "
        f"expected one of {', '.join(SUPPORTED)} (or a subclass). "
        "Compare other modules against their own framework's outputs instead."
    )


# ---------------------------------------------------------------- whole sequences


def _forward_sequence(module: nn.RNNBase, x: Any, hx: Any) -> Any:
    dtype = _module_dtype(module)
    step = _STEPS[module.mode]
    is_lstm = module.mode == "LSTM"
    directions = 2 if module.bidirectional else 1
    layers = module.num_layers
    hidden = module.hidden_size
    out_size = module.proj_size or hidden
    name = repr(module)

    seq = _as_array(x, dtype, "input", name)
    features = module.input_size
    if seq.ndim not in (2, 3) or seq.shape[-1] != features:
        order = "(batch, seq, %d)" if module.batch_first else "(seq, batch, %d)"
        raise LayoutError(
            f"{name} expects input of shape {order % features} or unbatched (seq, {features}), "
            f"found {tuple(seq.shape)}. Check input_size and the axis order (batch_first)."
        )
    batched = seq.ndim == 3
    if not batched:
        seq = seq[:, None, :]
    elif module.batch_first:
        seq = seq.transpose(1, 0, 2)
    steps, batch = seq.shape[0], seq.shape[1]
    if steps == 0:
        raise LayoutError(f"{name} needs a sequence of at least one step, found input {tuple(np.shape(x))}.")

    starts = _initial_states(hx, is_lstm, layers * directions, batch, out_size, hidden, batched, dtype, name)

    finals: list[State] = []
    layer_input = seq
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            weights = _layer_weights(module, layer, reverse=direction == 1, dtype=dtype)
            state = tuple(s[layer * directions + direction] for s in starts)
            out, state = _run(layer_input, state, weights, step, reverse=direction == 1)
            outputs.append(out)
            finals.append(state)
        layer_input = np.concatenate(outputs, axis=-1)

    output = layer_input
    h_n = np.stack([s[0] for s in finals])
    c_n = np.stack([s[1] for s in finals]) if is_lstm else None
    if not batched:
        output, h_n = output[:, 0], h_n[:, 0]
        c_n = None if c_n is None else c_n[:, 0]
    elif module.batch_first:
        output = output.transpose(1, 0, 2)
    output, h_n = _contiguous(output, dtype), _contiguous(h_n, dtype)
    if c_n is None:
        return output, h_n
    return output, (h_n, _contiguous(c_n, dtype))


def _run(
    seq: np.ndarray, state: State, weights: _Weights, step: Step, *, reverse: bool
) -> tuple[np.ndarray, State]:
    """One layer in one direction over ``seq`` (T, B, F): its outputs (T, B, H_out) and final state."""
    gi = weights.input_part(seq)
    steps = seq.shape[0]
    out = np.empty((steps, seq.shape[1], weights.w_hh.shape[1]), dtype=seq.dtype)
    for t in reversed(range(steps)) if reverse else range(steps):
        state = step(gi[t], state, weights)
        out[t] = state[0]
    return out, state


def _layer_weights(module: nn.RNNBase, layer: int, *, reverse: bool, dtype: np.dtype) -> _Weights:
    def get(param: str) -> np.ndarray | None:
        tensor = getattr(module, rnn_param(param, layer, reverse=reverse), None)
        return None if tensor is None else _param(tensor, dtype)

    w_ih, w_hh = get("weight_ih"), get("weight_hh")
    assert w_ih is not None and w_hh is not None
    bias = module.bias
    return _Weights(
        w_ih,
        w_hh,
        get("bias_ih") if bias else None,
        get("bias_hh") if bias else None,
        get("weight_hr") if module.proj_size else None,
    )


def _initial_states(
    hx: Any,
    is_lstm: bool,
    count: int,
    batch: int,
    out_size: int,
    hidden: int,
    batched: bool,
    dtype: np.dtype,
    name: str,
) -> State:
    """``(h0,)`` or ``(h0, c0)``, each (layers * directions, batch, features)."""
    sizes = (out_size, hidden) if is_lstm else (out_size,)
    labels = ("h0", "c0") if is_lstm else ("h0",)
    if hx is None:
        return tuple(np.zeros((count, batch, size), dtype=dtype) for size in sizes)
    parts = _split_state(hx, is_lstm, name)
    states = []
    for part, size, label in zip(parts, sizes, labels, strict=True):
        expected = (count, batch, size) if batched else (count, size)
        array = _as_array(part, dtype, label, name)
        if array.shape != expected:
            kind = "batched" if batched else "unbatched"
            raise LayoutError(
                f"{name} expects {label} of shape {expected} for this {kind} input "
                f"(layers * directions, {'batch, ' if batched else ''}features), found {tuple(array.shape)}. "
                "The batch axis of h0/c0 is never first, even with batch_first."
            )
        states.append(array if batched else array[:, None, :])
    return tuple(states)


# ---------------------------------------------------------------- cells


def _forward_cell(module: nn.RNNCellBase, x: Any, hx: Any) -> Any:
    dtype = _module_dtype(module)
    is_lstm = isinstance(module, nn.LSTMCell)
    step: Step
    if is_lstm:
        step = _lstm_step
    elif isinstance(module, nn.GRUCell):
        step = _gru_step
    else:
        step = _STEPS["RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"]
    name = repr(module)

    inputs = _as_array(x, dtype, "input", name)
    features = module.input_size
    if inputs.ndim not in (1, 2) or inputs.shape[-1] != features:
        raise LayoutError(
            f"{name} expects input of shape (batch, {features}) or unbatched ({features},), "
            f"found {tuple(inputs.shape)}. Check input_size; a cell takes one time step."
        )
    batched = inputs.ndim == 2
    if not batched:
        inputs = inputs[None, :]
    batch = inputs.shape[0]

    hidden = module.hidden_size
    labels = ("h", "c") if is_lstm else ("h",)
    if hx is None:
        state: State = tuple(np.zeros((batch, hidden), dtype=dtype) for _ in labels)
    else:
        parts = _split_state(hx, is_lstm, name)
        expected = (batch, hidden) if batched else (hidden,)
        arrays = []
        for part, label in zip(parts, labels, strict=True):
            array = _as_array(part, dtype, label, name)
            if array.shape != expected:
                raise LayoutError(
                    f"{name} expects initial {label} of shape {expected}, found {tuple(array.shape)}. "
                    "Check hidden_size and that h matches the input's batch."
                )
            arrays.append(array if batched else array[None, :])
        state = tuple(arrays)

    bias = module.bias
    weights = _Weights(
        _param(module.weight_ih, dtype),
        _param(module.weight_hh, dtype),
        _param(module.bias_ih, dtype) if bias else None,
        _param(module.bias_hh, dtype) if bias else None,
    )
    state = step(weights.input_part(inputs), state, weights)
    results = [_contiguous(s if batched else s[0], dtype) for s in state]
    return tuple(results) if is_lstm else results[0]


# ---------------------------------------------------------------- conversions


def _module_dtype(module: nn.Module) -> np.dtype:
    params = list(module.parameters())
    name = repr(module)
    if any(p.is_meta for p in params):
        raise LayoutError(
            f"{name} has parameters on the meta device, which hold no values. "
            "Load its weights (or call module.to_empty(device='cpu') and initialize it) first."
        )
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or (dtype := next(iter(dtypes))) not in (torch.float32, torch.float64):
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise LayoutError(
            f"{name}: the NumPy reference runs float32 or float64 parameters, found {found}. "
            "Compare a float32 copy instead: copy.deepcopy(module).float()."
        )
    return np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float64)


def _param(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return np.asarray(tensor.detach().cpu().numpy(), dtype=dtype)


def _as_array(value: Any, dtype: np.dtype, label: str, name: str) -> np.ndarray:
    """``value`` (NumPy array, torch tensor or nested lists) as a ``dtype`` array."""
    if isinstance(value, nn.utils.rnn.PackedSequence):
        raise LayoutError(
            f"{name}: the NumPy reference takes a padded {label}, found a PackedSequence. "
            "Pass the padded tensor (torch.nn.utils.rnn.pad_packed_sequence) instead."
        )
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype not in (torch.float32, torch.float64):
            value = value.to(torch.float64)
        value = value.numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise LayoutError(
            f"{name}: {label} must be a NumPy array or torch tensor of numbers, "
            f"found {type(value).__name__} ({e})."
        ) from e


def _split_state(hx: Any, is_lstm: bool, name: str) -> tuple[Any, ...]:
    """``hx`` as ``(h,)`` or ``(h, c)``, refusing the wrong structure."""
    pair = isinstance(hx, (tuple, list)) and len(hx) == 2
    if is_lstm and not pair:
        raise LayoutError(
            f"{name} expects hx as a pair (h0, c0), found {type(hx).__name__}. Pass both states, or None."
        )
    if not is_lstm and isinstance(hx, (tuple, list)):
        raise LayoutError(
            f"{name} expects hx as one array h0, found {a_or_an(type(hx).__name__)}. Pass h0 alone."
        )
    return tuple(hx) if is_lstm else (hx,)


def _contiguous(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=dtype)
