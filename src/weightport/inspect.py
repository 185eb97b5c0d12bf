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
from weightport.report import format_table
from weightport.sources import open_source

__all__ = ["describe_source", "format_description"]


def _plain(value: Any) -> Any:
    """``value`` with only JSON types (tuples as lists, other objects as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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
            "layers": _plain(source.metadata.get("layers", [])),
            "ignored": list(source.ignored),
        }


def format_description(info: dict[str, Any]) -> str:
    """The description as a readable table."""
    count = len(info["tensors"])
    lines = [
        f"{info['source']}: {count} tensor{'s' if count != 1 else ''}, {info['total_bytes']:,} bytes "
        f"(layout {info['layout']})"
    ]
    lines += format_table(
        ("name", "shape", "dtype", "bytes"),
        [(t["name"], str(tuple(t["shape"])), t["dtype"], f"{t['bytes']:,}") for t in info["tensors"]],
    )
    if info["layers"]:
        lines.append("Layers:")
        for layer in info["layers"]:
            if isinstance(layer, dict):
                name = layer.get("name", "?")
                kind = layer.get("kind") or layer.get("class_name") or ""
                config = layer.get("config", {})
                settings = (
                    ", ".join(f"{k}={v}" for k, v in config.items()) if isinstance(config, dict) else ""
                )
                lines.append(f"  {name}: {kind}" + (f" ({settings})" if settings else ""))
            else:
                lines.append(f"  {layer}")
    if info["ignored"]:
        lines.append(f"Ignored: {', '.join(info['ignored'])}")
    return "\n".join(lines)
