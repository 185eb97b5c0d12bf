"""PyTorch-side facts: the RNN family's names and gates, and shapes explained in a module's terms.

Every layout, the RNN tools and the reference forward read these tables from here: one home.

>>> rnn_param("bias_hh", 1, reverse=True)
'bias_hh_l1_reverse'
>>> RNN_GATES["GRU"], RNN_GATE_COUNT["LSTM"]
(('r', 'z', 'n'), 4)

>>> import torch
>>> explain_shape(torch.nn.LSTM(3, 4), "weight_ih_l0")
'(16, 3) = (4*hidden_size, input_size) of LSTM(input_size=3, hidden_size=4)'
>>> explain_shape(torch.nn.Linear(3, 2), "weight")
'(2, 3) = (out_features, in_features) of Linear(in_features=3, out_features=2)'
"""

from __future__ import annotations

import re

from torch import nn

__all__ = [
    "RNN_KINDS",
    "RNN_GATES",
    "RNN_GATE_COUNT",
    "RNN_ROLES",
    "rnn_param",
    "rnn_kind",
    "explain_shape",
    "describe_module",
]

RNN_KINDS = ("RNN", "LSTM", "GRU")  # the recurrent kinds PyTorch has: nn.RNN/LSTM/GRU and their cells
# Gate letters in PyTorch's order of the stacked blocks (a plain RNN has one block, no letter)
RNN_GATES: dict[str, tuple[str, ...]] = {"RNN": ("",), "LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}
RNN_GATE_COUNT = {kind: len(gates) for kind, gates in RNN_GATES.items()}
RNN_ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
_RNN_PARAM = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(\d+))?(_reverse)?$")


def rnn_param(role: str, layer: int | None = None, *, reverse: bool = False) -> str:
    """The state-dict name of ``role`` in ``layer`` (None: a cell's) and direction."""
    return role if layer is None else f"{role}_l{layer}{'_reverse' if reverse else ''}"


def rnn_kind(module: nn.Module) -> str | None:
    """``"RNN"``, ``"LSTM"`` or ``"GRU"`` for PyTorch's recurrent modules and cells, else None."""
    if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return None
    for kind in ("LSTM", "GRU", "RNN"):
        if type(module).__name__.startswith(kind):
            return kind
    return "RNN"


def describe_module(module: nn.Module) -> str:
    """``LSTM(input_size=3, hidden_size=4, proj_size=2)``: the settings that decide shapes."""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        parts = [f"input_size={module.input_size}", f"hidden_size={module.hidden_size}"]
        if getattr(module, "proj_size", 0):
            parts.append(f"proj_size={module.proj_size}")
        if getattr(module, "bidirectional", False):
            parts.append("bidirectional=True")
        return f"{type(module).__name__}({', '.join(parts)})"
    if isinstance(module, nn.Linear):
        return f"Linear(in_features={module.in_features}, out_features={module.out_features})"
    if isinstance(module, nn.Embedding):
        return f"Embedding({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return (
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={module.kernel_size}, groups={module.groups})"
        )
    return type(module).__name__


def explain_shape(module: nn.Module, local_name: str) -> str | None:
    """Why ``module``'s tensor ``local_name`` has its shape, or None when not known."""
    tensor = dict(module.named_parameters(recurse=False)).get(local_name)
    if tensor is None:
        return None
    shape = tuple(tensor.shape)
    formula = _formula(module, local_name)
    if formula is None:
        return None
    return f"{shape} = {formula} of {describe_module(module)}"


def _formula(module: nn.Module, local_name: str) -> str | None:
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        match = _RNN_PARAM.match(local_name)
        if not match:
            return None
        role, layer = match[1], int(match[2] or 0)
        gates = RNN_GATE_COUNT[rnn_kind(module) or "RNN"]
        rows = f"{gates}*hidden_size" if gates > 1 else "hidden_size"
        proj = getattr(module, "proj_size", 0)
        hidden_in = "proj_size" if proj else "hidden_size"
        if role == "weight_ih":
            if layer == 0:
                return f"({rows}, input_size)"
            factor = "2*" if getattr(module, "bidirectional", False) else ""
            return f"({rows}, {factor}{hidden_in})"
        if role == "weight_hh":
            return f"({rows}, {hidden_in})"
        if role == "weight_hr":
            return "(proj_size, hidden_size)"
        return f"({rows},)"
    if isinstance(module, nn.Linear):
        return "(out_features, in_features)" if local_name == "weight" else "(out_features,)"
    if isinstance(module, nn.modules.conv._ConvNd):
        if local_name == "bias":
            return "(out_channels,)"
        if module.transposed:
            return "(in_channels, out_channels/groups, *kernel_size)"
        return "(out_channels, in_channels/groups, *kernel_size)"
    if isinstance(module, nn.Embedding):
        return "(num_embeddings, embedding_dim)"
    return None
