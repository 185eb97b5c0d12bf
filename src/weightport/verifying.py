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

from weightport.errors import MissingDependencyError, SourceError, VerifyError, counted
from weightport.report import forward_notes_of
from weightport.tensors import numpy_of, unwrap

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


def _fields(outputs: Any) -> list[str] | None:
    """The names of a mapping of tensors (None values left out, as ``ModelOutput`` leaves them), else None."""
    if not isinstance(outputs, Mapping):
        return None
    items = [(str(k), v) for k, v in outputs.items() if v is not None]
    return [k for k, _ in items] if all(isinstance(v, torch.Tensor) for _, v in items) else None


def flatten_outputs(outputs: Any) -> list[np.ndarray]:
    """Nested tuples, lists and mappings (a transformers ``ModelOutput``: its values in order) of
    tensors/arrays, in order, as NumPy arrays; ``None`` entries are no output.

    >>> [a.shape for a in flatten_outputs({"last": np.zeros((2, 3)), "pooled": (np.ones(3), None)})]
    [(2, 3), (3,)]
    """
    if outputs is None:
        return []
    if isinstance(outputs, Mapping):
        return [a for item in outputs.values() for a in flatten_outputs(item)]
    if isinstance(outputs, (tuple, list)):
        return [a for item in outputs for a in flatten_outputs(item)]
    if isinstance(outputs, torch.Tensor):
        return [numpy_of(outputs, copy=True)]
    array = np.asarray(outputs)
    if array.dtype == object:
        raise VerifyError(
            f"an output of type {type(outputs).__name__} is not an array, nor a tuple, list or mapping of "
            "them. Fix: give the outputs as tensors or arrays, or wrap the module so it returns them."
        )
    return [array]


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

    The module is run under ``torch.no_grad()`` and its training mode is restored afterwards.

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
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            raw = module(*args)
        actual = flatten_outputs(raw)
    finally:
        module.train(was_training)
    if expected is None:
        from weightport.reference import forward

        expected = forward(module, *args)
        source = "the NumPy reference"
    wanted = flatten_outputs(expected)
    names = _names(unwrap(module), len(actual))
    fields = _fields(raw)
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
        report.outputs.append(_compare(name, a, e, rtol, atol))
    return report


_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def _flat_tensors(args: Any) -> list[torch.Tensor]:
    """The tensors of nested argument tuples, depth-first; None arguments are not graph inputs."""
    if isinstance(args, (tuple, list)):
        return [t for item in args for t in _flat_tensors(item)]
    return [] if args is None else [args]


def _run_onnx(path: Path, args: tuple[Any, ...]) -> tuple[list[np.ndarray], list[str]]:
    """The outputs of the ONNX graph in ``path`` on ``args``, and the graph's output names."""
    where = f"'{path.name}'"
    if path.suffix.lower() != ".onnx":
        raise SourceError(
            f"cannot verify against {where}: against= runs .onnx files only (with onnxruntime). "
            "Fix: pass an .onnx file, or the other framework's outputs as expected=."
        )
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            f"Verifying against {where} needs onnxruntime: pip install onnxruntime"
        ) from e
    try:
        session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors derive from Exception alone
        raise SourceError(
            f"{where}: onnxruntime cannot open it ({_first_line(e)}). Fix: check the path, and that "
            "the file is a complete ONNX model."
        ) from e
    graph_inputs = session.get_inputs()
    spec = ", ".join(f"{i.name} {i.type} {i.shape}" for i in graph_inputs)
    tensors = _flat_tensors(args)
    if len(tensors) != len(graph_inputs):
        raise SourceError(
            f"{where} takes {counted(len(graph_inputs), 'input')} "
            f"({', '.join(i.name for i in graph_inputs)}) but {counted(len(tensors), 'array')} "
            f"{'was' if len(tensors) == 1 else 'were'} given. Fix: pass the graph's inputs in its order "
            f"({spec}); nested tuples such as (x, (h0, c0)) give one input per array."
        )
    feeds = {}
    for info, tensor in zip(graph_inputs, tensors):
        array = numpy_of(tensor, copy=True)
        wanted = _ONNX_FLOATS.get(info.type)
        # a float64 module against a float32 graph: the graph's own type, as its exporter fed it
        feeds[info.name] = array.astype(wanted) if wanted and tensor.is_floating_point() else array
    try:
        outputs = session.run(None, feeds)
    except Exception as e:
        given = ", ".join(f"{n} {a.dtype} {list(a.shape)}" for n, a in feeds.items())
        raise SourceError(
            f"onnxruntime could not run {where} on {given} ({_first_line(e)}). Fix: pass inputs of "
            f"the shapes and types its graph takes: {spec}."
        ) from e
    return [np.asarray(o) for o in outputs], [o.name for o in session.get_outputs()]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
