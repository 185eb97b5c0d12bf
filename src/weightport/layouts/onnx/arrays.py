"""Arrays without a graph: :func:`export` and its ``"<slot>/<ONNX input>"`` key scheme, read back as nodes.

>>> import torch
>>> sorted(export(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Conv1d(2, 2, 1))))
['0/B', '0/C', '1/B', '1/W']
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from weightport.errors import LayoutError
from weightport.layouts.onnx.graph import Node
from weightport.layouts.onnx.ops import CONV_KINDS, GATE_ORDER, NORM_OPS, NORMS
from weightport.layouts.pairing import module_slots
from weightport.sources.base import Source
from weightport.torch_facts import RNN_KINDS
from weightport.transforms import ReorderBlocks

__all__ = ["export", "nodes_from_keys"]


def nodes_from_keys(module: nn.Module, source: Source) -> tuple[list[Node], dict[str, str]]:
    """Nodes for a mapping in export()'s key scheme, and a mapping that pins each to its slot."""
    slots = {slot.label: slot for slot in module_slots(module)}
    groups: dict[str, dict[str, str]] = {}
    for name in source.infos:
        label, _, role = name.rpartition("/")
        groups.setdefault(label, {})[role] = name
    unknown = [label for label in groups if label not in slots]
    if unknown and all("/" not in name for name in source.infos):  # not this key scheme at all
        names = list(source.infos)
        dotted = any("." in name for name in names)
        raise LayoutError(
            f"{source.description} has no ONNX graph, so its keys must be '<layer>/<ONNX input>' as "
            f"weightport.layouts.onnx.export writes them, but none has a '/' ({', '.join(repr(n) for n in names[:2])}"
            f"{' ...' if len(names) > 2 else ''}){': they look like PyTorch state-dict names' if dotted else ''}. "
            "Fix: drop layout='onnx' (pass layout='torch' for PyTorch's names), or load the .onnx file itself."
        )
    if unknown:
        raise LayoutError(
            f"{source.description} has no ONNX graph, so its keys must be '<layer>/<ONNX input>' as "
            f"weightport.layouts.onnx.export writes them; {', '.join(repr(u) for u in unknown)} name no layer of "
            f"{type(module).__name__}. Its layers: {', '.join(repr(s) for s in slots) or 'none'}."
        )
    nodes: list[Node] = []
    for label, roles in groups.items():
        kind = slots[label].kind
        inputs: tuple[str, ...]
        if kind in RNN_KINDS:
            op, inputs = kind, ("", roles.get("W", ""), roles.get("R", ""), roles.get("B", ""))
        elif kind == "Linear":
            op, inputs = "Gemm", ("", roles.get("B", ""), roles.get("C", ""))
        elif kind in CONV_KINDS.values():
            op, inputs = "Conv", ("", roles.get("W", ""), roles.get("B", ""))
        elif kind == "Embedding":
            op, inputs = "Gather", (roles.get("data", ""), "")
        elif kind in NORM_OPS:
            op = NORM_OPS[kind]
            inputs = ("", *(roles.get(name, "") for _, name in NORMS[op]))
        else:
            continue  # no ONNX node: its arrays stay unmatched
        attributes = {"transB": 1} if op == "Gemm" else {}
        nodes.append(Node(len(nodes), op, label, inputs, (), attributes, synthetic=True))
    return nodes, {node.label: node.name for node in nodes}


def export(module: nn.Module) -> dict[str, np.ndarray]:
    """``module``'s weights as ONNX-layout arrays, keyed ``"<slot>/<ONNX input>"`` (see the module doc).

    Raises:
        LayoutError: a layer has no ONNX node here (only RNN/LSTM/GRU and their
            cells, Linear, Conv1d/2d/3d, Embedding, BatchNorm and LayerNorm are exported).
    """
    from weightport.tensors import numpy_of

    state = module.state_dict()
    arrays: dict[str, np.ndarray] = {}
    refused = []
    for slot in module_slots(module):
        prefix = f"{slot.label}/" if slot.label else ""
        sub = slot.module
        if slot.kind in RNN_KINDS and not getattr(sub, "proj_size", 0):
            order = GATE_ORDER[slot.kind]
            back = ReorderBlocks(0, order).inverse()
            directions = (False, True) if slot.bidirectional else (False,)

            def get(param: str, reverse: bool) -> np.ndarray:
                return back(numpy_of(state[slot.name(param, reverse=reverse)], copy=True))  # noqa: B023

            arrays[prefix + "W"] = np.stack([get("weight_ih", r) for r in directions])
            arrays[prefix + "R"] = np.stack([get("weight_hh", r) for r in directions])
            if sub.bias:
                arrays[prefix + "B"] = np.stack(
                    [np.concatenate([get("bias_ih", r), get("bias_hh", r)]) for r in directions]
                )
        elif slot.kind == "Linear":
            arrays[prefix + "B"] = numpy_of(state[slot.name("weight")], copy=True)
            if sub.bias is not None:
                arrays[prefix + "C"] = numpy_of(state[slot.name("bias")], copy=True)
        elif slot.kind in CONV_KINDS.values():
            arrays[prefix + "W"] = numpy_of(state[slot.name("weight")], copy=True)
            if sub.bias is not None:
                arrays[prefix + "B"] = numpy_of(state[slot.name("bias")], copy=True)
        elif slot.kind == "Embedding":
            arrays[prefix + "data"] = numpy_of(state[slot.name("weight")], copy=True)
        elif slot.kind in NORM_OPS:
            # ONNX requires the scale (and BatchNormalization its B): a module without them computes ones/zeros
            norm: Any = sub
            size = (norm.num_features,) if slot.kind == "BatchNorm" else tuple(norm.normalized_shape)
            neutral = {"weight": np.ones(size, np.float32), "bias": np.zeros(size, np.float32)}
            for role, name in NORMS[NORM_OPS[slot.kind]]:
                if slot.name(role) in state:
                    arrays[prefix + name] = numpy_of(state[slot.name(role)], copy=True)
                elif role == "weight" or (role == "bias" and slot.kind == "BatchNorm"):
                    arrays[prefix + name] = neutral[role]
        else:
            refused.append(slot.describe())
    if refused:
        raise LayoutError(
            f"cannot export {type(module).__name__} to the ONNX layout: {', '.join(refused)} have no ONNX "
            "node weightport maps (RNN, LSTM, GRU and their cells without proj_size, Linear, Conv1d/2d/3d, "
            "Embedding, BatchNorm, LayerNorm). "
            "Fix: export those layers with weightport.to_numpy instead."
        )
    return arrays
