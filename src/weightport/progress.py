"""A progress bar for big loads: bytes, rate and the current tensor, on stderr.

Shown when asked (``progress=True``), or for loads over :data:`THRESHOLD_BYTES`
when stderr is a terminal; never otherwise. Uses ``tqdm`` when installed.

>>> with progress_callback(None, None, False) as callback:
...     callback is None
True
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from weightport.errors import MissingDependencyError

__all__ = ["THRESHOLD_BYTES", "progress_callback", "wanted"]

THRESHOLD_BYTES = 256 * 1024 * 1024


def wanted(progress: bool | None, nbytes: int) -> bool:
    """Whether to show a bar: as asked, else only for big loads on a terminal."""
    if progress is not None:
        return progress
    return nbytes >= THRESHOLD_BYTES and sys.stderr.isatty()


@contextmanager
def progress_callback(
    plan: Any, source: Any, progress: bool | None
) -> Iterator[Callable[[Any], None] | None]:
    """Yield a per-tensor callback that advances a bar, or None when no bar is wanted."""
    if plan is None or not wanted(progress, plan.nbytes):
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
        total=plan.nbytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        desc=f"loading {source.description}",
        leave=False,
    ) as bar:

        def advance(entry: Any) -> None:
            bar.set_postfix_str(entry.target, refresh=False)
            bar.update(entry.nbytes)

        yield advance
