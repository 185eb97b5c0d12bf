"""Keras pooling layers whose ``padding='same'`` a PyTorch pool does not compute as it is built by default:
forward notes, since a pool holds no weights to pair and check.

TensorFlow pads ``'same'`` by its rule (the extra pixel after, where the total is odd: a strided pool over
an even map), and leaves the padding out of both: a max pool never takes it, an average pool divides by the
pixels inside the input only. A PyTorch pool pads both sides equally, and ``nn.AvgPool2d`` counts the
padding unless built with ``count_include_pad=False``.

>>> pooling_notes({"p": ("AveragePooling2D", {"pool_size": [3, 3], "strides": [1, 1], "padding": "same"}, [], None)})
["Keras AveragePooling2D 'p' (pool (3, 3), stride (1, 1), padding='same') pads 1 before and 1 after per axis \
and averages the pixels inside the input only: build the PyTorch pool with padding=(1, 1), \
count_include_pad=False"]
"""

from __future__ import annotations

from typing import Any

from weightport.layouts.keras.padding import TF_SAME, tf_same

__all__ = ["pooling_notes"]

_POOLS = frozenset(f"{kind}Pooling{rank}D" for kind in ("Max", "Average") for rank in (1, 2, 3))


def _per_axis(value: Any, rank: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * rank


def pooling_notes(graph: dict[str, tuple[str, dict[str, Any], list[str], Any]]) -> list[str]:
    """What ``forward`` must do for each pooling layer of a Keras graph (:func:`.graph.graph_of`) that pads
    ``'same'`` over more than one pixel."""
    notes = []
    for name, (cls, cfg, _, _) in graph.items():
        if cls not in _POOLS or str(cfg.get("padding", "valid")).lower() != "same":
            continue
        rank = int(cls[-2])
        pool = _per_axis(cfg.get("pool_size", 2), rank)
        strides = _per_axis(cfg.get("strides") or pool, rank)
        if all(p == 1 for p in pool):
            continue
        said = f"Keras {cls} '{name}' (pool {pool}, stride {strides}, padding='same')"
        if all(s == 1 for s in strides):
            pads = [tf_same(10, p, 1, 1) for p in pool]
            even = all(b == a for b, a in pads)
            amounts = (
                f"pads {pads[0][0]} before and {pads[0][1]} after per axis"
                if len(set(pads)) == 1
                else f"pads {pads} (before, after) per axis"
            )
            build = (
                f"padding={tuple(b for b, _ in pads)}"
                if even
                else "padding=0, padding the input in forward by those amounts"
            )
        else:
            amounts = f"pads by TensorFlow's 'same' rule ({TF_SAME}), which depends on the input's size"
            build = "padding=0, padding the input in forward by those amounts"
        if cls.startswith("Average"):
            notes.append(
                f"{said} {amounts} and averages the pixels inside the input only: build the PyTorch pool with "
                f"{build}, count_include_pad=False"
                if build.startswith("padding=(")
                else f"{said} {amounts} and averages the pixels inside the input only: a PyTorch pool of padded "
                "zeros counts them; pad and divide as TensorFlow does in forward"
            )
        else:
            notes.append(
                f"{said} {amounts}, never taking a padded pixel: build the PyTorch max pool with {build}"
                + ("" if build.startswith("padding=(") else " (pad with -inf)")
            )
    return notes
