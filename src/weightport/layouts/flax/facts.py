"""Flax's own names and conventions, shared by reading a tree, its rules and export.

>>> conv_axes(4)  # a 2-D Conv's kernel: Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
(3, 2, 0, 1)
"""

from __future__ import annotations

from weightport.transforms import Transpose

__all__ = ["FRAMEWORK", "APIS", "COLLECTIONS", "TRAINING_STATE", "ROOT", "STATS", "T", "conv_axes"]

FRAMEWORK = "Flax"
APIS = ("linen", "nnx")
COLLECTIONS = ("params", "batch_stats")
# A flax.training TrainState's other top-level fields: optimizer moments and the step, never weights.
TRAINING_STATE = ("opt_state", "step")
ROOT = "(root)"  # the name of a layer whose params sit at the top of the tree
STATS = ("mean", "var")  # a BatchNorm's running statistics, in the batch_stats collection

T = Transpose((1, 0))  # a Dense kernel (in, out) <-> a PyTorch weight (out, in)


def conv_axes(rank: int) -> tuple[int, ...]:
    """Flax (k..., in, out) -> PyTorch (out, in, k...)."""
    return (rank - 1, rank - 2, *range(rank - 2))
