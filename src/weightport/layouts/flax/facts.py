"""Flax's own names and conventions, shared by reading a tree, its rules and export.

>>> conv_axes(4)  # a 2-D Conv's kernel: Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
(3, 2, 0, 1)
"""

from __future__ import annotations

import re
from collections.abc import Collection

from weightport.transforms import Transpose

__all__ = [
    "FRAMEWORK",
    "APIS",
    "COLLECTIONS",
    "TRAINING_STATE",
    "ROOT",
    "STATS",
    "LEAVES",
    "OWN_LEAVES",
    "leaves_framework",
    "T",
    "conv_axes",
]

FRAMEWORK = "Flax"
APIS = ("linen", "nnx")
COLLECTIONS = ("params", "batch_stats")
# A flax.training TrainState's other top-level fields: optimizer moments and the step, never weights.
TRAINING_STATE = ("opt_state", "step")
ROOT = "(root)"  # the name of a layer whose params sit at the top of the tree
STATS = ("mean", "var")  # a BatchNorm's running statistics, in the batch_stats collection
# the arrays Flax's own layers hold (a cell's gates and attention's projections are Dense layers), and of
# those the ones PyTorch names otherwise (its weight, running_mean, running_var)
LEAVES = frozenset({"kernel", "bias", "scale", "embedding", *STATS})
OWN_LEAVES = LEAVES - {"bias"}
# what only Keras names so (a Dense's kernel is Flax's too), and PyTorch's own names
_KERAS_LEAVES = frozenset(
    {"gamma", "beta", "moving_mean", "moving_variance", "embeddings", "recurrent_kernel"}
    | {"depthwise_kernel", "pointwise_kernel"}
)
_TORCH_LEAF = re.compile(
    r"^(weight|running_mean|running_var|num_batches_tracked|(weight|bias)_\w+|\w+_(weight|bias))$"
)


def leaves_framework(names: Collection[str], layout: str | None = None) -> str | None:
    """Whose leaves ``names`` end in (their last part, split at ``/`` or ``.``; an nnx variable's ``value``
    skipped): ``"flax"``, ``"keras"`` or ``"torch"`` where one framework's own leaves are among them and no
    other's (a lone ``kernel`` with ``bias`` is Keras's under ``layout='keras'``, else Flax's, which a flat
    dict loads as); else None. By these a flat dict's names tell whose they are.

    >>> leaves_framework(["fc1.kernel", "ln.scale"]), leaves_framework(["ln/gamma"]), leaves_framework(["fc.weight"])
    ('flax', 'keras', 'torch')
    """
    leaves = set()
    for name in names:
        parts = re.split(r"[/.]", name.removesuffix(":0"))
        leaves.add(parts[-2] if len(parts) > 1 and parts[-1] in ("value", "raw_value") else parts[-1])
    own = {
        "flax": leaves & (OWN_LEAVES - {"kernel"}),
        "keras": leaves & _KERAS_LEAVES,
        "torch": {leaf for leaf in leaves if _TORCH_LEAF.match(leaf)},
    }
    found = [framework for framework, hits in own.items() if hits]
    if len(found) == 1:
        return found[0]
    return (layout if layout == "keras" else "flax") if not found and "kernel" in leaves else None


T = Transpose((1, 0))  # a Dense kernel (in, out) <-> a PyTorch weight (out, in)


def conv_axes(rank: int) -> tuple[int, ...]:
    """Flax (k..., in, out) -> PyTorch (out, in, k...)."""
    return (rank - 1, rank - 2, *range(rank - 2))
