"""What ``weightport inspect`` shows of a Keras source: each layer in model order, its Keras variables by
name (``kernel``, ``bias``, ``gamma``, ``moving_mean``, ... where a Keras 3 file numbers them ``vars/0``,
``vars/1``), and, for a layer weightport cannot port, why.

>>> _why_not("Attention")
"weightport has no rule for Keras Attention: load its arrays yourself, under the module's names"
"""

from __future__ import annotations

from typing import Any

from weightport.errors import WeightportError
from weightport.layouts.keras.layers import KINDS, PREPROCESSING, Layer, collect, resolve, wrapped_kind
from weightport.sources.base import Source

__all__ = ["describe"]

_ALL_KINDS = set(KINDS.values())


def _why_not(cls: str | None, legacy: bool = False) -> str:
    if cls == "MultiHeadAttention" and legacy:
        return "a legacy .h5 names its attention weights without their sublayers' groups: save the model as .keras"
    if cls in PREPROCESSING:
        return "no PyTorch module computes it: reported as ignored with its values; apply it to the input"
    return f"weightport has no rule for Keras {cls}: load its arrays yourself, under the module's names"


def describe(source: Source) -> list[dict[str, Any]]:
    """The Keras layers in ``source`` in model order where known, with their variables' Keras names."""
    layers, _ = collect(source)
    named = {layer.name for layer in layers}
    for position, rec in enumerate(source.metadata.get("layers") or []):
        if rec.get("class_name") in PREPROCESSING and rec.get("name") not in named:  # no tensors: Rescaling
            layers.append(
                Layer(
                    "",
                    str(rec.get("name")),
                    rec.get("class_name"),
                    rec.get("config"),
                    seq=("model",),
                    index=position,
                )
            )
    layers.sort(key=lambda layer: (layer.seq, layer.index))
    out = []
    for layer in layers:
        variables: dict[str, str] = {}
        why = ""
        try:
            found = (
                None
                if layer.class_name in PREPROCESSING
                else resolve(layer, source, _ALL_KINDS, False, source.description)
            )
        except WeightportError as e:
            found, why = None, str(e)
        if found is not None:
            for part in found.parts:
                side = (
                    ("backward_layer " if part.reverse else "forward_layer ") if len(found.parts) > 1 else ""
                )
                for role, tensor in part.vars.items():
                    variables[tensor] = f"{side}{role}"
        elif layer.class_name in PREPROCESSING:
            roles = ("mean", "variance", "count")
            variables = {t: r for r, t in zip(roles, layer.tensors)}
            why = _why_not(layer.class_name)
        else:
            why = why or _why_not(
                layer.class_name or "(class not recorded, shapes fit no kind)", layer.legacy is not None
            )
        out.append(
            {
                "name": layer.name,
                "kind": wrapped_kind(layer.class_name, layer.config) or "(from shapes)",
                "config": layer.config or {},
                "tensors": layer.tensors,
                "variables": variables,
                "not_ported": why,
            }
        )
    return out
