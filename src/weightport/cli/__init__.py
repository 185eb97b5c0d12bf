"""The ``weightport`` command line: a thin layer over the public API.

Verbs: ``demo``, ``inspect FILE``, ``load FACTORY SOURCE``, ``verify FACTORY SOURCE IO.npz``
(without ``output_N`` in IO.npz, compared with an ``.onnx`` SOURCE run by onnxruntime, or else
with the NumPy reference). FACTORY is ``module:function`` or ``path/to/file.py:function``.
Global flags (``--debug``, ``--problems``, ``--json``) go anywhere on the line.
Exit codes: 0 ok, 1 verification failed, 2 usage or input error (on stderr, without Python's
internals: ``--debug`` shows the traceback). Warnings are one ``weightport: warning:`` line each;
every message is said in flags (:mod:`weightport.cli.terms`), never in the library's keywords.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from weightport.cli.as_json import SCHEMA, error_json, problems_json, report_json, verify_json
from weightport.cli.factories import UsageError, load_factory, summary
from weightport.cli.parts import source_part
from weightport.cli.terms import speak_cli

__all__ = ["main", "load_factory", "UsageError"]

DEFAULT_PROBLEMS = 10


def _paint(text: str, colour: str, stream: TextIO) -> str:
    """``text`` in colour when ``stream`` is a terminal and NO_COLOR is unset."""
    if not stream.isatty() or os.environ.get("NO_COLOR"):
        return text
    code = {"red": "31", "green": "32", "yellow": "33"}[colour]
    return f"\033[{code}m{text}\033[0m"


class _Warnings:
    """Warnings as one ``weightport: warning: ...`` line each on stderr, each text once; kept for
    ``--json`` and for ``verify`` to repeat beside a failure."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.texts: list[str] = []
        self.kinds: list[str] = []  # each text's category
        self.categories: set[str] = set()

    def show(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = speak_cli(" ".join(str(message).split()))
        if not category.__module__.startswith("weightport"):  # a framework's or the factory's own
            text = f"{category.__name__}: {text}"
        self.categories.add(category.__name__)
        if text in self.texts:
            return
        self.texts.append(text)
        self.kinds.append(category.__name__)
        where = f" ({filename}:{lineno})" if self.debug else ""
        print(f"{_paint('weightport: warning:', 'yellow', sys.stderr)} {text}{where}", file=sys.stderr)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        with warnings.catch_warnings():
            # each warning once per place, as Python shows them by default, whatever filters a caller set
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            warnings.showwarning = self.show
            yield


def _mapping(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep:
            raise UsageError(f"--map '{pair}' must look like SOURCE_LAYER=module.path")
        out[src] = dst
    return out


def _nonfinite(given: Sequence[str] | None) -> bool | frozenset[str]:
    """``--allow-nonfinite`` alone: every tensor; ``--allow-nonfinite=a,b``: those tensors only."""
    if not given:
        return False
    if any(value == "" for value in given):
        return True
    return frozenset(name for value in given for name in value.split(",") if name)


def _cmd_demo(args: argparse.Namespace, shown: _Warnings) -> int:
    if args.json:
        raise UsageError("demo has no --json output. Fix: drop --json.")
    from weightport.demo import run_demo

    return run_demo()


def _cmd_inspect(args: argparse.Namespace, shown: _Warnings) -> int:
    from weightport.inspect import described, format_description

    info, description = described(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_description(info, description))
    return 0


def _load(
    args: argparse.Namespace, dry_run: bool, inputs: tuple[Any, ...] | None = None, compared: bool = False
) -> tuple[Any, Any]:
    """The factory's model, loaded; ``inputs`` (or ``--example-input``) show pairing its call order.
    ``compared``: the caller compares the outputs itself (verify), so the load does not run an ONNX graph."""
    import weightport

    model = load_factory(args.factory)
    if args.example_input:
        inputs = tuple(_read_io(args.example_input)[0])
    source, declared = source_part(args.source, args.skip_layer, args.source_prefix)
    report = weightport.load(
        model,
        source,
        layout=args.layout or declared,
        mapping=_mapping(args.map),
        dry_run=dry_run,
        strict=not args.lenient,
        prefix=args.prefix,
        allow_nonfinite=_nonfinite(args.allow_nonfinite),
        example_inputs=tuple(inputs) if inputs else None,
        progress=args.progress,
        check_outputs=not (compared or args.no_check_outputs),
    )
    return model, report


def _report_text(report: Any, shown: _Warnings, full: bool) -> str:
    """The report's table in flags; what a warning already said (settings not checked, notes on what
    forward must do) is not said again."""
    from dataclasses import fields, replace

    changes: dict[str, Any] = {"pairings": [replace(p, how=speak_cli(p.how)) for p in report.pairings]}
    for field, warning in (("unchecked", "UncheckedConfigWarning"), ("notes", "ForwardNoteWarning")):
        if warning in shown.categories and field in {f.name for f in fields(report)}:
            changes[field] = []
    said = replace(report, **changes)
    table = getattr(said, "table", None)
    return speak_cli(table() if full and callable(table) else str(said))


def _read_io(path: str) -> tuple[list[Any], list[Any]]:
    """The ``input_N`` and ``output_N`` arrays of an ``.npz``, in order; at least one input."""
    from weightport.sources import open_source

    where = f"'{os.path.basename(path)}'"
    with open_source(path) as io:
        input_names, output_names = _io_names(where, list(io.infos))
        inputs = [io.read(n) for n in input_names]
        expected = [io.read(n) for n in output_names]
    if not inputs:
        raise UsageError(
            f"{where} has no arrays named input_N. Fix: save the inputs as input_0, input_1, ... and "
            "the expected outputs as output_0, output_1, ..."
        )
    return inputs, expected


def _check_out(out: str) -> None:
    """Refuse an ``--out`` that cannot be written before a load that may be long, not after it."""
    from weightport.sources import written_suffixes

    path = Path(out)
    suffixes = written_suffixes()
    if path.suffix not in suffixes:
        said = "has no suffix to name a format" if not path.suffix else f"ends in '{path.suffix}'"
        stem = path.with_suffix("") if path.suffix else path
        raise UsageError(
            f"--out '{out}' {said}; weightport writes {' or '.join(suffixes)} files. "
            f"Fix: --out {stem}{suffixes[-1]} (or {stem}{suffixes[0]})."
        )
    if not path.parent.is_dir():
        raise UsageError(f"--out '{out}': there is no folder '{path.parent}'. Fix: create it first.")


def _cmd_load(args: argparse.Namespace, shown: _Warnings) -> int:
    import weightport

    if args.out:
        _check_out(args.out)
    model, report = _load(args, args.dry_run)
    wrote = None
    if args.out and not args.dry_run:
        wrote = str(weightport.save(model, args.out))
    if args.dry_run:
        note = f"dry run: nothing was loaded or written{f' ({args.out} not written)' if args.out else ''}."
    elif wrote:
        note = f"wrote {wrote}"
    else:
        note = (
            "nothing was written: without --out the model is filled in memory only and dropped on exit. "
            "Fix: --out FILE.safetensors (or FILE.npz) saves its weights."
        )
    if args.json:
        _print_json(args, shown, ok=True, report=report_json(report, args.source), wrote=wrote, note=note)
    else:
        print(_report_text(report, shown, args.full))
        print(note)
    return 0


_IO_NAME = re.compile(r"(input|output)_(0|[1-9][0-9]*)")


def _io_names(where: str, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ``input_N`` and ``output_N`` names in ``names``, each in numeric order.

    >>> _io_names("'io.npz'", ["output_0", "input_10", "input_2"] + [f"input_{i}" for i in (0, 1, *range(3, 10))])[0][:4]
    ['input_0', 'input_1', 'input_2', 'input_3']
    """
    numbered: dict[str, dict[int, str]] = {"input": {}, "output": {}}
    for name in names:
        match = _IO_NAME.fullmatch(name)
        if match is None:
            raise UsageError(
                f"{where}: array '{name}' is not named input_N or output_N. Fix: save the inputs as "
                "input_0, input_1, ... and the expected outputs as output_0, output_1, ..."
            )
        numbered[match[1]][int(match[2])] = name
    for kind, found in numbered.items():
        gaps = [f"{kind}_{i}" for i in range(len(found)) if i not in found]
        if gaps:
            raise UsageError(
                f"{where}: has {', '.join(found[i] for i in sorted(found))} but no {gaps[0]}. "
                f"Fix: number the {kind}s {kind}_0, {kind}_1, ... with no gaps."
            )
    return [numbered["input"][i] for i in sorted(numbered["input"])], [
        numbered["output"][i] for i in sorted(numbered["output"])
    ]


def _cmd_verify(args: argparse.Namespace, shown: _Warnings) -> int:
    import weightport
    from weightport.errors import WeightportError

    where = f"'{os.path.basename(args.io)}'"
    inputs, expected = _read_io(args.io)
    input_names = [f"input_{i}" for i in range(len(inputs))]
    # the inputs also show pairing the call order; verify's own comparison is the one to show
    model, report = _load(args, False, tuple(inputs), compared=True)
    # an ONNX file can be run: with no output_N its own outputs are the expected ones
    against = args.source if not expected and args.source.lower().endswith(".onnx") else None
    try:
        check = weightport.verify(
            model,
            tuple(inputs),
            tuple(expected) if expected else None,
            against=against,
            rtol=args.rtol,
            atol=args.atol,
        )
    except WeightportError:
        raise
    except Exception as e:
        given = ", ".join(f"{n} of shape {a.shape}" for n, a in zip(input_names, inputs))
        raise UsageError(
            f"the module's forward on {given} raised {summary(e)}. Fix: save the inputs in the "
            "shapes and order the module's forward takes; --debug shows the traceback."
        ) from e
    compared = "output_N of " + args.io if expected else ("onnxruntime" if against else "the NumPy reference")
    if args.json:
        _print_json(
            args,
            shown,
            ok=bool(check),
            report=report_json(report, args.source),
            verify=verify_json(check, compared),
        )
        return 0 if check else 1
    lines = speak_cli(str(check)).splitlines()
    if not expected:
        reference = "onnxruntime's" if against else "weightport.reference.forward's"
        lines[0] += f"; {where} has no output_N, so the expected outputs are {reference}"
    lines[0] = _paint(lines[0], "green" if check else "red", sys.stdout)
    if not check:  # what the load warned of may be why (an activation or direction the file did not record)
        said = bool(getattr(check, "notes", None))  # the report repeats the notes on forward itself
        lines += [
            f"  the load warned: {text}"
            for text, kind in zip(shown.texts, shown.kinds)
            if not (said and kind == "ForwardNoteWarning")
        ]
    print("\n".join(lines))
    return 0 if check else 1


def _print_json(args: argparse.Namespace, shown: _Warnings, *, ok: bool, **parts: Any) -> None:
    """The one JSON document of a ``--json`` run, on stdout."""
    document = {"schema": SCHEMA, "command": args.verb, "ok": ok, **parts, "warnings": list(shown.texts)}
    document.setdefault("problems", [])
    print(json.dumps(document, indent=2))


def _problem_count(text: str) -> int | None:
    """``--problems``: a count, or ``all`` (None)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a count: give a number (0 or more) or all")
    return int(text)


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags every verb takes, anywhere on the line (a verb's copy leaves the top's value alone)."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show Python's traceback of an error"
    )
    parser.add_argument(
        "--problems",
        type=_problem_count,
        metavar="N|all",
        default=default(DEFAULT_PROBLEMS),
        help=f"how many of a refused load's problems to list (default: {DEFAULT_PROBLEMS}; all: every one)",
    )
    parser.add_argument("--version", action="version", version=f"weightport {_version()}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightport",
        description="Put NumPy-world weights into PyTorch modules.",
        epilog="FACTORY is module:function (imported from the current directory) or path/to/file.py:function; "
        "it returns the PyTorch model (or is one).",
    )
    _global_flags(parser, top=True)
    parser.add_argument("--json", action="store_true", help="machine-readable output (inspect, load, verify)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{demo,inspect,load,verify}")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        _global_flags(sub, top=False)
        return sub

    def json_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=what)

    verb("demo", "the nn.RNN-from-NumPy case end to end").set_defaults(run=_cmd_demo)

    inspect = verb("inspect", "list the tensors (and layers) in a weights file")
    inspect.add_argument("file")
    json_flag(inspect, "the description as JSON (schema 1: tensors, constants, layers, ignored)")
    inspect.set_defaults(run=_cmd_inspect)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("factory", help="module:function or path/to/file.py:function that returns the model")
        p.add_argument("source", help="weights file or folder")
        p.add_argument("--layout", choices=["torch", "keras", "flax", "onnx"], help="default: from the file")
        p.add_argument(
            "--map",
            action="append",
            metavar="SOURCE=MODULE_PATH",
            help="pair a source layer (or, for PyTorch names, a tensor) with a module path; repeatable",
        )
        p.add_argument("--prefix", metavar="PATH.", help="load into the submodule at this path (encoder.)")
        p.add_argument(
            "--source-prefix",
            metavar="NAME.",
            help="load only the source's tensors whose names start with this, without it (bert.); read into memory",
        )
        p.add_argument(
            "--skip-layer",
            action="append",
            metavar="LAYER",
            help="leave out a source layer the model should not take (repeatable; weightport inspect lists the "
            "layers); the rest is read into memory",
        )
        p.add_argument(
            "--lenient", action="store_true", help="skip names on either side instead of refusing the load"
        )
        p.add_argument(
            "--allow-nonfinite",
            action="append",
            metavar="NAME,...",
            help="accept NaN/Inf values: alone, in every tensor; as --allow-nonfinite=NAME,... in those only",
        )
        p.add_argument(
            "--example-input",
            "--example-inputs",
            dest="example_input",
            metavar="IO.npz",
            help="inputs (input_0, input_1, ...) for one forward pass that shows the order the model calls "
            "its modules in, to pair layers of one kind and shape; verify uses its IO.npz when this is not given",
        )
        p.add_argument(
            "--no-check-outputs",
            action="store_true",
            help="from an .onnx SOURCE, do not run its graph and the model on the same inputs before writing "
            "(by default a model whose outputs differ is refused)",
        )
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="a progress bar on stderr over checking and writing (default: for loads over 256 MiB on a terminal)",
        )
        json_flag(p, "the report and every problem as JSON on stdout (schema 1)")

    load = verb(
        "load", "load a weights file into a model and report what went where (--out saves the result)"
    )
    model_args(load)
    load.add_argument("--out", help="write the filled model's weights (.safetensors or .npz)")
    load.add_argument(
        "--dry-run", action="store_true", help="check everything and show the plan; write nothing"
    )
    load.add_argument(
        "--full",
        action="store_true",
        help="the whole report: every pairing and tensor (default: big models grouped)",
    )
    load.set_defaults(run=_cmd_load)

    verify = verb("verify", "load, run on IO.npz inputs, compare with its outputs")
    model_args(verify)
    verify.add_argument(
        "io",
        help=".npz with input_0.. and output_0.. (without outputs: an .onnx SOURCE's, run by onnxruntime)",
    )
    verify.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="relative tolerance: an output passes where |actual - expected| <= atol + rtol * |expected| "
        "(default: %(default)g)",
    )
    verify.add_argument(
        "--atol", type=float, default=1e-6, help="absolute tolerance, as above (default: %(default)g)"
    )
    verify.set_defaults(run=_cmd_verify)
    return parser


def _argv(argv: Sequence[str]) -> list[str]:
    """``--allow-nonfinite`` alone as ``--allow-nonfinite=`` (so it never takes the next word)."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word == "--":
            return out + list(argv[i:])
        out.append("--allow-nonfinite=" if word == "--allow-nonfinite" else word)
    return out


def _error_lines(error: BaseException, limit: int | None) -> list[str]:
    """An error's message in flags: a refused load's first ``limit`` problems, then how many more."""
    problems = getattr(error, "problems", None)
    text = str(error).strip()
    listing = getattr(error, "format", None)
    if callable(listing) and callable(getattr(error, "lines", None)):
        # a refused load's own listing, its causes grouped, cut at the command line's limit
        lines = [line.strip() for line in listing(limit, more="--problems all lists them").splitlines()]
    elif isinstance(problems, list) and problems:
        lines = [text.splitlines()[0]]
        shown = problems if limit is None else problems[:limit]
        lines += [f"- {problem}" for problem in shown]
        if len(shown) < len(problems):
            lines.append(f"... and {len(problems) - len(shown)} more (--problems all lists them)")
    else:
        lines = [line.strip() for line in text.splitlines()] or [type(error).__name__]
    return [speak_cli(line) for line in lines]


def _print_traceback(error: BaseException) -> None:
    """The traceback of ``--debug``, without the message that follows it anyway (problems once)."""
    chain = traceback.TracebackException.from_exception(error)
    lines = list(chain.format())
    own = len(list(chain.format_exception_only()))
    kind = f"{type(error).__module__}.{type(error).__qualname__}"
    sys.stderr.write("".join(lines[: len(lines) - own]) + f"{kind}: (its message follows)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightport`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(_argv(sys.argv[1:] if argv is None else argv))
    shown = _Warnings(args.debug)
    try:
        code = _run(args, shown)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:  # `weightport demo | head -1`: the reader has gone, so stop quietly
        with contextlib.suppress(OSError, ValueError):  # Python's flush at exit then finds no pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a command killed by SIGPIPE


def _run(args: argparse.Namespace, shown: _Warnings) -> int:
    """The verb's exit code; an error it raises as lines on stderr (and JSON with ``--json``), code 2."""
    from weightport.errors import WeightportError

    try:
        with shown.shown():
            return int(args.run(args, shown))
    except BrokenPipeError:
        raise
    except (UsageError, WeightportError, OSError) as e:
        if args.debug:
            _print_traceback(e)
        lines = _error_lines(e, args.problems)
        print(f"{_paint('weightport: error:', 'red', sys.stderr)} {lines[0]}", file=sys.stderr)
        for line in lines[1:]:  # a refused load lists its problems, one per line
            print(f"  {line}", file=sys.stderr)
        if args.json:
            _print_json(args, shown, ok=False, error=error_json(e, lines[0]), problems=problems_json(e))
        return 2
    except Exception as e:  # not one of ours: still one line, the traceback on request
        if args.debug:
            _print_traceback(e)
        line = (
            f"{summary(e)} (an unexpected error: weightport or a package it uses failed). Fix: --debug shows "
            "the traceback; please report it with the command line."
        )
        print(f"{_paint('weightport: error:', 'red', sys.stderr)} {line}", file=sys.stderr)
        if args.json:
            _print_json(args, shown, ok=False, error=error_json(e, line), problems=[])
        return 2


def _version() -> str:
    """The installed package's version, read without importing the library (so without torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightport")
    except PackageNotFoundError:
        return "unknown"
