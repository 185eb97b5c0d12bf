"""What gets paired, as data: a PyTorch model's slots, a source's layers, and a pair.

A PyTorch model is seen as a list of *slots*: each module with parameters of its
own is one slot, except a multi-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU``, which is
one slot per layer (so stacked Keras LSTMs fill one ``nn.LSTM(num_layers=k)``).
A slot's *kind* is what its module is (``isinstance``, so subclasses of ``nn.Linear``
count as ``Linear``); a module of no known kind gets ``other:<Class>`` and never
takes a source layer. How layers and slots are paired is :mod:`weightport.layouts.pairing`'s job.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.LSTM(3, 4, num_layers=2), torch.nn.Linear(4, 2))
>>> [s.label for s in module_slots(model)]
['0[0]', '0[1]', '1']
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from torch import nn

from weightport.torch_facts import rnn_param

__all__ = [
    "Slot",
    "SourceLayer",
    "Paired",
    "module_slots",
    "slot_kind",
    "target_shapes",
    "torch_class",
    "KNOWN_KINDS",
    "LAYER_SCALE",
]

# What a module is, by isinstance, most specific first: a subclass counts as its base
# (nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear; timm's Conv2dSame a Conv2d).
_KIND_CLASSES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LSTM, "LSTM"),
    (nn.GRU, "GRU"),
    (nn.RNN, "RNN"),
    (nn.LSTMCell, "LSTM"),
    (nn.GRUCell, "GRU"),
    (nn.RNNCell, "RNN"),
    (nn.MultiheadAttention, "MultiheadAttention"),  # its out_proj is part of its slot (see module_slots)
    (nn.Linear, "Linear"),
    (nn.Conv1d, "Conv1d"),
    (nn.Conv2d, "Conv2d"),
    (nn.Conv3d, "Conv3d"),
    (nn.ConvTranspose1d, "ConvTranspose1d"),
    (nn.ConvTranspose2d, "ConvTranspose2d"),
    (nn.ConvTranspose3d, "ConvTranspose3d"),
    (nn.Embedding, "Embedding"),
    (nn.modules.batchnorm._BatchNorm, "BatchNorm"),
    (nn.LayerNorm, "LayerNorm"),
    (nn.GroupNorm, "GroupNorm"),
    (nn.RMSNorm, "RMSNorm"),
)
# transformers' Conv1D (GPT-2's attention and MLP): a Linear whose weight is stored (in, out). Known by its
# class name and home, so transformers is never imported to ask.
TRANSFORMERS_CONV1D = "Conv1D"
KNOWN_KINDS = frozenset({kind for _, kind in _KIND_CLASSES} | {TRANSFORMERS_CONV1D})
# a module holding one layer-scale vector (PyTorch has no module for it): the Keras layout's slots only
# (weightport.layouts.keras.scale); to every other layout such a module is of no known kind
LAYER_SCALE = "LayerScale"
# how a message names a kind's PyTorch module; any other kind: nn.<kind> (nn.LSTM, nn.Linear)
_TORCH_CLASS = {
    "BatchNorm": "nn.BatchNorm1d/2d/3d",
    TRANSFORMERS_CONV1D: "transformers' Conv1D",
    LAYER_SCALE: "layer-scale module (one vector parameter named 'gamma' or '...scale...', as torchvision's "
    "CNBlock.layer_scale or timm's LayerScale.gamma)",
}


def slot_kind(module: nn.Module) -> str:
    """The kind a source layer must have to fill ``module``: ``LSTM``, ``Linear``, ``Conv2d``, ...

    A module of no known kind gets ``other:<class>``, which no source layer has, so it is
    never filled by shape (transformers' ``Conv1D`` keeps its weight as ``(in, out)``: filling
    it as an ``nn.Linear`` would be silently wrong).

    >>> slot_kind(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))
    'Linear'
    >>> slot_kind(nn.ConvTranspose2d(2, 2, 3)), slot_kind(nn.PReLU())
    ('ConvTranspose2d', 'other:PReLU')
    """
    cls_ = type(module)
    if cls_.__name__ == "Conv1D" and cls_.__module__.startswith("transformers."):
        return TRANSFORMERS_CONV1D
    for cls, kind in _KIND_CLASSES:
        if isinstance(module, cls):
            return kind
    return f"other:{type(module).__name__}"


def torch_class(kind: str) -> str:
    """How a message names the PyTorch module of a kind: ``nn.GRU``, ``nn.Linear``."""
    return _TORCH_CLASS.get(kind, f"nn.{kind}")


@dataclass(frozen=True)
class Slot:
    """One place to put one source layer: a module, and for RNNs one of its layers."""

    path: str
    module: nn.Module
    kind: str
    layer: int | None = None

    @property
    def label(self) -> str:
        return self.path if self.layer is None else f"{self.path}[{self.layer}]"

    @property
    def said(self) -> str:
        """How a note names it: ``'encoder.rnn[1]'``, or ``the module (layer 1)`` for the root."""
        if self.path:
            return f"'{self.label}'"
        return "the module" if self.layer is None else f"the module (layer {self.layer})"

    @property
    def bidirectional(self) -> bool:
        return bool(getattr(self.module, "bidirectional", False))

    def name(self, param: str, *, reverse: bool = False) -> str:
        """The state-dict name of ``param`` (``weight_ih``, ``bias``...) in this slot.

        >>> Slot("rnn", nn.GRU(2, 3, num_layers=2), "GRU", 1).name("bias_hh", reverse=True)
        'rnn.bias_hh_l1_reverse'
        """
        local = rnn_param(param, self.layer, reverse=reverse)
        return f"{self.path}.{local}" if self.path else local

    def describe(self) -> str:
        m = self.module
        if isinstance(m, nn.RNNBase):
            extra = ", bidirectional" if m.bidirectional else ""
            return f"{self.label} ({type(m).__name__}(input_size={m.input_size}, hidden_size={m.hidden_size}){extra})"
        return f"{self.label} ({type(m).__name__})"

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of the module's ``weight``, where it has one."""
        shape = getattr(getattr(self.module, "weight", None), "shape", None)
        return None if shape is None else tuple(shape)

    def describe_with_shape(self) -> str:
        """:meth:`describe` with the weight's shape, which tells two modules of one class apart."""
        if isinstance(self.module, nn.RNNBase) or self.weight_shape is None:
            return self.describe()
        return f"{self.label or '(root)'} ({type(self.module).__name__} {self.weight_shape})"


@dataclass(frozen=True)
class SourceLayer:
    """One layer of the source: its name there, the slot kind it fills, and how to show it.

    ``order`` is ``(group, position)`` where the source records its layers' order:
    positions compare only within one group (a Keras 3 ``.weights.h5`` numbers
    layers per class; Flax numbers them per class and parent). ``None``: no
    recorded order (a file's key order is not one).
    """

    name: str
    kind: str
    detail: str = ""
    paths: tuple[str, ...] = ()  # module paths the source's own names suggest (besides ``name`` itself)
    order: tuple[Hashable, int | tuple[int, ...]] | None = None
    unordered: str = ""  # where ``order`` is None though the source numbers the layer: why
    # the module the source records the layer ran in, where that is no slot of the layer's kind (a parent
    # whose forward applies a child's weight itself: the dynamo exporter's name scopes)
    within: str = ""


@dataclass(frozen=True)
class Paired:
    """One source layer in one slot, and the proof that put it there (``how``: ``"by name"``, ...)."""

    source: SourceLayer
    slot: Slot
    how: str
    # "forward" or "reverse": one direction of a bidirectional slot (mapping= "rnn[0]:reverse")
    side: str = ""


def module_slots(model: nn.Module) -> list[Slot]:
    """Every slot of ``model`` in registration order (the order ``named_modules`` gives).

    An ``nn.MultiheadAttention`` is one slot with its ``out_proj`` (a framework's attention layer
    holds all four projections): rules name ``out_proj.weight`` through :meth:`Slot.name`.
    """
    slots: list[Slot] = []
    inside: tuple[str, ...] = ()  # paths of attention modules whose children are part of their slot
    for path, module in model.named_modules():
        if inside and any(path.startswith(p + ".") for p in inside):
            continue
        holds_stats = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        if not holds_stats and not any(True for _ in module.parameters(recurse=False)):
            continue  # nothing to fill (a BatchNorm with affine=False still holds its running statistics)
        kind = slot_kind(module)
        if isinstance(module, nn.MultiheadAttention):
            inside += (path,)
        if isinstance(module, nn.RNNBase):
            slots += [Slot(path, module, kind, layer) for layer in range(module.num_layers)]
        else:
            slots.append(Slot(path, module, kind))
    return slots


def target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``model``'s state dict (meta tensors included), by name."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
