"""Padding as ONNX and PyTorch state it: a Conv's pads, padding='same', and a Pad node before a Conv.

>>> same_pads((3, 4), (1, 1), upper=True)
((1, 1), (1, 2))
"""

from __future__ import annotations

from typing import Any

from weightport.layouts.onnx.graph import Graph, Node

__all__ = ["same_pads", "onnx_pads", "torch_pads", "pad_before"]

# ONNX Pad modes and the PyTorch padding_mode that pads the same way
_PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad_before(node: Node, graph: Graph, dims: int, spatial: tuple[int, ...] | None) -> Any:
    """The Pad node that makes a Conv's input, as Layer.pad holds it (None: no Pad, or one PyTorch cannot
    fold into a Conv: non-zero constant, or padding along the batch or channel axes)."""
    pad = graph.producers.get(node.input(0))
    while pad is not None and pad.op_type == "Identity":
        pad = graph.producers.get(pad.input(0))
    if pad is not None and pad.op_type == "Concat":
        return "circular", None  # torch.onnx.export wraps the input around with Slice and Concat
    if pad is None or pad.op_type != "Pad":
        return None
    raw_mode = pad.attr("mode", "constant")
    mode = _PAD_MODES.get(raw_mode.decode() if isinstance(raw_mode, bytes) else str(raw_mode))
    value = pad.attr("value", 0.0) if len(pad.inputs) < 3 else None
    if mode is None or (mode == "zeros" and value != 0.0):
        return None
    pads = pad.attr("pads") if len(pad.inputs) < 2 else graph.ints(pad.input(1))
    if len(pad.inputs) > 3 and pad.input(3):  # opset 18 axes: not followed
        pads = None
    rank = dims + 2
    if pads is None or len(pads) != 2 * rank:
        return mode, None
    if any(pads[a] or pads[a + rank] for a in (0, 1)):
        return None
    axes = spatial if spatial is not None else tuple(range(dims))
    return mode, (tuple(pads[2 + a] for a in axes), tuple(pads[2 + rank + a] for a in axes))


def same_pads(kernel: tuple[int, ...], dilation: tuple[int, ...], upper: bool) -> tuple[tuple, tuple]:
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    small = tuple(t // 2 for t in totals)
    large = tuple(t - t // 2 for t in totals)
    return (small, large) if upper else (large, small)


def onnx_pads(
    node: Node, kernel: tuple[int, ...], dilation: tuple[int, ...], dims: int
) -> tuple[tuple, tuple]:
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(kernel, dilation, auto == "SAME_UPPER")
    if auto == "VALID":
        return (0,) * dims, (0,) * dims
    pads = tuple(node.attr("pads", [0] * 2 * dims))
    return pads[:dims], pads[dims:]


def torch_pads(module: Any, kernel: tuple[int, ...], dims: int) -> tuple[tuple, tuple]:
    if module.padding == "valid":
        return (0,) * dims, (0,) * dims
    if module.padding == "same":
        return same_pads(kernel, tuple(module.dilation), upper=True)
    return tuple(module.padding), tuple(module.padding)
