"""One problem per recurrent module, where its tensors' shapes tell its real sizes or gate count.

A GRU's weights offered to an LSTM, or an RNN's built with another ``hidden_size``, would give one
shape problem per tensor; :func:`explain_recurrent_sizes` replaces them with one that names the cause
in the module's terms (used by :func:`weightport.plan.build_plan`).

>>> import torch
>>> from weightport.torch_facts import recurrent_sizes
>>> recurrent_sizes(torch.nn.LSTM(4, 8), {"weight_hh_l0": (24, 8), "weight_ih_l0": (24, 4)})
(3, 8, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from weightport.errors import Problem, a_or_an, counted
from weightport.sources.base import Source
from weightport.torch_facts import (
    GATES_OF,
    RECURRENT_PARAM,
    RNN_GATE_COUNT,
    describe_module,
    recurrent_sizes,
    rnn_constructor,
    rnn_kind,
)

__all__ = ["explain_recurrent_sizes"]


def explain_recurrent_sizes(
    module: nn.Module,
    prefix: str,
    source: Source,
    mismatched: Mapping[str, tuple[tuple[int, ...], Problem]],
    problems: list[Problem],
) -> None:
    """One problem per recurrent module in place of one per tensor, where every shape that does not fit
    is explained by other sizes (hidden_size, input_size) or another gate count (a GRU's weights for an
    LSTM): the cause said once, in the module's terms."""
    owners: dict[str, dict[str, tuple[tuple[int, ...], Problem]]] = {}
    for target, mismatch in mismatched.items():
        path, _, local = target.rpartition(".")
        if RECURRENT_PARAM.match(local):
            owners.setdefault(path, {})[local] = mismatch
    for path, found in owners.items():
        if len(found) < 2:  # one tensor's own problem says it best
            continue
        owner = module.get_submodule(path) if path else module
        kind = rnn_kind(owner)
        if kind is None or getattr(owner, "proj_size", None):
            continue
        sizes = recurrent_sizes(owner, {local: shape for local, (shape, _) in found.items()})
        if sizes is None:
            continue
        label = prefix + path if path else prefix.rstrip(".") or type(owner).__name__
        dropped = {id(problem) for _, problem in found.values()}
        problems[:] = [p for p in problems if id(p) not in dropped]
        problems.append(_recurrent_problem(owner, kind, label, sizes, found, source))


def _recurrent_problem(
    owner: nn.Module,
    kind: str,
    label: str,
    sizes: tuple[int, int, int],
    found: Mapping[str, tuple[tuple[int, ...], Problem]],
    source: Source,
) -> Problem:
    module: Any = owner
    gates, hidden, inputs = sizes
    cell = isinstance(owner, nn.RNNCellBase)
    layers = module.num_layers * (2 if module.bidirectional else 1) if not cell else 1
    where = f"every {kind} layer" if layers > 1 else f"the {type(owner).__name__}"
    expected, said = [], []
    other = type(owner).__name__
    looks = ""
    if gates != RNN_GATE_COUNT[kind]:
        other = GATES_OF[gates] + ("Cell" if cell else "")
        expected.append(counted(RNN_GATE_COUNT[kind], "gate block"))
        said.append(f"{counted(gates, 'gate block')}")
        looks = f": this looks like {a_or_an(other)} ({counted(gates, 'gate')}), not {a_or_an(type(owner).__name__)}"
    for setting, have, got in (
        ("hidden_size", module.hidden_size, hidden),
        ("input_size", module.input_size, inputs),
    ):
        if have != got:
            expected.append(f"{setting}={have}")
            said.append(f"{setting}={got}")
    # the example that shows the sizes best: weight_hh holds both the gate rows and hidden_size
    example = min(found, key=lambda n: (not n.startswith("weight_hh"), not n.startswith("weight_ih"), n))
    built = rnn_constructor(owner, other, inputs, hidden)
    if gates != RNN_GATE_COUNT[kind]:
        fix = f"build the module as {built} for these weights, or pass {a_or_an(type(owner).__name__)}'s weights"
    else:
        sizes_said = ", ".join(said)
        fix = f"build the module with {sizes_said}: {built}, or pass arrays made for {', '.join(expected)}"
    return Problem(
        label,
        f"{', '.join(expected)} in {where} ({describe_module(owner)})",
        f"{', '.join(said)} in {source.description} (by the shapes of its {counted(len(found), 'tensor')} for "
        f"the module: '{example}' is {found[example][0]}){looks}",
        fix,
    )
