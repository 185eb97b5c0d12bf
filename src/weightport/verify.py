"""Run a module and compare its outputs with expected ones, or with the NumPy reference.

>>> import numpy as np, torch, weightport
>>> rnn = torch.nn.GRU(3, 4, batch_first=True)
>>> report = weightport.verify(rnn, np.ones((2, 5, 3), np.float32))
>>> bool(report), [o.name for o in report.outputs]
(True, ['output', 'h_n'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.errors import VerifyError
from weightport.export import tensor_to_numpy
from weightport.loading import unwrap

__all__ = ["OutputCheck", "VerifyReport", "verify", "flatten_outputs"]


@dataclass(frozen=True)
class OutputCheck:
    """One output compared: its name, shape and max absolute / relative errors."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Truthy when every output is within tolerance; prints one line per output."""

    outputs: list[OutputCheck] = field(default_factory=list)
    rtol: float = 1e-5
    atol: float = 1e-6
    against: str = "expected outputs"

    def __bool__(self) -> bool:
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        status = "OK" if self else "FAILED"
        lines = [f"verify against {self.against}: {status} (rtol={self.rtol:g}, atol={self.atol:g})"]
        for o in self.outputs:
            mark = "ok  " if o.ok else "FAIL"
            lines.append(
                f"  {mark} {o.name:<10} {o.shape!s:<16} max abs err {o.max_abs:.3g}  max rel err "
                f"{o.max_rel:.3g}{'  ' + o.note if o.note else ''}"
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> VerifyReport:
        """Raise :class:`VerifyError` when an output is off; return the report otherwise."""
        if not self:
            raise VerifyError(str(self) + "\nFix: check the weights' layout and the module's settings.")
        return self


def _names(module: nn.Module, count: int) -> list[str]:
    if isinstance(module, nn.LSTM):
        return ["output", "h_n", "c_n"][:count]
    if isinstance(module, nn.LSTMCell):
        return ["h", "c"][:count]
    if isinstance(module, nn.RNNBase):
        return ["output", "h_n"][:count]
    if count == 1:
        return ["output"]
    return [f"output[{i}]" for i in range(count)]


def flatten_outputs(outputs: Any) -> list[np.ndarray]:
    """Nested tuples of tensors/arrays in order, as NumPy arrays."""
    if isinstance(outputs, (tuple, list)):
        return [a for item in outputs for a in flatten_outputs(item)]
    if isinstance(outputs, torch.Tensor):
        return [tensor_to_numpy(outputs)]
    return [np.asarray(outputs)]


def _as_inputs(inputs: Any, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    def convert(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(convert(i) for i in x)
        if x is None:
            return None
        tensor = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    items = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(convert(x) for x in items)


def verify(
    module: nn.Module,
    inputs: Any,
    expected: Any = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> VerifyReport:
    """Run ``module(*inputs)`` in eval mode and compare with ``expected``.

    Args:
        module: the module to run (its training mode is restored afterwards); under
            ``torch.compile`` or ``nn.DataParallel`` the wrapper is run, and the
            reference reads the wrapped module's weights.
        inputs: an array, or a tuple of arguments (arrays, or nested tuples like ``(h0, c0)``).
        expected: outputs in the module's own nesting; None compares an RNN-family
            module with :func:`weightport.reference.forward`.
        rtol, atol: an element passes when ``|a - e| <= atol + rtol * |e|``.
    """
    first = next(iter(module.parameters()), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    args = _as_inputs(inputs, dtype, device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            actual = flatten_outputs(module(*args))
    finally:
        module.train(was_training)
    against = "expected outputs"
    if expected is None:
        from weightport.reference import forward

        expected = forward(module, *args)
        against = "the NumPy reference"
    wanted = flatten_outputs(expected)
    names = _names(unwrap(module), len(actual))
    report = VerifyReport(rtol=rtol, atol=atol, against=against)
    if len(wanted) != len(actual):
        raise VerifyError(
            f"the module returned {len(actual)} outputs but {len(wanted)} were expected. "
            "Fix: give expected outputs in the module's own nesting."
        )
    for name, a, e in zip(names, actual, wanted):
        report.outputs.append(_compare(name, a, e, rtol, atol))
    return report


def _compare(name: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    if actual.shape != expected.shape:
        return OutputCheck(
            name,
            actual.shape,
            float("inf"),
            float("inf"),
            False,
            f"shape {actual.shape} but expected {expected.shape}",
        )
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(e != 0, diff / np.abs(e), np.where(diff == 0, 0.0, np.inf))
    max_rel = float(rel.max()) if rel.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(e))) and not np.isnan(diff).any()
    return OutputCheck(name, actual.shape, max_abs, max_rel, ok)
