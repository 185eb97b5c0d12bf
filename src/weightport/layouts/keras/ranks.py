"""The rank of each layer's input (batch axis included), followed through a Keras model config from the
shapes it records: an ``InputLayer``'s ``batch_shape`` (``batch_input_shape`` in tf.keras), a first layer's
own ``batch_input_shape``, a layer's built input shape; each layer's class then says the rank it returns.

A tf.keras full-model ``.h5`` records no layer's built shape, and records a norm's axes made positive: the
rank says whether ``axis=[2]`` is the last axis of a 3-D input or the middle one of a 4-D one. A layer of
a class not listed here (a Lambda, a TensorFlow op other than an element-wise one) gives no rank, and
neither do the layers after it.

>>> g = {"in": ("InputLayer", {"batch_input_shape": [None, 4, 4]}, [], None),
...      "d": ("Dense", {}, ["in"], None), "f": ("Flatten", {}, ["d"], None), "n": ("LayerNormalization", {}, ["f"], None)}
>>> input_ranks(g)
{'d': 3, 'f': 3, 'n': 2}
"""

from __future__ import annotations

from typing import Any

__all__ = ["input_ranks"]

_Node = tuple[str, dict[str, Any], list[str], tuple[int, ...] | None]

# classes whose output has their input's rank
_SAME_RANK = frozenset(
    {
        *(f"{c}{n}D" for c in ("Conv", "DepthwiseConv", "SeparableConv") for n in (1, 2, 3)),
        *(f"Conv{n}DTranspose" for n in (1, 2, 3)),
        *(
            f"{c}{n}D"
            for c in ("ZeroPadding", "Cropping", "UpSampling", "MaxPooling", "AveragePooling")
            for n in (1, 2, 3)
        ),
        *(f"SpatialDropout{n}D" for n in (1, 2, 3)),
        "Dense",
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "Normalization",
        "Rescaling",
        "LayerScale",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "Softmax",
        "Dropout",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Identity",
        "Masking",
        "Permute",
        "MultiHeadAttention",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
    }
)
_RECURRENT = frozenset({"SimpleRNN", "LSTM", "GRU"})
# tf.keras's TFOpLambda functions (a TensorFlow op called on Keras tensors) that work element by element
_ELEMENTWISE_OPS = frozenset(
    {
        *(f"__operators__.{op}" for op in ("add", "sub", "mul", "truediv", "neg")),
        *(f"math.{op}" for op in ("add", "subtract", "multiply", "divide", "truediv", "negative", "maximum")),
        *(f"math.{op}" for op in ("minimum", "sigmoid", "tanh", "exp", "abs", "square", "sqrt", "rsqrt")),
        *(f"nn.{op}" for op in ("relu", "relu6", "gelu", "silu", "swish", "sigmoid", "elu", "selu")),
    }
)


def input_ranks(graph: dict[str, _Node]) -> dict[str, int]:
    """Layer name -> the rank of its input, for the layers whose rank the config shows."""
    outputs: dict[str, int | None] = {}

    def output_rank(name: str, seen: frozenset[str]) -> int | None:
        if name not in outputs:
            outputs[name] = None if name in seen else _output(graph[name], input_rank(name, seen | {name}))
        return outputs[name]

    def input_rank(name: str, seen: frozenset[str]) -> int | None:
        cls, cfg, inputs, built = graph[name]
        recorded = built or cfg.get("batch_input_shape") or cfg.get("batch_shape")
        if isinstance(recorded, (list, tuple)) and cls != "InputLayer":
            return len(recorded)
        ranks = {output_rank(i, seen) for i in inputs if i in graph}
        return ranks.pop() if len(ranks) == 1 else None

    found = {name: input_rank(name, frozenset({name})) for name in graph if graph[name][0] != "InputLayer"}
    return {name: rank for name, rank in found.items() if rank is not None}


def _output(node: _Node, rank: int | None) -> int | None:
    """The rank a layer returns, given its input's."""
    cls, cfg, _, _ = node
    if cls == "InputLayer":
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        return len(shape) if isinstance(shape, (list, tuple)) else None
    if cls == "Reshape" and isinstance(cfg.get("target_shape"), (list, tuple)):
        return len(cfg["target_shape"]) + 1
    if cls == "RepeatVector":
        return 3
    if rank is None:
        return None
    if cls in _SAME_RANK or (cls == "TFOpLambda" and cfg.get("function") in _ELEMENTWISE_OPS):
        return rank
    if cls == "Flatten":
        return 2
    if cls == "Embedding":
        return rank + 1
    if cls.startswith(("GlobalMaxPooling", "GlobalAveragePooling")):
        return rank if cfg.get("keepdims") else 2
    if cls in _RECURRENT:
        return rank if cfg.get("return_sequences") else rank - 1
    if cls in ("Bidirectional", "TimeDistributed"):
        inner = cfg.get("layer")
        if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
            cls_, cfg_ = str(inner.get("class_name")), inner["config"]
            if cls == "TimeDistributed":
                below = _output((cls_, cfg_, [], None), rank - 1)
                return None if below is None else below + 1
            return _output((cls_, cfg_, [], None), rank)
    return None
