"""Finding the layers: each node that holds weights (LSTM, GRU, RNN, Gemm, MatMul(+Add), Conv, ConvTranspose,
Gather, BatchNormalization, LayerNormalization) as one :class:`~weightport.layouts.onnx.graph.Layer`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from weightport.layouts.onnx.attention import attention_layers
from weightport.layouts.onnx.checks import check_recurrent_node
from weightport.layouts.onnx.graph import (
    Graph,
    Layer,
    Node,
    is_float,
    keeps_last_axis,
    normalized_axes,
    raw_axes,
    stored_matrix,
    unit_axis_from_unsqueeze,
    zero_filled,
)
from weightport.layouts.onnx.groupnorm import group_norm_layer
from weightport.layouts.onnx.issues import Issues, computed
from weightport.layouts.onnx.ops import CONV_KINDS, CONV_TRANSPOSE_KINDS, KIND_OF_NORM_OP, NORMS
from weightport.layouts.onnx.pads import onnx_pads, pad_before
from weightport.layouts.onnx.stacking import RecurrentLayer, wiring
from weightport.sources.base import Source
from weightport.torch_facts import RNN_KINDS
from weightport.transforms import Identity, Op, Reshape, Transpose

__all__ = ["find_layers", "named_path", "owner_path", "ran_in_module"]

_DYNAMO_VALUE = re.compile(r"val_\d+")


def find_layers(nodes: list[Node], source: Source, issues: Issues, validated: set[str]) -> list[Layer]:
    graph = Graph.of(nodes, source)
    layers: list[Layer] = []
    seen: dict[tuple[Any, ...], Layer] = {}
    holding: dict[str, list[Layer]] = {}  # stored tensor -> the layers reading it
    for node in nodes:
        if node.op_type in RNN_KINDS:
            layer = _recurrent_layer(node, graph, issues, validated)
        elif node.op_type == "Gemm":
            layer = _gemm_layer(node, graph, issues)
        elif node.op_type == "MatMul":
            layer = _matmul_layer(node, graph)
        elif node.op_type == "Conv":
            layer = _conv_layer(node, graph, issues)
        elif node.op_type == "ConvTranspose":
            layer = _conv_transpose_layer(node, graph, issues)
        elif node.op_type == "Gather":
            layer = _gather_layer(node, graph)
        elif node.op_type in NORMS:
            layer = _norm_layer(node, graph, issues)
        elif node.op_type == "InstanceNormalization":
            layer = group_norm_layer(node, graph, validated)
        else:
            layer = None
        if layer is None:
            continue
        layer.aliases = _aliases(node, layer, graph)
        # A layer applied twice (one Linear called in two places) shows as two nodes on the same stored
        # tensors: it is one source layer, filled once (and counted: equal values stored once are read so too).
        key: tuple[Any, ...] = (
            layer.kind,
            tuple(sorted(layer.tensors.items())),
            repr(sorted(layer.ops.items())),
            repr(sorted(node.attributes.items())),
            layer.spatial,
            tuple(sorted(layer.aliases.items())),
        )
        if key in seen:
            seen[key].modules.append(node.module)
            continue
        sharing = {id(o): o for name in layer.tensors.values() for o in holding.get(name, ())}
        if not layer.aliases and any(_same_values(layer, other, source) for other in sharing.values()):
            validated.update(layer.tensors.values())  # a copy of a layer that is filled: nothing to place
            continue
        seen[key] = layer
        layer.modules = [node.module]
        layers.append(layer)
        for name in layer.tensors.values():
            holding.setdefault(name, []).append(layer)
    return attention_layers(layers, source, graph)


def _aliases(node: Node, layer: Layer, graph: Graph) -> dict[str, str]:
    """Role -> the name the node reads its stored tensor under, where that is an ``Identity``'s output named
    as a parameter (``blocks.0.norm2.weight`` = Identity(``blocks.0.norm1.weight``): the legacy exporter
    stores equal values once, and each other parameter holding them is such an Identity)."""
    by_stored: dict[str, str] = {}
    for name in node.inputs:
        producer = graph.producers.get(name)
        if producer is None or producer.op_type != "Identity" or name in graph.source.infos:
            continue
        stored = graph.stored(name)
        if stored is not None and "." in name and "::" not in name and not name.startswith("/"):
            by_stored[stored] = name
    return {role: by_stored[t] for role, t in layer.tensors.items() if t in by_stored}


def _same_values(layer: Layer, other: Layer, source: Source) -> bool:
    """Whether ``layer`` is ``other`` (which shares a stored tensor with it) applied again through other
    nodes: every other stored tensor holds the same values once converted (torch.onnx.export writes one
    Linear called on a 2-D and a 3-D input as a Gemm on its weight and a MatMul on a transposed copy, with
    the same bias)."""
    if layer.kind != other.kind or layer.tensors.keys() != other.tensors.keys():
        return False
    for role, name in layer.tensors.items():
        if name == other.tensors[role]:
            continue
        mine = layer.ops.get(role, Identity())(source.read(name))
        theirs = other.ops.get(role, Identity())(source.read(other.tensors[role]))
        if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
            return False
    return True


def owner_path(layer: Layer) -> str:
    """The module path a layer's stored tensors name, where they all share one (``head.weight``, ``head.bias``:
    ``head``, as torch.onnx.export keeps parameter names; a tensor read through an Identity named as the
    node's own parameter by that name); synthetic names (``onnx::LSTM_201``) name none (``""``); an
    attention layer's is the one its in_proj and out_proj names prove."""
    if layer.owner is not None:
        return layer.owner
    owners = {layer.aliases.get(role, name).rpartition(".")[0] for role, name in layer.tensors.items()}
    (owner,) = owners if len(owners) == 1 else ("",)
    return owner if ":" not in owner else ""


def named_path(layer: Layer, changes: Callable[[str], bool] = lambda path: False) -> tuple[str, ...]:
    """The module path a layer's names give: :func:`owner_path`; else the one its named tensors share beside
    tensors the exporter computed (:func:`_named_beside_computed`); else (the dynamo exporter stores a weight
    it transposed for a MatMul as ``val_12``) the module the exporter records the node ran in (a parent's,
    where its forward calls ``F.linear`` itself, pairs with no layer). Either of the last two unless
    ``changes(path)``: its forward changes its own weight first (``example_inputs=`` shows it), so the stored
    tensor is what it made of it."""
    owner = owner_path(layer)
    if owner or layer.owner is not None:
        return (owner,) if owner else ()
    found = _named_beside_computed(layer) or ran_in_module(layer)
    return (found,) if found and not changes(found) else ()


def _named_beside_computed(layer: Layer) -> str:
    """The module a layer's named tensors share where the others have names the exporter made up for tensors
    it computed (OPT's ``q_proj``: its weight, transposed and folded, stored as ``onnx::MatMul_431``, its
    bias Add reading ``m.model.decoder.layers.0.self_attn.q_proj.bias``), provided the exporter records the
    node running in that very module: a parent's forward applying the module's weight itself
    (``F.linear(x, self.fc.weight.t(), self.fc.bias)``) stores the same names. ``""`` where the named tensors
    disagree or none is named.

    >>> [_synthetic(n) for n in ("onnx::MatMul_431", "val_12", "/m/fc/Constant_output_0", "weight", "m.fc.bias")]
    [True, True, True, True, False]
    >>> _called_in("m.decoder.layers.0.self_attn.q_proj", "m.model.decoder.layers.0.self_attn.q_proj")
    True
    >>> _called_in("", "fc"), _called_in("m.fc", "m.block.proj")
    (False, False)
    """
    names = [layer.aliases.get(role, name) for role, name in layer.tensors.items()]
    owners = {name.rpartition(".")[0] for name in names if not _synthetic(name)}
    if len(owners) != 1:
        return ""
    (owner,) = owners
    node = layer.node
    ran = node.module is not None and node.module == owner
    return owner if ran or (node.module is None and _called_in(node.name_scope, owner)) else ""


def _synthetic(name: str) -> bool:
    """A stored tensor's name an exporter made up rather than a parameter's dotted path."""
    return ":" in name or name.startswith("/") or "." not in name or _DYNAMO_VALUE.fullmatch(name) is not None


def _called_in(scope: str | None, owner: str) -> bool:
    """Whether the call path the TorchScript exporter spells in a node's name (:func:`.graph._name_scope`)
    ends in module ``owner``: the path lists the modules whose forward ran, so it skips one a parent went
    around (``OPTForCausalLM`` calls ``self.model.decoder``: ``m.decoder...`` for ``m.model.decoder...``),
    but never adds one, and it ends in the owner's own name."""
    if not scope:
        return False
    called, path = scope.split("."), iter(owner.split("."))
    return called[-1] == owner.rpartition(".")[2] and all(part in path for part in called)


def ran_in_module(layer: Layer) -> str:
    """The module the exporter records the layer's node ran in (dynamo's name scopes, else the path the
    TorchScript exporter spells in the node's name); ``""`` for the model itself or no record."""
    node = layer.node
    return node.module if node.module is not None else node.name_scope or ""


def _stored_inputs(
    node: Node, inputs: list[tuple[str, int, str]], graph: Graph, issues: Issues
) -> dict[str, str] | None:
    """``{key: stored tensor}`` for the node's ``(key, position, ONNX name)`` inputs that are given;
    None (and an issue) when one of them is computed by the graph."""
    tensors = {}
    for key, position, role in inputs:
        name = node.input(position)
        if not name:
            continue
        found = graph.stored(name)
        if found is None:
            computed(node, role, name, issues, graph)
            return None
        tensors[key] = found
    return tensors


def _recurrent_layer(node: Node, graph: Graph, issues: Issues, validated: set[str]) -> Layer | None:
    kind = node.op_type
    roles = [("W", 1), ("R", 2), ("B", 3)] + ([("P", 7)] if kind == "LSTM" else [])
    tensors = _stored_inputs(node, [(role, position, role) for role, position in roles], graph, issues)
    if tensors is None:
        return None
    if "W" not in tensors or "R" not in tensors:
        issues.add(node, "has no W or R input; the graph is malformed. Fix: re-export the model.")
        return None
    if node.synthetic:
        return RecurrentLayer(node, kind, tensors, detail=f"ONNX {kind} arrays")
    check_recurrent_node(node, tensors, graph, issues, validated)
    direction = node.attr("direction", "forward")
    notes = [f"hidden_size={node.attr('hidden_size')}", f"direction={direction}"]
    if node.attr("layout", 0):
        notes.append("layout=1: X and Y batch-first, as batch_first=True takes them")
    if node.input(4):
        # ONNX zeroes Y past each sequence's length and takes Y_h at its last step: PyTorch does the same
        # for a PackedSequence. The weights are the same either way; how forward() is called is the model's.
        notes.append(
            "sequence_lens: steps past each length give zeros, as PyTorch gives for a packed input "
            "(nn.utils.rnn.pack_padded_sequence)"
        )
    forward = (
        (
            "the graph takes sequence_lens (steps past each length give zeros): for sequences of different "
            "lengths, pass the module nn.utils.rnn.pack_padded_sequence(x, lengths), which does the same",
        )
        if node.input(4)
        else ()
    )
    detail = f"ONNX {kind} node ({', '.join(notes)})"
    return RecurrentLayer(
        node, kind, tensors, detail=detail, forward_notes=forward, wiring=wiring(node, graph)
    )


def _bias_op(shape: tuple[int, ...], size: int) -> Op | None:
    """How a stored bias of ``shape`` becomes a vector of ``size`` (None: it is no bias vector)."""
    if shape == (size,):
        return Identity()
    if len(shape) > 1 and shape[-1] == size and all(d == 1 for d in shape[:-1]):
        return Reshape(shape, (size,))
    return None


def _gemm_layer(node: Node, graph: Graph, issues: Issues) -> Layer | None:
    source = graph.source
    found = stored_matrix(node.input(1), graph)
    if found is None:
        return None
    name, transposed = found
    trans_b = bool(node.attr("transB", 0)) != transposed  # True: the stored matrix is (out, in)
    shape = source.infos[name].shape
    out_features = shape[0] if trans_b else shape[1]
    ops: dict[str, Op] = {"weight": Identity() if trans_b else Transpose((1, 0))}
    tensors = {"weight": name}
    if node.attr("transA", 0):
        issues.add(
            node,
            "transA=1 transposes the layer's input itself; nn.Linear cannot. Fix: re-export with transA=0.",
            unsupported=True,
        )
    if node.attr("alpha", 1.0) != 1.0:
        issues.add(
            node,
            f"alpha={node.attr('alpha')} scales A*B; weightport only moves values, never scales "
            "them. Fix: multiply B by alpha and set alpha=1 in the file.",
            unsupported=True,
        )
    bias = node.input(2)
    if bias:
        if node.attr("beta", 1.0) != 1.0:
            issues.add(
                node,
                f"beta={node.attr('beta')} scales C; weightport only moves values, never scales "
                "them. Fix: multiply C by beta and set beta=1 in the file.",
                unsupported=True,
            )
        stored_bias = graph.stored(bias)
        op = _bias_op(source.infos[stored_bias].shape, out_features) if stored_bias else None
        if stored_bias is None or op is None:
            issues.add(
                node,
                f"input C '{bias}' is not a stored bias vector of {out_features} values; "
                "nn.Linear adds one bias per output. Fix: re-export with a per-output bias.",
                unsupported=True,
            )
        else:
            tensors["bias"], ops["bias"] = stored_bias, op
    return Layer(node, "Linear", tensors, ops, detail=f"ONNX Gemm node {shape}")


def _matmul_layer(node: Node, graph: Graph) -> Layer | None:
    found = stored_matrix(node.input(1), graph)
    if found is None:
        return None  # a product of two activations: no weights
    name, transposed = found
    shape = graph.source.infos[name].shape
    out_features = shape[0] if transposed else shape[1]
    tensors = {"weight": name}
    ops: dict[str, Op] = {"weight": Identity() if transposed else Transpose((1, 0))}
    result, after = node, graph.only_consumer(node)
    while after is not None and after.op_type != "Add" and keeps_last_axis(after, out_features, graph):
        result, after = after, graph.only_consumer(after)
    if after is not None and after.op_type == "Add" and after.index not in graph.fused:
        bias = graph.stored_operand(after, result.outputs[0])
        op = _bias_op(graph.source.infos[bias].shape, out_features) if bias else None
        if bias is not None and op is not None:
            tensors["bias"], ops["bias"] = bias, op
            graph.fused.add(after.index)
    return Layer(node, "Linear", tensors, ops, detail=f"ONNX MatMul node {shape}")


def _conv_spatial(node: Node, shape: tuple[int, ...], graph: Graph) -> tuple[int, ...] | None:
    """The spatial axes of a Conv that really convolve, when the others run over a unit axis.

    tf2onnx writes Keras Conv1D as TensorFlow does: Unsqueeze the input to 2-D, a Conv with a kernel of
    height 1, Squeeze. Along an axis the Unsqueeze made, with kernel 1, stride 1 and no padding, that Conv
    is a Conv1d (None: every axis convolves).
    """
    dims = len(shape) - 2
    kernel = tuple(shape[2:])
    strides = node.attr("strides") or [1] * dims
    dilations = node.attr("dilations") or [1] * dims
    begin, end = onnx_pads(node, kernel, tuple(dilations), dims)
    unit = [
        s
        for s in range(dims)
        if kernel[s] == 1
        and strides[s] == 1
        and begin[s] == end[s] == 0
        and unit_axis_from_unsqueeze(node.input(0), 2 + s, len(shape), graph)
    ]
    kept = tuple(s for s in range(dims) if s not in unit)
    return kept if unit and kept else None


def _channel_bias(node: Node, channels: int, rank: int, graph: Graph) -> tuple[str, Op] | None:
    """A stored per-channel bias added after the Conv (tf2onnx adds it after the Squeeze of a Conv1D).

    The channel axis is followed through ``Squeeze``/``Unsqueeze``/``Transpose``/``Identity`` to an
    ``Add`` of a stored tensor that has ``channels`` entries on that axis and one on every other.
    """
    axis, current, after = 1, node, graph.only_consumer(node)
    while after is not None and after.op_type != "Add":
        if after.op_type in ("Squeeze", "Unsqueeze"):
            squeeze = after.op_type == "Squeeze"
            raw = raw_axes(after, graph) or []
            axes = normalized_axes(after, graph, rank if squeeze else rank + len(raw))
            if axes is None or (squeeze and axis in axes):
                return None
            if squeeze:
                axis, rank = axis - sum(a < axis for a in axes), rank - len(axes)
            else:
                rank += len(axes)
                for a in sorted(axes):
                    axis += a <= axis
        elif after.op_type == "Transpose":
            perm = after.attr("perm") or list(range(rank))[::-1]
            if sorted(perm) != list(range(rank)):
                return None
            axis = perm.index(axis)
        elif after.op_type != "Identity":
            return None
        current, after = after, graph.only_consumer(after)
    if after is None or after.index in graph.fused:
        return None
    bias = graph.stored_operand(after, current.outputs[0])
    if bias is None:
        return None
    shape = graph.source.infos[bias].shape
    aligned = axis - (rank - len(shape))  # the bias axis facing the channels (broadcasting aligns right)
    if len(shape) > rank or not 0 <= aligned < len(shape) or shape[aligned] != channels:
        return None
    if any(d != 1 for i, d in enumerate(shape) if i != aligned):
        return None
    graph.fused.add(after.index)
    return bias, Identity() if shape == (channels,) else Reshape(shape, (channels,))


def _conv_layer(node: Node, graph: Graph, issues: Issues) -> Layer | None:
    source = graph.source
    weight = graph.stored(node.input(1))
    if weight is None or len(source.infos[weight].shape) not in CONV_KINDS:
        return None
    shape = source.infos[weight].shape
    tensors = {"weight": weight}
    ops: dict[str, Op] = {}
    spatial = _conv_spatial(node, shape, graph)
    kind, detail = CONV_KINDS[len(shape)], f"ONNX Conv node {shape}"
    if spatial is not None:
        target = (*shape[:2], *(shape[2 + s] for s in spatial))
        kind, detail = CONV_KINDS[len(target)], f"{detail} over unit axes (a {CONV_KINDS[len(target)]})"
        ops["weight"] = Reshape(shape, target)
    pad = pad_before(node, graph, len(shape) - 2, spatial)
    bias = node.input(2)
    stored_bias = graph.stored(bias)
    if bias and stored_bias is None and zero_filled(bias, graph):
        detail += ", its bias zeros the graph expands (none)"
    elif bias and stored_bias is None:
        computed(node, "B", bias, issues, graph)
    elif stored_bias is not None:
        tensors["bias"] = stored_bias
    else:
        added = _channel_bias(node, shape[0], len(shape), graph)
        if added is not None:
            tensors["bias"], ops["bias"] = added
    return Layer(node, kind, tensors, ops, detail=detail, spatial=spatial, pad=pad)


def _conv_transpose_layer(node: Node, graph: Graph, issues: Issues) -> Layer | None:
    """``ConvTranspose(X, W, B)`` with a stored weight: ``nn.ConvTranspose1d/2d/3d``, which keeps W as ONNX
    does, ``(C_in, C_out / group, *kernel)``; its settings are checked once paired (:mod:`.transposed`)."""
    weight = graph.stored(node.input(1))
    if weight is None or len(graph.source.infos[weight].shape) not in CONV_TRANSPOSE_KINDS:
        return None
    shape = graph.source.infos[weight].shape
    tensors = {"weight": weight}
    bias = node.input(2)
    stored_bias = graph.stored(bias)
    if bias and stored_bias is None and not zero_filled(bias, graph):
        computed(node, "B", bias, issues, graph)
    elif stored_bias is not None:
        tensors["bias"] = stored_bias
    kind = CONV_TRANSPOSE_KINDS[len(shape)]
    return Layer(node, kind, tensors, detail=f"ONNX ConvTranspose node {shape}")


def _gather_layer(node: Node, graph: Graph) -> Layer | None:
    """``Gather(data=stored matrix, indices)`` along axis 0: an embedding lookup."""
    table = graph.stored(node.input(0))
    infos = graph.source.infos
    if table is None or len(infos[table].shape) != 2 or node.attr("axis", 0) != 0:
        return None  # indexing activations or shapes, not a table of weights
    if not is_float(infos[table].dtype):
        return None  # an integer lookup table is graph code
    shape = infos[table].shape
    return Layer(node, "Embedding", {"weight": table}, detail=f"ONNX Gather node {shape}")


def _norm_layer(node: Node, graph: Graph, issues: Issues) -> Layer | None:
    """BatchNormalization (scale, B, mean, var) or LayerNormalization (Scale, B) with stored inputs."""
    if node.op_type == "BatchNormalization" and _computed_statistics(node, graph, issues):
        return None
    inputs = [
        (role, position, onnx_name) for position, (role, onnx_name) in enumerate(NORMS[node.op_type], 1)
    ]
    tensors = _stored_inputs(node, inputs, graph, issues)
    if tensors is None or "weight" not in tensors:
        return None
    kind = KIND_OF_NORM_OP[node.op_type]
    shape = graph.source.infos[tensors["weight"]].shape
    if node.op_type == "BatchNormalization" and node.attr("spatial", 1) == 0:
        issues.add(
            node,
            "spatial=0 (opset 7-8) keeps one mean and variance per channel and position, while "
            "nn.BatchNorm*d keeps one per channel. Fix: re-export with spatial=1 (opset 9 or later).",
            unsupported=True,
        )
        return None
    detail = f"ONNX {node.op_type} node {shape}"
    forward: tuple[str, ...] = ()
    if _training_mode(node):
        detail += ", training_mode=1: normalizes with the batch's statistics, as the module does in train()"
        forward = (
            "the graph normalizes with the batch's statistics (training_mode=1): run the module in train() "
            "mode for its outputs (eval(), as weightport.verify runs it, uses the running statistics)",
        )
    return Layer(node, kind, tensors, detail=detail, forward_notes=forward)


def _training_mode(node: Node) -> bool:
    """Whether a BatchNormalization normalizes with its batch's statistics: ``training_mode=1`` (opset 14 on),
    or, before opset 14, which has no such attribute, the running statistics among its outputs (a legacy
    export in training mode gives five outputs; in inference mode it gives only ``Y``)."""
    if node.op_type != "BatchNormalization":
        return False
    return bool(node.attr("training_mode", 0)) or sum(bool(out) for out in node.outputs) > 1


def _computed_statistics(node: Node, graph: Graph, issues: Issues) -> bool:
    """Refuse a BatchNormalization whose mean and variance the graph computes from the input (True): a
    normalization over each input's own statistics, as tf2onnx writes a Keras LayerNormalization (Reshape,
    this node over computed moments with ones and zeros, Reshape, then Mul and Add by gamma and beta)."""
    if graph.stored(node.input(3)) is not None or graph.stored(node.input(4)) is not None:
        return False
    weight = _reshaped_stored(node.input(0), graph)
    if weight is not None:
        _refuse_standardized(node, weight, graph, issues)
        return True
    issues.add(
        node,
        "normalizes with a mean and variance the graph computes from its input, not stored running "
        "statistics: a normalization over each input's own statistics (tf2onnx writes a Keras "
        "LayerNormalization so: this node over computed moments, then Mul and Add by its gamma and beta), "
        "which weightport does not read as a layer. Fix: load the source framework's own file (a Keras "
        "model's .keras or .weights.h5, whose LayerNormalization weightport ports), or load that norm's "
        "gamma and beta (the stored vectors of the Mul and Add after this node) by name into it, the other "
        "layers' weights with them, as a dict",
        unsupported=True,
    )
    return True


# the ops that only regroup a tensor's values: a stored weight through them is still that weight
_REGROUPING = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"})


def _reshaped_stored(name: str, graph: Graph) -> str | None:
    """The stored tensor whose values input ``name`` holds, regrouped (through :data:`_REGROUPING` ops only:
    a model's forward reshapes its weight so to normalize it), or None where the graph computes new values."""
    for _ in range(8):
        found = graph.stored(name)
        if found is not None:
            return found
        node = graph.producers.get(name)
        if node is None or node.op_type not in _REGROUPING:
            return None
        name = node.input(0)
    return None


def _refuse_standardized(node: Node, weight: str, graph: Graph, issues: Issues) -> None:
    """Refuse a BatchNormalization over the stored ``weight`` with its own statistics: the model's forward
    standardizes that weight before use (weight standardization: timm's ``StdConv2d`` and ``ScaledStdConv2d``
    call ``F.batch_norm`` on their reshaped weight), and the exporter kept the computation in the graph.
    Which module does that is not in the graph, only what it computes."""
    issues.add(
        node,
        f"normalizes the stored '{weight}' (regrouped) with its own mean and variance: the model's forward "
        "standardizes that weight before a layer uses it (weight standardization), and the graph computes "
        "it, which weightport does not run. A module that standardizes its weight in its own forward (as timm's "
        "StdConv2d and ScaledStdConv2d do) takes the stored weight as it is; the graph cannot show that the "
        "module's forward does so. Fix: where the module standardizes its weight itself, load each tensor "
        "from the initializer of its name: weightport.load(model, path, layout='torch', strict=False) "
        "(it skips the file's other initializers, graph constants; the report's missing lists any tensor "
        "of the model it left as it was); otherwise load the PyTorch weights themselves",
        unsupported=True,
    )
