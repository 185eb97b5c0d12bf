"""A progress bar for big loads: bytes, rate and the current tensor, on stderr.

A load shows two bars in turn, one while it checks the values (dry runs too) and one while it writes
them, each counting the bytes the report counts (each tensor once, in the module's dtype).
Shown when asked (``progress=True``), or for loads over :data:`THRESHOLD_BYTES` when stderr is a
terminal; never otherwise. Uses ``tqdm`` when installed.

>>> with progress_callback(None, None, False) as callback:
...     callback is None
True
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from weightport.errors import MissingDependencyError

__all__ = ["THRESHOLD_BYTES", "progress_callback", "wanted", "unique_nbytes"]

THRESHOLD_BYTES = 256 * 1024 * 1024

# exact bytes with thousands separators, as a report prints them
_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n:,}/{total:,} bytes [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


def wanted(progress: bool | None, nbytes: int) -> bool:
    """Whether to show a bar: as asked, else only for big loads on a terminal."""
    if progress is not None:
        return progress
    return nbytes >= THRESHOLD_BYTES and sys.stderr.isatty()


def unique_nbytes(entries: Any) -> int:
    """The bytes of ``entries``' tensors, a tied tensor once: what the report counts."""
    seen: set[Hashable] = set()
    total = 0
    for entry in entries:
        if entry.key not in seen:
            seen.add(entry.key)
            total += entry.nbytes
    return total


@contextmanager
def progress_callback(
    plan: Any, source: Any, progress: bool | None, phase: str = "writing"
) -> Iterator[Callable[[Any], None] | None]:
    """Yield a per-tensor callback that advances a bar, or None when no bar is wanted.

    ``phase`` says what the load is doing (``"checking"``, ``"writing"``); the callback counts each
    tensor once, however often it is called for it (a tied tensor's other names).
    """
    if plan is None:
        yield None
        return
    total = unique_nbytes(plan.entries)
    if not wanted(progress, total):
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        if progress:
            raise MissingDependencyError(
                "progress=True needs tqdm: pip install 'weightport[progress]'"
            ) from None
        yield None
        return
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=_Unfailing(sys.stderr),
        desc=f"loading {source.description}: {phase}",
        bar_format=_FORMAT,
        leave=False,
    ) as bar:
        seen: set[Hashable] = set()

        def advance(entry: Any) -> None:
            if entry.key in seen:
                return
            seen.add(entry.key)
            bar.set_postfix_str(entry.target, refresh=False)
            bar.update(entry.nbytes)

        yield advance


class _Unfailing:
    """The bar's stream: a write that fails (stderr a closed pipe) stops the bar's output, never the load."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.failed = stream, False

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # ValueError: a closed file
                self.failed = True
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.failed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
