"""Graphs a runtime rewrote for its own kernels: quantized weights, and onnxruntime's fused contrib ops.

Such a file holds what the runtime computes with, not the model's parameters: int8 weights with their
scales (``quantize_dynamic``, ``quantize_static``), or a bias moved into a fused node (``BiasGelu``,
``SkipLayerNormalization``, ``FusedConv``: onnxruntime's optimizer writes them at
``ORT_ENABLE_EXTENDED`` and above). weightport moves values and never dequantizes, and reads the
standard operators only: a Linear read from the bare ``MatMul`` would take no bias, so the file is
refused as a whole, with what it holds and the file to load instead.

>>> from weightport.layouts.onnx.graph import Node
>>> _rewritten(Node(0, "com.microsoft.BiasGelu", "g", ("h", "fc1.bias"), ("y",), {}))
'contrib'
>>> _rewritten(Node(0, "com.microsoft.MatMulNBits", "q", ("h", "w_q4", "scales"), ("y",), {}))
'quantized'
"""

from __future__ import annotations

import re
from collections import Counter

from weightport.errors import UnsupportedConfigError
from weightport.layouts.onnx.graph import Graph, Node
from weightport.sources.base import Source

__all__ = ["refuse_runtime_graphs"]

# the standard operators that compute with quantized tensors
QUANTIZED = frozenset(
    {
        "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear",
        "DynamicQuantizeLinear",
    }
)  # fmt: skip


# how onnxruntime names its quantized contrib operators: QAttention, QLinearAdd, DynamicQuantizeLSTM,
# DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMulNBits, GatherBlockQuantized, ...
_QUANTIZED_NAME = re.compile(r"^Q[A-Z]|Quantiz|Integer|NBits")
# the element types of quantized weights (int4/uint4 and the float8s are stored packed or as such)
_QUANTIZED_DTYPES = frozenset({"int8", "uint8", "int4", "uint4", "float8_e4m3fn", "float8_e5m2"})


def _rewritten(node: Node, graph: Graph | None = None) -> str | None:
    """``"quantized"`` or ``"contrib"`` where ``node`` is an operator of a runtime's own form: quantized by
    its name, or (a contrib operator) by the 8-bit or narrower stored tensors it computes with."""
    bare = node.op_type.rsplit(".", 1)[-1]
    if node.op_type in QUANTIZED or _QUANTIZED_NAME.search(bare):
        return "quantized"
    if "." not in node.op_type:
        return None
    if graph is not None and any(
        (stored := graph.stored(name)) is not None
        and graph.source.infos[stored].dtype.name in _QUANTIZED_DTYPES
        for name in node.inputs
    ):
        return "quantized"
    return "contrib"  # an operator of a domain other than ONNX's own


def refuse_runtime_graphs(nodes: list[Node], source: Source) -> None:
    """Raise UnsupportedConfigError where nodes compute with stored tensors in a runtime's own form (the
    graph's wiring is worked out only where such an operator is there at all)."""
    candidates = [node for node in nodes if _rewritten(node) is not None]
    if not candidates:
        return
    graph = Graph.of(nodes, source)
    found: dict[str, Counter[str]] = {"quantized": Counter(), "contrib": Counter()}
    for node in candidates:
        kind = _rewritten(node, graph) or "contrib"
        if any(graph.stored(name) for name in node.inputs):
            found[kind][node.op_type] += 1
    if not any(found.values()):
        return
    where = source.description
    ops = ", ".join(f"{op} x{n}" for counts in found.values() for op, n in sorted(counts.items()))
    if found["quantized"]:
        raise UnsupportedConfigError(
            f"{where} is quantized: its nodes compute with integer weights and their scales ({ops}), as "
            "onnxruntime.quantization writes them; weightport moves values and never dequantizes, and a "
            "PyTorch model of the same layers holds floats. Fix: load the float model's file (the one that "
            "was quantized), or, for a quantized PyTorch model, quantize it after loading the float weights."
        )
    raise UnsupportedConfigError(
        f"{where} holds operators of a runtime's own ({ops}): onnxruntime's optimizer writes them at "
        "graph_optimization_level ORT_ENABLE_EXTENDED and above, moving a layer's bias or a folded "
        "BatchNorm into a fused node, which no PyTorch module's tensors are. weightport reads the standard "
        "ONNX operators only. Fix: load the file as the exporter wrote it (before optimization), or one "
        "saved with ORT_ENABLE_BASIC, which keeps the standard operators."
    )
