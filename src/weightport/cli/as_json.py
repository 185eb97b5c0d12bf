"""``--json`` of ``load`` and ``verify``: the report and every problem, as data (schema 1).

Every text in it is said in the command line's terms (:func:`weightport.cli.terms.speak_cli`), as
the table is; names, shapes and dtypes are the library's own.

>>> from weightport.errors import Problem
>>> problem_json(Problem("fc.weight", "shape (4, 3)", "shape (3, 4)", "pass strict=False"))["fix"]
'pass --lenient'
"""

from __future__ import annotations

from typing import Any

from weightport.cli.terms import speak_cli

__all__ = ["SCHEMA", "problem_json", "problems_json", "report_json", "verify_json", "error_json"]

SCHEMA = 1


def problem_json(problem: Any) -> dict[str, str]:
    """One :class:`weightport.errors.Problem`: where, expected, found, and the fix."""
    return {
        "name": problem.name,
        "expected": speak_cli(problem.expected),
        "found": speak_cli(problem.found),
        "fix": speak_cli(problem.fix),
        "message": speak_cli(str(problem)),
    }


def report_json(report: Any, source: str) -> dict[str, Any]:
    """A :class:`weightport.LoadReport`; ``source`` is the path as the command line was given it."""
    return {
        "module": report.module,
        "source": source,
        "layout": report.layout,
        "dry_run": report.dry_run,
        "bytes": report.nbytes,
        "scope": report.scope or None,
        "tensors": [
            {
                "target": row.target,
                "shape": list(row.shape),
                "dtype": row.dtype,
                "source_dtype": row.source_dtype,
                "transform": row.transform,
                "origin": row.origin,
                "aliases": list(row.aliases),
            }
            for row in report.rows
        ],
        "pairings": [
            {
                "source_layer": p.source_layer,
                "source_kind": p.source_kind,
                "module_path": p.module_path,
                "module_kind": p.module_kind,
                "how": speak_cli(p.how),
            }
            for p in report.pairings
        ],
        "ignored": list(report.ignored),
        "missing": list(report.missing),
        "unchecked": [speak_cli(u) for u in report.unchecked],
        "notes": [speak_cli(n) for n in getattr(report, "notes", [])],
    }


def verify_json(check: Any, against: str) -> dict[str, Any]:
    """A :class:`weightport.VerifyReport`; ``against`` says what the outputs were compared with."""
    return {
        "ok": bool(check),
        "against": against,
        "rtol": check.rtol,
        "atol": check.atol,
        "outputs": [
            {
                "name": o.name,
                "shape": list(o.shape),
                "max_abs_error": _number(o.max_abs),
                "max_rel_error": _number(o.max_rel),
                "ok": o.ok,
                "note": o.note or None,
            }
            for o in check.outputs
        ],
        "notes": [speak_cli(n) for n in getattr(check, "notes", [])],
    }


def _number(value: float) -> float | str:
    """JSON has no inf or NaN: those as the strings ``"inf"`` and ``"nan"``."""
    return value if value == value and abs(value) != float("inf") else str(value)


def error_json(error: BaseException, message: str) -> dict[str, Any]:
    """An error that ended the run: its kind and its message (the first line, in flags)."""
    return {"kind": type(error).__name__, "message": message}


def problems_json(error: BaseException) -> list[dict[str, str]]:
    """Every problem of a refused load (none for other errors), uncapped."""
    return [problem_json(p) for p in getattr(error, "problems", None) or []]
