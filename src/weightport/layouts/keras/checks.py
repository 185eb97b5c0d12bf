"""Keras settings held against the PyTorch module: refusals, mismatches, and what stays unchecked.

Settings no PyTorch module expresses are refused; settings the module must be built with are compared
with it (a :class:`~weightport.errors.Problem` each); settings that act outside the module become
notes on what ``forward`` must do; without a configuration, what the variables show is checked and
the rest listed as unchecked.

>>> _act({"class_name": "function", "config": {"name": "ReLU"}}), _act(None)
('relu', 'linear')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

from weightport.errors import LayoutError, LoadError, Problem, a_or_an, counted
from weightport.layouts.keras.activations import activation_name as _act
from weightport.layouts.keras.activations import activation_note
from weightport.layouts.keras.attention import attention_notes, attention_problems
from weightport.layouts.keras.einsum import why_not_a_dense
from weightport.layouts.keras.layers import DEPTHWISE, Layer, Part, Resolved, inner_layers
from weightport.layouts.keras.padding import padding_of, padding_verdict, transpose_verdict
from weightport.layouts.keras.unshown import unshown_settings
from weightport.layouts.pairing import Slot
from weightport.sources.base import Source
from weightport.torch_facts import RNN_KINDS

__all__ = [
    "notes",
    "check_config",
    "check_weights_only",
    "check_direction",
    "refuse_whole_model_layer",
    "refuse_einsum",
]


def _refusals(found: Resolved, part: Part, cfg: Mapping[str, Any]) -> list[str]:
    """Settings no PyTorch module of this kind can express, each with why and what to do."""
    kind, label = found.kind, f"Keras {part.cls} '{found.layer.name}'"
    out = []
    mode = _quantized(cfg)
    if mode:
        out.append(
            f"{label} is quantized (Keras quantize('{mode}')): its kernel is stored as {mode} values with "
            "scales beside them, which a copy into a float weight cannot undo. Fix: load the model as saved "
            "before quantize(), or dequantize the kernel (kernel / kernel_scale, as Keras does) and load the arrays "
            "as a dict under the module's names."
        )
    act = _act(cfg.get("activation", "tanh"))
    if kind == "GRU" and not cfg.get("reset_after", True):
        out.append(
            f"{label} has reset_after=False: Keras computes h~ = tanh(x W_h + (r * h) U_h + b_h) but "
            "nn.GRU computes n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); they differ unless U_h is zero. "
            "Fix: rebuild the Keras layer with reset_after=True (the default) and retrain, or write a custom cell."
        )
    if kind in ("LSTM", "GRU") and _act(cfg.get("recurrent_activation", "sigmoid")) != "sigmoid":
        ra = _act(cfg.get("recurrent_activation"))
        out.append(
            f"{label} has recurrent_activation='{ra}': nn.{kind} gates use the logistic sigmoid only, and "
            f"'{ra}' gives different gate values (hard_sigmoid is off by up to about 0.1). Fix: rebuild the Keras "
            "layer with recurrent_activation='sigmoid' and retrain, or write a custom cell."
        )
    if kind in ("LSTM", "GRU") and act != "tanh":
        out.append(
            f"{label} has activation='{act}': nn.{kind} uses tanh only. Fix: rebuild the Keras layer with "
            "activation='tanh' and retrain, or write a custom cell."
        )
    if kind == "RNN" and act not in ("tanh", "relu"):
        out.append(
            f"{label} has activation='{act}': nn.RNN offers nonlinearity='tanh' or 'relu' only. Fix: rebuild "
            "the Keras layer with one of those and retrain, or write a custom cell."
        )
    if kind in RNN_KINDS and len(found.parts) == 2 and not part.reverse and cfg.get("go_backwards"):
        out.append(
            f"Keras Bidirectional '{found.layer.name}' wraps {a_or_an(part.cls)} with go_backwards=True, so its "
            "'forward' layer reads the input backwards and keeps its outputs in reversed time order while "
            "the 'backward' one reads it forwards; a bidirectional PyTorch module runs its first direction "
            "forwards and realigns the reverse one, so the halves of the output are swapped (and, with "
            "return_sequences, flipped in time). Fix: rebuild the Keras layer with go_backwards=False (the "
            "default) and retrain."
        )
    if kind == "LayerNorm" and cfg.get("rms_scaling"):
        out.append(
            f"{label} has rms_scaling=True: Keras computes x * gamma / sqrt(var(x) + epsilon), removing no mean "
            "(and has no beta); nn.LayerNorm and nn.RMSNorm compute otherwise. Fix: write that normalization "
            "as a module of your own and load gamma into it with the torch layout."
        )
    return out


def notes(
    found: Resolved, part: Part, slot: Slot, keras_version: str | None = None
) -> list[tuple[str, bool]]:
    """Notes for the pairing's "how", each with whether the caller's ``forward`` must act on it for
    Keras's outputs (a :class:`~weightport.errors.ForwardNoteWarning`): padding the module does itself
    is said for the record only. ``keras_version``: the Keras that wrote the file, where recorded (an
    activation's meaning changed with it: :mod:`.activations`).

    These settings act on the input, the state or the output, not on what the module computes, so
    they load: weights are the same, and the note says what to do outside the module.
    """
    cfg, m, kind = part.config or {}, cast(Any, slot.module), found.kind
    notes: list[tuple[str, bool]] = []
    if kind in RNN_KINDS and not part.reverse:
        if cfg.get("go_backwards") and len(found.parts) == 1:
            notes.append(("Keras runs it backwards (go_backwards=True): flip the input in time", True))
        if cfg.get("stateful"):
            state = "h_n, c_n" if kind == "LSTM" else "h_n"
            notes.append(
                (
                    f"Keras carries the state between calls (stateful=True): pass the returned {state} as the "
                    "next call's initial state",
                    True,
                )
            )
        if found.layer.masked_by:
            notes.append(
                (
                    f"Keras skips the masked steps ({found.layer.masked_by} before it): pass the lengths with "
                    "nn.utils.rnn.pack_padded_sequence",
                    True,
                )
            )
    if kind in RNN_KINDS and len(found.parts) == 2 and not part.reverse:
        merged = _merge_note(found.layer.config or {}, m)
        if merged:
            notes.append((merged, True))
    if kind == "LayerNorm":
        moved = _moved_norm_axes(cfg, m, found.layer.input_rank)
        if moved:
            notes.append((moved, True))
    if kind in ("BatchNorm", "GroupNorm"):
        moved = _channel_axis(cfg, found.layer.input_rank, f"nn.{type(m).__name__}")
        if moved:
            notes.append((moved, True))
    act = _act(cfg.get("activation"))
    if kind in _WITH_ACTIVATION and act != "linear":
        dim = "-1" if kind == "Linear" else "1"  # Keras's axis -1 is a conv's channels, dim 1 of its output
        notes.append(
            (f"Keras applies activation='{act}' after it: {activation_note(act, dim, keras_version)}", True)
        )
    if kind in ("Conv1d", "Conv2d"):
        note, _ = padding_verdict(cfg, m, found.layer)
        if note:  # a module that pads by itself leaves forward nothing to do
            notes.append((note, padding_of(m) == ((0, 0),) * len(m.kernel_size)))
    if kind in ("ConvTranspose1d", "ConvTranspose2d"):
        note, _ = transpose_verdict(cfg, m)
        if note:
            notes.append((note, True))
    if kind == "MultiheadAttention":
        notes += [(note, True) for note in attention_notes(part, slot, found.layer.input_rank)]
    if kind == "Embedding" and cfg.get("mask_zero"):
        notes.append(
            (
                "Keras masks id 0 (mask_zero=True), so later recurrent layers skip those steps: pass the lengths "
                "with nn.utils.rnn.pack_padded_sequence",
                True,
            )
        )
    return notes


# a Bidirectional's merge_mode -> how its two halves of PyTorch's output (f, b: out[..., :H], out[..., H:])
# give Keras's output (Keras's own Bidirectional.call)
_MERGES = {"sum": "{f} + {b}", "ave": "({f} + {b}) / 2", "mul": "{f} * {b}", None: "({f}, {b}), two outputs"}


def merge_mode(cfg: Mapping[str, Any]) -> str | None:
    """A Bidirectional's recorded ``merge_mode`` (Keras's default: ``'concat'``, as PyTorch's output)."""
    return cast("str | None", cfg.get("merge_mode", "concat"))


def _merge_note(cfg: Mapping[str, Any], m: Any) -> str:
    """What ``forward`` must do with a bidirectional module's output, whose two directions PyTorch
    concatenates, where the Keras Bidirectional merges them otherwise; else ``""``."""
    mode = merge_mode(cfg)
    if mode == "concat":
        return ""
    size = getattr(m, "proj_size", 0) or m.hidden_size
    merged = _MERGES.get(mode, f"merge_mode={mode!r}").format(f=f"out[..., :{size}]", b=f"out[..., {size}:]")
    return (
        f"Keras merges the two directions' outputs with merge_mode={mode!r} where PyTorch concatenates them: "
        f"from the module's output out, take {merged}"
    )


def _quantized(cfg: Mapping[str, Any]) -> str:
    """The mode of a layer Keras quantized (``int8``, ``int4``, ``float8``: its dtype policy says so), else ``""``."""
    policy = cfg.get("dtype")
    if isinstance(policy, Mapping) and "Quantized" in str(policy.get("class_name", "")):
        inner = policy.get("config")
        return str(inner.get("mode", "quantized")) if isinstance(inner, Mapping) else "quantized"
    return ""


def _moved_norm_axes(cfg: Mapping[str, Any], m: Any, input_rank: int | None) -> str:
    """What ``forward`` must do where a Keras LayerNormalization normalizes other axes than the last
    ``len(normalized_shape)`` (nn.LayerNorm's), else ``""``. A positive axis counts from the batch axis;
    where the input's rank is not known (tf.keras records axes made positive once built), whether it is
    the last is not either: the note says so, naming the axis."""
    axis = cfg.get("axis", -1)
    axis = list(axis) if isinstance(axis, list) else axis  # a live tf.keras layer's ListWrapper
    axes = sorted(axis if isinstance(axis, list) else [axis])
    rank = len(m.normalized_shape)
    them = "that axis" if len(axes) == 1 else "those axes"
    if input_rank is not None:
        axes = sorted(a - input_rank if a >= 0 else a for a in axes)
    elif any(a >= 0 for a in axes):
        return (
            f"Keras normalizes over axis {axis} of its input (counted from the batch axis), and the source records "
            f"no input rank to tell whether {them} {'is' if len(axes) == 1 else 'are'} the last: if not, move "
            f"{them} last before the module (and back after it)"
        )
    if axes == list(range(-rank, 0)):
        return ""
    return f"Keras normalizes over axis {axis} of its input: move {them} last before the module (and back after it)"


def _channel_axis(cfg: Mapping[str, Any], input_rank: int | None, module: str) -> str:
    """What ``forward`` must do where a Keras BatchNormalization or GroupNormalization takes another axis
    than its input's last as its channels (a channels_last model's, which its PyTorch twin has as dim 1),
    else ``""``. A positive axis where the input's rank is not known (tf.keras) may be the last or not: the
    note names it."""
    axis = cfg.get("axis", -1)
    axes = axis if isinstance(axis, list) else [axis]
    if len(axes) != 1 or not isinstance(axes[0], int):
        return f"Keras normalizes over axes {axis} of its input, {module} over dim 1: move them there"
    if axes[0] == -1 or (input_rank is not None and axes[0] == input_rank - 1):
        return ""
    if input_rank is None and axes[0] >= 0:
        return (
            f"Keras takes axis {axes[0]} of its input (counted from the batch axis) as the channels, and the source "
            f"records no input rank to tell whether that is its last: if not, {module} takes dim 1, so give the "
            "module the tensor whose dim 1 is that axis (a channels_first model's own layout)"
        )
    said = f"{input_rank}-D " if input_rank is not None else ""
    return (
        f"Keras takes axis {axes[0]} of its {said}input as the channels, not its last: {module} takes "
        "dim 1, so give the module the tensor whose dim 1 is that axis (a channels_first model's own layout)"
    )


def _check_stacked(
    found: Resolved, part: Part, slot: Slot, mismatch: Callable[[str, str, str], None]
) -> None:
    """A Keras recurrent layer filling one layer of a multi-layer RNN must run as that layer does: reading
    every step the layer below returns, in the order it returns them, and returning every step, both
    directions concatenated, to the layer above (where the configuration records it)."""
    cfg, m, layer = part.config or {}, cast(Any, slot.module), cast(int, slot.layer)
    mode = merge_mode(found.layer.config or {})
    if layer < m.num_layers - 1 and len(found.parts) == 2 and not part.reverse and mode != "concat":
        mismatch(
            f"a layer whose two directions' outputs the next one reads concatenated (layer {layer} of "
            f"nn.{type(m).__name__}, read by layer {layer + 1})",
            f"Keras merge_mode={mode!r}: it merges them otherwise",
            f"build this layer as an nn.{type(m).__name__} of its own (num_layers=1) and merge its output's "
            "halves in forward as Keras does",
        )
    name = f"nn.{type(m).__name__}"
    if layer > 0 and cfg.get("go_backwards") and not part.reverse:
        mismatch(
            f"a layer that reads its input in time order (layer {layer} of {name}, fed by layer {layer - 1})",
            "Keras go_backwards=True: it reads its input backwards, and no flip of the module's input reaches "
            "an inner layer",
            f"build this layer as an {name} of its own (num_layers=1) and flip its input in time in forward",
        )
    if layer < m.num_layers - 1 and cfg.get("return_sequences") is False:
        mismatch(
            f"a layer returning every step (layer {layer} of {name}, read by layer {layer + 1})",
            "Keras return_sequences=False: it returns its last step only",
            f"build this layer as an {name} of its own (num_layers=1) and give the next one what Keras does",
        )


_CONVS = ("Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d")
_WITH_ACTIVATION = ("Linear", *_CONVS)
_NORMS = ("BatchNorm", "LayerNorm", "GroupNorm")


def check_config(found: Resolved, part: Part, slot: Slot, refusals: list[str]) -> list[Problem]:
    """Problems between the layer's Keras configuration and the module; refusals go to ``refusals``."""
    cfg = part.config or {}
    refusals += _refusals(found, part, cfg)
    m: Any = slot.module
    kind, label = found.kind, f"{slot.label} <- Keras {part.cls} '{found.layer.name}'"
    problems = []

    def mismatch(expected: str, found_: str, fix: str) -> None:
        problems.append(Problem(label, expected, found_, fix))

    if kind in RNN_KINDS and slot.layer is not None:
        _check_stacked(found, part, slot, mismatch)
    if kind in RNN_KINDS:
        if "units" in cfg and int(cfg["units"]) != m.hidden_size:
            mismatch(
                f"hidden_size={cfg['units']} (Keras units)",
                f"hidden_size={m.hidden_size}",
                f"build the module with hidden_size={cfg['units']}",
            )
        if kind == "RNN" and _act(cfg.get("activation", "tanh")) in ("tanh", "relu"):
            act = _act(cfg.get("activation", "tanh"))
            if m.nonlinearity != act:
                mismatch(
                    f"nonlinearity='{act}' (Keras activation)",
                    f"nonlinearity='{m.nonlinearity}'",
                    f"build nn.RNN(..., nonlinearity='{act}')",
                )
    _check_bias(found, part, slot, problems, label)
    if kind in _NORMS and "epsilon" in cfg:
        eps = float(cfg["epsilon"])
        if not math.isclose(eps, m.eps, rel_tol=1e-6):
            mismatch(
                f"eps={eps:g} (Keras epsilon)",
                f"eps={m.eps:g}",
                f"build the PyTorch module with eps={eps:g}: Keras's default is 1e-3, PyTorch's 1e-5",
            )
    if kind == "GroupNorm" and "groups" in cfg and int(cfg["groups"]) != m.num_groups:
        mismatch(
            f"num_groups={cfg['groups']} (Keras groups)",
            f"num_groups={m.num_groups}",
            f"build nn.GroupNorm({cfg['groups']}, {m.num_channels}, ...)",
        )
    if kind in _CONVS:
        # tf.keras records groups=1 for a DepthwiseConv2D (a Conv subclass): its groups are checked by shape
        conv_cfg = {k: v for k, v in cfg.items() if k != "groups"} if part.cls in DEPTHWISE else cfg
        _check_conv(conv_cfg, m, found.layer, mismatch)
    return problems


def _check_bias(found: Resolved, part: Part, slot: Slot, problems: list[Problem], label: str) -> None:
    m: Any = slot.module
    kind = found.kind
    checks: list[tuple[str, str, bool]] = []
    if kind in RNN_KINDS:
        checks.append(("use_bias", "bias", bool(m.bias)))
    elif kind in _WITH_ACTIVATION:
        checks.append(("use_bias", "bias", m.bias is not None))
    elif kind in ("BatchNorm", "GroupNorm"):
        checks.append(("scale/center", "affine", bool(m.affine)))
    elif kind == "LayerNorm":
        checks.append(("scale/center", "elementwise_affine", m.weight is not None))
        if "beta" in part.vars and m.bias is None:
            checks.append(("center", "bias", False))
    # a PyTorch norm's weight and bias come together (or a LayerNorm's weight alone): the one Keras
    # leaves out is made (scale=False: weight 1; center=False: bias 0)
    var = {"use_bias": ("bias",), "scale/center": ("gamma", "beta"), "center": ("beta",)}
    for setting, arg, has in checks:
        keras_has = any(v in part.vars for v in var[setting])
        if keras_has != has:
            problems.append(
                Problem(
                    label,
                    f"{arg}={keras_has} (Keras {setting}={keras_has})",
                    f"{arg}={has}",
                    f"build the module with {arg}={keras_has}",
                )
            )
    if part.cls in DEPTHWISE:
        _check_depthwise(part, slot, problems, label)
    if kind == "MultiheadAttention":
        problems += attention_problems(part, slot, label, found.layer.input_rank)


def _check_depthwise(part: Part, slot: Slot, problems: list[Problem], label: str) -> None:
    """A depthwise kernel ``(*k, in, multiplier)`` fills only a conv with ``groups == in_channels == in``:
    its weight's shape ``(in * multiplier, 1, *k)`` fits any conv whose groups equal its input channels,
    but with other groups each output channel would read another input channel."""
    m: Any = slot.module
    shape = part.shapes.get("kernel", ())
    if len(shape) != len(m.kernel_size) + 2:
        return
    channels, multiplier = shape[-2], shape[-1]
    if m.groups != channels or m.in_channels != channels:
        problems.append(
            Problem(
                label,
                f"groups={channels} and in_channels={channels} (Keras {part.cls}: each of the {channels} "
                f"input channels its own depth_multiplier={multiplier} outputs, channel i * {multiplier} + m)",
                f"in_channels={m.in_channels}, groups={m.groups}",
                f"build nn.{type(m).__name__}({channels}, {channels * multiplier}, kernel_size, groups={channels})",
            )
        )


def _check_conv(cfg: Mapping[str, Any], m: Any, layer: Layer, mismatch: Any) -> None:
    pairs = [
        ("strides", "stride", cfg.get("strides")),
        ("dilation_rate", "dilation", cfg.get("dilation_rate")),
    ]
    differ = False
    for keras, torch_name, value in pairs:
        if value is None:
            continue
        wanted = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(m.stride)
        if tuple(getattr(m, torch_name)) != wanted:
            differ = True
            mismatch(
                f"{torch_name}={wanted} (Keras {keras})",
                f"{torch_name}={getattr(m, torch_name)}",
                f"build the module with {torch_name}={wanted}",
            )
    if "groups" in cfg and int(cfg["groups"]) != m.groups:
        mismatch(
            f"groups={cfg['groups']}", f"groups={m.groups}", f"build the module with groups={cfg['groups']}"
        )
    if differ:
        return  # the padding Keras needs follows from its stride and dilation: said once those agree
    _, problem = (
        transpose_verdict(cfg, m)
        if type(m).__name__.startswith("ConvTranspose")
        else padding_verdict(cfg, m, layer)
    )
    if problem is not None:
        mismatch(*problem)


def check_weights_only(
    found: Resolved,
    part: Part,
    slot: Slot,
    source: Source,
    problems: list[Problem],
    refusals: list[str],
    unchecked: list[str],
) -> None:
    """What the variables alone show, and which settings stay unchecked."""
    label = f"Keras {found.detail} '{found.layer.name}' -> '{slot.label}'"
    _check_bias(found, part, slot, problems, f"{slot.label} <- Keras {part.cls} '{found.layer.name}'")
    settings: list[str] = []
    if found.kind == "GRU":
        if "bias" in part.vars and len(source.infos[part.vars["bias"]].shape) == 1:
            refusals += _refusals(found, part, {"reset_after": False})
        elif "bias" not in part.vars:
            settings.append("reset_after (assumed True)")
    settings += unshown_settings(found, part, slot)
    if settings and not part.reverse:
        unchecked.append(f"{label}: {', '.join(settings)}")


def check_direction(found: Resolved, slot: Slot, where: str) -> None:
    two_way = len(found.parts) == 2
    if two_way == slot.bidirectional:
        return
    m = slot.module
    if two_way:
        raise LayoutError(
            f"{where}: Keras layer '{found.layer.name}' is {found.detail} but '{slot.label}' is a one-way "
            f"{type(m).__name__}. Fix: build it with bidirectional=True, or pass mapping= to pair it with one."
        )
    raise LayoutError(
        f"{where}: Keras layer '{found.layer.name}' ({found.detail}) runs one way but '{slot.label}' is a "
        f"bidirectional {type(m).__name__}. Fix: build it with bidirectional=False, or pass mapping=."
    )


def refuse_whole_model_layer(layers: list[Layer], where: str) -> None:
    """Nothing pairs, and the weights sit under one layer that holds a whole model of layers, named
    otherwise than transformers' TF checkpoints (``tf_model.h5``, whose names :mod:`.hf` pairs): say
    that, once, instead of one problem per tensor; likewise where an EinsumDense's recorded equation is the
    reason (:func:`refuse_einsum`)."""
    refuse_einsum(layers)
    nested = [layer for layer in layers if len(inner_layers(layer)) > 2]
    if len(nested) != 1 or sum(len(layer.tensors) for layer in layers) > 2 * len(nested[0].tensors):
        return
    layer = nested[0]
    inner = inner_layers(layer)
    raise LayoutError(
        f"{where}: the weights sit under the one top-level Keras layer '{layer.name}' "
        f"({layer.class_name or 'class not recorded'}: {counted(len(layer.tensors), 'tensor')} in {counted(len(inner), 'inner layer')}, "
        f"such as '{inner[0]}'), a layer that holds a whole model. weightport pairs Keras layers that are one "
        "PyTorch module each (Dense, Conv, LSTM, ...), and the layers inside such a layer only where their "
        f"names follow transformers' TF checkpoints ('<model>/{layer.name}/<inner layer>/.../kernel:0', each "
        "named as its PyTorch twin names it); these do not. Fix: save the Keras model with those inner layers "
        "at its top level (model.save('model.keras')), or convert it with the library that wrote it and save "
        "that PyTorch model's state_dict."
    )


def refuse_einsum(layers: list[Layer]) -> None:
    """Nothing pairs, and an EinsumDense's recorded equation is one no ``nn.Linear`` computes: refuse with
    what it computes instead, and the module that computes it."""
    problems = []
    for layer in layers:
        why = why_not_a_dense(layer.config) if layer.class_name == "EinsumDense" and layer.config else ""
        if not why:
            continue
        equation, bias = str(layer.config.get("equation")), layer.config.get("bias_axes")  # type: ignore[union-attr]
        names = layer.tensors
        read = ", ".join(f"'{role}': source.read('{name}')" for role, name in zip(("kernel", "bias"), names))
        act = _act(layer.config.get("activation"))  # type: ignore[union-attr]
        problems.append(
            Problem(
                f"Keras EinsumDense '{layer.name}'",
                "an equation an nn.Linear computes (the input's last axis contracted with one kernel axis, the "
                "other put last, the bias along it alone, as in 'abc,cd->abd'): an EinsumDense loads into an "
                "nn.Linear only where its configuration says how its weights read as a Dense's",
                f"equation='{equation}', bias_axes={bias!r}: {why}",
                "compute it in a module of your own that holds the kernel"
                + (" and the bias" if bias else "")
                + " as Keras stores them (nn.Parameter named kernel"
                + (", bias" if bias else "")
                + f") and returns torch.einsum('{equation}', x, self.kernel)"
                + (" + self.bias" if bias else "")
                + ("" if act == "linear" else f", then activation='{act}'")
                + f", and load it with weightport.load(module, {{{read}}}), "
                "source = weightport.open_source(the same file or model)",
            )
        )
    if problems:
        raise LoadError(problems)
