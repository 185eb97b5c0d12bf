"""What Flax params do not record, per paired layer: the settings the report lists as unchecked.

A msgpack (or a params pytree) holds arrays by name, never a module's settings: a cell's activations and
``nn.RNN``'s direction, ``nn.Bidirectional``'s ``merge_fn``, a norm's epsilon and axes, a
``DenseGeneral``'s ``axis``, the heads of an attention split into Linears, a Conv's padding. Each note
names the PyTorch module, Flax's default, and what the module must do for any other.

>>> from weightport.layouts.flax.layers import Layer
>>> from weightport.layouts.slots import Paired, Slot, SourceLayer
>>> import torch
>>> layer = Layer("DenseGeneral_0", "Linear", "DenseGeneral", shapes={"kernel": (6, 4), "bias": (4,)})
>>> pair = Paired(SourceLayer("DenseGeneral_0", "Linear"), Slot("fc", torch.nn.Linear(6, 4), "Linear"), "")
>>> unchecked([(layer, pair)])[0][:70]
"'fc': Flax DenseGeneral 'DenseGeneral_0' contracts one input axis of 6"
"""

from __future__ import annotations

from weightport.layouts.flax.attention import ATTENTION, Heads, split_at
from weightport.layouts.flax.layers import DENSE_GENERAL, Layer
from weightport.layouts.slots import Paired
from weightport.torch_facts import RNN_GATE_COUNT, RNN_KINDS

__all__ = ["unchecked"]


def unchecked(pairs: list[tuple[Layer, Paired]]) -> list[str]:
    """The settings each paired layer computes with that Flax params do not carry, for the report."""
    return [
        *_recurrent(pairs),
        *_conv1d(pairs),
        *_heads(pairs),
        *(note for lay, p in pairs for note in _layer_notes(lay, p)),
    ]


def _labels(pairs: list[tuple[Layer, Paired]]) -> str:
    return ", ".join(p.slot.label + (f":{p.side}" if p.side else "") for _, p in pairs)


def _recurrent(pairs: list[tuple[Layer, Paired]]) -> list[str]:
    """Cells' activations, one-way layers' direction, and Bidirectional's merge_fn."""
    notes = []
    gated = [p.slot.label for lay, p in pairs if lay.kind in RNN_KINDS and RNN_GATE_COUNT[lay.kind] > 1]
    if gated:
        notes.append(
            f"Flax cells' gate_fn and activation_fn ({', '.join(gated)}): PyTorch computes sigmoid gates and "
            "tanh, Flax's defaults; a cell built with others computes something else"
        )
    cells = [(lay, p) for lay, p in pairs if lay.cell is not None]
    one_way = [(lay, p) for lay, p in cells if lay.backward is None and not p.side]
    if one_way:
        notes.append(
            f"Flax recurrent layers' direction ({_labels(one_way)}): PyTorch runs the sequence forward, as "
            "nn.RNN does by default; a Flax nn.RNN(reverse=True) runs the sequence backwards: flip the input's "
            "time axis (and the output, unless keep_order=True) around the PyTorch module"
        )
    both = [(lay, p) for lay, p in cells if lay.backward is not None or p.side]
    if both:
        notes.append(
            f"Flax nn.Bidirectional's merge_fn ({_labels(both)}): PyTorch concatenates the forward then the "
            "backward outputs, as Flax's default merge_fn does; one that merges them otherwise (the halves "
            "swapped, summed) computes something else: merge PyTorch's two halves (output[..., :H], "
            "output[..., H:]) as the Flax model's merge_fn does"
        )
    return notes


def _conv1d(pairs: list[tuple[Layer, Paired]]) -> list[str]:
    conv1d = [p.slot.label for lay, p in pairs if lay.kind == "Conv1D"]
    if not conv1d:
        return []
    return [
        f"{', '.join(conv1d)}: read as transformers' FlaxConv1D, whose kernel is (features, in), since the "
        "module's are transformers' Conv1D; a Flax Dense's kernel is (in, features), which only a non-square "
        "shape would show"
    ]


def _heads(pairs: list[tuple[Layer, Paired]]) -> list[str]:
    """An attention split into Linears whose module declares no head count: the kernels' heads, to follow."""
    unseen: dict[Heads, list[str]] = {}
    for lay, p in pairs:
        if lay.heads is not None and not lay.heads.declared.get(p.slot.path):
            unseen.setdefault(lay.heads, []).append(f"'{p.slot.label}'")
    return [
        f"{', '.join(labels)}: the file's attention '{heads.attention}' has {heads.count} heads of {heads.size} "
        "(its kernels record them; no module around these Linears declares num_heads): split the projections "
        f"so (features (..., {heads.count * heads.size}) -> ({heads.count}, {heads.size})), and merge the heads "
        "back in that order before the output projection"
        for heads, labels in unseen.items()
    ]


def _dense_general(lay: Layer, p: Paired) -> str:
    """A DenseGeneral's axis (and the order of its input and output axes), which its kernel's shape does not
    record."""
    kernel, bias = lay.shapes.get("kernel", ()), lay.shapes.get("bias")
    sizes = (int(getattr(p.slot.module, "in_features", 0)), int(getattr(p.slot.module, "out_features", 0)))
    at = len(kernel) - len(bias) if bias else split_at(kernel, *sizes)
    inputs, outputs = (kernel[:at], kernel[at:]) if at else ((), ())
    where = f"'{p.slot.label}': Flax DenseGeneral '{lay.name}'"
    if len(inputs) == 1:
        note = (
            f"{where} contracts one input axis of {inputs[0]}, the last unless its axis= said another (and "
            "batch_dims=()): the module's nn.Linear reads the last, so move that axis there (x.movedim(axis, -1))"
        )
    else:
        note = (
            f"{where} contracts the input axes {inputs}, the last ones unless its axis= said others (and "
            f"batch_dims=()), its kernel's rows flattened from them in that order: flatten the PyTorch input "
            f"the same way (x.flatten(-{len(inputs)}) of (..., {', '.join(map(str, inputs))})), not transposed"
        )
    if len(outputs) > 1:
        note += f"; its outputs {outputs} come flattened in that order (y.unflatten(-1, {outputs}))"
    return note


def _norm_axes(name: str, module: object) -> str:
    shape = tuple(getattr(module, "normalized_shape", ()))
    return (
        f"; Flax {name}'s reduction_axes and feature_axes (-1, the defaults) must both be the module's last "
        f"{len(shape)} axes (normalized_shape={shape}): a Flax {name} that normalizes over more axes than its "
        "scale spans (reduction_axes=(-2, -1) with a scale of the last) computes something else"
    )


def _transpose_kernel(lay: Layer, label: str) -> str:
    """A ConvTranspose kernel (k..., c, c) reads both ways: as Flax's default transpose_kernel=False (flipped
    here) or as transpose_kernel=True's (k..., out, in), which Flax flips itself. The first is taken; the
    second is that weight with its channel axes swapped and flipped back: the fix, said whole."""
    kernel = lay.shapes.get("kernel", ())
    if len(kernel) < 3 or kernel[-1] != kernel[-2]:
        return ""  # the kernel's shape said which
    dims = list(range(2, len(kernel)))
    return (
        f"; its kernel has as many inputs as outputs ({kernel[-1]}), so it reads both ways and was read as "
        "transpose_kernel=False (Flax's default). If the Flax layer set transpose_kernel=True, fix the weight "
        f"after the load: with torch.no_grad(): w = model.get_submodule('{label}').weight; "
        f"w.copy_(w.transpose(0, 1).flip({dims}))"
    )


def _layer_notes(lay: Layer, p: Paired) -> list[str]:
    """One layer's own unchecked settings."""
    module = p.slot.module
    label = p.slot.label
    if lay.kind == "RNN":
        return [
            f"'{label}': Flax SimpleCell's activation_fn (tanh by default) must be the module's "
            f"nonlinearity='{getattr(module, 'nonlinearity', 'tanh')}', and residual=False"
        ]
    if lay.kind == ATTENTION:
        return [
            f"'{label}': Flax attention takes (batch, length, features), as the module does with "
            f"batch_first=True (it has batch_first={getattr(module, 'batch_first', '?')}); its mask and "
            "dropout are arguments of the call, not weights"
        ]
    if lay.detail == DENSE_GENERAL and lay.heads is None and lay.kind == "Linear":
        return [_dense_general(lay, p)]
    if lay.kind == "LayerNorm":
        return [
            f"'{label}': the module has eps={getattr(module, 'eps', '?')}; Flax LayerNorm's epsilon "
            "is 1e-6 unless the Flax model set another (transformers: config.layer_norm_eps), and the "
            "module must use the same" + _norm_axes("LayerNorm", module)
        ]
    if lay.kind == "BatchNorm":
        return [
            f"'{label}': Flax BatchNorm's epsilon (1e-5 by default) must equal the module's "
            f"eps={getattr(module, 'eps', '?')}; PyTorch's momentum is 1 - Flax's (0.01 for Flax's 0.99)"
        ]
    if lay.kind == "RMSNorm":
        return [
            f"'{label}': Flax RMSNorm's epsilon (1e-6 by default) must be the module's "
            f"eps={getattr(module, 'eps', '?')} (None there means the dtype's machine epsilon)"
            + _norm_axes("RMSNorm", module)
        ]
    if lay.kind == "GroupNorm":
        return [
            f"'{label}': Flax GroupNorm's num_groups (32 by default) must be the module's "
            f"num_groups={getattr(module, 'num_groups', '?')}, and its epsilon (1e-6 by default) the module's "
            f"eps={getattr(module, 'eps', '?')}; Flax takes channels-last inputs"
        ]
    if lay.kind.startswith("ConvTranspose"):
        return [
            f"'{label}': Flax ConvTranspose's padding, strides and kernel_dilation (PyTorch's padding "
            "and output_padding for them: weightport.layouts.flax.torch_padding, which refuses what PyTorch "
            f"cannot pad); Flax takes channels-last inputs{_transpose_kernel(lay, label)}"
        ]
    if lay.kind.startswith("Conv") and lay.kind != "Conv1D":
        return [
            f"'{label}': Flax Conv's padding ('SAME' by default; the module has "
            f"padding={getattr(module, 'padding', '?')}), strides and dilation ('SAME' with a stride above 1 "
            "pads by TensorFlow's rule, its extra pixel after, which no fixed symmetric padding gives for "
            "every input size: build the conv with padding=0 and pad in forward, or use timm's Conv2dSame); "
            "Flax takes channels-last inputs, so permute them (and a Dense after a flatten sees channels-last "
            "order)"
        ]
    return []
