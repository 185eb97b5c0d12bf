"""Before a load from an ONNX file writes anything: the file's graph and the model, with the planned
tensors, run on the same inputs, and their outputs compared.

Pairing checks each layer's weights and settings; what the model computes between its layers (the
activations, pooling, residual adds, attention heads, the order it calls its layers in) only a run
shows. The inputs are ``example_inputs=``, or random ones where every input of the graph is a float
tensor of a known shape (a leading symbolic axis taken as a batch of 2). The model runs through
``torch.func.functional_call``: its own tensors are not touched.

>>> import numpy as np
>>> ok, largest, allowed = outputs_agree(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), eps=2.0**-23)
>>> ok, round(largest, 9), round(allowed, 9)
(True, 1e-06, 1.5259e-05)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.call_order import ExampleInputs, arguments_of, tensors_to
from weightport.errors import Problem, SourceError, WeightportError
from weightport.outputs import first_line, flat_tensors, flatten_outputs, graph_session, in_eval, run_graph
from weightport.plan import Plan
from weightport.sources.base import Source
from weightport.tensors import as_torch

__all__ = ["compare_with_graph", "outputs_agree", "AUTOMATIC_LIMIT"]

# Random inputs are made (and the graph run without being asked) for models up to this size; above it the
# run, which holds the graph's weights a second time, happens only for example_inputs.
AUTOMATIC_LIMIT = 1 << 30
_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.FLOAT, FLOAT16, DOUBLE
_OTHER_TYPES = {6: np.int32, 7: np.int64, 9: np.bool_}  # INT32, INT64, BOOL
# Allowed difference, in units of the coarser dtype's epsilon times the output's largest value (at least 1).
# Exact twins measured 1-8 of them against onnxruntime (ResNet-50, ConvNeXt-T, ViT-S, BERT-base, EfficientNet-B0).
_ULPS = 64


def outputs_agree(actual: np.ndarray, expected: np.ndarray, eps: float) -> tuple[bool, float, float]:
    """Whether two outputs agree within rounding: ``|a - e| <= 64 eps max(max|e|, 1)`` (NaN and Inf
    where both have them); with the largest difference and the allowance."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    finite = np.isfinite(e)
    scale = float(np.abs(e[finite]).max()) if finite.any() else 0.0
    allowed = _ULPS * eps * max(scale, 1.0)
    diff = np.where(same, 0.0, np.abs(a - e))
    largest = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
    return largest <= allowed, largest, allowed


def compare_with_graph(
    plan: Plan, source: Source, root: nn.Module, example_inputs: ExampleInputs | None, strict: bool = True
) -> tuple[list[Problem], list[str]]:
    """The problem of a model whose outputs, with the planned tensors, are not the graph's; else, where
    they could not be compared, why (a note for the load's warning). Nothing for other sources, nor for a
    partial load (``strict=False`` leaving tensors on either side)."""
    runnable = getattr(source, "runnable", None)
    partial = not strict and (plan.missing or plan.ignored)  # computes something else by choice
    # where the load notes what forward must still do, the outputs may differ until it does (the notes warn)
    if (
        runnable is None
        or plan.layout.name != "onnx"
        or not plan.entries
        or partial
        or plan.layout.forward_notes
    ):
        return [], []
    where = source.description
    inside = plan.module is not root  # prefix=, or a wrapped model: the graph is the submodule's
    given = None if inside else example_inputs  # an example is the whole model's inputs
    if given is None and plan.nbytes > AUTOMATIC_LIMIT:
        return [], [
            _unchecked(f"the model is {plan.nbytes / 2**30:.1f} GiB, and no example_inputs were given")
        ]
    inputs = _inputs(source, plan.module, given)
    if inputs is None:
        return [], [_unchecked(_why_no_inputs(source, plan), inputs_would_help=not inside)]
    args, kwargs = inputs
    try:
        serialized = runnable()
        if serialized is None:
            return [], [_unchecked(f"{where} keeps external data inside a subgraph")]
        session = graph_session(serialized, where)
        expected, names = run_graph(session, _graph_order(session, args, kwargs, where), where)
    except WeightportError as error:
        return [], [_unchecked(f"{where} could not be run: {first_line(error)}", given is None)]
    if not all(np.isfinite(e).all() for e in expected if e.dtype.kind in "fc"):  # NaN is no comparison
        return [], [_unchecked("the graph's outputs on them are not all finite", given is None)]
    try:
        actual = _run_model(plan, source, args, kwargs)
    except Exception as error:  # any failure of the model's own forward: the comparison is what is lost
        return [], [
            _unchecked(
                f"the model could not run on them with the planned tensors ({first_line(error)})",
                given is None,
            )
        ]
    leading = actual[: len(expected)]
    if len(expected) < len(actual) and [a.size for a in leading] == [e.size for e in expected]:
        actual = leading  # the leading outputs, as a graph of an RNN's sequence that leaves out its states
    eps = _coarsest_eps([*(e.tensor.dtype for e in plan.entries), *(o.dtype for o in expected)])
    shapes = [a.shape for a in actual], [e.shape for e in expected]
    if shapes[0] != shapes[1]:  # another nesting or layout of the outputs (an RNN node's Y: no batch-first)
        sizes = [a.size for a in actual] == [e.size for e in expected]
        if sizes and all(
            outputs_agree(a.reshape(-1), e.reshape(-1), eps)[0] for a, e in zip(actual, expected)
        ):
            return [], []  # the same values in the same order, under other shapes
        said = ", ".join(str(shape) for shape in shapes[1])
        return [], [
            _unchecked(
                f"the model returns outputs of shapes {', '.join(str(shape) for shape in shapes[0])} "
                f"(flattened in order) and the graph {said}",
                inputs_would_help=False,
            )
        ]
    for name, a, want in zip(names, actual, expected):
        ok, largest, allowed = outputs_agree(a, want, eps)
        if ok:
            continue
        found = f"output '{name}' off by up to {largest:.3g} (rounding allows {allowed:.2g})"
        said = "the given example_inputs" if given is not None else "random inputs of its declared shapes"
        return [
            Problem(
                "(outputs)",
                f"the outputs of the graph of {where} (run by onnxruntime on {said})",
                f"{found} from the model with the planned tensors: every weight fits its layer, so the model "
                "computes something else between its layers (an activation, pooling, a residual add, attention "
                "heads, a flatten order, or layers called in another order than they were paired in)",
                "build the model the file was exported from (compare its activations, pooling and attention "
                "settings with the graph's ops; `weightport inspect` lists them); or, where the difference is "
                "meant, pass check_outputs=False and compare with weightport.verify(model, inputs, against=file)",
            )
        ], []
    return [], []


def _unchecked(why: str, inputs_would_help: bool = True) -> str:
    fix = (
        "pass example_inputs= to have both run on them before anything is written"
        if inputs_would_help
        else "compare them with weightport.verify(model, inputs, against=file)"
    )
    return (
        f"what the model computes between its layers (activations, pooling, residual adds, attention heads): its "
        f"outputs were not compared with the graph's, as {why}. Fix: {fix}"
    )


def _graph_inputs(source: Source) -> list[Any]:
    model = getattr(source, "model", None)
    if model is None:
        return []
    stored = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in stored]


def _inputs(
    source: Source, root: nn.Module, example_inputs: ExampleInputs | None
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The inputs both run on: the example's, or made from the graph's declared inputs (see :func:`_made`),
    by keyword where the model's forward takes every graph input's name."""
    if example_inputs is not None:
        args, kwargs = arguments_of(example_inputs)
        return tensors_to(args, lambda t: t), tensors_to(kwargs, lambda t: t)
    made = _made(source)
    if not made:
        return None
    try:
        parameters = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    if all(name in parameters for name in made):
        return (), made
    return tuple(made.values()), {}


def _made(source: Source) -> dict[str, torch.Tensor] | None:
    """Random values for every graph input of a known shape (a symbolic leading axis taken as 2, others
    as 11): floats from a normal distribution; integers that index an embedding table (a ``Gather`` of a
    stored tensor, through ops that only reshape or cast) below its row count; other integers and booleans
    as masks that keep a different prefix of each row (1 then 0), so that neither reading of a mask (1 keeps,
    or True pads) hides every position and masking is exercised."""
    rng = np.random.default_rng(0)
    made = {}
    bounds = _index_bounds(source)
    for graph_input in _graph_inputs(source):
        tensor_type = graph_input.type.tensor_type
        if not tensor_type.HasField("shape"):
            return None
        dims = [
            d.dim_value
            if d.HasField("dim_value")
            else (2 if i == 0 else 11)
            if d.HasField("dim_param")
            else -1
            for i, d in enumerate(tensor_type.shape.dim)
        ]
        dtype = _FLOAT_TYPES.get(tensor_type.elem_type) or _OTHER_TYPES.get(tensor_type.elem_type)
        if dtype is None or any(d <= 0 for d in dims):
            return None
        if dtype in _FLOAT_TYPES.values():
            array: np.ndarray = rng.standard_normal(dims).astype(dtype)
        elif graph_input.name in bounds:
            array = rng.integers(0, bounds[graph_input.name], dims).astype(dtype)
        else:
            array = _mask(dims).astype(dtype)
        made[graph_input.name] = torch.from_numpy(array)
    return made


def _mask(dims: list[int]) -> np.ndarray:
    """1 over a prefix of each row's last axis and 0 after it, the prefix shorter in each row (at least 1)."""
    if not dims:
        return np.ones((), np.int64)
    rows, width = math.prod(dims[:-1]), dims[-1]
    kept = [max(1, width - 1 - row % max(1, width - 1)) for row in range(rows)]
    return (np.arange(width)[None, :] < np.array(kept)[:, None]).reshape(dims)


# ops whose first input reaches their output as the same values, reshaped or cast: an index stays an index
_PASSES_INDICES = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Slice"}


def _index_bounds(source: Source) -> dict[str, int]:
    """Graph inputs used, directly or through ops that only reshape or cast them, as the indices of a
    ``Gather`` from a stored tensor: the fewest rows they index."""
    stored = set(source.infos)
    nodes = source.metadata.get("nodes", [])
    origin = {graph_input.name: graph_input.name for graph_input in _graph_inputs(source)}
    for node in nodes:  # nodes are in topological order: one pass carries each input forward
        inputs, outputs = node.get("inputs", []), node.get("outputs", [])
        if node.get("op_type") in _PASSES_INDICES and inputs and inputs[0] in origin and outputs:
            origin[outputs[0]] = origin[inputs[0]]
    bounds: dict[str, int] = {}
    for node in nodes:
        inputs = node.get("inputs", [])
        if (
            node.get("op_type") == "Gather"
            and len(inputs) == 2
            and inputs[0] in stored
            and inputs[1] in origin
        ):
            axis = int(node.get("attributes", {}).get("axis", 0))
            shape = source.infos[inputs[0]].shape
            if 0 <= axis < len(shape):
                name = origin[inputs[1]]
                bounds[name] = min(bounds.get(name, shape[axis]), shape[axis])
    return bounds


def _why_no_inputs(source: Source, plan: Plan) -> str:
    described = []
    for graph_input in _graph_inputs(source):
        tensor_type = graph_input.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor_type.shape.dim]
        described.append(f"{graph_input.name} {dims}")
    return (
        f"no example_inputs were given and not every input of the graph is a number tensor of a known rank "
        f"({', '.join(described) or 'none'})"
    )


def _graph_order(
    session: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str
) -> list[torch.Tensor]:
    """The example's tensors in the graph's input order: positionals flattened in order, keywords by name."""
    tensors = [torch.as_tensor(t) for t in flat_tensors(list(args))]
    names = [i.name for i in session.get_inputs()]
    if kwargs:
        unnamed = [n for n in names[len(tensors) :] if n not in kwargs]
        if unnamed:
            raise SourceError(
                f"{where}: graph inputs {', '.join(unnamed)} are not among the example's keywords "
                f"({', '.join(kwargs)})"
            )
        tensors += [torch.as_tensor(kwargs[n]) for n in names[len(tensors) :]]
    return tensors


def _run_model(plan: Plan, source: Source, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[np.ndarray]:
    """The model's outputs, flattened in order, in eval mode with the planned tensors in place of its own."""
    tensors: dict[str, torch.Tensor] = {}
    tied: set[str] = set()
    device = torch.device("cpu")
    for entry in plan.entries:
        name = entry.target.removeprefix(plan.prefix)  # the names inside the module loaded into
        if any(name in names for names in (tensors, tied)):
            continue  # a tied tensor is given once: functional_call ties its other names
        target = entry.tensor
        device = target.device if target.device.type != "meta" else device
        value = as_torch(np.ascontiguousarray(entry.value(source))).reshape(entry.shape)
        tensors[name] = value.to(dtype=target.dtype)
        tied.update(alias.removeprefix(plan.prefix) for alias in entry.aliases)
    tensors = {name: t.to(device) for name, t in tensors.items()}
    dtype = plan.entries[0].tensor.dtype

    def moved(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).to(device)
        return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point else t

    with in_eval(plan.module):
        out = torch.func.functional_call(
            plan.module, tensors, tensors_to(args, moved), tensors_to(kwargs, moved), strict=False
        )
    return flatten_outputs(out)


def _coarsest_eps(dtypes: list[Any]) -> float:
    """The epsilon of the least precise float among torch and NumPy dtypes (float32's where none is)."""
    epsilons = [float(np.finfo(np.float32).eps)]
    for dtype in dtypes:
        if isinstance(dtype, torch.dtype):
            epsilons += [torch.finfo(dtype).eps] if dtype.is_floating_point else []
        elif np.dtype(dtype).kind == "f":
            epsilons.append(float(np.finfo(dtype).eps))
    return max(epsilons)
