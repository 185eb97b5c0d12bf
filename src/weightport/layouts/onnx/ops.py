"""What each weight-holding ONNX op is in PyTorch: the module kind it fills and its inputs' roles.

The recurrent ops keep their gates in ONNX's own order (LSTM i,o,f,c; GRU z,r,h); PyTorch's order comes
from :mod:`weightport.torch_facts`, and :data:`GATE_ORDER` reorders one into the other.

>>> GATE_ORDER
{'RNN': (0,), 'LSTM': (0, 2, 3, 1), 'GRU': (1, 0, 2)}
>>> CONV_KINDS[4], CONV_TRANSPOSE_KINDS[3], NORMS["LayerNormalization"]
('Conv2d', 'ConvTranspose1d', (('weight', 'Scale'), ('bias', 'B')))
"""

from __future__ import annotations

from weightport.torch_facts import RNN_GATES, RNN_KINDS

__all__ = [
    "ONNX_GATES",
    "GATE_ORDER",
    "ACTIVATIONS",
    "CONV_KINDS",
    "CONV_TRANSPOSE_KINDS",
    "NORM_OPS",
    "KIND_OF_NORM_OP",
    "NORMS",
]

# Gate letters in ONNX's order of the stacked blocks (its ``c`` is PyTorch's ``g``, its ``h`` PyTorch's ``n``)
ONNX_GATES: dict[str, tuple[str, ...]] = {"RNN": ("",), "LSTM": ("i", "o", "f", "c"), "GRU": ("z", "r", "h")}
_TORCH_LETTER = {"c": "g", "h": "n"}
# kind -> the ONNX block each of PyTorch's gates is, in PyTorch's order: ReorderBlocks(0, GATE_ORDER[kind])
# turns ONNX's stacking into PyTorch's.
GATE_ORDER: dict[str, tuple[int, ...]] = {
    kind: tuple([_TORCH_LETTER.get(g, g) for g in ONNX_GATES[kind]].index(gate) for gate in RNN_GATES[kind])
    for kind in RNN_KINDS
}
# kind -> PyTorch's activations per direction, as ONNX names them
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
    "GRU": ("Sigmoid", "Tanh"),
    "RNN": ("Tanh",),
}
CONV_KINDS = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}  # a Conv weight's rank -> the module kind it fills
# a ConvTranspose weight's rank -> the module kind it fills: ONNX and PyTorch both keep (C_in, C_out/group, *k)
CONV_TRANSPOSE_KINDS = {3: "ConvTranspose1d", 4: "ConvTranspose2d", 5: "ConvTranspose3d"}
# Normalization nodes by module kind: the ONNX op, and for each stored input (by position, from 1) the
# module tensor it fills and its ONNX name.
NORM_OPS = {"BatchNorm": "BatchNormalization", "LayerNorm": "LayerNormalization"}
KIND_OF_NORM_OP = {op: kind for kind, op in NORM_OPS.items()}
NORMS = {
    "BatchNormalization": (
        ("weight", "scale"),
        ("bias", "B"),
        ("running_mean", "input_mean"),
        ("running_var", "input_var"),
    ),
    "LayerNormalization": (("weight", "Scale"), ("bias", "B")),
}
