"""What a Keras model config's graph says beyond the layer list: which ZeroPadding1D/2D feeds a layer
alone (its explicit padding, held against the module's padding by :mod:`.checks`), and the input size
each layer was built for.

>>> g = graph_of({"class_name": "Sequential", "config": {"layers": [
...     {"class_name": "ZeroPadding2D", "config": {"name": "pad", "padding": [[0, 1], [0, 1]]}},
...     {"class_name": "Conv2D", "config": {"name": "conv"}, "build_config": {"input_shape": [None, 9, 9, 3]}}]}})
>>> g["conv"][2], g["conv"][3]
(['pad'], (None, 9, 9, 3))
"""

from __future__ import annotations

from typing import Any

from weightport.layouts.flattening import FlatMap
from weightport.layouts.keras.axes import PER_FEATURE, Node, flat_reads

__all__ = [
    "graph_of",
    "note_padding",
    "maskings",
    "shared_layers",
    "zero_padding",
    "flattened_maps",
    "one_position_maps",
]

_Node = Node
_CONTAINERS = frozenset({"Sequential", "Functional", "Model"})


def graph_of(model_config: Any) -> dict[str, _Node]:
    """Layer name -> (class, config, the names of the layers feeding it, its built input shape), for every
    layer of a functional or Sequential model config (Keras 3 and tf.keras forms), those of nested models
    included: wired to what feeds the nested model, and read by what reads it.

    >>> g = graph_of({"class_name": "Sequential", "config": {"layers": [
    ...     {"class_name": "Dense", "config": {"name": "a"}},
    ...     {"class_name": "Sequential", "config": {"name": "inner", "layers": [
    ...         {"class_name": "InputLayer", "config": {"name": "in"}},
    ...         {"class_name": "Dense", "config": {"name": "b"}}]}},
    ...     {"class_name": "Dense", "config": {"name": "c"}}]}})
    >>> {name: node[2] for name, node in g.items()}
    {'a': [], 'b': ['a'], 'c': ['b']}
    """
    out: dict[str, _Node] = {}
    _add_model(model_config, [], out)
    return out


def _add_model(model_config: Any, feeds: list[str], out: dict[str, _Node]) -> list[str]:
    """Add the layers of ``model_config`` to ``out``, its inputs fed by the layers ``feeds`` (none for the
    model loaded); returns the names of the layers that make its outputs."""
    sequential = isinstance(model_config, dict) and model_config.get("class_name") == "Sequential"
    inner = model_config.get("config") if isinstance(model_config, dict) else None
    starts = _histories(inner.get("input_layers")) if isinstance(inner, dict) else []
    renamed: dict[
        str, list[str]
    ] = {}  # a nested model's name, or its input layer's -> the layers they stand for
    previous = feeds
    for entry in _entries(model_config):
        cfg, cls = entry["config"], str(entry.get("class_name"))
        name = str(cfg.get("name", entry.get("name", "")))
        histories = _histories(entry.get("inbound_nodes"))
        inputs = (
            previous if sequential else [n for h in dict.fromkeys(histories) for n in renamed.get(h, [h])]
        )
        if cls == "InputLayer" and feeds:  # a nested model's input: what feeds that model
            fed = [feeds[starts.index(name)]] if len(starts) == len(feeds) and name in starts else feeds
            renamed[name] = previous = fed
            continue
        if cls in _CONTAINERS and isinstance(cfg.get("layers"), list):
            renamed[name] = previous = _add_model(entry, inputs, out)
            continue
        build = entry.get("build_config")
        shape = _built_shape(build)
        built = (
            tuple(shape)
            if isinstance(shape, list) and all(isinstance(d, (int, type(None))) for d in shape)
            else None
        )
        out[name] = (cls, cfg, inputs, built)  # type: ignore[assignment]
        previous = [name]
    if sequential or not isinstance(inner, dict):
        return previous
    ends = _histories(inner.get("output_layers"))
    return [n for end in ends for n in renamed.get(end, [end])] or previous


def _built_shape(build: Any) -> Any:
    """The input shape a ``build_config`` records: ``input_shape``, or a MultiHeadAttention's query's
    (``shapes_dict``'s ``query_shape``)."""
    if not isinstance(build, dict):
        return None
    shapes = build.get("shapes_dict")
    return build.get("input_shape") or (shapes.get("query_shape") if isinstance(shapes, dict) else None)


def flattened_maps(graph: dict[str, _Node]) -> dict[str, FlatMap]:
    """Dense layer name -> the Flatten (or Reshape) of several axes that feeds it, through layers that keep
    each feature: its name, the sizes of the axes flattened where the config records them, and which axes
    they are, in the order Keras flattens them (see :func:`.axes.flat_reads`).

    >>> flat = flattened_maps(graph_of({"class_name": "Sequential", "config": {"layers": [
    ...     {"class_name": "Conv2D", "config": {"name": "conv"}},
    ...     {"class_name": "Flatten", "config": {"name": "f"}, "build_config": {"input_shape": [None, 2, 2, 3]}},
    ...     {"class_name": "Dropout", "config": {"name": "drop"}},
    ...     {"class_name": "Dense", "config": {"name": "fc"}}]}}))["fc"]
    >>> flat, flat.roles
    (('f', (2, 2, 3)), ('s0', 's1', 'c'))
    """
    return flat_reads(graph)


_POOLING = frozenset({f"Global{kind}Pooling{rank}D" for kind in ("Average", "Max") for rank in (1, 2, 3)})
# layers that keep a map's positions as they are (each position on its own, or the whole map alike)
_SAME_POSITIONS = PER_FEATURE | {"ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "BatchNormalization"}
_JOINS = frozenset({"Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum"})


def one_position_maps(graph: dict[str, _Node]) -> set[str]:
    """The layers that read a map of one position (a global pooling with ``keepdims=True``, then layers
    that keep its positions, 1 x 1 convolutions included), or were built for one: a 1 x 1 convolution of
    such a map is a Linear of its channels.

    >>> sorted(one_position_maps(graph_of({"class_name": "Sequential", "config": {"layers": [
    ...     {"class_name": "GlobalAveragePooling2D", "config": {"name": "pool", "keepdims": True}},
    ...     {"class_name": "Conv2D", "config": {"name": "c1", "kernel_size": [1, 1]}},
    ...     {"class_name": "Activation", "config": {"name": "act"}},
    ...     {"class_name": "Conv2D", "config": {"name": "c2", "kernel_size": [1, 1]}}]}})))
    ['act', 'c1', 'c2']
    """
    out: set[str] = set()
    one: set[str] = set()  # layers whose outputs are maps of one position
    for name, (cls, cfg, inputs, built) in graph.items():
        first = cfg.get("data_format") == "channels_first"
        spatial = (built[2:] if first else built[1:-1]) if built is not None and len(built) >= 3 else None
        if (spatial and all(d == 1 for d in spatial)) or (inputs and all(i in one for i in inputs)):
            out.add(name)
        reads_one = name in out
        kernel = cfg.get("kernel_size")
        pointwise = kernel is not None and all(
            k == 1 for k in (kernel if isinstance(kernel, list) else [kernel])
        )
        if (cls in _POOLING and cfg.get("keepdims")) or (
            reads_one and (cls in _SAME_POSITIONS or cls in _JOINS or (cls.startswith("Conv") and pointwise))
        ):
            one.add(name)
    return out


def shared_layers(model_config: Any) -> dict[str, int]:
    """The top-level layers a functional model config calls more than once (one set of weights each), with
    how many times: ``inbound_nodes`` holds one entry per call (Keras 3 and tf.keras alike).

    >>> shared_layers({"class_name": "Functional", "config": {"layers": [
    ...     {"class_name": "Dense", "config": {"name": "d"}, "inbound_nodes": [{"args": []}, {"args": []}]}]}})
    {'d': 2}
    """
    out: dict[str, int] = {}
    for entry in _entries(model_config):
        nodes = entry.get("inbound_nodes")
        if isinstance(nodes, list) and len(nodes) > 1:
            out[str(entry["config"].get("name", ""))] = len(nodes)
    return out


def _entries(model_config: Any) -> list[dict[str, Any]]:
    """The top-level layer entries of a model config (each a dict with a dict ``config``), in its order."""
    inner = model_config.get("config") if isinstance(model_config, dict) else None
    entries = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("config"), dict)]


def _histories(nodes: Any) -> list[str]:
    """The layer names a config's ``inbound_nodes`` read from (Keras 3 ``keras_history``, tf.keras lists)."""
    if isinstance(nodes, dict):
        history = nodes.get("keras_history")
        if isinstance(history, list) and history and isinstance(history[0], str):
            return [history[0]]
        return [n for v in nodes.values() for n in _histories(v)]
    if isinstance(nodes, list):
        if len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
            return [nodes[0]]  # tf.keras: [layer name, node index, tensor index, kwargs]
        return [n for v in nodes for n in _histories(v)]
    return []


def note_padding(layer: Any, graph: dict[str, _Node]) -> None:
    """Record the ZeroPadding1D/2D that alone feeds ``layer``, and the input ``layer`` was built for (its
    spatial size and rank)."""
    node = graph.get(layer.name)
    if node is None:
        return
    _, cfg, inputs, built = node
    fmt = str(cfg.get("data_format") or "channels_last")
    if built is not None:
        layer.input_rank = len(built)
    if built is not None and len(built) >= 3:
        layer.built = tuple(built[1:-1] if fmt == "channels_last" else built[2:])  # type: ignore[arg-type]
    if len(inputs) != 1 or inputs[0] not in graph:
        return
    cls, pad_cfg, _, _ = graph[inputs[0]]
    if cls not in ("ZeroPadding1D", "ZeroPadding2D"):
        return
    rank = 1 if cls == "ZeroPadding1D" else 2
    layer.padded_by, layer.padding = inputs[0], zero_padding(pad_cfg.get("padding", 1), rank)


def maskings(graph: dict[str, _Node]) -> dict[str, str]:
    """Layer name -> the ``Masking`` layer upstream of it (whose mask Keras carries on to it), said with its
    ``mask_value``; layers with none are left out. One walk over the graph, whatever its order.

    >>> g = graph_of({"class_name": "Sequential", "config": {"layers": [
    ...     {"class_name": "Masking", "config": {"name": "m", "mask_value": 0.0}},
    ...     {"class_name": "LSTM", "config": {"name": "lstm"}}]}})
    >>> maskings(g)
    {'lstm': "Masking 'm' (mask_value=0)"}
    """
    masked: dict[str, str] = {}
    changed = True
    while (
        changed
    ):  # once in a config's own (topological) order; again only for an input listed after its reader
        changed = False
        for name, (_, _, inputs, _) in graph.items():
            if name in masked:
                continue
            for source in inputs:
                cls, cfg, _, _ = graph.get(source, ("", {}, [], None))
                said = (
                    f"Masking '{source}' (mask_value={cfg.get('mask_value', 0.0):g})"
                    if cls == "Masking"
                    else ""
                )
                said = said or masked.get(source, "")
                if said:
                    masked[name], changed = said, True
                    break
    return masked


def zero_padding(value: Any, rank: int) -> tuple[tuple[int, int], ...]:
    """A ZeroPadding layer's ``padding`` as (before, after) per spatial axis.

    >>> zero_padding(1, 2), zero_padding([[0, 1], [0, 1]], 2), zero_padding([2, 3], 1)
    (((1, 1), (1, 1)), ((0, 1), (0, 1)), ((2, 3),))
    """
    if isinstance(value, int):
        return ((value, value),) * rank
    items = list(value)
    if rank == 1:
        return ((int(items[0]), int(items[1])),) if len(items) == 2 else ((int(items[0]),) * 2,)
    if all(isinstance(v, int) for v in items):
        return tuple((int(v), int(v)) for v in items)
    return tuple((int(v[0]), int(v[1])) for v in items)
