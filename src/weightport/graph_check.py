"""Before a load from an ONNX file writes anything: the file's graph and the model, with the planned
tensors, run on the same inputs, and their outputs compared.

Pairing checks each layer's weights and settings; what the model computes between its layers (the
activations, pooling, residual adds, attention heads, the order it calls its layers in) only a run
shows. The inputs are ``example_inputs=``, or random ones where every input of the graph is a number
tensor of a known shape (a leading symbolic axis taken as a batch of 2, other symbolic axes a size the
graph runs on). The model runs through ``torch.func.functional_call``: its own tensors are not touched.
float16 and bfloat16 are storage: both run in float32, so float32's rounding bounds them.

>>> import numpy as np
>>> ok, largest, allowed = outputs_agree(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), eps=2.0**-23)
>>> ok, round(largest, 9), round(allowed, 9)
(True, 1e-06, 1.5259e-05)
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.call_order import ExampleInputs, arguments_of, tensors_to
from weightport.errors import Problem, SourceError, WeightportError
from weightport.outputs import (
    first_line,
    flat_tensors,
    flatten_outputs,
    float32_graph,
    graph_session,
    in_eval,
    run_graph,
)
from weightport.plan import Plan
from weightport.sources.base import Source
from weightport.sources.onnx import BFLOAT16, ONNX_DTYPES
from weightport.tensors import as_torch

__all__ = ["compare_with_graph", "outputs_agree", "AUTOMATIC_LIMIT"]

# Random inputs are made (and the graph run without being asked) for models up to this size; above it the
# run, which holds the graph's weights a second time, happens only for example_inputs.
AUTOMATIC_LIMIT = 1 << 30
# The graph input types inputs are made for (by TensorProto code; bfloat16 made in float32, then rounded by torch)
_FLOAT_TYPES = {code: dtype.type for code, dtype in ONNX_DTYPES.items() if dtype.kind == "f"}
_OTHER_TYPES = {
    code: dtype.type for code, dtype in ONNX_DTYPES.items() if dtype.type in (np.int32, np.int64, np.bool_)
}
# Allowed difference, in units of the coarser dtype's epsilon times the output's largest value (at least 1).
# Exact twins measured 1-8 of them against onnxruntime (ResNet-50, ConvNeXt-T, ViT-S, BERT-base, EfficientNet-B0).
_ULPS = 64
_FLOAT32_EPS = float(np.finfo(np.float32).eps)
_LOW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # storage: computed in float32
# Made inputs: the sizes tried for symbolic axes past the first (a batch of 2), in order, until the graph runs
# (a ViT's patches and position embeddings take only its own image size); within this many seconds.
_SIZES = (11, 32, 64, 224, 16, 8, 128, 256, 384, 512)
_RETRY_SECONDS = 10.0
_MADE_LIMIT = 1 << 24  # elements of one made input: larger sizes are not tried
_GROUPS = 8  # runs that move the graph's rounded float16 constants, value by value


def outputs_agree(
    actual: np.ndarray, expected: np.ndarray, eps: float, slack: np.ndarray | None = None
) -> tuple[bool, float, float]:
    """Whether two outputs agree within rounding: ``|a - e| <= 64 eps max(max|e|, 1)``, plus ``slack``
    element by element where given (NaN and Inf where both have them); with the largest difference and
    the allowance (where the difference passes its allowance most, with slack)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    finite = np.isfinite(e)
    scale = float(np.abs(e[finite]).max()) if finite.any() else 0.0
    allowed = _ULPS * eps * max(scale, 1.0)
    diff = np.nan_to_num(np.where(same, 0.0, np.abs(a - e)), nan=np.inf)
    if slack is None or not diff.size:
        largest = float(diff.max()) if diff.size else 0.0
        return largest <= allowed, largest, allowed
    bound = allowed + slack.reshape(diff.shape)
    worst = int(np.argmax(diff - bound))
    largest, at = float(diff.reshape(-1)[worst]), float(bound.reshape(-1)[worst])
    return largest <= at, largest, at


def compare_with_graph(
    plan: Plan, source: Source, root: nn.Module, example_inputs: ExampleInputs | None, strict: bool = True
) -> tuple[list[Problem], list[str]]:
    """The problem of a model whose outputs, with the planned tensors, are not the graph's; else, where
    they could not be compared, or only coarsely, why (notes for the load's warning). Nothing for other
    sources, nor for a partial load (``strict=False`` leaving tensors on either side).

    float16 and bfloat16 are storage here: the graph is run with its tensors and types widened to float32
    (:func:`~weightport.outputs.float32_graph`) and the model with the planned values in float32, so
    float32's rounding bounds them; only where either cannot run so are they compared in the narrow type,
    64 of its epsilons apart (6% for float16), and a note says so."""
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
    made = given is None
    if made and plan.nbytes > AUTOMATIC_LIMIT:
        return [], [
            _unchecked(f"the model is {plan.nbytes / 2**30:.1f} GiB, and no example_inputs were given")
        ]
    if _inputs(source, plan.module, given) is None:
        return [], [_unchecked(_why_no_inputs(source, plan), inputs_would_help=not inside)]
    try:
        serialized = runnable()
    except WeightportError as error:
        return [], [_unchecked(f"{where} could not be run: {first_line(error)}", made)]
    if serialized is None:
        return [], [_unchecked(f"{where} keeps external data inside a subgraph")]
    widened = float32_graph(serialized, frozenset(name for e in plan.entries for name in e.rule.sources))
    promoted, low, constants = widened.graph, widened.low, widened.constants
    del widened
    narrow = [_LOW_DTYPES[name] for name in low]
    narrow += [e.tensor.dtype for e in plan.entries if e.tensor.dtype in _LOW_DTYPES.values()]
    candidates = _candidates(source, plan.module, given)
    if promoted is not None or not low:  # in float32, the graph widened where it holds a narrow float
        ran = _run_both(plan, source, promoted or serialized, candidates, True, where, made, constants)
        del promoted
        coarse_why = ""
        if isinstance(ran, _Failed) and narrow:
            coarse_why = f"in float32 {ran.why}"
    else:
        ran, coarse_why = (
            _Failed("", None),
            f"its {' and '.join(low)} tensors could not be widened to float32",
        )
    if isinstance(ran, _Failed) and narrow:  # the file's own graph and the model in its own dtypes
        retry = [ran.inputs] if ran.inputs is not None else _candidates(source, plan.module, given)
        ran = _run_both(plan, source, serialized, retry, False, where, made, {})
    del serialized
    if isinstance(ran, _Failed):
        return [], [_unchecked(ran.why, made)]
    return _compared(ran, plan, where, given, narrow if coarse_why else [], coarse_why)


def _compared(
    ran: _Ran, plan: Plan, where: str, given: ExampleInputs | None, narrow: list[Any], coarse_why: str
) -> tuple[list[Problem], list[str]]:
    """The comparison of one run of both: a problem where an output differs, else notes (outputs not
    compared, or compared only to a narrow float's precision)."""
    made = given is None
    expected, names, actual = ran.expected, ran.names, ran.actual
    leading = actual[: len(expected)]
    if len(expected) < len(actual) and [a.size for a in leading] == [e.size for e in expected]:
        actual = leading  # the leading outputs, as a graph of an RNN's sequence that leaves out its states
    # an output the graph gives NaN or Inf in is no comparison (NaN == NaN would pass anything); the others are
    finite = [not (e.dtype.kind in "fc" and not np.isfinite(e).all()) for e in expected]
    if not any(finite):
        return [], [_unchecked("the graph's outputs on them are not all finite", made)]
    notes = []
    if not all(finite):
        skipped = ", ".join(f"'{n}'" for n, ok in zip(names, finite) if not ok)
        notes.append(
            _unchecked(
                "the graph's values of them on these inputs are not all finite",
                made,
                f" for {skipped} (the others were)",
            )
        )
    eps, coarsest = _coarsest(
        [*ran.dtypes, *narrow, *(e.dtype for e in expected), *(a.dtype for a in actual)]
    )
    slacks: list[np.ndarray | None] = [*ran.slack] if ran.slack else [None] * len(expected)
    pairs = [(n, a, e, m) for n, a, e, m, ok in zip(names, actual, expected, slacks, finite) if ok]
    shapes = [a.shape for a in actual], [e.shape for e in expected]
    if shapes[0] != shapes[1]:  # another nesting or layout of the outputs (an RNN node's Y: no batch-first)
        sizes = [a.size for a in actual] == [e.size for e in expected]
        if sizes and all(outputs_agree(a.reshape(-1), e.reshape(-1), eps, m)[0] for _, a, e, m in pairs):
            # the same values in the same order, under other shapes
            pairs = [(n, a.reshape(-1), e.reshape(-1), m) for n, a, e, m in pairs]
        else:
            said = ", ".join(str(shape) for shape in shapes[1])
            return [], [
                _unchecked(
                    f"the model returns outputs of shapes {', '.join(str(shape) for shape in shapes[0])} "
                    f"(flattened in order) and the graph {said}",
                    inputs_would_help=False,
                )
            ]
    largest_allowed = 0.0
    for name, a, want, moved in pairs:
        ok, largest, allowed = outputs_agree(a, want, eps, moved)
        largest_allowed = max(largest_allowed, allowed)
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
        ], notes
    if eps > _FLOAT32_EPS:  # a pass this coarse lets a model that computes slightly else through: say so
        why = coarse_why or f"the model computes its outputs in {coarsest}"
        notes.append(
            f"what the model computes between its layers (activations, pooling, residual adds, attention "
            f"heads): its outputs were compared with the graph's only to {coarsest}'s precision (64 of its "
            f"epsilons times the largest output, here up to {largest_allowed:.2g}), as {why}, so a model that "
            "computes slightly else (a scaled activation, GELU's tanh approximation) passes it. Fix: compare "
            "the outputs yourself at the tolerance you need: weightport.verify(model, inputs, against=file)"
        )
    return [], notes


def _unchecked(why: str, inputs_would_help: bool = True, only: str = "") -> str:
    fix = (
        "pass example_inputs= to have both run on them before anything is written"
        if inputs_would_help
        else "compare them with weightport.verify(model, inputs, against=file)"
    )
    return (
        f"what the model computes between its layers (activations, pooling, residual adds, attention heads): "
        f"its outputs were not compared with the graph's{only}, as {why}. Fix: {fix}"
    )


@dataclass
class _Ran:
    """One run of both on the same inputs: the graph's outputs and names, the model's outputs, the dtypes
    the model computed in, and what the graph's rounded constants allow beyond rounding."""

    expected: list[np.ndarray]
    names: list[str]
    actual: list[np.ndarray]
    dtypes: list[Any]
    slack: list[np.ndarray] | None  # how far its narrow constants' rounding may move each output


@dataclass
class _Failed:
    """Why a run of both failed, and the inputs the graph ran on, if it did."""

    why: str
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None


def _run_both(
    plan: Plan,
    source: Source,
    graph: bytes,
    candidates: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    upcast: bool,
    where: str,
    quiet: bool,
    constants: dict[str, tuple[np.ndarray, np.ndarray]],
) -> _Ran | _Failed:
    """The graph run on the first of ``candidates`` it runs on (made inputs: each a size of its symbolic
    axes, tried within a few seconds), then the model on the same; ``upcast``: the model in float32 where
    its tensors are float16 or bfloat16; ``quiet``: onnxruntime's failures on made inputs not logged;
    ``constants``: the graph's narrow constants, as inputs (see :func:`_slack`)."""
    try:
        session = graph_session(graph, where, quiet=quiet)
    except WeightportError as error:
        return _Failed(f"{where} could not be run: {first_line(error)}", None)
    first: WeightportError | None = None
    tried, deadline = 0, time.monotonic() + _RETRY_SECONDS
    graph_run: tuple[list[np.ndarray], list[str]] | None = None
    stored = {name: value for name, (value, _) in constants.items()}
    for args, kwargs in candidates:
        try:
            order = _graph_order(session, args, kwargs, where, stored)
            graph_run = run_graph(session, order, where, stored)
            break
        except WeightportError as error:
            first, tried = first or error, tried + 1
            if time.monotonic() > deadline:
                break
    if graph_run is None:
        more = f" (nor on {tried - 1} other sizes of its symbolic axes)" if tried > 1 else ""
        return _Failed(f"{where} could not be run: {first_line(first) if first else 'no inputs'}{more}", None)
    expected, names = graph_run
    slack = _slack(session, order, where, constants, expected) if constants else None
    del session
    try:
        actual, dtypes = _run_model(plan, source, args, kwargs, upcast)
    except Exception as error:  # any failure of the model's own forward: the comparison is what is lost
        return _Failed(
            f"the model could not run on them with the planned tensors ({first_line(error)})", (args, kwargs)
        )
    return _Ran(expected, names, actual, dtypes, slack)


def _slack(
    session: Any,
    order: list[torch.Tensor],
    where: str,
    constants: dict[str, tuple[np.ndarray, np.ndarray]],
    expected: list[np.ndarray],
) -> list[np.ndarray]:
    """How far each output may move as the graph's narrow constants were rounded (a GELU's sqrt(2) stored
    as 1.414): the graph run again with each constant value moved by half its unit in the last place, the
    moves of each output summed. A value repeated across constants is one (it rounded one way); past
    ``_GROUPS`` values, the rest move together."""
    groups: dict[Any, dict[str, np.ndarray]] = {}
    for name, (value, half) in constants.items():
        key = float(value.reshape(-1)[0]) if value.size == 1 else name
        groups.setdefault(key, {})[name] = half
    ordered = list(groups.values())
    if len(ordered) > _GROUPS:
        ordered[_GROUPS - 1 :] = [{n: h for group in ordered[_GROUPS - 1 :] for n, h in group.items()}]
    slack = [np.zeros(e.shape, np.float64) for e in expected]
    stored = {name: value for name, (value, _) in constants.items()}
    for group in ordered:
        moved = {**stored, **{name: np.asarray(stored[name] + half) for name, half in group.items()}}
        try:
            outputs, _ = run_graph(session, order, where, moved)
        except WeightportError:
            continue  # a graph that cannot run with them moved: no slack from them (the stricter side)
        for total, out, base in zip(slack, outputs, expected):
            if out.shape == base.shape and out.dtype.kind == "f":
                total += np.nan_to_num(np.abs(out.astype(np.float64) - base), nan=0.0, posinf=0.0)
    return slack


def _graph_inputs(source: Source) -> list[Any]:
    model = getattr(source, "model", None)
    if model is None:
        return []
    stored = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in stored]


def _candidates(
    source: Source, root: nn.Module, example_inputs: ExampleInputs | None
) -> Iterable[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs to try, in order: the example alone, or inputs made with each of ``_SIZES`` for the
    symbolic axes past the first (one set where there are none), made as they are tried."""
    if example_inputs is not None:
        given = _inputs(source, root, example_inputs)
        return [given] if given is not None else []
    return _made_candidates(source, root)


def _made_candidates(source: Source, root: nn.Module) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    free = any(
        d.HasField("dim_param") or not d.HasField("dim_value")
        for graph_input in _graph_inputs(source)
        for d in list(graph_input.type.tensor_type.shape.dim)[1:]
    )
    for size in _SIZES if free else _SIZES[:1]:
        inputs = _inputs(source, root, None, size)
        if inputs is not None:
            yield inputs


def _inputs(
    source: Source, root: nn.Module, example_inputs: ExampleInputs | None, size: int = _SIZES[0]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The inputs both run on: the example's, or made from the graph's declared inputs (see :func:`_made`),
    by keyword where the model's forward takes every graph input's name."""
    if example_inputs is not None:
        args, kwargs = arguments_of(example_inputs)
        return tensors_to(args, lambda t: t), tensors_to(kwargs, lambda t: t)
    made = _made(source, size)
    if not made:
        return None
    try:
        parameters = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    if all(name in parameters for name in made):
        return (), made
    return tuple(made.values()), {}


def _made(source: Source, size: int = _SIZES[0]) -> dict[str, torch.Tensor] | None:
    """Random values for every graph input of a known shape (a symbolic leading axis taken as 2, others
    as ``size``; for another size than the first, None where an input would pass ``_MADE_LIMIT``
    elements): floats from a normal distribution; integers that index an embedding table (a ``Gather`` of a
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
            else (2 if i == 0 else size)
            if d.HasField("dim_param")
            else -1
            for i, d in enumerate(tensor_type.shape.dim)
        ]
        elem = tensor_type.elem_type
        dtype = _FLOAT_TYPES.get(elem) or _OTHER_TYPES.get(elem) or (np.float32 if elem == BFLOAT16 else None)
        if dtype is None or any(d <= 0 for d in dims):
            return None
        if size != _SIZES[0] and math.prod(dims) > _MADE_LIMIT:  # a retry's size: not at any cost
            return None
        if dtype in _FLOAT_TYPES.values():
            array: np.ndarray = rng.standard_normal(dims).astype(dtype)
        elif graph_input.name in bounds:
            array = rng.integers(0, bounds[graph_input.name], dims).astype(dtype)
        else:
            array = _mask(dims).astype(dtype)
        tensor = torch.from_numpy(array)
        made[graph_input.name] = tensor.to(torch.bfloat16) if elem == BFLOAT16 else tensor
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
    session: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str, fed: dict[str, Any]
) -> list[torch.Tensor]:
    """The example's tensors in the graph's input order (but those ``fed``): positionals flattened in
    order, keywords by name."""
    tensors = [torch.as_tensor(t) for t in flat_tensors(list(args))]
    names = [i.name for i in session.get_inputs() if i.name not in fed]
    if kwargs:
        unnamed = [n for n in names[len(tensors) :] if n not in kwargs]
        if unnamed:
            raise SourceError(
                f"{where}: graph inputs {', '.join(unnamed)} are not among the example's keywords "
                f"({', '.join(kwargs)})"
            )
        tensors += [torch.as_tensor(kwargs[n]) for n in names[len(tensors) :]]
    return tensors


def _run_model(
    plan: Plan, source: Source, args: tuple[Any, ...], kwargs: dict[str, Any], upcast: bool
) -> tuple[list[np.ndarray], list[torch.dtype]]:
    """The model's outputs, flattened in order, in eval mode with the planned tensors in place of its own,
    and the dtypes it computed in; ``upcast``: float16 and bfloat16 computed in float32 (the planned values
    as the file holds them, the module's other such tensors and the inputs widened)."""
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
        tensors[name] = value.to(dtype=_computed(target.dtype, upcast))
        tied.update(alias.removeprefix(plan.prefix) for alias in entry.aliases)
    if upcast:  # the module's own narrow tensors the plan does not fill (non-persistent buffers): widened too
        by_tensor: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for name, t in [
            *plan.module.named_parameters(remove_duplicate=False),
            *plan.module.named_buffers(remove_duplicate=False),
        ]:
            by_tensor.setdefault(id(t), []).append((name, t))
        for named in by_tensor.values():
            name, t = named[0]
            narrow = t.dtype in _LOW_DTYPES.values() and t.device.type != "meta"
            if narrow and not any(n in tensors or n in tied for n, _ in named):
                tensors[name] = t.detach().to(torch.float32)
    tensors = {name: t.to(device) for name, t in tensors.items()}
    dtype = _computed(plan.entries[0].tensor.dtype, upcast)

    def moved(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).to(device)
        return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point else t

    with in_eval(plan.module):
        out = torch.func.functional_call(
            plan.module, tensors, tensors_to(args, moved), tensors_to(kwargs, moved), strict=False
        )
    return flatten_outputs(out), [t.dtype for t in tensors.values()]


def _computed(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and dtype in _LOW_DTYPES.values() else dtype


def _coarsest(dtypes: list[Any]) -> tuple[float, str]:
    """The epsilon and name of the least precise float among torch and NumPy dtypes (float32 where none is).

    >>> _coarsest([torch.float64, np.dtype(np.float16), torch.int64])
    (0.0009765625, 'float16')
    """
    coarsest = (_FLOAT32_EPS, "float32")
    for dtype in dtypes:
        # NumPy's (ml_dtypes' bfloat16 among them): torch's of that name
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, np.dtype(dtype).name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            eps = float(torch.finfo(dtype).eps)
            coarsest = max(coarsest, (eps, str(dtype).removeprefix("torch.")))
    return coarsest
