"""How a Keras conv pads, held against how the PyTorch conv pads: equal, equal once ``forward`` pads the
input (a note), or not expressible (a problem saying the amounts needed).

Keras pads ``'valid'`` (nothing, or what a ``ZeroPadding1D/2D`` right before it adds), ``'same'``
(TensorFlow's rule: an axis of size ``n`` gets ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` in
all, half of it rounded down before; with stride 1 that is a fixed amount, above 1 it depends on ``n``)
and ``'causal'``. A PyTorch conv pads a fixed symmetric amount; timm's ``Conv2dSame`` (its TF-ported
models' strided convs) pads each input by TensorFlow's rule itself.

>>> tf_same(224, 3, 2, 1), tf_same(225, 3, 2, 1), tf_same(8, 5, 1, 1)
((0, 1), (1, 1), (2, 2))
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "tf_same",
    "dynamic_same",
    "padding_of",
    "padding_verdict",
    "transpose_verdict",
    "keras_crop",
    "TF_SAME",
]

TF_SAME = (
    "pad each spatial axis of size n by max((ceil(n / stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0) "
    "in all, half of it (rounded down) before and the rest after"
)

Verdict = tuple[str | None, tuple[str, str, str] | None]  # (a note for the pairing, or a problem)


def tf_same(n: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's ``'same'`` padding (before, after) of an axis of size ``n``."""
    total = max((math.ceil(n / stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


def dynamic_same(m: Any) -> bool:
    """Whether the module pads each input by TensorFlow's ``'same'`` rule itself (timm's ``Conv2dSame``)."""
    return type(m).__name__ == "Conv2dSame" and type(m).__module__.startswith("timm.")


def padding_of(m: Any) -> tuple[tuple[int, int], ...] | None:
    """The module's own padding as (before, after) per axis, where it is fixed (None: it pads each input
    as it comes)."""
    kernel, dilation = m.kernel_size, m.dilation
    if dynamic_same(m):
        return None
    if m.padding == "valid":
        return ((0, 0),) * len(kernel)
    if m.padding == "same":  # PyTorch's (stride 1): total (k - 1) * d, the odd one after
        return tuple(((k - 1) * d // 2, (k - 1) * d - (k - 1) * d // 2) for k, d in zip(kernel, dilation))
    return tuple((p, p) for p in m.padding)


def _by_size(m: Any) -> str:
    """TensorFlow's 'same' amounts for this conv, per axis and per input size modulo the stride."""
    axes = []
    for k, s, d in zip(m.kernel_size, m.stride, m.dilation):
        cases = [f"n % {s} == {r}: {tf_same(10 * s + r, k, s, d)}" for r in range(s)] if s > 1 else []
        axes.append(", ".join(cases) or str(tf_same(10, k, s, d)))
    return "; ".join(f"axis {i}: {a}" for i, a in enumerate(axes))


def explicit_padding_matches(layer: Any, fixed: Any, padding: str) -> bool:
    return padding == "valid" and bool(layer.padding) and tuple(layer.padding) == fixed


def padding_verdict(cfg: Any, m: Any, layer: Any) -> Verdict:
    """Whether the module pads as Keras does, for a Conv1D/Conv2D/DepthwiseConv2D ``cfg`` and its ``layer``."""
    padding = str(cfg.get("padding", "valid")).lower()
    if (
        padding == "same"
        and not layer.padding
        and all((k - 1) * d == 0 for k, d in zip(m.kernel_size, m.dilation))
    ):
        padding = "valid"  # a 1 x 1 kernel: 'same' pads nothing, whatever the stride
    fixed = padding_of(m)
    rank = len(m.kernel_size)
    zeros = ((0, 0),) * rank
    explicit = tuple(layer.padding) if padding == "valid" and layer.padding else None
    name = f"Keras {'ZeroPadding1D' if rank == 1 else 'ZeroPadding2D'} '{layer.padded_by}'"
    then = "padding='valid'"
    if padding == "same" and layer.padding:  # the zeros before it, then what 'same' pads the padded input
        if any(s != 1 for s in m.stride):
            return None, (
                f"padding by {name} ({tuple(layer.padding)} (before, after) per axis), then by TensorFlow's "
                f"'same' rule for stride {tuple(m.stride)}, which depends on the input's size",
                f"padding={m.padding}"
                if fixed is not None
                else "Conv2dSame, which does not add the ZeroPadding",
                f"build the module with padding=0 and pad the input in forward: by {tuple(layer.padding)}, then "
                f"as 'same' does ({TF_SAME})",
            )
        same = [tf_same(10, k, 1, d) for k, d in zip(m.kernel_size, m.dilation)]
        explicit = tuple((z[0] + a[0], z[1] + a[1]) for z, a in zip(layer.padding, same))
        name, then = f"{name} and padding='same' together", "the conv"
    mode = m.padding_mode == "zeros" or fixed == zeros
    if not mode and padding in ("same", "valid") and fixed not in (None, zeros):
        wrong_mode = (
            "padding_mode='zeros' (Keras pads with zeros)",
            f"padding_mode='{m.padding_mode}'",
            "build the module with padding_mode='zeros'",
        )
        if padding == "same" and all(s == 1 for s in m.stride):
            return None, wrong_mode
        if explicit_padding_matches(layer, fixed, padding):
            return None, wrong_mode
    if padding == "valid" and explicit is None:
        if fixed == zeros:
            return None, None
        return None, (
            "padding equivalent to Keras padding='valid'",
            "Conv2dSame, which pads each input as 'same'" if fixed is None else f"padding={m.padding}",
            "build the module with padding=0 (a plain nn.Conv)",
        )
    if explicit is not None:
        if fixed == explicit and mode:
            return f"{name} before it pads as the module does, {explicit}", None
        if fixed == zeros:
            return f"{name} pads the input by {explicit} (before, after) per axis: pad it so in forward", None
        if fixed is None and layer.built is not None:
            sizes = [b - p[0] - p[1] for b, p in zip(layer.built, explicit)]
            if None not in layer.built and all(
                tf_same(n, k, s, d) == e
                for n, k, s, d, e in zip(sizes, m.kernel_size, m.stride, m.dilation, explicit)
            ):
                return (
                    f"{name} pads {explicit}, what Conv2dSame pads inputs of the size it was built for "
                    f"({tuple(sizes)}); other sizes may differ",
                    None,
                )
        symmetric = all(a == b for a, b in explicit)
        fix = (
            f"build the module with padding={tuple(a for a, _ in explicit)}"
            if symmetric
            else f"build the module with padding=0 and pad the input by {explicit} (F.pad) in forward"
        )
        if fixed is None and layer.built is None:  # the file records no input size to hold it against
            fix = (
                "pass example_inputs= (the size the forward pass gives it tells what Conv2dSame pads), load "
                f"the .keras file (it records the size each layer was built for), or {fix}"
            )
        return None, (
            f"padding (before, after) per axis = {explicit} ({name}, then {then})",
            "Conv2dSame, which pads by TensorFlow's 'same' rule" if fixed is None else f"padding={m.padding}",
            fix,
        )
    if padding == "same":
        unit = all(s == 1 for s in m.stride)
        want = tuple(tf_same(10, k, 1, d) for k, d in zip(m.kernel_size, m.dilation))
        if fixed is None or (unit and fixed == want and mode):
            return None, None
        if not unit and fixed == zeros:
            return f"Keras pads as TensorFlow's padding='same' with stride {tuple(m.stride)}: {TF_SAME}", None
        amounts = str(want) if unit else _by_size(m)
        return None, (
            f"padding as Keras padding='same' (before, after): {amounts}",
            f"padding={m.padding}" + ("" if mode else f", padding_mode='{m.padding_mode}'"),
            "build the module with padding='same'"
            if unit
            else f"build the module with padding=0 (PyTorch's padding='same' needs stride 1) and {TF_SAME} in "
            "forward"
            + (", or use timm's Conv2dSame, which pads each input so" if rank == 2 else "")
            + " (a fixed symmetric padding cannot: the amounts depend on the input's size)",
        )
    if padding == "causal":
        steps = (m.kernel_size[0] - 1) * m.dilation[0]
        if fixed == zeros:
            return f"Keras pads causally: left-pad the input by {steps} steps (dilation * (kernel - 1))", None
        return None, (
            "padding equivalent to Keras padding='causal'",
            f"padding={m.padding}",
            "build the module with padding=0 (PyTorch has no causal padding) and left-pad the input "
            f"by dilation * (kernel - 1) = {steps} steps",
        )
    return None, (
        f"padding equivalent to Keras padding='{padding}'",
        f"padding={m.padding}",
        "pad the input yourself",
    )


def keras_crop(kernel: int, stride: int, dilation: int, padding: str, extra: int | None) -> tuple[int, int]:
    """What Keras crops of a transposed conv's full result on one axis, as (before, after); ``after`` is
    negative where Keras adds positions instead (zero contributions: the bias alone).

    On ``n`` inputs the full result is ``(n - 1) * stride + k`` long (``k = (kernel - 1) * dilation + 1``).
    Keras's output is ``n * stride + max(k - stride, 0)`` long for ``'valid'`` (the full result plus
    ``output_padding`` where one is given), ``n * stride`` for ``'same'``, and ``(n - 1) * stride + k - 2 * (k //
    2) + output_padding`` for ``'same'`` with it, cropped at the start by half (rounded down) of what
    TensorFlow's ``'same'`` rule pads a conv over that output by; none of it depends on ``n``.

    >>> keras_crop(2, 3, 1, "valid", None), keras_crop(3, 2, 1, "same", None), keras_crop(2, 1, 1, "same", None)
    ((0, -1), (0, 1), (0, 1))
    """
    n = 10  # any size: the amounts are the same for all
    k = (kernel - 1) * dilation + 1
    full = (n - 1) * stride + k
    if padding == "valid":
        return 0, -(max(stride - k, 0) if extra is None else extra)
    if extra is None:
        before, size = max(k - stride, 0) // 2, n * stride
    else:
        size = full - 2 * (k // 2) + extra
        rest = size - (n - 1) * stride
        before = max(k - (stride if rest == 0 else rest), 0) // 2
    return before, full - before - size


def _per_axis(value: Any, rank: int) -> tuple[Any, ...]:
    """A Keras setting given once or per axis, per axis."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


def _crop_slice(crops: tuple[tuple[int, int], ...]) -> str:
    """The slice of a channels-first output ``y`` that crops (before, after) off each spatial axis."""
    return "y[..., " + ", ".join(f"{b}:{-a if a else ''}" for b, a in crops) + "]"


def _crops_said(crops: tuple[tuple[int, int], ...]) -> str:
    if len(set(crops)) == 1 and min(crops[0]) >= 0:
        return f"{crops[0][0]} before and {crops[0][1]} after on {'each' if len(crops) > 1 else 'the'} axis"
    return f"{crops} (before, after) per axis"


def transpose_verdict(cfg: Any, m: Any) -> Verdict:
    """Whether a ConvTranspose crops as a Keras Conv1DTranspose/Conv2DTranspose with ``cfg``: exactly (its
    twin), once ``forward`` crops its output (a note), or not (a problem).

    PyTorch crops ``padding`` off both ends of the full result, then adds ``output_padding`` positions at
    the end, so its twin has ``padding = before`` and ``output_padding = before - after`` of
    :func:`keras_crop`'s amounts; where Keras crops one more after than before (an odd crop), no
    ConvTranspose has them, and ``forward`` crops what the module leaves.

    >>> from torch import nn
    >>> transpose_verdict({"padding": "valid", "strides": 3}, nn.ConvTranspose1d(1, 1, 2, stride=3, output_padding=1))
    (None, None)
    >>> transpose_verdict({"padding": "same"}, nn.ConvTranspose2d(1, 1, 2))[0]
    "Keras padding='same' crops its output unevenly, which no nn.ConvTranspose2d does: crop the module's output in forward by 0 before and 1 after on each axis, y[..., 0:-1, 0:-1]"
    """
    padding = str(cfg.get("padding", "valid")).lower()
    given = cfg.get("output_padding")
    said = f"Keras padding='{padding}'" + ("" if given is None else f" with output_padding={given}")
    extra = _per_axis(given, len(m.kernel_size))
    keras = tuple(
        keras_crop(k, s, d, padding, e) for k, s, d, e in zip(m.kernel_size, m.stride, m.dilation, extra)
    )
    found = f"padding={m.padding}, output_padding={m.output_padding}"
    if all(before >= after for before, after in keras):  # the twin exists
        pads, outs = tuple(b for b, _ in keras), tuple(b - a for b, a in keras)
        if tuple(m.padding) == pads and tuple(m.output_padding) == outs:
            return None, None
        return None, (
            f"padding={pads}, output_padding={outs} ({said})",
            found,
            f"build the module with padding={pads}, output_padding={outs}",
        )
    crops = tuple((b - p, a - p + o) for (b, a), p, o in zip(keras, m.padding, m.output_padding))
    if min(min(c) for c in crops) >= 0:
        return (
            f"{said} crops its output unevenly, which no nn.{type(m).__name__} does: crop the module's output "
            f"in forward by {_crops_said(crops)}, {_crop_slice(crops)}",
            None,
        )
    outs = tuple(max(-a, 0) for _, a in keras)
    crops = tuple((b, a + o) for (b, a), o in zip(keras, outs))
    return None, (
        f"a crop PyTorch can make ({said} crops {_crops_said(keras)})",
        found,
        "nn.ConvTranspose crops the same amount at both ends: build the module with padding=0 and "
        f"output_padding={outs}, and crop its output in forward by {_crops_said(crops)}, {_crop_slice(crops)}",
    )
