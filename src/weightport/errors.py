"""One exception family for everything weightport raises.

Every class derives from :class:`WeightportError` and also from the builtin that
fits, so ``except ValueError`` keeps working. Messages say where (tensor, file,
layer), what was expected, what was found, and what to do.

>>> issubclass(LoadError, ValueError) and issubclass(LoadError, WeightportError)
True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "WeightportError",
    "Problem",
    "LoadError",
    "SourceError",
    "LayoutError",
    "UnsupportedConfigError",
    "MissingDependencyError",
    "VerifyError",
    "UncheckedConfigWarning",
]

MAX_LISTED_PROBLEMS = 25


class WeightportError(Exception):
    """Base class of every error weightport raises."""


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a load: where, what was expected, what was found, the fix.

    >>> str(Problem("fc.weight", "shape (4, 3)", "shape (3, 4)", "transpose it"))
    "'fc.weight': expected shape (4, 3), found shape (3, 4). Fix: transpose it."
    """

    name: str
    expected: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"'{self.name}': expected {self.expected}, found {self.found}. Fix: {self.fix}."


class LoadError(WeightportError, ValueError):
    """A load was refused; nothing was written. ``.problems`` lists every reason."""

    def __init__(self, problems: list[Problem], *, target: str = "the module") -> None:
        self.problems = sorted(problems)
        self.target = target
        super().__init__(self._message())

    def _message(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"weightport refused to load into {self.target}: {count} {noun}; nothing was written."]
        lines += [f"  - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if count > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {count - MAX_LISTED_PROBLEMS} more (see the error's .problems)")
        return "\n".join(lines)


class SourceError(WeightportError, ValueError):
    """A file or mapping could not be read: missing, corrupt, truncated or unsafe."""


class LayoutError(WeightportError, ValueError):
    """Source layers could not be paired with the module's, or a layout is unknown."""


class UnsupportedConfigError(LayoutError):
    """The source uses a configuration that the PyTorch module cannot express."""


class MissingDependencyError(WeightportError, ImportError):
    """An optional package is needed for this file or framework."""


class VerifyError(WeightportError, AssertionError):
    """Outputs differ from what was expected by more than the tolerance."""


class UncheckedConfigWarning(UserWarning):
    """The source does not record some settings (a weights-only file), so they could not be checked."""
