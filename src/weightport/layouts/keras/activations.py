"""Keras's activations by name, each with the PyTorch call that computes what Keras computes (its default
settings: ``leaky_relu``'s slope 0.2, ``softmax`` over axis -1), and, where the PyTorch module of the same
name built with its defaults computes otherwise, why. One table, read by the notes on a Dense/Conv
``activation`` (:func:`activation_note`) and on an ``Activation`` layer (:func:`layer_note`).

>>> activation_note("leaky_relu")
"apply it in forward as F.leaky_relu(y, 0.2) on the module's output y (Keras's slope 0.2; nn.LeakyReLU()'s \
default slope is 0.01)"
>>> layer_note("elu") is None  # nn.ELU() computes Keras's elu
True
"""

from __future__ import annotations

from typing import Any

__all__ = ["ACTIVATIONS", "activation_name", "torch_call", "activation_note", "layer_note"]

_SOFTMAX = "nn.{0}() without dim= takes dim 0 of a 1-D or 3-D tensor and dim 1 otherwise"
_NO_MODULE = "no PyTorch module computes it"

# Keras activation name -> (the PyTorch call computing Keras's output on a tensor {x}, {dim} standing for
# Keras's axis -1; why the module of the same name, built with PyTorch's defaults, differs, or "").
# Each checked against keras.activations on inputs from -60 to 60 (tests/test_keras_activation_notes.py).
ACTIVATIONS: dict[str, tuple[str, str]] = {
    "linear": ("{x}", ""),
    "relu": ("F.relu({x})", ""),
    "relu6": ("F.relu6({x})", ""),
    "leaky_relu": ("F.leaky_relu({x}, 0.2)", "Keras's slope 0.2; nn.LeakyReLU()'s default slope is 0.01"),
    "elu": ("F.elu({x})", ""),
    "selu": ("F.selu({x})", ""),
    "celu": ("F.celu({x})", ""),
    "gelu": ("F.gelu({x})", ""),  # Keras's approximate=False, as PyTorch's default (not approximate='tanh')
    "sigmoid": ("torch.sigmoid({x})", ""),
    "hard_sigmoid": ("F.hardsigmoid({x})", ""),  # Keras 3's relu6(x + 3) / 6; Keras 2's: _KERAS_2
    "hard_silu": ("F.hardswish({x})", ""),
    "hard_swish": ("F.hardswish({x})", ""),
    "silu": ("F.silu({x})", ""),
    "swish": ("F.silu({x})", ""),
    "mish": ("F.mish({x})", ""),
    "softplus": ("F.softplus({x})", ""),
    "softsign": ("F.softsign({x})", ""),
    "tanh": ("torch.tanh({x})", ""),
    "hard_tanh": ("F.hardtanh({x})", ""),
    "log_sigmoid": ("F.logsigmoid({x})", ""),
    "tanh_shrink": ("F.tanhshrink({x})", ""),
    "hard_shrink": ("F.hardshrink({x}, 0.5)", ""),
    "soft_shrink": ("F.softshrink({x}, 0.5)", ""),
    "glu": ("F.glu({x}, dim={dim})", ""),  # nn.GLU()'s default dim is -1, Keras's axis
    "softmax": ("F.softmax({x}, dim={dim})", _SOFTMAX.format("Softmax")),
    "log_softmax": ("F.log_softmax({x}, dim={dim})", _SOFTMAX.format("LogSoftmax")),
    "exponential": ("torch.exp({x})", _NO_MODULE),
    "sparse_plus": ("torch.where({x} >= 1, {x}, F.relu({x} + 1) ** 2 / 4)", _NO_MODULE),
    "sparse_sigmoid": ("torch.clamp(({x} + 1) / 2, 0, 1)", _NO_MODULE),
    "squareplus": ("({x} + torch.sqrt({x} * {x} + 4)) / 2", _NO_MODULE),
}

# what Keras 2 (tf.keras) computed otherwise under the same name
_KERAS_2 = {
    "hard_sigmoid": (
        "torch.clamp(0.2 * {x} + 0.5, 0, 1)",
        "tf.keras 2's slope 0.2; nn.Hardsigmoid() is Keras 3's",
    ),
}


def activation_name(value: Any) -> str:
    """An activation's name as a config records it (a name, or a serialized function); none is ``'linear'``."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name") or value.get("class_name")
    return "linear" if value is None else str(value).lower()


def _entry(name: str, keras_version: str | None) -> tuple[str, str] | None:
    if keras_version is not None and keras_version.startswith("2.") and name in _KERAS_2:
        return _KERAS_2[name]
    return ACTIVATIONS.get(name)


def torch_call(name: str, x: str = "y", dim: str = "-1", keras_version: str | None = None) -> str | None:
    """The PyTorch call computing Keras's activation ``name`` on ``x`` (``dim``: the dim Keras's axis -1 is
    in PyTorch's tensor), as the Keras that wrote the file computed it; ``None`` for a name not known."""
    entry = _entry(name, keras_version)
    return None if entry is None else entry[0].format(x=x, dim=dim)


def activation_note(name: str, dim: str = "-1", keras_version: str | None = None) -> str:
    """What ``forward`` must do for a Dense/Conv ``activation=name``, which Keras applies to the layer's output.

    ``dim``: where Keras's axis -1 sits in the module's output (``1`` for a conv's channels-first map).
    """
    entry = _entry(name, keras_version)
    if entry is None:
        return f"apply it in forward (weightport knows no PyTorch call for Keras's '{name}': compute what it does)"
    call, why = entry[0].format(x="y", dim=dim), entry[1]
    older = (
        f"; a file from tf.keras 2 means {_KERAS_2[name][0].format(x='y')}"
        if keras_version is None and name in _KERAS_2
        else ""
    )
    said = f" ({why}{older})" if why else (f" ({older[2:]})" if older else "")
    return f"apply it in forward as {call} on the module's output y{said}"


def layer_note(name: str, keras_version: str | None = None) -> str | None:
    """What to build or compute for a Keras ``Activation(name)`` layer, where the PyTorch module of the same
    name built with its defaults computes otherwise (or none does); ``None`` where it computes the same."""
    entry = _entry(name, keras_version)
    if entry is None:
        return f"compute what Keras's '{name}' does (weightport knows no PyTorch call for it)"
    call, why = entry
    if not why:
        return None
    dim = "(dim=-1 is Keras's axis -1; where the PyTorch tensor is a channels-first map, dim=1)"
    return f"compute {call.format(x='x', dim='-1')} ({why}){' ' + dim if '{dim}' in call else ''}"
