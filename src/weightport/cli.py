"""The ``weightport`` command line: a thin layer over the public API.

Verbs: ``demo``, ``inspect FILE``, ``load FACTORY SOURCE``, ``verify FACTORY SOURCE IO.npz``
(without ``output_N`` in IO.npz, compared with an ``.onnx`` SOURCE run by onnxruntime, or else
with the NumPy reference).
Exit codes: 0 ok, 1 verification failed, 2 usage or input error (one line on
stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["main", "load_factory"]


def _paint(text: str, colour: str, stream: TextIO) -> str:
    """``text`` in red or green when ``stream`` is a terminal and NO_COLOR is unset."""
    if not stream.isatty() or os.environ.get("NO_COLOR"):
        return text
    code = {"red": "31", "green": "32"}[colour]
    return f"\033[{code}m{text}\033[0m"


class UsageError(Exception):
    """A bad command line or argument, reported as one line with exit code 2."""


def load_factory(spec: str) -> Any:
    """Call ``package.module:function`` (no arguments) and return the model it builds."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"factory '{spec}' must look like package.module:function")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"factory '{spec}': cannot import '{module_name}' ({e})") from e
    except Exception as e:
        raise UsageError(
            f"factory '{spec}': importing '{module_name}' raised {_summary(e)}. "
            "Fix: make the module import cleanly; --debug shows the traceback."
        ) from e
    finally:
        sys.path.remove(".")
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"factory '{spec}': '{module_name}' has no '{attr}'")
        target = getattr(target, part)
    if callable(target) and not hasattr(target, "state_dict"):
        try:
            model = target()
        except Exception as e:
            raise UsageError(
                f"the factory '{spec}' raised {_summary(e)}. Fix: make '{attr}()' build the model "
                "with no arguments; --debug shows the traceback."
            ) from e
    else:
        model = target
    if not hasattr(model, "state_dict"):
        raise UsageError(f"factory '{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _summary(error: BaseException) -> str:
    """``RuntimeError: first line of the message``, for one-line reports of foreign errors."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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


def _cmd_demo(args: argparse.Namespace) -> int:
    from weightport.demo import run_demo

    return run_demo()


def _cmd_inspect(args: argparse.Namespace) -> int:
    from weightport.inspect import describe_source

    info = describe_source(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from weightport.inspect import format_description

    print(format_description(info))
    return 0


def _load(args: argparse.Namespace, dry_run: bool, inputs: tuple[Any, ...] | None = None) -> tuple[Any, Any]:
    """The factory's model, loaded; ``inputs`` (or ``--example-inputs``) show pairing its call order."""
    import weightport

    model = load_factory(args.factory)
    if args.example_inputs:
        inputs = tuple(_read_io(args.example_inputs)[0])
    report = weightport.load(
        model,
        args.source,
        layout=args.layout,
        mapping=_mapping(args.map),
        dry_run=dry_run,
        strict=not args.lenient,
        example_inputs=tuple(inputs) if inputs else None,
    )
    return model, report


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


def _cmd_load(args: argparse.Namespace) -> int:
    import weightport
    from weightport.export import save_path

    if args.out:
        save_path(args.out)  # refused before a load that may be long, not after it
    model, report = _load(args, args.dry_run)
    print(report)
    if args.out and args.dry_run:
        print(f"dry run: {args.out} not written")
    elif args.out:
        path = weightport.save(model, args.out)
        print(f"wrote {path}")
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


def _cmd_verify(args: argparse.Namespace) -> int:
    import weightport
    from weightport.errors import WeightportError

    where = f"'{os.path.basename(args.io)}'"
    inputs, expected = _read_io(args.io)
    input_names = [f"input_{i}" for i in range(len(inputs))]
    model, _ = _load(args, False, tuple(inputs))  # the inputs also show pairing the model's call order
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
            f"the module's forward on {given} raised {_summary(e)}. Fix: save the inputs in the "
            "shapes and order the module's forward takes; --debug shows the traceback."
        ) from e
    lines = str(check).splitlines()
    if not expected:
        reference = "onnxruntime's" if against else "weightport.reference.forward's"
        lines[0] += f"; {where} has no output_N, so the expected outputs are {reference}"
    lines[0] = _paint(lines[0], "green" if check else "red", sys.stdout)
    print("\n".join(lines))
    return 0 if check else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightport", description="Put NumPy-world weights into PyTorch modules."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"weightport {_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("demo", help="the nn.RNN-from-NumPy case end to end").set_defaults(run=_cmd_demo)

    inspect = verbs.add_parser("inspect", help="list the tensors (and layers) in a weights file")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_cmd_inspect)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("factory", help="package.module:function that returns the PyTorch model")
        p.add_argument("source", help="weights file or folder")
        p.add_argument("--layout", choices=["torch", "keras", "flax", "onnx"], help="default: from the file")
        p.add_argument(
            "--map", action="append", metavar="SRC=DST", help="pair a source layer with a module path"
        )
        p.add_argument("--lenient", action="store_true", help="strict=False: skip names on either side")
        p.add_argument(
            "--example-inputs",
            metavar="IO.npz",
            help="inputs (input_0, input_1, ...) for one forward pass that shows the order the model calls "
            "its modules in (example_inputs=); verify uses its IO.npz inputs when this is not given",
        )

    load = verbs.add_parser("load", help="load a weights file into a model and save the result")
    model_args(load)
    load.add_argument("--out", help="write the filled model's weights (.safetensors or .npz)")
    load.add_argument("--dry-run", action="store_true", help="check and show the plan, write nothing")
    load.set_defaults(run=_cmd_load)

    verify = verbs.add_parser("verify", help="load, run on IO.npz inputs, compare with its outputs")
    model_args(verify)
    verify.add_argument(
        "io",
        help=".npz with input_0.. and output_0.. (without outputs: an .onnx SOURCE's, run by onnxruntime)",
    )
    verify.add_argument("--rtol", type=float, default=1e-5)
    verify.add_argument("--atol", type=float, default=1e-6)
    verify.set_defaults(run=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightport`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    from weightport.errors import WeightportError

    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:  # `weightport demo | head -1`: the reader has gone, so stop quietly
        with contextlib.suppress(OSError, ValueError):  # Python's flush at exit then finds no pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a command killed by SIGPIPE
    except (UsageError, WeightportError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{_paint('weightport: error:', 'red', sys.stderr)} {lines[0]}", file=sys.stderr)
        for line in lines[1:]:  # a LoadError lists its problems, one per line
            print(f"  {line.strip()}", file=sys.stderr)
        return 2


def _version() -> str:
    """The installed package's version, read without importing the library (so without torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightport")
    except PackageNotFoundError:
        return "unknown"
