"""Run a module and compare its outputs with expected ones, an ONNX file's, or the NumPy reference.

>>> import numpy as np, torch, weightport
>>> rnn = torch.nn.GRU(3, 4, batch_first=True)
>>> report = weightport.verify(rnn, np.ones((2, 5, 3), np.float32))
>>> bool(report), [o.name for o in report.outputs]
(True, ['output', 'h_n'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.errors import SourceError, VerifyError, counted
from weightport.outputs import (
    OutputCheck,
    compare_output,
    flat_tensors,
    flatten_outputs,
    graph_session,
    in_eval,
    output_fields,
    run_graph,
)
from weightport.report import forward_notes_of
from weightport.tensors import unwrap

__all__ = ["OutputCheck", "VerifyReport", "verify", "flatten_outputs"]


@dataclass
class VerifyReport:
    """Truthy when every output is within tolerance; prints one line per output.

    ``notes`` are the loads' notes on what the model's ``forward`` must do around its modules
    (see :class:`~weightport.ForwardNoteWarning`); a failed report repeats them, as a likely cause.
    """

    outputs: list[OutputCheck] = field(default_factory=list)
    rtol: float = 1e-5
    atol: float = 1e-6
    against: str = "expected outputs"
    notes: list[str] = field(default_factory=list)

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
        if not self and self.notes:
            lines.append("  the outputs differ; the load noted what forward must do, which may be why:")
            lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> VerifyReport:
        """Raise :class:`VerifyError` when an output is off; return the report otherwise."""
        if not self:
            fix = (
                "do in forward what the notes say, then check the weights' layout and the module's settings"
                if self.notes
                else "check the weights' layout and the module's settings"
            )
            raise VerifyError(f"{self}\nFix: {fix}.")
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
    against: str | os.PathLike[str] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> VerifyReport:
    """Run ``module(*inputs)`` in eval mode and compare with ``expected``, or with an ONNX file.

    The module is run under ``torch.no_grad()`` and every submodule's training mode is restored afterwards (a frozen BatchNorm stays in eval).

    Args:
        module: the module to run; under ``torch.compile`` or ``nn.DataParallel`` the wrapper
            is run, and the reference reads the wrapped module's weights.
        inputs: an array, or a tuple of arguments (arrays, or nested tuples like ``(h0, c0)``).
        expected: outputs in the module's own nesting; None (and no ``against``) compares an
            RNN-family module with :func:`weightport.reference.forward`. Where the module returns a
            mapping of tensors (a transformers ``ModelOutput``), a mapping compares the fields it names,
            and fewer arrays than fields compare the leading fields in order.
        against: an ``.onnx`` file, run with onnxruntime on the same inputs (flattened in order,
            as the graph's inputs); each of the module's outputs, flattened depth-first
            (``out, (h, c)`` is three), is compared with the graph's output in the same place.
        rtol, atol: an element passes when ``|a - e| <= atol + rtol * |e|``.

    Returns:
        A :class:`VerifyReport`: truthy when every output is within tolerance;
        ``raise_if_failed()`` raises :class:`VerifyError` otherwise.

    Raises:
        SourceError: both ``expected`` and ``against`` given; ``against`` not an ``.onnx``
            file, or one onnxruntime cannot open or run; inputs that are not the graph's.
        MissingDependencyError: ``against`` given and onnxruntime is not installed.
        VerifyError: the module returned a different number of outputs than expected.

    Example:
        >>> import os, tempfile, warnings, pytest, weightport
        >>> _ = pytest.importorskip("onnxruntime")  # the doctest is skipped without it
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
        >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
        >>> x = np.ones((1, 3), np.float32)
        >>> with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     torch.onnx.export(net, (torch.from_numpy(x),), path, dynamo=False)
        >>> report = weightport.verify(net, x, against=path)
        >>> bool(report), report.against
        (True, "'net.onnx' run by onnxruntime")
        >>> with torch.no_grad():
        ...     net[0].bias += 0.1
        >>> bool(weightport.verify(net, x, against=path))
        False
    """
    if against is not None and expected is not None:
        raise SourceError(
            "verify got both expected= and against=; pass one of them: expected= for outputs you "
            "computed, against= for an .onnx file to run."
        )
    first = next(iter(module.parameters()), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    args = _as_inputs(inputs, dtype, device)
    source, graph_outputs = "expected outputs", None
    if against is not None:  # before the forward: a bad file or input count fails fast
        onnx_file = f"'{Path(against).name}'"
        expected, graph_outputs = _run_onnx(Path(against), args)
        source = f"{onnx_file} run by onnxruntime"
    with in_eval(module):
        raw = module(*args)
    actual = flatten_outputs(raw)
    if expected is None:
        from weightport.reference import forward

        expected = forward(module, *args)
        source = "the NumPy reference"
    wanted = flatten_outputs(expected)
    names = _names(unwrap(module), len(actual))
    fields = output_fields(raw)
    if fields is not None:  # a mapping of tensors (a transformers ModelOutput): its fields by name
        names = fields
        if isinstance(expected, Mapping) and set(expected) <= set(fields):
            actual = [a for name, a in zip(fields, actual) if name in expected]
            names = [name for name in fields if name in expected]
            wanted = flatten_outputs({name: expected[name] for name in names})
        elif 0 < len(wanted) < len(actual):  # the leading fields, in order (last_hidden_state, logits)
            actual, names = actual[: len(wanted)], names[: len(wanted)]
    # the notes of every load into the module or any module inside it (a wrapper built around a loaded one)
    loaded = [module, *unwrap(module).modules()]
    notes = list(dict.fromkeys(note for m in loaded for note in forward_notes_of(m)))
    report = VerifyReport(rtol=rtol, atol=atol, against=source, notes=notes)
    if len(wanted) != len(actual) and graph_outputs is not None:
        raise VerifyError(
            f"the module returned {counted(len(actual), 'output')} (flattened in order) but "
            f"{onnx_file} has {counted(len(wanted), 'output')} ({', '.join(graph_outputs)}). Fix: "
            "compare with the ONNX file exported from this module, or pass the outputs as expected=."
        )
    if len(wanted) != len(actual):
        raise VerifyError(
            f"the module returned {counted(len(actual), 'output')} but {len(wanted)} "
            f"{'was' if len(wanted) == 1 else 'were'} expected. "
            "Fix: give expected outputs in the module's own nesting."
        )
    for name, a, e in zip(names, actual, wanted):
        report.outputs.append(compare_output(name, a, e, rtol, atol))
    return report


def _run_onnx(path: Path, args: tuple[Any, ...]) -> tuple[list[np.ndarray], list[str]]:
    """The outputs of the ONNX graph in ``path`` on ``args``, and the graph's output names."""
    where = f"'{path.name}'"
    if path.suffix.lower() != ".onnx":
        raise SourceError(
            f"cannot verify against {where}: against= runs .onnx files only (with onnxruntime). "
            "Fix: pass an .onnx file, or the other framework's outputs as expected=."
        )
    return run_graph(graph_session(path, where), flat_tensors(args), where)
