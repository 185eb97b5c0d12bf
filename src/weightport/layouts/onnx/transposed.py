"""ConvTranspose nodes against ``nn.ConvTranspose1d/2d/3d``: the settings that change the output.

ONNX and PyTorch keep the weight alike, ``(C_in, C_out / group, *kernel)``; what differs is how each says
the output's length. ONNX gives ``strides``, ``dilations``, ``group``, ``pads`` (cropped from the start and
end of each axis), ``output_padding`` (added at the end) or ``auto_pad``, or an ``output_shape`` from which
the pads follow; PyTorch crops ``padding`` from both ends and adds ``output_padding``. Each is compared here.

>>> transposed_pads("SAME_UPPER", (3,), (1,), (2,), (1,))
((1,), (1,))
"""

from __future__ import annotations

from typing import Any

from weightport.layouts.onnx.checks import malformed_kernel
from weightport.layouts.onnx.graph import Layer, Node
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.pairing import Slot
from weightport.sources.base import Source

__all__ = ["check_conv_transpose", "transposed_pads"]


def transposed_pads(
    auto: str,
    kernel: tuple[int, ...],
    dilations: tuple[int, ...],
    strides: tuple[int, ...],
    output_padding: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The crop at the start and end of each axis that ``auto_pad=SAME_*`` gives a ConvTranspose (its output
    ``stride`` times the input's length), or None where the total is odd: ONNX's spec and onnxruntime put the
    odd one at different ends, so that crop is not known."""
    totals = [op + (k - 1) * d + 1 - s for k, d, s, op in zip(kernel, dilations, strides, output_padding)]
    if any(t < 0 or t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals), tuple(t // 2 for t in totals)


def check_conv_transpose(node: Node, layer: Layer, slot: Slot, source: Source, issues: Issues) -> None:
    """Refuse a ConvTranspose node whose settings the paired module does not share, naming both values."""
    module: Any = slot.module
    name = type(module).__name__
    kernel = tuple(source.infos[layer.tensors["weight"]].shape[2:])
    dims = len(kernel)
    if malformed_kernel(node, kernel, issues):
        return
    found = {
        "strides": tuple(node.attr("strides") or (1,) * dims),
        "dilations": tuple(node.attr("dilations") or (1,) * dims),
        "group": int(node.attr("group", 1)),
        "output_padding": tuple(node.attr("output_padding") or (0,) * dims),
    }
    expected = {
        "strides": ("stride", tuple(module.stride)),
        "dilations": ("dilation", tuple(module.dilation)),
        "group": ("groups", int(module.groups)),
        "output_padding": ("output_padding", tuple(module.output_padding)),
    }
    for key, value in found.items():
        setting, own = expected[key]
        if value != own:
            issues.add(
                node,
                f"{key}={_shown(value)} but {slot.said} has {setting}={_shown(own)}; the output differs "
                f"(in length or in values). Fix: build the {name} with {setting}={_shown(value)}.",
            )
    if node.attr("output_shape") is not None:
        issues.add(
            node,
            f"output_shape={list(node.attr('output_shape'))} fixes the output's length, and ONNX then crops as "
            "much as that takes, which depends on the input's length; a PyTorch ConvTranspose crops a fixed "
            "padding. Fix: re-export with explicit pads and output_padding (torch.onnx.export writes those).",
            unsupported=True,
        )
        return
    _check_pads(node, slot, found, kernel, issues)


def _check_pads(
    node: Node, slot: Slot, found: dict[str, Any], kernel: tuple[int, ...], issues: Issues
) -> None:
    """The node's crop (``pads`` or ``auto_pad``) against the module's ``padding``, cropped at both ends."""
    module: Any = slot.module
    name, dims = type(module).__name__, len(kernel)
    auto = str(node.attr("auto_pad", "NOTSET"))
    own = tuple(module.padding)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = transposed_pads(auto, kernel, found["dilations"], found["strides"], found["output_padding"])
        if pads is None:
            issues.add(
                node,
                f"auto_pad={auto} crops an odd total from an axis, and ONNX's spec and onnxruntime put the odd "
                "one at different ends; PyTorch's ConvTranspose crops padding equally from both. Fix: re-export "
                "with explicit pads.",
                unsupported=True,
            )
            return
        begin, end = pads
    elif auto == "VALID":
        begin = end = (0,) * dims
    else:
        raw = tuple(node.attr("pads") or (0,) * 2 * dims)
        begin, end = raw[:dims], raw[dims:]
    if begin != end:
        issues.add(
            node,
            f"pads begin {_shown(begin)}, end {_shown(end)}: PyTorch's ConvTranspose crops padding equally "
            f"from both ends of each axis. Fix: use a {name}(padding=0) and, in the model's forward, crop "
            f"{_shown(begin)} from the start and {_shown(end)} from the end of each axis of its output.",
            unsupported=True,
        )
    elif begin != own:
        issues.add(
            node,
            f"pads {_shown(begin)} (cropped from both ends) but {slot.said} has padding={_shown(own)}; the "
            f"output differs. Fix: build the {name} with padding={_shown(begin)}.",
        )


def _shown(value: Any) -> str:
    """A setting as PyTorch's constructor takes it: ``2`` where every axis is ``2``, else the tuple."""
    if isinstance(value, tuple) and value and all(v == value[0] for v in value):
        return str(value[0])
    return str(value)
