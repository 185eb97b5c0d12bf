"""What a weights file holds: every tensor, and the layers a reader recognised.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "w.npz"; np.savez(path, weight=np.eye(2, dtype=np.float32))
>>> print(format_description(describe_source(path)))  # doctest: +ELLIPSIS
'w.npz': 1 tensor, 16 bytes (layout torch)
name    shape   dtype    bytes
weight  (2, 2)  float32  16
"""

from __future__ import annotations

import os
from typing import Any

from weightport.dtypes import describe_dtype
from weightport.layouts import get_layout
from weightport.report import format_table
from weightport.sources import Source, open_source

__all__ = ["describe_source", "format_description"]


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


def _layers(source: Source) -> list[Any]:
    """The layers the source's layout recognises (none for plain state dicts)."""
    return get_layout(source.metadata.get("layout", "torch")).describe(source)


def describe_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description: tensors (name, shape, dtype, bytes), layers, ignored entries."""
    with open_source(path) as source:
        tensors = [
            {"name": i.name, "shape": list(i.shape), "dtype": describe_dtype(i.dtype), "bytes": i.nbytes}
            for i in source.infos.values()
        ]
        return {
            "source": source.description,
            "layout": source.metadata.get("layout", "torch"),
            "tensors": tensors,
            "total_bytes": sum(t["bytes"] for t in tensors),
            "layers": _plain(_layers(source)),
            "ignored": list(source.ignored),
        }


def format_description(info: dict[str, Any]) -> str:
    """The description as a readable table."""
    count = len(info["tensors"])
    lines = [
        f"{info['source']}: {count} tensor{'s' if count != 1 else ''}, {info['total_bytes']:,} bytes "
        f"(layout {info['layout']})"
    ]
    # the framework's own name of each tensor where the layout knows it (Keras: 'dense kernel' for vars/0)
    own = {
        t: f"{layer.get('name', '?')} {v}"
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
    if info["layers"]:
        lines.append("Layers:")
        for layer in info["layers"]:
            config = layer.get("config") or {}
            settings = ", ".join(f"{k}={config[k]}" for k in _SHOWN if k in config)
            count = len(layer.get("tensors", []))
            lines.append(
                f"  {layer.get('name', '?')}: {layer.get('kind', '')}, {count} tensor{'s' if count != 1 else ''}"
                + (f" ({settings})" if settings else "")
                + (f"; not ported: {layer['not_ported']}" if layer.get("not_ported") else "")
            )
    if info["ignored"]:
        lines.append(f"Ignored: {', '.join(info['ignored'])}")
    return "\n".join(lines)
