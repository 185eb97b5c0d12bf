"""Keras layers without weights whose settings PyTorch's twin module does not take by default: a
``LeakyReLU`` (Keras's slope 0.3, or 0.2 in ``keras.activations``; ``nn.LeakyReLU``'s 0.01), an ``ELU``
with another ``alpha`` than 1, a ``ReLU`` with a slope, threshold or ``max_value``, an ``Activation`` whose
PyTorch module computes otherwise by default (:func:`.activations.layer_note`: ``leaky_relu``'s slope 0.2,
``softmax``'s axis), a ``UnitNormalization`` (no module in PyTorch). Nothing pairs them, so where the
configuration records them, each becomes a forward note saying its settings, what to build or compute, and
where it sits (:func:`.preprocessing.where_applied`).

>>> g = {"in": ("InputLayer", {}, [], None), "d": ("Dense", {}, ["in"], None),
...      "act": ("LeakyReLU", {"negative_slope": 0.3}, ["d"], None), "e": ("Dense", {}, ["act"], None)}
>>> weightless_notes(g, {"d": "0", "e": "2"})
["Keras LeakyReLU 'act' (negative_slope=0.3) on the output of Keras 'd' (module '0') and before Keras 'e' \
(module '2') reads it, inside the model: build nn.LeakyReLU(0.3) (its default slope is 0.01)"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weightport.layouts.keras.activations import activation_name, layer_note
from weightport.layouts.keras.axes import Node
from weightport.layouts.keras.preprocessing import where_applied

__all__ = ["weightless_notes"]


def _number(cfg: Mapping[str, Any], *keys: str, default: float) -> float:
    """A numeric setting under the first of ``keys`` the config has (Keras 3 and tf.keras name some apart)."""
    for key in keys:
        if cfg.get(key) is not None:
            return float(cfg[key])
    return default


def _what(cls: str, cfg: Mapping[str, Any], keras_version: str | None) -> tuple[str, str] | None:
    """The settings said, and what to build or compute, for a layer of ``cls`` that needs a note."""
    if cls == "LeakyReLU":
        slope = _number(cfg, "negative_slope", "alpha", default=0.3)
        return f"negative_slope={slope:g}", f"build nn.LeakyReLU({slope:g}) (its default slope is 0.01)"
    if cls == "ELU":
        alpha = _number(cfg, "alpha", default=1.0)
        return (f"alpha={alpha:g}", f"build nn.ELU(alpha={alpha:g})") if alpha != 1.0 else None
    if cls == "ReLU":
        slope = _number(cfg, "negative_slope", default=0.0)
        threshold = _number(cfg, "threshold", default=0.0)
        top = cfg.get("max_value")
        if slope == 0.0 and threshold == 0.0:
            if top is None:
                return None
            m = float(top)
            build = "nn.ReLU6()" if m == 6.0 else f"nn.Hardtanh(0.0, {m:g}) (torch.clamp(x, 0, {m:g}))"
            return f"max_value={m:g}", f"build {build}: a plain nn.ReLU does not cap"
        cap = f"min(x, {float(top):g}) " if top is not None else "x "
        return (
            f"negative_slope={slope:g}, threshold={threshold:g}, max_value={top}",
            f"compute {cap}where x >= {threshold:g}, else {slope:g} * (x - {threshold:g}) (no nn.ReLU does)",
        )
    if cls == "Activation":
        name = activation_name(cfg.get("activation"))
        told = layer_note(name, keras_version)
        return None if told is None else (f"activation='{name}'", told)
    if cls == "UnitNormalization":
        axis = cfg.get("axis", -1)
        return (
            f"axis={axis}",
            "divide by the L2 norm over that axis of Keras's (channels-last) input, F.normalize(x, dim=...) "
            "over the same axis of the PyTorch tensor (dim=1 for a channels-first map's channels)",
        )
    return None


def weightless_notes(
    graph: Mapping[str, Node], modules: Mapping[str, str], keras_version: str | None = None
) -> list[str]:
    """A forward note per such layer of a Keras graph (:func:`.graph.graph_of`); ``modules``: Keras layer
    name -> the PyTorch module it filled; ``keras_version``: the Keras that wrote the file, where recorded."""
    notes = []
    for name, (cls, cfg, _, _) in graph.items():
        what = _what(cls, cfg, keras_version)
        if what is not None:
            said, do = what
            notes.append(f"Keras {cls} '{name}' ({said}) {where_applied(name, graph, modules)}: {do}")
    return notes
