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
    "Widened",
    "float32_graph",
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


def graph_session(model: str | os.PathLike[str] | bytes, where: str, quiet: bool = False) -> Any:
    """An onnxruntime session (CPU) over a model file's path, or a serialized model; ``quiet``: its
    failures are not also logged to stderr (runs on inputs that were made, which may not fit).

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
        options = onnxruntime.SessionOptions()
        if quiet:
            options.log_severity_level = 4  # fatal only: a failed run is raised, and said once by the caller
        return onnxruntime.InferenceSession(given, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors derive from Exception alone
        raise SourceError(
            f"{where}: onnxruntime cannot open it ({first_line(e)}). Fix: check the path, and that "
            "the file is a complete ONNX model."
        ) from e


_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def run_graph(
    session: Any, tensors: list[torch.Tensor], where: str, extra: Mapping[str, np.ndarray] | None = None
) -> tuple[list[np.ndarray], list[str]]:
    """The graph's outputs on ``tensors`` (its inputs in order, besides those ``extra`` feeds by name), and
    its output names.

    Raises:
        SourceError: not as many tensors as the graph's inputs, or the runtime failed on them.
    """
    extra = extra or {}
    graph_inputs = [i for i in session.get_inputs() if i.name not in extra]
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
    given = ", ".join(f"{n} {a.dtype} {list(a.shape)}" for n, a in feeds.items())
    try:
        outputs = session.run(None, {**feeds, **extra})
    except Exception as e:
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


# TensorProto.FLOAT16 and BFLOAT16, and their names; FLOAT
_LOW_FLOATS = {10: "float16", 16: "bfloat16"}
_FLOAT = 1
# A narrow constant's value taken as exact where it needs at most this many significant bits (1, 0.5, 0.75, 3):
# exporters write those exactly, while a rounded float32 constant fills the mantissa (all but 1 in 64 do).
_EXACT_BITS = {"float16": 5, "bfloat16": 2}


@dataclass
class Widened:
    """A graph with float16 and bfloat16 widened to float32 (see :func:`float32_graph`)."""

    graph: bytes | None  # None: nothing narrow in it, or a tensor that could not be widened
    low: list[str]  # the narrow types found
    # its narrow constants that look rounded (not a weight kept by the caller), now graph inputs: their
    # widened values, and half a unit in their last place (0 where exact): how far the rounding moved them
    constants: dict[str, tuple[np.ndarray, np.ndarray]]


def float32_graph(serialized: bytes, keep: frozenset[str] = frozenset()) -> Widened:
    """The graph with float16 and bfloat16 taken as storage: their tensors (initializers, ``Constant`` and
    ``ConstantOfShape`` values) widened exactly to float32, casts and ``dtype`` attributes to them made
    float32, and so the value types of its inputs, outputs and intermediate values; subgraphs and local
    functions too. The main graph's narrow ``Constant`` values and initializers outside ``keep`` that look
    rounded (some value fills the mantissa) become graph inputs, so one session runs them as stored or moved.

    >>> import onnx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.array([0.5, 1.4142], np.float16), "w")
    >>> node = helper.make_node("Mul", ["x", "w"], ["y"])
    >>> x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2]) for n in "xy")
    >>> m = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))
    >>> widened = float32_graph(m.SerializeToString())
    >>> widened.low, [i.name for i in onnx.ModelProto.FromString(widened.graph).graph.input]
    (['float16'], ['x', 'w'])
    >>> widened.constants["w"][1]  # 0.5 taken as exact; 1.4142 as float16 rounded it
    array([0.        , 0.00048828], dtype=float32)
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return Widened(None, [], {})
    found: set[str] = set()
    constants: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        model = onnx.ModelProto.FromString(serialized)
        graph = model.graph
        declared = {i.name for i in graph.input}
        for tensor in list(graph.initializer):
            if (
                tensor.data_type in _LOW_FLOATS
                and tensor.name not in keep
                and _rounded(tensor, constants, numpy_helper)
            ):
                found.add(_LOW_FLOATS[tensor.data_type])
                graph.initializer.remove(tensor)
                if tensor.name not in declared:
                    graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, _FLOAT, tensor.dims))
        for node in list(graph.node):
            value = [a.t for a in node.attribute if a.name == "value" and a.t.data_type in _LOW_FLOATS]
            plain = node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1
            if (
                plain
                and value
                and node.output[0] not in keep
                and _rounded(value[0], constants, numpy_helper, node.output[0])
            ):
                found.add(_LOW_FLOATS[value[0].data_type])
                graph.node.remove(node)
                graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], _FLOAT, value[0].dims))
        _promote_graph(graph, found, numpy_helper)
        for function in model.functions:
            _promote_nodes(function.node, found, numpy_helper)
        promoted = bytes(model.SerializeToString()) if found else None
    except Exception:  # a graph the promotion cannot widen: the caller compares the file's own graph
        return Widened(None, sorted(found), {})
    return Widened(promoted, sorted(found), constants if promoted else {})


def _rounded(
    tensor: Any, constants: dict[str, tuple[np.ndarray, np.ndarray]], numpy_helper: Any, name: str = ""
) -> bool:
    """Whether a narrow constant looks rounded (some value of it fills the mantissa); then its widened
    values and half units in their last place (0 where exact) go into ``constants``."""
    kind = _LOW_FLOATS[tensor.data_type]
    wide = np.asarray(numpy_helper.to_array(tensor)).astype(np.float32)
    fraction, exponent = np.frexp(wide)
    scaled = fraction * 2.0 ** _EXACT_BITS[kind]
    exact = ~np.isfinite(wide) | (scaled == np.round(scaled))
    if exact.all():
        return False
    bits = 11 if kind == "float16" else 8  # significant bits; float16's subnormals below 2**-14 have fewer
    ulp = np.ldexp(np.float32(1.0), np.maximum(exponent, -13) - bits).astype(np.float32)
    half = np.where(exact, np.float32(0.0), ulp / 2).astype(np.float32)
    shape = tuple(int(d) for d in tensor.dims)
    constants[name or tensor.name] = (wide.reshape(shape), half.reshape(shape))
    return True


def _promote_graph(graph: Any, found: set[str], numpy_helper: Any) -> None:
    for tensor in graph.initializer:
        _promote_tensor(tensor, found, numpy_helper)
    for sparse in graph.sparse_initializer:
        _promote_tensor(sparse.values, found, numpy_helper)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _promote_type(value.type, found)
    _promote_nodes(graph.node, found, numpy_helper)


def _promote_nodes(nodes: Any, found: set[str], numpy_helper: Any) -> None:
    for node in nodes:
        for attr in node.attribute:
            if (
                attr.name in ("to", "dtype", "output_dtype") and attr.i in _LOW_FLOATS
            ):  # Cast, RandomNormal, ...
                found.add(_LOW_FLOATS[attr.i])
                attr.i = _FLOAT
            for tensor in [attr.t, *attr.tensors]:
                _promote_tensor(tensor, found, numpy_helper)
            for sparse in [attr.sparse_tensor, *attr.sparse_tensors]:
                _promote_tensor(sparse.values, found, numpy_helper)
            for graph in [attr.g, *attr.graphs]:
                _promote_graph(graph, found, numpy_helper)


def _promote_tensor(tensor: Any, found: set[str], numpy_helper: Any) -> None:
    if tensor.data_type in _LOW_FLOATS:
        found.add(_LOW_FLOATS[tensor.data_type])
        widened = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
        tensor.CopyFrom(widened)


def _promote_type(value_type: Any, found: set[str]) -> None:
    kind = value_type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(value_type, kind)
        if inner.elem_type in _LOW_FLOATS:
            found.add(_LOW_FLOATS[inner.elem_type])
            inner.elem_type = _FLOAT
    elif kind in ("sequence_type", "optional_type"):
        _promote_type(getattr(value_type, kind).elem_type, found)
    elif kind == "map_type":
        _promote_type(value_type.map_type.value_type, found)
