"""Why a module layer got nothing: the graph computes it in a way no node maps back to (a recurrence
unrolled or left in a ``Loop``/``Scan``, a ``Gather`` along another axis, a batched ``MatMul``)."""

from __future__ import annotations

from collections import Counter

from torch import nn
from torch.nn.utils import parametrize

from weightport.errors import LayoutError, a_or_an
from weightport.layouts.onnx.graph import Graph, Layer, Node, is_float
from weightport.layouts.pairing import module_slots, slot_kind
from weightport.sources.base import Source
from weightport.torch_facts import RNN_GATE_COUNT, RNN_KINDS, parametrized_fix

__all__ = ["explain_unrolled_recurrence", "loop_hints", "unmapped_hints", "unread_hints"]


def explain_unrolled_recurrence(
    module: nn.Module, layers: list[Layer], where: str, error: LayoutError
) -> None:
    """When pairing failed and a recurrent module has no node of its kind in the graph, say why.

    Exporters that unroll the recurrence into per-step MatMul/Add nodes (torch.onnx.export's dynamo
    exporter does so for nn.RNN) leave nothing that maps back to the module's weights; a graph whose
    recurrent nodes are of another kind (an LSTM file, a GRU module) is a module of the wrong class.
    """
    found = {layer.kind for layer in layers}
    recurrent = sorted(found & set(RNN_KINDS))
    for path, sub in module.named_modules():
        kind = slot_kind(sub)
        if not (isinstance(sub, nn.RNNBase) and kind in RNN_KINDS and kind not in found):
            continue
        label = f"'{path}'" if path else "the model itself"
        if recurrent:  # the graph recurs with another kind of node: the module is of the wrong class
            raise LayoutError(
                f"{where} has ONNX {' and '.join(recurrent)} node(s) but no {kind} node for {label} "
                f"({type(sub).__name__}): the weights of one kind of recurrent layer do not fit another. "
                f"Fix: build the module as nn.{recurrent[0]} with the graph's sizes, or load a file exported "
                f"from a model with {a_or_an(kind)}. (Pairing said: {error})"
            ) from error
        raise LayoutError(
            f"{where} has no ONNX {kind} node for {label} ({type(sub).__name__}): the graph computes "
            "the recurrence some other way (an exporter that unrolls it into per-step MatMul and Add "
            "nodes, as torch.onnx.export's dynamo exporter does for nn.RNN), and those nodes do not "
            f"map back to the module's weights. Fix: export with torch.onnx.export(..., dynamo=False), "
            f"which writes {kind} nodes, or save the PyTorch weights themselves (weightport.save). "
            f"(Pairing said: {error})"
        ) from error


def loop_hints(module: nn.Module, layers: list[Layer], nodes: list[Node], source: Source) -> dict[str, str]:
    """Why a recurrent module got nothing when the graph runs its recurrence in a ``Loop`` or ``Scan``.

    tf2onnx rewrites the Keras recurrent layers its patterns match into ONNX LSTM/GRU nodes, and leaves the
    rest (SimpleRNN, GRU(reset_after=False), masked layers, and layers it does not match, as it does not
    Keras 3's GRU) as a loop whose body (a subgraph, not read here) multiplies by weights passed in as the
    loop's inputs: nothing says which input is which gate's. Their shapes still say which Keras layer they
    are (:func:`_keras_cell`).
    """
    loops = [node for node in nodes if node.op_type in ("Loop", "Scan")]
    found = {layer.kind for layer in layers}
    hints = {}
    shown: set[int] = set()  # the loops named already: a module of the same sizes after is the next loop's
    for slot in module_slots(module):
        if not loops or slot.kind not in RNN_KINDS or slot.kind in found:
            continue
        shapes = {
            loop.index: [tuple(source.infos[n].shape) for n in _loop_weights(loop, source)] for loop in loops
        }
        held = {loop.index: _keras_cell(slot.module, shapes[loop.index]) for loop in loops}
        fitting = [lp for lp in loops if held[lp.index] is not None]  # this module's, by its sizes
        loop = next((lp for lp in fitting if lp.index not in shown), fitting[0] if fitting else loops[0])
        shown.add(loop.index)
        weights = _loop_weights(loop, source)
        holds, fix = held[loop.index] or (
            "",
            "Load the Keras weights file instead (weightport.load(model, 'model.weights.h5') maps SimpleRNN, "
            "LSTM and GRU(reset_after=True); GRU(reset_after=False) computes what no PyTorch GRU does), or "
            f"convert to ONNX from a model whose {slot.kind} becomes an ONNX {slot.kind} node",
        )
        hints[slot.path] = (
            f"the graph has no ONNX {slot.kind} node: {loop.op_type} node '{loop.label}' runs the recurrence "
            f"step by step, its body (a subgraph, which weightport does not read) multiplying by "
            + (", ".join(f"{w!r} {source.infos[w].shape}" for w in weights[:4]) or "tensors")
            + f" with nothing to say which is which gate's{holds}. tf2onnx writes such loops for the Keras "
            "recurrent layers it does not rewrite into ONNX LSTM and GRU nodes (SimpleRNN, "
            "GRU(reset_after=False), masked layers, and others its patterns miss, as Keras 3's GRU). " + fix
        )
    return hints


def _loop_weights(loop: Node, source: Source) -> list[str]:
    """The stored tensors of one or more axes a loop takes as inputs (its weights)."""
    return [n for n in loop.inputs if n in source.infos and len(source.infos[n].shape) >= 1]


def _keras_cell(module: nn.Module, shapes: list[tuple[int, ...]]) -> tuple[str, str] | None:
    """Where a loop's weights have the shapes of a Keras cell of ``module``'s sizes (kernel ``(in, gates *
    hidden)``, recurrent kernel ``(hidden, gates * hidden)``, and the bias): which cell they are, and the
    fix; else None. A GRU's bias tells its ``reset_after``: two rows (input and recurrent biases, as
    ``nn.GRU`` holds them) for True, one for False.

    >>> print(_keras_cell(nn.GRU(3, 4), [(2, 12), (3, 12), (4, 12)])[0])
    : their shapes are a Keras GRU(reset_after=True)'s (kernel (3, 12), recurrent kernel (4, 12), bias (2, 12))
    """
    kind, hidden, inputs = (
        slot_kind(module),
        getattr(module, "hidden_size", 0),
        getattr(module, "input_size", 0),
    )
    if kind not in RNN_KINDS:
        return None
    width = RNN_GATE_COUNT[kind] * hidden
    have = Counter(shapes)
    if (
        not have[(inputs, width)]
        or not have[(hidden, width)]
        or have[(inputs, width)] + have[(hidden, width)] < 2
    ):
        return None  # both matrices: two of one shape where input_size is hidden_size
    keras = {"RNN": "SimpleRNN", "LSTM": "LSTM", "GRU": "GRU"}[kind]
    bias: tuple[int, ...]
    if kind == "GRU" and (2, width) in shapes:
        keras, bias = "GRU(reset_after=True)", (2, width)
    elif kind == "GRU" and (width,) in shapes:
        keras, bias = "GRU(reset_after=False)", (width,)
    elif (width,) in shapes:
        bias = (width,)
    else:
        return None
    holds = (
        f": their shapes are a Keras {keras}'s (kernel {(inputs, width)}, recurrent kernel {(hidden, width)}, "
        f"bias {bias})"
    )
    if keras == "GRU(reset_after=False)":
        return holds, (
            "GRU(reset_after=False) computes what no PyTorch GRU does: rebuild the Keras layer with "
            "reset_after=True (the default) and retrain, or write a custom cell"
        )
    return holds, (
        f"Load the Keras weights file instead (weightport.load(model, 'model.weights.h5') maps its {keras} "
        f"into this {type(module).__name__}), or convert to ONNX from a model whose {kind} becomes an ONNX "
        f"{kind} node"
    )


def unmapped_hints(
    module: nn.Module, layers: list[Layer], nodes: list[Node], source: Source, hints: dict[str, str]
) -> None:
    """Why an Embedding or Linear got nothing when the graph uses a stored table or weight some other way:
    ``Gather`` along an axis other than 0, ``MatMul`` by a stored tensor of 3 or more axes; and why a
    parametrization's originals did (the export stored what it computes)."""
    graph = Graph.of(nodes, source)
    found = {layer.kind for layer in layers}
    why: dict[str, str] = {}
    for node in nodes:
        first = graph.stored(node.input(0)) if node.op_type == "Gather" else None
        second = graph.stored(node.input(1)) if node.op_type == "MatMul" else None
        if first and len(source.infos[first].shape) == 2 and is_float(source.infos[first].dtype):
            why.setdefault(
                "Embedding",
                f"Gather node '{node.label}' takes entries of the stored table '{first}' along axis "
                f"{node.attr('axis', 0)}, while nn.Embedding looks up rows (axis 0): the output's axes differ: "
                "store the table transposed and gather along axis 0, or index the tensor in forward()",
            )
        if second and len(source.infos[second].shape) > 2:
            why.setdefault(
                "Linear",
                f"MatMul node '{node.label}' multiplies by the stored {len(source.infos[second].shape)}-D "
                f"tensor '{second}' {source.infos[second].shape}, a batched product with one matrix per "
                "leading index, not one nn.Linear: hold it as an nn.Parameter and load it with "
                "layout='torch' under its own name, or use torch.matmul in forward()",
            )
    for slot in module_slots(module):
        if slot.kind in why and slot.kind not in found:
            hints.setdefault(slot.path, why[slot.kind])
    _parametrized_hints(module, hints)


def _parametrized_hints(module: nn.Module, hints: dict[str, str]) -> None:
    """Why a parametrization's originals (weight norm's ``original0``, ``original1``) got nothing: an export
    that folds constants stores the tensor it computes, as one constant read where the weight is."""
    for path, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        at = f"{path}." if path else ""
        for leaf, held in sub.parametrizations.items():
            originals = [f"{at}parametrizations.{leaf}.{n}" for n, _ in held.named_parameters(recurse=False)]
            hints.setdefault(
                f"{at}parametrizations.{leaf}",
                f"the graph holds no tensor by these names: an export that folds constants (torch.onnx.export's "
                f"default) stores the '{at}{leaf}' the parametrization computes from them, as one constant: "
                + parametrized_fix(f"{at}{leaf}", originals),
            )


# nodes that read a stored tensor as a layer's weights (the layers this layout maps, and their kin)
_WEIGHT_READERS = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Gather",
        "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    }
)  # fmt: skip


def unread_hints(names: list[str], nodes: list[Node], graph: Graph) -> dict[str, str]:
    """For each stored tensor of ``names`` that no rule places: the nodes that read it (through Identity and
    Cast), so the fix can tell a constant of the computation from a layer's weights in a form weightport does
    not map (tf2onnx writes a BatchNorm as Mul and Add by two stored vectors)."""
    wanted = set(names)
    readers: dict[str, list[Node]] = {}
    hints = {}
    for node in nodes:
        if node.op_type == "Cast" and graph.stored(node.outputs[0] if node.outputs else "") is None:
            narrowed = graph.stored(node.input(0))
            if narrowed in wanted:
                hints[narrowed] = _narrowing_hint(narrowed, node, graph)
            continue
        if node.op_type in ("Identity", "Cast"):
            continue  # followed by graph.stored: their readers are the tensor's
        for stored in {graph.stored(i) or "" for i in node.inputs} & wanted:
            readers.setdefault(stored, []).append(node)
    for name, read_by in readers.items():
        if any(node.op_type in _WEIGHT_READERS for node in read_by):
            continue  # a layer's node: pairing, not arithmetic, left it out
        said = ", ".join(f"'{node.label}' ({node.op_type})" for node in read_by[:3])
        more = f" and {len(read_by) - 3} more" if len(read_by) > 3 else ""
        hints[name] = (
            f"it is read by node {said}{more}, which no layer weightport maps takes as weights. Where that is "
            "arithmetic the model does by itself (a constant the exporter made, as a pooling divisor), pass "
            "strict=False to skip it; where it holds a layer's values in another form (a BatchNorm written as "
            "Mul and Add), strict=False would not give that layer these values: convert them and load them by name "
            "(weightport.load(model, {'module.tensor': array}, strict=False))"
        )
    return hints


# ONNX Cast ``to`` codes of the float types a narrowing Cast rounds into
_FLOAT_NAMES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


def _narrowing_hint(name: str, cast: Node, graph: Graph) -> str:
    """Why stored tensor ``name`` is unplaced where a Cast that does not keep every value reads it."""
    stored = graph.source.infos[name].dtype.name
    to = _FLOAT_NAMES.get(cast.attr("to"), f"ONNX type {cast.attr('to')}")
    return (
        f"it is stored as {stored} and read through node '{cast.label}' (Cast to {to}), which rounds or "
        "converts its values, so the layer after it computes with values the file does not hold; weightport "
        f"follows only casts that keep every value: save the model with this tensor stored as {to} (its "
        f"Cast removed), or convert it yourself and load it by name: weightport.load(model, "
        f"{{'module.tensor': array.astype('{to}')}}, strict=False), which checks the values fit"
    )
