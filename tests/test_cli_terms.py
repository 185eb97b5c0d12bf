"""The command line's words: every keyword the library's messages name has a flag, or a reason it has none."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import weightport
from weightport.cli.terms import FLAGS, NOT_IN_THE_CLI, speak_cli

SOURCES = Path(weightport.__file__).parent


def _messages() -> list[tuple[str, str]]:
    """Every string the library could put in a message (docstrings left out), with where it is; the
    parts of an f-string joined, with a placeholder for each value."""
    found = []
    for path in sorted(SOURCES.rglob("*.py")):
        if "cli" in path.relative_to(SOURCES).parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        parts_of_fstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "NAME" for v in node.values)
                parts_of_fstrings.update(id(v) for v in node.values)
                found.append((f"{path.relative_to(SOURCES)}:{node.lineno}", text))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and id(node) not in parts_of_fstrings
            ):
                found.append((f"{path.relative_to(SOURCES)}:{node.lineno}", node.value))
    return found


MESSAGES = _messages()
KEYWORDS = {
    name
    for function in (weightport.load, weightport.verify)
    for name in inspect.signature(function).parameters
}


def test_every_pass_keyword_in_the_library_has_a_flag_or_a_reason() -> None:
    said = {m for _, text in MESSAGES for m in re.findall(r"\b(?:pass|drop|key) (\w+)=", text)}
    assert said, "the grep found nothing: the pattern no longer matches the library's phrasing"
    assert said - set(FLAGS) - set(NOT_IN_THE_CLI) == set()


def test_every_load_and_verify_keyword_has_a_flag_or_a_reason() -> None:
    said = {k for k in KEYWORDS for _, text in MESSAGES if re.search(rf"\b{k}=", text)}
    assert said - set(FLAGS) - set(NOT_IN_THE_CLI) == set()
    assert set(FLAGS) <= KEYWORDS  # a flag is for a keyword that exists


def test_no_message_keeps_a_keyword_the_command_line_has_a_flag_for() -> None:
    left = []
    for where, text in MESSAGES:
        said = speak_cli(text)
        for keyword in FLAGS:
            # rtol=/atol= are printed as values ("(rtol=1e-05, atol=1e-06)"), not as fixes
            if keyword not in ("rtol", "atol") and re.search(rf"(?<![\w-]){keyword}=(?![0-9])", said):
                left.append(f"{where}: {said}")
    assert left == []


def test_every_flag_exists_on_the_command_line() -> None:
    from weightport.cli import _parser

    options = {
        option
        for action in _parser()._subparsers._group_actions[0].choices["verify"]._actions  # type: ignore[union-attr]
        for option in action.option_strings
    } | {"--out", "--dry-run", "--full"}
    assert set(FLAGS.values()) <= options | {"--no-progress"}


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("Fix: pass prefix='lstm.' to load into that submodule.", "Fix: pass --prefix lstm. to load into that submodule."),
        ("or pass strict=False to skip names", "or pass --lenient to skip names"),
        ("pass mapping={'alpha': 'module.path', ...} to pair", "pass --map alpha=module.path ... to pair"),
        ("pass mapping={'a': 'rnn[1]', 'b': 'head'}", "pass --map 'a=rnn[1]' --map b=head"),
        ("pass layout='flax' for a Flax/JAX pytree", "pass --layout flax for a Flax/JAX pytree"),
        ("Fix: drop layout= (weightport reads it", "Fix: drop --layout (weightport reads it"),
        ("pass example_inputs= (inputs for one forward pass", "pass --example-input IO.npz (inputs for one forward pass"),
        ("by recorded order (Keras) and call order (example_inputs)", "by recorded order (Keras) and call order (--example-input)"),
        ("... and 75 more (see the error's .problems)", "... and 75 more (--problems all lists them)"),
        ("pass allow_nonfinite=True if they belong", "pass --allow-nonfinite if they belong"),
        ("in allow_nonfinite, a name of a tensor", "in --allow-nonfinite, a name of a tensor"),
        ("(as prefix='encoder.' would)", "(as --prefix encoder. would)"),
        ("or pass the outputs as expected=.", "or pass the outputs as output_0, output_1, ... in IO.npz."),
        ("(report.table() shows every row)", "(--full shows every row)"),
        ("layout=1: X and Y batch-first", "layout=1: X and Y batch-first"),
        ("verify against expected outputs: OK (rtol=1e-05, atol=1e-06)", "verify against expected outputs: OK (rtol=1e-05, atol=1e-06)"),
    ],
)  # fmt: skip
def test_speak_cli(library: str, cli: str) -> None:
    assert speak_cli(library) == cli
