"""Checks of a node's settings: against what PyTorch can compute at all (while finding the layers),
and against the module it is paired with (recurrent sizes and activations, normalization epsilon,
Conv strides, dilations, groups and padding)."""

from __future__ import annotations

import math
from typing import Any

from weightport.layouts.onnx.graph import Graph, Layer, Node, all_zero
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.onnx.ops import ACTIVATIONS
from weightport.layouts.onnx.pads import onnx_pads, same_pads, torch_pads
from weightport.layouts.pairing import Slot
from weightport.sources.base import Source

__all__ = ["check_recurrent_node", "check_recurrent_module", "check_norm", "check_conv", "malformed_kernel"]


# --- the node alone: what PyTorch cannot compute -------------------------------------------------------


def check_recurrent_node(
    node: Node, tensors: dict[str, str], graph: Graph, issues: Issues, validated: set[str]
) -> None:
    kind, source = node.op_type, graph.source
    directions = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    if kind == "GRU" and node.attr("linear_before_reset", 0) != 1:
        issues.add(
            node,
            "linear_before_reset=0 (the ONNX default) computes h~ = tanh(W_h x + R_h (r * h) + b), "
            "applying the reset gate before the recurrent product, but PyTorch's GRU computes "
            "n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); they agree only when R_h is zero. "
            "Fix: re-export the model with linear_before_reset=1 (torch.onnx.export writes that).",
            unsupported=True,
        )
    if "P" in tensors:
        if all_zero(source, tensors["P"]):
            validated.add(tensors["P"])
        else:
            issues.add(
                node,
                f"input P '{tensors['P']}' holds non-zero peephole weights; ONNX adds P_i*c, P_f*c "
                "and P_o*c inside the gates, PyTorch's LSTM has no peephole terms. Fix: use a model "
                "without peepholes (P absent or all zero).",
                unsupported=True,
            )
    _check_initial_states(node, graph, issues, validated)
    if node.attr("clip") is not None:
        issues.add(
            node,
            f"clip={node.attr('clip')} clamps the gates' inputs to [-clip, clip]; PyTorch's "
            f"{kind} never clips. Fix: re-export without clip.",
            unsupported=True,
        )
    if node.attr("input_forget", 0):
        issues.add(
            node,
            "input_forget=1 couples the input and forget gates; PyTorch's LSTM keeps them "
            "independent. Fix: re-export with input_forget=0.",
            unsupported=True,
        )
    defaults = list(ACTIVATIONS[kind]) * directions
    found = _activations(node)
    if kind == "RNN":
        if found is not None and not (len(set(found)) == 1 and found[0] in ("Tanh", "Relu")):
            issues.add(
                node,
                f"activations={found}; PyTorch's RNN uses one nonlinearity, tanh or relu, in "
                "every direction. Fix: re-export with Tanh or Relu.",
                unsupported=True,
            )
    elif found is not None and list(found) != defaults:
        issues.add(
            node,
            f"activations={found}; PyTorch's {kind} uses {defaults}. Fix: re-export with the "
            "default activations.",
            unsupported=True,
        )


def _check_initial_states(node: Node, graph: Graph, issues: Issues, validated: set[str]) -> None:
    """Initial states stored in the file (torch.onnx.export's dynamo exporter writes zeros there).

    All zero is what PyTorch's module starts from when ``forward`` gets no state: accepted. Anything
    else is an input of the computation, not a weight the module can hold: refused. States computed by
    the graph (from its inputs) are the caller's, as in PyTorch.
    """
    states = (
        (("initial_h", 5, "h_0"), ("initial_c", 6, "c_0"))
        if node.op_type == "LSTM"
        else (("initial_h", 5, "h_0"),)
    )
    for role, position, torch_name in states:
        name = graph.stored(node.input(position))
        if name is None:
            continue
        if all_zero(graph.source, name):
            validated.add(name)
            continue
        issues.add(
            node,
            f"input {role} '{name}' is a stored, non-zero initial state; PyTorch's {node.op_type} starts "
            f"from zeros unless forward() is given {torch_name}, and a module holds no state to load it "
            f"into. Fix: pass those values as {torch_name} when calling the module (read them with "
            f"weightport.open_source), or re-export without a constant initial state.",
            unsupported=True,
        )


# --- the node against its paired module -----------------------------------------------------------------


def check_recurrent_module(node: Node, slot: Slot, how: str, direction: str, issues: Issues) -> None:
    module: Any = slot.module
    if direction == "reverse":
        if how != "mapping=":
            issues.add(
                node,
                "direction=reverse runs over the sequence backwards and PyTorch has no "
                "reverse-only layer. Fix: if the model flips its input and output in time "
                f"(y = flip(layer(flip(x)))), pass mapping={{'{node.label}': 'module.path'}} to load "
                "it into that forward layer.",
                unsupported=True,
            )
        elif getattr(module, "bidirectional", False):
            issues.add(
                node,
                f"direction=reverse cannot fill '{slot.label}', a bidirectional layer: it would "
                "become its forward half. Fix: map it to a unidirectional layer run on the "
                "time-flipped input.",
            )
    hidden = node.attr("hidden_size")
    if hidden is not None and hidden != module.hidden_size:
        issues.add(
            node,
            f"hidden_size={hidden}, but it is paired with {slot.describe()}. Fix: build it with "
            f"hidden_size={hidden}.",
        )
    if node.op_type == "RNN":
        found = (_activations(node) or ["Tanh"])[0]
        expected = "Relu" if module.nonlinearity == "relu" else "Tanh"
        if found in ("Tanh", "Relu") and found != expected:
            issues.add(
                node,
                f"activation {found} but '{slot.label}' uses nonlinearity='{module.nonlinearity}'. "
                f"Fix: build it with nonlinearity='{found.lower()}'.",
            )


def _activations(node: Node) -> list[str] | None:
    """A recurrent node's ``activations``, the names in the spec's spelling (onnxruntime reads them in any
    case: ``sigmoid`` is ``Sigmoid``)."""
    found = node.attr("activations")
    if found is None:
        return None
    spelled = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
    return [spelled.get(str(a).lower(), str(a)) for a in found]


def check_norm(node: Node, layer: Layer, slot: Slot, source: Source, issues: Issues) -> None:
    module: Any = slot.module
    epsilon = float(node.attr("epsilon", 1e-5))
    if not math.isclose(epsilon, float(module.eps), rel_tol=1e-6):
        issues.add(
            node,
            f"epsilon={epsilon:g} but '{slot.label}' was built with eps={module.eps:g}; the normalization "
            f"divides by sqrt(var + eps). Fix: build it with eps={epsilon:g}.",
        )
    if layer.kind == "LayerNorm":
        rank = len(source.infos[layer.tensors["weight"]].shape)
        axis = int(node.attr("axis", -1))
        if axis >= 0:
            issues.add(
                node,
                f"axis={axis} counts from the input's first axis, and the graph does not record the input's "
                f"rank, so whether it normalizes over the last {rank} axes its Scale covers (what nn.LayerNorm "
                "does) is not known. Fix: re-export with a negative axis (torch.onnx.export writes "
                "-len(normalized_shape)).",
                unsupported=True,
            )
        elif axis != -rank:
            issues.add(
                node,
                f"axis={axis} normalizes over the last {-axis} axes, but its Scale has {rank}; nn.LayerNorm "
                "normalizes over exactly the axes its weight covers. Fix: re-export so Scale covers every "
                "normalized axis.",
                unsupported=True,
            )


def malformed_kernel(node: Node, kernel: tuple[int, ...], issues: Issues) -> bool:
    """Whether a (transposed) Conv node declares a ``kernel_shape`` other than its weight's (an issue)."""
    declared = node.attr("kernel_shape")
    if declared is None or tuple(declared) == kernel:
        return False
    issues.add(
        node,
        f"kernel_shape={list(declared)} but its weight W has kernel {list(kernel)}; the graph is malformed "
        "(onnxruntime refuses it). Fix: re-export the model.",
    )
    return True


def check_conv(
    node: Node,
    layer: Layer,
    slot: Slot,
    source: Source,
    issues: Issues,
    unchecked: list[str],
    forward_pad: tuple[int, ...] | None = None,
) -> None:
    """Check a Conv node's settings against ``slot``'s module; ``forward_pad``: the zero padding (``F.pad``'s
    amounts) the model's forward puts on the module's input, which with the module's own padding must make
    the node's pads where the two differ (a node's uneven pads: ``F.pad`` then a ``padding=0`` conv)."""
    module: Any = slot.module
    dims = len(module.kernel_size)
    # The node's own axes (it may convolve over more, unit ones: see layers._conv_spatial), then the module's.
    node_dims = len(source.infos[layer.tensors["weight"]].shape) - 2
    axes = layer.spatial if layer.spatial is not None else tuple(range(node_dims))
    node_kernel = tuple(source.infos[layer.tensors["weight"]].shape[2:])
    if malformed_kernel(node, node_kernel, issues):
        return
    strides = node.attr("strides") or [1] * node_dims
    dilations = node.attr("dilations") or [1] * node_dims
    found = {
        "strides": tuple(strides[a] for a in axes),
        "dilations": tuple(dilations[a] for a in axes),
        "group": node.attr("group", 1),
    }
    expected = {"strides": tuple(module.stride), "dilations": tuple(module.dilation), "group": module.groups}
    for key, value in found.items():
        if value != expected[key]:
            issues.add(
                node,
                f"{key}={value} but '{slot.label}' has {expected[key]}. Fix: build the "
                f"{type(module).__name__} to match.",
            )
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER") and any(s != 1 for s in found["strides"]):
        issues.add(
            node,
            f"auto_pad={auto} with strides={found['strides']} pads each input so the output has "
            "ceil(length / stride) steps: how much depends on the input's length, while PyTorch's Conv pads "
            "a fixed amount. Fix: re-export with explicit pads (the input's shape fixed), or pad the input "
            "yourself (F.pad) before a Conv with padding=0.",
            unsupported=True,
        )
        return
    kernel = tuple(module.kernel_size)
    node_begin, node_end = onnx_pads(node, node_kernel, tuple(dilations), node_dims)
    begin, end = tuple(node_begin[a] for a in axes), tuple(node_end[a] for a in axes)
    name = type(module).__name__
    if module.padding_mode != "zeros" and any(torch_pads(module, kernel, dims)[0]):
        _check_pad_before(node, layer, slot, (begin, end), issues, unchecked)
        return
    if (begin, end) == torch_pads(module, kernel, dims):
        return
    if forward_pad is not None and (begin, end) == _with_forward_pad(
        torch_pads(module, kernel, dims), forward_pad
    ):
        return  # the forward pass showed the model pad the input so before the module
    stride_one = all(s == 1 for s in found["strides"])
    if stride_one and (begin, end) == same_pads(kernel, tuple(module.dilation), upper=True):
        issues.add(
            node,
            f"pads begin {begin}, end {end} (auto_pad={auto}) are what padding='same' pads, but '{slot.label}' "
            f"has padding={module.padding}. Fix: build it with padding='same'{_MERGED_PAD}.",
        )
    elif begin != end:
        issues.add(
            node,
            f"pads begin {begin}, end {end}: PyTorch's Conv pads both sides equally (padding='same' puts "
            f"the odd one at the end, only with stride 1). Fix: pad the input with zeros in forward "
            f"(F.pad(x, ...) by the amounts that make these) before a {name}(padding=0), and pass "
            f"example_inputs= so the forward pass shows it{_MERGED_PAD}.",
            unsupported=True,
        )
    else:
        issues.add(
            node,
            f"pads {begin} (with zeros) but '{slot.label}' has padding={module.padding}. Fix: build it "
            f"with padding={begin}{_MERGED_PAD}.",
        )


# torch.onnx.export(dynamo=True)'s optimizer merges a zero Pad node into the Conv after it: a model that pads
# in its forward (timm's Conv2dSame, F.pad before a padding=0 conv) then reads as a Conv that pads itself
_MERGED_PAD = (
    "; where the model already pads in its forward (timm's Conv2dSame, an F.pad before the conv), the "
    "exporter's optimizer merged that padding into this Conv: pass example_inputs= (the forward pass shows "
    "the padding), or re-export with dynamo=True, optimize=False (or dynamo=False), which keeps the Pad node"
)


def _check_pad_before(
    node: Node,
    layer: Layer,
    slot: Slot,
    conv_pads: tuple[tuple[int, ...], tuple[int, ...]],
    issues: Issues,
    unchecked: list[str],
) -> None:
    """A module with padding_mode other than 'zeros': the graph must pad that way in a Pad node before the
    Conv (what torch.onnx.export writes), the Conv itself not at all."""
    module: Any = slot.module
    padding, mode = module.padding, module.padding_mode
    before, after = _module_pads(module)
    if any(conv_pads[0] + conv_pads[1]) or layer.pad is None or layer.pad[0] != mode:
        how = (
            f"the Conv pads {conv_pads[0]} with zeros"
            if any(conv_pads[0] + conv_pads[1])
            else "no Pad node before it"
            if layer.pad is None
            else f"the Pad node before it pads as padding_mode='{layer.pad[0]}'"
        )
        issues.add(
            node,
            f"{how}, but '{slot.label}' has padding={padding}, padding_mode='{mode}'. Fix: build it with "
            f"the graph's padding (padding_mode='zeros' and the Conv's pads, or the Pad node's mode).",
        )
        return
    if layer.pad[1] is None:
        unchecked.append(
            f"how much the graph pads before Conv '{node.label}' (it computes the amounts); taken to be "
            f"'{slot.label}''s padding={padding}"
        )
    elif layer.pad[1] != (before, after):
        issues.add(
            node,
            f"the Pad node before it pads begin {layer.pad[1][0]}, end {layer.pad[1][1]}, but '{slot.label}' "
            f"has padding={padding!r} (begin {before}, end {after}). Fix: build it with the Pad node's amounts "
            "(equal on both sides), or padding='same' where they are what it pads.",
            unsupported=layer.pad[1][0] != layer.pad[1][1] and _same_pads(module) != layer.pad[1],
        )


def _same_pads(module: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What ``padding='same'`` pads a conv by (stride 1): ``dilation * (kernel - 1)`` per axis, the
    smaller half before, as PyTorch splits it."""
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)


def _module_pads(module: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How much a conv pads before and after each spatial axis, for any of its ``padding`` forms."""
    if module.padding == "same":
        return _same_pads(module)
    if module.padding == "valid":
        zeros = (0,) * len(module.kernel_size)
        return zeros, zeros
    return tuple(module.padding), tuple(module.padding)


def _with_forward_pad(
    own: tuple[tuple[int, ...], tuple[int, ...]], pad: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The module's own padding (begin, end per spatial axis) plus a zero ``F.pad`` of its input (its amounts
    pair up from the last axis back), or None where that pad reaches past the spatial axes.

    >>> _with_forward_pad(((0, 0), (0, 0)), (0, 1, 0, 1))
    ((0, 0), (1, 1))
    """
    dims = len(own[0])
    if len(pad) % 2 or len(pad) > 2 * dims:
        return None
    pairs = [(pad[2 * k], pad[2 * k + 1]) if 2 * k + 1 < len(pad) else (0, 0) for k in range(dims)][::-1]
    return (
        tuple(b + p[0] for b, p in zip(own[0], pairs)),
        tuple(e + p[1] for e, p in zip(own[1], pairs)),
    )
