"""A BatchNorm that an ONNX exporter folded away is never left as it was.

``torch.onnx.export`` (both exporters, by default) fuses each eval-mode BatchNorm into the
Conv or Gemm before it: the graph then has no BatchNormalization node for it, only the fused
weights (under the conv's name, or a synthetic one). Loading that file into the original model
would fill the conv and leave the BatchNorm as it was: outputs silently off. The ``onnx`` layout
(the default for ``.onnx``) loads such a BatchNorm as its exact eval-mode equivalent
(:mod:`weightport.layouts.onnx.folding`); any other layout's load is refused with the cause said
once, and the fix names ``layout='onnx'``.

>>> import numpy as np, torch
>>> from weightport.sources import open_source
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2))
>>> source = open_source({"0.weight": np.ones((2, 1, 1, 1), np.float32)})
>>> source.metadata["nodes"] = [{"op_type": "Conv", "inputs": ["x", "0.weight"], "outputs": ["y"]}]
>>> folded_batchnorms(model, source).name
'(folded BatchNorm)'
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from torch import nn

from weightport.errors import Problem
from weightport.sources.base import Source

if TYPE_CHECKING:
    from weightport.plan import Plan

__all__ = ["folded_batchnorms"]

_FOLDS_INTO = frozenset(
    {"Conv1d", "Conv2d", "Conv3d", "Linear"}
)  # the layers exporters fuse a BatchNorm into
_PASS_THROUGH = frozenset({"Identity", "Cast"})  # a stored tensor may reach its node through these
_STORED = ("weight", "bias", "running_mean", "running_var")  # how exporters name a kept BatchNorm's inputs
_LISTED = 8


def folded_batchnorms(module: nn.Module, source: Source, plan: Plan | None = None) -> Problem | None:
    """The problem of ``module``'s BatchNorms that an ONNX graph folded away, or None.

    A BatchNorm counts when it tracks running statistics, comes right after a Conv or Linear
    among the model's modules that hold tensors, gets none of its tensors from ``plan`` (None:
    before planning, so none does), and no BatchNormalization node of the graph is left for it:
    each node feeds a planned tensor or names another BatchNorm (``features.1.weight``).
    """
    nodes: list[Mapping[str, Any]] | None = source.metadata.get("nodes")
    if nodes is None:
        return None  # not a graph: nothing was folded
    from weightport.layouts.pairing import module_slots  # the graph layouts' machinery, imported by them

    entries = plan.entries if plan is not None else []
    prefix = plan.prefix if plan is not None else ""
    filled = {entry.rule.target.rpartition(".")[0] for entry in entries}
    slots = module_slots(module)
    unfilled = [
        slot.path
        for before, slot in pairwise(slots)
        if slot.kind == "BatchNorm"
        and getattr(slot.module, "track_running_stats", False)  # batch statistics in eval too: never folded
        and before.kind in _FOLDS_INTO
        and slot.path not in filled
    ]
    if not unfilled:
        return None
    named = {f"{prefix}{path}.{leaf}": path for path in unfilled for leaf in _STORED}
    kept = _kept(nodes, {s for entry in entries for s in entry.rule.sources}, named)
    if kept is None:
        return None
    affected = [path for path in unfilled if path not in kept]
    if not affected:
        return None
    listed = ", ".join(f"'{prefix}{path}'" for path in affected[:_LISTED])
    if len(affected) > _LISTED:
        listed += f" and {len(affected) - _LISTED} more"
    these, as_is, each = (
        ("this BatchNorm", "as it is", "in its place")
        if len(affected) == 1
        else ("these BatchNorms", "as they are", "in place of each")
    )
    return Problem(
        "(folded BatchNorm)",
        f"a BatchNormalization node in {source.description} for each BatchNorm that follows a Conv or Linear",
        f"none for {listed}: the exporter fused each eval-mode BatchNorm into the layer before it, so the file "
        f"holds only the fused weights; loading them would leave {these} {as_is} and the outputs wrong",
        "load it with layout='onnx' (the default for .onnx), which loads each folded BatchNorm as its exact "
        "eval-mode equivalent (weight 1, running_mean 0, running_var 1 - eps, the folded bias); or re-export "
        "keeping the BatchNormalization nodes: torch.onnx.export(model, args, path, dynamo=False, "
        "training=torch.onnx.TrainingMode.PRESERVE); or load it into a model without "
        f"{these}: nn.Identity() {each}, and the layer before it built with bias=True",
    )


def _kept(nodes: list[Mapping[str, Any]], used: set[str], named: Mapping[str, str]) -> set[str] | None:
    """The BatchNorms that BatchNormalization nodes name, of those in ``named`` (stored name -> path);
    None when a node feeds no planned tensor and names none of them (it may be one of theirs)."""
    alias = {n["outputs"][0]: n["inputs"][0] for n in nodes if n["op_type"] in _PASS_THROUGH and n["inputs"]}

    def stored(name: str) -> str:
        for _ in range(len(alias)):  # bounded: a malformed graph may loop
            if name not in alias:
                break
            name = alias[name]
        return name

    kept: set[str] = set()
    for node in nodes:
        if node["op_type"] != "BatchNormalization" or node.get("domain", "") not in ("", "ai.onnx"):
            continue
        inputs = {stored(name) for name in node["inputs"][1:]}
        if inputs & used:
            continue  # its tensors are planned: it is a BatchNorm's the plan fills
        owners = {named[name] for name in inputs if name in named}
        if not owners:
            return None
        kept |= owners
    return kept
