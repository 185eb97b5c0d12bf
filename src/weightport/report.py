"""What a load did (or, with ``dry_run=True``, would do), as data and as a table.

``print(report)`` stays short for big models: past :data:`MAX_ROWS` rows, tensors that differ only in
their numbers share a row (``lstm.weight_ih_l{1..3}{,_reverse}``), and what is still too long ends in
a count; :meth:`LoadReport.table` gives every row, and :meth:`LoadReport.summary` a few lines.

>>> import numpy as np, torch, weightport
>>> report = weightport.load(torch.nn.Linear(2, 1), {"weight": np.ones((1, 2)), "bias": np.zeros(1)})
>>> report.written
['weight', 'bias']
>>> print(report)  # doctest: +NORMALIZE_WHITESPACE
Loaded 2 tensors (12 bytes) into Linear from the given mapping (layout torch).
target  shape   dtype    from    transform  source
weight  (1, 2)  float32  float64 as is      the given mapping 'weight'
bias    (1,)    float32  float64 as is      the given mapping 'bias'
>>> print(report.summary())  # doctest: +ELLIPSIS
Loaded 2 tensors (12 bytes) into Linear from the given mapping in ... s (layout torch).
Ignored 0, missing 0, not checked 0, notes on forward 0.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from weightport.errors import compact_names, counted
from weightport.layouts.base import Pairing

__all__ = [
    "ReportRow",
    "LoadReport",
    "format_table",
    "MAX_ROWS",
    "remember_forward_notes",
    "forward_notes_of",
]

# Rows (of pairings, of tensors) print(report) shows before it groups them, then before it cuts them
MAX_ROWS = 24
# Names listed per line of ignored / missing / unchecked before the rest is a count
MAX_NAMES = 12


@dataclass(frozen=True)
class ReportRow:
    """One planned tensor: target name, shape, target dtype, source dtype, transform, origin."""

    target: str
    shape: tuple[int, ...]
    dtype: str
    source_dtype: str
    transform: str
    origin: str
    aliases: tuple[str, ...] = ()


@dataclass
class LoadReport:
    """The outcome of :func:`weightport.load`.

    ``print(report)`` shows the pairings and the tensors, grouped and cut for big models;
    :meth:`table` shows every row; :meth:`summary` says it in a few lines.

    Attributes:
        rows: every tensor written (or to be written, on a dry run), in order
            (made from ``make_rows`` when first read).
        ignored: source names not used (``strict=False``), stray files.
        missing: module tensors left as they were (``strict=False``).
        pairings: how source layers were paired with modules (framework layouts).
        scope: the submodule loaded into when weightport found it by name (every source
            layer pairs by name inside it: a wrapped model), as ``prefix=`` would.
        unchecked: settings the source did not carry, so they were not checked.
        notes: what the model's ``forward`` must do around the modules for the source's outputs
            (an activation, a flipped input), each with the module it is about; given as a
            :class:`~weightport.ForwardNoteWarning` too.
        nbytes: bytes written (or to be written).
        seconds: how long the load took, checks and write.
        dry_run: True when nothing was written.
        values_checked: False under ``check_values=False``: no value was scanned (NaN/Inf, float
            ranges, casts that must be exact), and the report says so.
    """

    module: str
    source: str
    layout: str
    make_rows: Callable[[], list[ReportRow]] = field(default=list, repr=False, compare=False)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    pairings: list[Pairing] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    nbytes: int = 0
    dry_run: bool = False
    scope: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    values_checked: bool = True

    @cached_property
    def rows(self) -> list[ReportRow]:
        """Every tensor written (or to be written, on a dry run), in order."""
        return self.make_rows()

    @property
    def written(self) -> list[str]:
        """Target names written (empty on a dry run)."""
        return [] if self.dry_run else [r.target for r in self.rows]

    @property
    def cast(self) -> list[str]:
        """``'name: float64 -> float32'`` for each tensor whose dtype changed."""
        return [f"{r.target}: {r.source_dtype} -> {r.dtype}" for r in self.rows if r.source_dtype != r.dtype]

    def summary(self) -> str:
        """A few lines: tensors, bytes, time, layout, and how many were ignored, missing, not checked,
        and notes on what ``forward`` must do."""
        verb = "Would load" if self.dry_run else "Loaded"
        lines = [
            f"{verb} {counted(len(self.rows), 'tensor')} ({self.nbytes:,} bytes) into {self.module} from "
            f"{self.source} in {self.seconds:.2f} s (layout {self.layout})."
        ]
        if self.pairings:
            hows = sorted({_how(p.how) for p in self.pairings})
            lines.append(f"Paired {counted(len(self.pairings), 'layer')} ({', '.join(hows)}).")
        if self.scope:
            lines.append(f"Loaded into '{self.scope}' (as prefix='{self.scope}.' would).")
        lines.append(
            f"Ignored {len(self.ignored)}, missing {len(self.missing)}, not checked {len(self.unchecked)}, "
            f"notes on forward {len(self.notes)}."
        )
        if not self.values_checked:
            lines.append(_VALUES_NOT_CHECKED)
        return "\n".join(lines)

    def table(self) -> str:
        """The whole report: every pairing, every tensor's row, every name ignored or missing."""
        return self._render(short=False)

    def __str__(self) -> str:
        return self._render(short=True)

    def _render(self, short: bool) -> str:
        verb = "Would load" if self.dry_run else "Loaded"
        lines = [
            f"{verb} {counted(len(self.rows), 'tensor')} ({self.nbytes:,} bytes) into {self.module} "
            f"from {self.source} (layout {self.layout})."
        ]
        if self.scope:
            lines.append(
                f"Loaded into '{self.scope}': every source layer pairs by name inside it "
                f"(as prefix='{self.scope}.' would)."
            )
        cut = False
        if self.pairings:
            lines.append("Pairing:")
            pairings = [
                (p.source_layer, p.source_kind, p.module_path or "(root)", p.module_kind, p.how)
                for p in self.pairings
            ]
            shown = pairings[: MAX_ROWS - 4] if short and len(pairings) > MAX_ROWS else pairings
            lines += format_table(("source layer", "kind", "module", "module kind", "how"), shown)
            if len(shown) < len(pairings):
                lines.append(f"... and {counted(len(pairings) - len(shown), 'more pairing')}")
                cut = True
        rows = [_cells(r) for r in self.rows]
        if short and len(rows) > MAX_ROWS:
            rows = _grouped(self.rows)
        shown_rows = rows[: MAX_ROWS - 4] if short and len(rows) > MAX_ROWS else rows
        lines += format_table(("target", "shape", "dtype", "from", "transform", "source"), shown_rows)
        if len(shown_rows) < len(rows):
            rest = sum(_members(r) for r in rows[len(shown_rows) :])
            lines.append(f"... and {counted(rest, 'more tensor')}")
            cut = True
        for title, names in (
            ("Ignored", self.ignored),
            ("Missing (left as they were)", self.missing),
        ):
            if names:
                listed = compact_names(names) if short else names
                if short and len(listed) > MAX_NAMES:
                    listed = [*listed[:MAX_NAMES], f"... ({len(names)} in all)"]
                    cut = True
                lines.append(f"{title}: {', '.join(listed)}")
        if self.unchecked:
            lines.append(f"Not checked (the source does not carry them): {'; '.join(self.unchecked)}")
        if not self.values_checked:
            lines.append(_VALUES_NOT_CHECKED)
        if self.notes:
            lines.append("Notes (what forward must do around the modules; not checked):")
            lines += [f"  - {note}" for note in self.notes]
        if cut:
            lines.append("(report.table() shows every row)")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:  # IPython
        printer.text(str(self))  # type: ignore[attr-defined]


_VALUES_NOT_CHECKED = (
    "Values not checked (check_values=False): no NaN/Inf, range or exact-cast check was made, so a value "
    "its tensor's dtype cannot hold would go in rounded, wrapped or as inf."
)


def _how(how: str) -> str:
    """The pairing's way, without the notes after it (``"by name; Keras applies ..."``)."""
    return how.split(";")[0].strip()


def _cells(r: ReportRow) -> tuple[str, ...]:
    return (
        r.target + "".join(f" (= {a})" for a in r.aliases),
        str(r.shape),
        r.dtype,
        r.source_dtype,
        r.transform,
        r.origin,
    )


_NUMBERS = re.compile(r"\d+")
_COUNT = re.compile(r" \((\d+) tensors\)$")


def _grouped(rows: list[ReportRow]) -> list[tuple[str, ...]]:
    """Rows that differ only in the numbers of their names (and origins) as one row each, the target
    said compactly with its count: ``lstm.weight_ih_l{1..3}{,_reverse} (6 tensors)``."""
    groups: dict[tuple[object, ...], list[ReportRow]] = {}
    for r in rows:
        name, origin = (_NUMBERS.sub("#", text.replace("_reverse", "")) for text in (r.target, r.origin))
        key = (name, r.shape, r.dtype, r.source_dtype, r.transform, origin, r.aliases)
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            out.append(_cells(first))
            continue
        targets = compact_names(r.target for r in members)
        origins = compact_names(r.origin for r in members)
        origin = origins[0] if len(origins) == 1 else f"{members[0].origin} ... {members[-1].origin}"
        out.append(
            (
                f"{', '.join(targets)} ({len(members)} tensors)",
                str(first.shape),
                first.dtype,
                first.source_dtype,
                first.transform,
                origin,
            )
        )
    return out


def _members(cells: tuple[str, ...]) -> int:
    found = _COUNT.search(cells[0])
    return int(found[1]) if found else 1


def format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]


# module -> (the prefix loaded into -> the forward notes of the last load there), for weightport.verify
_FORWARD_NOTES: weakref.WeakKeyDictionary[Any, dict[str, list[str]]] = weakref.WeakKeyDictionary()


def remember_forward_notes(module: Any, prefix: str, notes: list[str]) -> None:
    """Keep the forward notes of a load into ``module`` (at ``prefix``) while the module lives, so a
    verification that fails can say them; a later load at the same prefix replaces them."""
    with contextlib.suppress(TypeError):  # an object without weak references: nothing to remember it by
        _FORWARD_NOTES.setdefault(module, {})[prefix] = list(notes)


def forward_notes_of(module: Any) -> list[str]:
    """The forward notes of the loads into ``module``, in order, each once."""
    try:
        kept = _FORWARD_NOTES.get(module, {})
    except TypeError:
        return []
    return list(dict.fromkeys(note for notes in kept.values() for note in notes))
