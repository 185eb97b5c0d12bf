"""What a load did (or, with ``dry_run=True``, would do), as data and as a table.

>>> import numpy as np, torch, weightport
>>> report = weightport.load(torch.nn.Linear(2, 1), {"weight": np.ones((1, 2)), "bias": np.zeros(1)})
>>> report.written
['weight', 'bias']
>>> print(report)  # doctest: +NORMALIZE_WHITESPACE
Loaded 2 tensors (12 bytes) into Linear from the given mapping (layout torch).
target  shape   dtype    from    transform  source
weight  (1, 2)  float32  float64 as is      the given mapping 'weight'
bias    (1,)    float32  float64 as is      the given mapping 'bias'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from weightport.layouts.base import Pairing

__all__ = ["ReportRow", "LoadReport", "format_table"]


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

    Attributes:
        rows: every tensor written (or to be written, on a dry run), in order
            (made from ``make_rows`` when first read).
        ignored: source names not used (``strict=False``), stray files.
        missing: module tensors left as they were (``strict=False``).
        pairings: how source layers were paired with modules (framework layouts).
        scope: the submodule loaded into when weightport found it by name (every source
            layer pairs by name inside it: a wrapped model), as ``prefix=`` would.
        unchecked: settings the source did not carry, so they were not checked.
        dry_run: True when nothing was written.
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

    def __str__(self) -> str:
        verb = "Would load" if self.dry_run else "Loaded"
        count = len(self.rows)
        lines = [
            f"{verb} {count} tensor{'s' if count != 1 else ''} ({self.nbytes:,} bytes) into {self.module} "
            f"from {self.source} (layout {self.layout})."
        ]
        if self.scope:
            lines.append(
                f"Loaded into '{self.scope}': every source layer pairs by name inside it "
                f"(as prefix='{self.scope}.' would)."
            )
        if self.pairings:
            lines.append("Pairing:")
            lines += format_table(
                ("source layer", "kind", "module", "module kind", "how"),
                [
                    (p.source_layer, p.source_kind, p.module_path or "(root)", p.module_kind, p.how)
                    for p in self.pairings
                ],
            )
        lines += format_table(
            ("target", "shape", "dtype", "from", "transform", "source"),
            [
                (
                    r.target + "".join(f" (= {a})" for a in r.aliases),
                    str(r.shape),
                    r.dtype,
                    r.source_dtype,
                    r.transform,
                    r.origin,
                )
                for r in self.rows
            ],
        )
        for title, names in (
            ("Ignored", self.ignored),
            ("Missing (left as they were)", self.missing),
            ("Not checked (the source does not carry them)", self.unchecked),
        ):
            if names:
                lines.append(f"{title}: {', '.join(names)}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:  # IPython
        printer.text(str(self))  # type: ignore[attr-defined]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
