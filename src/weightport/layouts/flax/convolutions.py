"""Flax ``ConvTranspose`` into ``nn.ConvTranspose1d/2d/3d``, and its padding in PyTorch's terms.

Flax's ``ConvTranspose`` (``lax.conv_transpose``) keeps its kernel ``(k..., in, out)`` and, by default
(``transpose_kernel=False``), does not flip it: it dilates the input by the strides, pads it and
correlates. PyTorch's ``ConvTranspose`` is the gradient of a Conv, which flips: so its weight
``(in, out, k...)`` is Flax's kernel flipped on every spatial axis, axes permuted. With
``transpose_kernel=True`` Flax flips and swaps the channel axes itself, and keeps the kernel
``(k..., out, in)``: a permutation alone. The kernel's shape tells the two apart unless ``in == out``
(then the default is assumed, and the report's note gives the one line that turns the loaded weight
into the other reading's). Flax has no feature groups here: a module with
``groups > 1`` is refused.

Padding is a setting of the call, never in the params: :func:`torch_padding` turns Flax's
(``'VALID'``, ``'SAME'``, or ``(low, high)`` per axis) into PyTorch's ``padding`` and
``output_padding``, or refuses what PyTorch cannot express (an input padded more at the start than the
end, by more than the kernel, ``'CIRCULAR'``): PyTorch's module crops ``padding`` from both ends and adds
``output_padding`` at the end only, so ``low = d*(k-1) - padding`` and ``high = low + output_padding``.

>>> torch_padding((4, 4), (2, 2), "SAME"), torch_padding((3,), (2,), "VALID"), torch_padding((3,), (2,), [(1, 2)])
(((1, 1), (0, 0)), ((0,), (0,)), ((1,), (1,)))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import Rule
from weightport.layouts.flax.facts import FRAMEWORK
from weightport.sources.base import Source
from weightport.transforms import Chain, Identity, Op, ReorderBlocks, Transpose

if TYPE_CHECKING:
    from weightport.layouts.flax.layers import Layer
    from weightport.layouts.slots import Paired

__all__ = ["torch_padding", "conv_transpose_rules", "flip_and_permute", "CONV_TRANSPOSE_DETAIL"]

CONV_TRANSPOSE_DETAIL = "ConvTranspose"


def _flax_pads(kernel: int, stride: int, padding: str | tuple[int, int], dilation: int) -> tuple[int, int]:
    """``lax.conv_transpose``'s (low, high) padding of the stride-dilated input for one axis."""
    k = dilation * (kernel - 1) + 1
    if padding == "SAME":
        total = k + stride - 2
        low = k - 1 if stride > k - 1 else math.ceil(total / 2)
        return low, total - low
    if padding == "VALID":
        total = k + stride - 2 + max(k - stride, 0)
        return k - 1, total - (k - 1)
    if isinstance(padding, str):
        raise UnsupportedConfigError(
            f"Flax ConvTranspose padding='{padding}' wraps or reflects the input; PyTorch's ConvTranspose pads "
            "with zeros only. Fix: retrain with 'SAME', 'VALID' or explicit padding."
        )
    return int(padding[0]), int(padding[1])


def torch_padding(
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    kernel_dilation: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PyTorch's ``(padding, output_padding)`` for a Flax ``ConvTranspose`` (see the module doc).

    Raises:
        UnsupportedConfigError: PyTorch's ConvTranspose cannot pad this way; the message says why.
    """
    dilation = tuple(kernel_dilation or (1,) * len(kernel_size))
    pads = [padding] * len(kernel_size) if isinstance(padding, str) else list(padding)
    crop, extra = [], []
    for axis, (k, s, d, pad) in enumerate(zip(kernel_size, strides, dilation, pads)):
        low, high = _flax_pads(k, s, pad, d)  # type: ignore[arg-type]
        p, op = d * (k - 1) - low, high - low
        if p < 0 or not 0 <= op < max(s, d):
            raise UnsupportedConfigError(
                f"Flax ConvTranspose axis {axis} (kernel {k}, stride {s}, dilation {d}, padding {pad!r}) pads "
                f"the dilated input by {low} before and {high} after; PyTorch's pads d*(k-1) - padding = "
                f"{d * (k - 1)} - padding on both sides and output_padding (0 <= output_padding < "
                f"max(stride, dilation) = {max(s, d)}) more after, which cannot make ({low}, {high}). "
                "Fix: use a ConvTranspose with padding=0 and crop or pad its output yourself."
            )
        crop.append(p)
        extra.append(op)
    return tuple(crop), tuple(extra)


def flip_and_permute(kernel: Sequence[int]) -> Op:
    """Flax (k..., in, out), not flipped -> PyTorch (in, out, k...), flipped on every spatial axis
    (each spatial axis reversed as blocks of one).

    >>> import numpy as np
    >>> op = flip_and_permute((3, 2, 4))
    >>> k = np.arange(24.0).reshape(3, 2, 4)
    >>> np.array_equal(op(k), k[::-1].transpose(1, 2, 0)), np.array_equal(op.inverse()(op(k)), k)
    (True, True)
    """
    rank = len(kernel)
    flips = [ReorderBlocks(axis, tuple(range(kernel[axis] - 1, -1, -1))) for axis in range(rank - 2)]
    return Chain(*flips, Transpose((rank - 2, rank - 1, *range(rank - 2))))


def conv_transpose_rules(layer: Layer, pair: Paired, source: Source) -> list[Rule]:
    """A Flax ConvTranspose into an ``nn.ConvTranspose*d`` (see the module doc)."""
    slot = pair.slot
    module = slot.module
    origin = f"{FRAMEWORK} '{layer.name}' (ConvTranspose)"
    kernel = tuple(int(d) for d in source.infos[layer.leaves["kernel"]].shape)
    rank = len(kernel)
    c_in, c_out = int(getattr(module, "in_channels", 0)), int(getattr(module, "out_channels", 0))
    where = f"{FRAMEWORK} ConvTranspose '{layer.name}' -> '{slot.label}'"
    if getattr(module, "groups", 1) != 1:
        raise UnsupportedConfigError(
            f"{where}: the module has groups={module.groups}; Flax's ConvTranspose has no feature groups. "
            "Fix: build it with groups=1."
        )
    if kernel[-2:] == (c_in, c_out):  # transpose_kernel=False, Flax's default: flip
        op: Op = flip_and_permute(kernel)
    elif kernel[-2:] == (c_out, c_in):  # transpose_kernel=True: Flax flips and swaps itself
        op = Transpose((rank - 1, rank - 2, *range(rank - 2)))
    else:
        raise LayoutError(
            f"{where}: kernel {kernel} is (k..., in, out) or, with transpose_kernel=True, (k..., out, in); "
            f"the module has in_channels={c_in}, out_channels={c_out}. Fix: build the module with the kernel's "
            "channels, or pass mapping= to pair the layers yourself."
        )
    rules = [Rule(slot.name("weight"), (layer.leaves["kernel"],), op, origin)]
    if "bias" in layer.leaves:
        rules.append(Rule(slot.name("bias"), (layer.leaves["bias"],), Identity(), origin))
    return rules
