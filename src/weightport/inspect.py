"""What a weights file holds: every tensor, and the layers a reader recognised.

:func:`describe_source` is the data ``weightport inspect --json`` prints (schema 1, the same keys
for every framework): the weights apart from a graph's constants (an ONNX file's int64 shapes),
each with the layer and the framework's own variable name that hold it; the layers with their
kind, recorded settings (``config``, empty where the file records none), tensors and whether they
port; the entries a reader skipped, with why.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.npz"; np.savez(path, weight=np.eye(2, dtype=np.float32))
>>> info = describe_source(path)
>>> info["schema"], info["source"] == str(path), info["tensors"][0]["shape"]
(1, True, [2, 2])
>>> print(format_description(info))
'w.npz': 1 tensor, 16 bytes (layout torch)
name    shape   dtype    bytes
weight  (2, 2)  float32  16
"""

from __future__ import annotations

import os
import re
from typing import Any

from weightport.dtypes import describe_dtype
from weightport.layouts import get_layout
from weightport.report import format_table
from weightport.sources import Source, open_source

__all__ = ["SCHEMA", "describe_source", "described", "format_description"]

SCHEMA = 1

# The settings worth a glance in the table (--json has every one the file records).
_SHOWN = (
    "units",
    "hidden_size",
    "activation",
    "activations",
    "recurrent_activation",
    "use_bias",
    "reset_after",
    "direction",
    "linear_before_reset",
    "filters",
    "kernel_size",
    "kernel_shape",
    "strides",
    "epsilon",
)


def _plain(value: Any) -> Any:
    """``value`` with only JSON types (tuples as lists, other objects as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _relative(tensor: str, layer: str) -> str | None:
    """``tensor``'s name below ``layer`` ('params/cell/hf/bias' in 'cell': 'hf/bias'), if it is below it."""
    parts, inner = tensor.split("/"), layer.split("/")
    for start in range(len(parts) - len(inner) - 1, -1, -1):  # the innermost match
        if parts[start : start + len(inner)] == inner:
            return "/".join(parts[start + len(inner) :])
    return None


def _layer(raw: dict[str, Any]) -> dict[str, Any]:
    """One layer with the keys every framework's has: name, kind, config, tensors, variables, not_ported."""
    tensors = [str(t) for t in raw.get("tensors") or []]
    variables = {str(t): str(v) for t, v in (raw.get("variables") or {}).items()}
    name = str(raw.get("name", ""))
    for tensor in tensors:  # a framework that does not name them: the tensor's path below the layer
        if tensor not in variables:
            below = _relative(tensor, name)
            if below:
                variables[tensor] = below
    return {
        "name": name,
        "kind": str(raw.get("kind", "")),
        "config": _plain(raw.get("config") or {}),
        "tensors": tensors,
        "variables": variables,
        "not_ported": raw.get("not_ported") or None,
    }


def _ignored(entry: str) -> dict[str, str]:
    """A reader's ``"name (why)"`` as ``{"name", "reason"}``."""
    match = re.fullmatch(r"(.*?) \((.*)\)", entry)
    return {"name": match[1], "reason": match[2]} if match else {"name": entry, "reason": ""}


def described(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """:func:`describe_source`'s data, and how messages name the source (``"'m.npz'"``) for the table."""
    with open_source(path) as source:
        layout_name = str(source.metadata.get("layout", "torch"))
        layout = get_layout(layout_name)
        layers = [_layer(raw) for raw in layout.describe(source)]
        weights = _weights(layout, source, layers)
        owner = {t: layer for layer in layers for t in layer["tensors"]}
        entries: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for info in source.infos.values():
            layer = owner.get(info.name)
            entries[info.name in weights].append(
                {
                    "name": info.name,
                    "shape": list(info.shape),
                    "dtype": describe_dtype(info.dtype),
                    "bytes": info.nbytes,
                    "layer": layer["name"] if layer else None,
                    "variable": layer["variables"].get(info.name) if layer else None,
                }
            )
        data = {
            "schema": SCHEMA,
            "source": os.fspath(path),
            "layout": layout_name,
            "tensors": entries[True],
            "total_bytes": sum(t["bytes"] for t in entries[True]),
            "constants": entries[False],
            "constant_bytes": sum(t["bytes"] for t in entries[False]),
            "layers": layers,
            "ignored": [_ignored(entry) for entry in source.ignored],
        }
        return data, source.description


def describe_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description (schema 1): the path as given, the layout, the weights (``tensors``:
    name, shape, dtype, bytes, layer, variable) apart from graph ``constants``, ``layers`` (name,
    kind, config, tensors, variables, not_ported) and ``ignored`` entries (name, reason)."""
    return described(path)[0]


def _weights(layout: Any, source: Source, layers: list[dict[str, Any]]) -> set[str]:
    """The tensors that are weights: as the layout says where it tells weights from a graph's
    constants (ONNX), and every tensor a layer holds; else all of them."""
    says = getattr(layout, "weight_names", None)  # an optional member of the Layout protocol
    if not callable(says):
        return set(source.infos)
    return set(says(source)) | {t for layer in layers for t in layer["tensors"]}


def format_description(info: dict[str, Any], description: str | None = None) -> str:
    """The description as a readable table; ``description`` names the source (default: its file name)."""
    count = len(info["tensors"])
    where = description or repr(os.path.basename(str(info["source"]).rstrip("/\\")))
    lines = [
        f"{where}: {count} tensor{'s' if count != 1 else ''}, {info['total_bytes']:,} bytes "
        f"(layout {info['layout']})"
    ]
    # the framework's own name of each tensor where the layout knows it (Keras: 'dense kernel' for vars/0)
    own = {
        t: f"{layer.get('name') or '?'} {v}"
        for layer in info["layers"]
        for t, v in (layer.get("variables") or {}).items()
    }
    if own:
        lines += format_table(
            ("name", "variable", "shape", "dtype", "bytes"),
            [
                (t["name"], own.get(t["name"], ""), str(tuple(t["shape"])), t["dtype"], f"{t['bytes']:,}")
                for t in info["tensors"]
            ],
        )
    else:
        lines += format_table(
            ("name", "shape", "dtype", "bytes"),
            [(t["name"], str(tuple(t["shape"])), t["dtype"], f"{t['bytes']:,}") for t in info["tensors"]],
        )
    constants = info.get("constants") or []
    if constants:
        shown = ", ".join(f"{c['name']} {tuple(c['shape'])} {c['dtype']}" for c in constants[:8])
        more = f", ... ({len(constants) - 8} more)" if len(constants) > 8 else ""
        lines.append(f"Graph constants (not weights): {shown}{more}")
    if info["layers"]:
        lines.append("Layers:")
        for layer in info["layers"]:
            config = layer.get("config") or {}
            settings = ", ".join(f"{k}={config[k]}" for k in _SHOWN if k in config)
            count = len(layer.get("tensors", []))
            lines.append(
                f"  {layer.get('name') or '?'}: {layer.get('kind', '')}, {count} tensor{'s' if count != 1 else ''}"
                + (f" ({settings})" if settings else "")
                + (f"; not ported: {layer['not_ported']}" if layer.get("not_ported") else "")
            )
    if info["ignored"]:
        said = [f"{e['name']} ({e['reason']})" if e["reason"] else e["name"] for e in info["ignored"]]
        lines.append(f"Ignored: {', '.join(said)}")
    return "\n".join(lines)
