"""The checks a plan's values need, made by reading the source once (NaN/Inf, float range, exact casts,
tied tensors given twice); each bad value becomes a problem of the plan, before anything is written.

>>> import numpy as np, torch
>>> from weightport.layouts import get_layout
>>> from weightport.plan import build_plan
>>> from weightport.sources import open_source
>>> lin = torch.nn.Linear(2, 1)
>>> src = open_source({"weight": np.array([[np.nan, 0.0]]), "bias": np.zeros(1)})
>>> plan = build_plan(lin, src, get_layout("torch").plan(lin, src))
>>> check_values(plan, src)
>>> print(plan.problems[0].found)
1 NaN/Inf value (first at index (0, 0): nan) in the given mapping 'weight'
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import replace

import numpy as np
import torch

from weightport import values
from weightport.dtypes import describe_dtype, is_float
from weightport.errors import Problem
from weightport.options import NonFinite
from weightport.plan import Entry, Plan, origin_of
from weightport.sources.base import Source

__all__ = ["check_values", "check_ties", "value_problem", "of_source", "allowed_nonfinite"]


def check_values(
    plan: Plan,
    source: Source,
    allow_nonfinite: NonFinite = False,
    *,
    after_fill: bool = False,
    progress: Callable[[Entry], None] | None = None,
) -> None:
    """Read each planned source tensor once and add a problem for each bad value found.

    Values stream through :meth:`Source.iter_chunks` (one small buffer for files);
    only tied tensors and value-making ops need whole arrays. ``progress`` is called
    with each entry once it is checked (a progress bar).
    """
    checked: dict[tuple[str, torch.dtype, bool], str | None] = {}
    second_names = check_ties(plan, source)
    for entry in _ticked(plan.entries, progress):
        if id(entry) in second_names:  # the same tensor again, compared by check_ties
            continue
        allowed = _allowed(entry.target, allow_nonfinite)
        if entry.check == "none":
            continue
        if after_fill and entry.tensor.is_meta and entry.check == "finite" and entry.rule.op.value_preserving:
            entry.check_after_fill = allowed  # nothing to undo: the new tensors go in only when all pass
            continue
        bad = None
        if entry.rule.op.value_preserving:
            for key in entry.rule.sources:
                memo = (key, entry.tensor.dtype, allowed)
                if memo not in checked:
                    checked[memo] = _scan(source, key, entry, allowed)
                bad = bad or checked[memo]
        else:
            value = entry.value(source)
            bad = values.find_bad_values(value, entry.tensor.dtype, entry.check, allowed)
        if bad:
            plan.problems.append(value_problem(entry, bad, of_source(entry, source)))


def check_ties(plan: Plan, source: Source) -> set[int]:
    """Add a problem for each tied tensor given under two names with different values; return the
    ``id`` of each entry that names such a tensor a second time (made even with ``check_values=False``:
    a tie can take only one of two values)."""
    firsts: dict[Hashable, tuple[Entry, np.ndarray]] = {}
    second_names: set[int] = set()
    for entry in plan.entries:
        first = firsts.get(entry.key)
        if first is None and not entry.aliases:
            continue
        value = entry.value(source)
        if first is None:
            firsts[entry.key] = (entry, value)
            continue
        second_names.add(id(entry))
        if not np.array_equal(first[1], value, equal_nan=True):
            problem = entry.tie_problem(first[0])
            plan.problems.append(
                replace(problem, found=f"{problem.found}: {_first_difference(value, first[1])}")
            )
    return second_names


def _first_difference(given: np.ndarray, other: np.ndarray) -> str:
    """Where two values of one tied tensor first differ, and how many elements do, for a message.

    >>> _first_difference(np.array([[1.0, 2.0], [3.0, np.nan]]), np.array([[1.0, 2.5], [3.0, 4.0]]))
    '2 elements differ, the first at index (0, 1): 2.0 and 2.5'
    """
    if given.shape != other.shape:
        return f"shapes {given.shape} and {other.shape}"
    differ = np.asarray(given != other)
    if all(
        a.dtype.kind == "c" or is_float(a.dtype) for a in (given, other)
    ):  # NaN under both names is one value
        differ &= ~(np.isnan(given) & np.isnan(other))
    count = int(np.count_nonzero(differ))
    index = tuple(int(i) for i in np.argwhere(differ)[0]) if differ.ndim else ()
    noun = "element differs" if count == 1 else "elements differ"
    return f"{count} {noun}, the first at index {index}: {given[index].item()!r} and {other[index].item()!r}"


def _ticked(entries: list[Entry], progress: Callable[[Entry], None] | None) -> Iterator[Entry]:
    """``entries``, calling ``progress`` with each once the loop is done with it."""
    for entry in entries:
        yield entry
        if progress is not None:
            progress(entry)


def of_source(entry: Entry, source: Source) -> str:
    """`` of <the source>`` where the entry's origin does not name it (a Flax layer's name alone), else ``''``."""
    return "" if source.description in origin_of(entry.rule) else f" of {source.description}"


def value_problem(entry: Entry, bad: str, where: str = "") -> Problem:
    """The problem of ``entry``'s bad values (``bad`` as :func:`values.find_bad_values` says them)."""
    return Problem(
        entry.target,
        f"values that fit {describe_dtype(entry.tensor.dtype)}",
        f"{bad} in {origin_of(entry.rule)}{where}",
        _value_fix(bad),
    )


def _scan(source: Source, key: str, entry: Entry, allowed: bool) -> str | None:
    """The first bad-value description for source tensor ``key``, streaming through chunks."""
    if source.in_memory:  # one chunk: the array itself
        return values.find_bad_values(source.read(key), entry.tensor.dtype, entry.check, allowed)
    for chunk in source.iter_chunks(key):
        if values.find_bad_values(chunk, entry.tensor.dtype, entry.check, allowed):
            # describe it with indices of the whole tensor (the error path: reading it all is fine)
            return values.find_bad_values(source.read(key), entry.tensor.dtype, entry.check, allowed)
    return None


def allowed_nonfinite(name: str, allow_nonfinite: NonFinite) -> bool:
    """Whether target ``name`` may hold NaN/Inf under ``allow_nonfinite`` (a bool, or a set of names)."""
    return _allowed(name, allow_nonfinite)


def _allowed(name: str, allow_nonfinite: NonFinite) -> bool:
    if isinstance(allow_nonfinite, bool):
        return allow_nonfinite
    return name in allow_nonfinite


_WIDER = (("complex64's range", "module.to(torch.complex128)"), ("float32's range", "module.double()"))


def _value_fix(bad: str) -> str:
    if "NaN" in bad or "Inf" in bad:
        return "replace them, or pass allow_nonfinite=True (or a set of names) if they belong there"
    if "range" in bad:
        wider = next((w for key, w in _WIDER if key in bad), "module.float()")
        return f"scale the values, or load into a wider dtype ({wider})"
    return "round or convert the values first, or load into a tensor of a dtype that holds them"
