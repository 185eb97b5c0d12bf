"""Keras layers that hold no PyTorch weight but change what the model computes: ``Normalization`` and
``Rescaling`` (the input stage of ``keras.applications`` models). No PyTorch module takes them, so they
are set aside and reported as ignored with their values, saying what to apply to the input, never
dropped silently.

>>> _values([0.5, 0.25])
'[0.5, 0.25]'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weightport.layouts.keras.layers import PREPROCESSING, Layer
from weightport.sources.base import Source

__all__ = ["set_aside"]


def _values(value: Any) -> str:
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:8])
    return f"[{shown}{', ...' if flat.size > 8 else ''}]" if np.ndim(value) else f"{float(value):.6g}"


def _said(cls: str, name: str, cfg: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    if cls == "Rescaling":
        scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
        return (
            f"Keras Rescaling '{name}' (scale {_values(scale)}, offset {_values(offset)}) has no weights and no "
            f"PyTorch module: compute x * {_values(scale)} + {_values(offset)} before the model"
        )
    mean = cfg.get("mean") if cfg.get("mean") is not None else arrays.get("mean")
    variance = cfg.get("variance") if cfg.get("variance") is not None else arrays.get("variance")
    if mean is None or variance is None:
        stats = "its statistics are not in the file"
    else:
        stats = f"mean {_values(mean)}, variance {_values(variance)}"
    invert = " (invert=True: x * sqrt(variance) + mean)" if cfg.get("invert") else ""
    return (
        f"Keras Normalization '{name}' ({stats}) has no PyTorch module: compute (x - mean) / "
        f"sqrt(variance) before the model{invert}"
    )


def set_aside(layers: list[Layer], source: Source) -> tuple[list[Layer], list[str]]:
    """The layers that stay to be paired, and one report line per preprocessing layer set aside
    (its tensors, if any, named first: ``layers/normalization/vars/0, ... (Keras Normalization ...)``)."""
    kept: list[Layer] = []
    said: list[str] = []
    seen: set[str] = set()
    for layer in layers:
        if layer.class_name not in PREPROCESSING:
            kept.append(layer)
            continue
        seen.add(layer.name)
        roles = ("mean", "variance", "count")
        named = dict(zip(roles, [layer.own[i] for i in sorted(layer.own)] or list(layer.legacy or [])))
        arrays = {
            r: source.read(t) for r, t in named.items() if r != "count" and source.infos[t].nbytes < 1 << 20
        }
        text = _said(str(layer.class_name), layer.name, layer.config or {}, arrays)
        said += (
            [f"{t} ({text})" for t in layer.tensors[:1]] + list(layer.tensors[1:])
            if layer.tensors
            else [text]
        )
    for rec in (
        source.metadata.get("layers") or []
    ):  # the ones without tensors (Rescaling, a fixed Normalization)
        name, cls = str(rec.get("name") or ""), rec.get("class_name")
        if cls in PREPROCESSING and name not in seen:
            said.append(_said(str(cls), name, rec.get("config") or {}, {}))
    return kept, said
