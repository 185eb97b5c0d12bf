"""The options of one load, decided once in :func:`weightport.load` and passed down as one value.

>>> options = LoadOptions(strict=False)
>>> options.strict, options.check_values, options.rollback
(False, True, True)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from weightport.call_order import ExampleInputs

__all__ = ["LoadOptions", "NonFinite"]

# accept NaN/Inf: everywhere (True), nowhere (False), or in the tensors of these target names
NonFinite = bool | Collection[str]


@dataclass(frozen=True)
class LoadOptions:
    """What :func:`weightport.load` was asked to do (its keyword arguments; see its docstring)."""

    strict: bool = True
    prefix: str | None = None
    allow_nonfinite: NonFinite = False
    dry_run: bool = False
    layout: str | None = None
    mapping: Mapping[str, str] | None = None
    check_values: bool = True
    rollback: bool = True
    progress: bool | None = None
    example_inputs: ExampleInputs | None = None
    check_outputs: bool = True

    def __post_init__(self) -> None:
        mapping = self.mapping
        wrong = (
            [f"{mapping!r}"]
            if mapping is not None and not isinstance(mapping, Mapping)
            else [
                f"{k!r}: {v!r}"
                for k, v in (mapping or {}).items()
                if not isinstance(k, str) or not isinstance(v, str)
            ]
        )
        if wrong:
            from weightport.errors import LoadError, Problem

            raise LoadError(
                [
                    Problem(
                        "mapping",
                        "a dict of one source layer (or tensor) name -> one module path, each a str",
                        ", ".join(wrong[:4]),
                        "give each source layer one module path, e.g. mapping={'dense': 'fc'}; one source layer "
                        "cannot fill two modules (load its arrays into the second by name)",
                    )
                ]
            )
        allowed = self.allow_nonfinite
        if isinstance(allowed, str):  # one name, not its letters
            object.__setattr__(self, "allow_nonfinite", frozenset([allowed]))
        elif not isinstance(allowed, (bool, Collection)) or isinstance(allowed, Mapping):
            from weightport.errors import LoadError, Problem

            raise LoadError(
                [
                    Problem(
                        "allow_nonfinite",
                        "True, False, or a set of target names",
                        repr(allowed),
                        "pass allow_nonfinite=True to accept NaN/Inf everywhere, or a set of names",
                    )
                ]
            )
