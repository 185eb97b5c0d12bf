"""Outputs compared: a module's flattened in order, and an ONNX graph's, run by onnxruntime.

The one home of how :func:`weightport.verify` and a load from an ONNX file (which runs the file's graph
before writing, see :mod:`weightport.graph_check`) flatten, run and compare outputs.

>>> [a.shape for a in flatten_outputs({"last": np.zeros((2, 3)), "pooled": (np.ones(3), None)})]
[(2, 3), (3,)]
>>> compare_output("y", np.array([1.0, 2.0]), np.array([1.0, 2.5]), rtol=1e-5, atol=1e-6).max_abs
0.5
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from weightport.errors import MissingDependencyError, SourceError, VerifyError, counted
from weightport.tensors import numpy_of

__all__ = [
    "OutputCheck",
    "compare_output",
    "first_line",
    "flat_tensors",
    "flatten_outputs",
    "graph_session",
    "in_eval",
    "output_fields",
    "run_graph",
]


@dataclass(frozen=True)
class OutputCheck:
    """One output compared: its name, shape and max absolute / relative errors."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def output_fields(outputs: Any) -> list[str] | None:
    """The names of a mapping of tensors (None values left out, as ``ModelOutput`` leaves them), else None."""
    if not isinstance(outputs, Mapping):
        return None
    items = [(str(k), v) for k, v in outputs.items() if v is not None]
    return [k for k, _ in items] if all(isinstance(v, torch.Tensor) for _, v in items) else None


def flatten_outputs(outputs: Any) -> list[np.ndarray]:
    """Nested tuples, lists and mappings (a transformers ``ModelOutput``: its values in order) of
    tensors/arrays, in order, as NumPy arrays; ``None`` entries are no output."""
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


@contextlib.contextmanager
def in_eval(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode, without gradients; then every submodule back in its own mode (``train(mode)``
    would set them all to the root's, undoing a frozen BatchNorm's eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for inner, training in modes:
            inner.training = training


def flat_tensors(args: Any) -> list[torch.Tensor]:
    """The tensors of nested argument tuples, depth-first; None arguments are not graph inputs."""
    if isinstance(args, (tuple, list)):
        return [t for item in args for t in flat_tensors(item)]
    return [] if args is None else [args]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a runtime's errors run to pages)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def graph_session(model: str | os.PathLike[str] | bytes, where: str) -> Any:
    """An onnxruntime session (CPU) over a model file's path, or a serialized model.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        SourceError: onnxruntime cannot open the model.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(f"Running {where} needs onnxruntime: pip install onnxruntime") from e
    try:
        given = model if isinstance(model, bytes) else os.fspath(model)
        return onnxruntime.InferenceSession(given, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors derive from Exception alone
        raise SourceError(
            f"{where}: onnxruntime cannot open it ({first_line(e)}). Fix: check the path, and that "
            "the file is a complete ONNX model."
        ) from e


_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def run_graph(session: Any, tensors: list[torch.Tensor], where: str) -> tuple[list[np.ndarray], list[str]]:
    """The graph's outputs on ``tensors`` (its inputs in order), and its output names.

    Raises:
        SourceError: not as many tensors as the graph's inputs, or the runtime failed on them.
    """
    graph_inputs = session.get_inputs()
    spec = ", ".join(f"{i.name} {i.type} {i.shape}" for i in graph_inputs)
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
            f"onnxruntime could not run {where} on {given} ({first_line(e)}). Fix: pass inputs of "
            f"the shapes and types its graph takes: {spec}."
        ) from e
    return [np.asarray(o) for o in outputs], [o.name for o in session.get_outputs()]


def compare_output(
    name: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float
) -> OutputCheck:
    """``actual`` against ``expected``: an element passes when ``|a - e| <= atol + rtol * |e|``."""
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
