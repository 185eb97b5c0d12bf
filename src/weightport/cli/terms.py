"""The command line's words for the library's: keyword arguments said as the flags that set them.

The library's messages name its keywords ("pass prefix='lstm.'", "pass strict=False"); a command-line
user has flags instead. :data:`FLAGS` is the one table from keyword to flag, and :func:`speak_cli`
rewrites any message with it, so every fix the command line prints is one its user can type.

>>> speak_cli("Fix: pass prefix='lstm.' to load into that submodule.")
'Fix: pass --prefix lstm. to load into that submodule.'
>>> speak_cli("pass mapping={'dense_1': 'head'} to pair them yourself, or strict=False")
'pass --map dense_1=head to pair them yourself, or --lenient'
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

__all__ = ["FLAGS", "NOT_IN_THE_CLI", "speak_cli"]

# keyword of weightport.load / weightport.verify -> the flag that sets it
FLAGS: dict[str, str] = {
    "strict": "--lenient",  # strict=False
    "prefix": "--prefix",
    "mapping": "--map",
    "allow_nonfinite": "--allow-nonfinite",
    "example_inputs": "--example-input",
    "layout": "--layout",
    "dry_run": "--dry-run",
    "progress": "--progress",
    "check_outputs": "--no-check-outputs",  # check_outputs=False
    "rtol": "--rtol",
    "atol": "--atol",
}

# keywords the library's messages name that no command-line run can reach, and why
NOT_IN_THE_CLI: dict[str, str] = {
    "overrides": "weightport.init's (initializers); the command line has no init verb",
    "against": "weightport.verify's; verify sets it itself for an .onnx SOURCE without output_N",
    "expected": "weightport.verify's; verify reads it from IO.npz's output_N (said so where a fix names it)",
    "rollback": "weightport.load's; the command line always keeps the undo copies",
    "check_values": "weightport.load's; the command line always checks the values",
}

# what a bare flag needs after it, where a fix names the keyword without a value ("pass prefix=")
_METAVAR = {"prefix": "PATH.", "mapping": "SOURCE=MODULE_PATH", "example_inputs": "IO.npz", "layout": "NAME"}

_QUOTED = r"""(?:'([^']*)'|"([^"]*)")"""


def _arg(text: str) -> str:
    """``text`` as a shell word: quoted only where a shell would split or expand it."""
    return shlex.quote(text)


def _safetensors(path: str) -> str:
    """``path`` with its suffix replaced by ``.safetensors``."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem if dot and '/' not in suffix else path}.safetensors"


def _pairs(match: re.Match[str]) -> str:
    """``mapping={'a': 'b', 'c': 'd'}`` as ``--map a=b --map c=d`` (``...`` kept)."""
    body = match[1]
    pairs = re.findall(_QUOTED + r"\s*:\s*" + _QUOTED, body)
    if not pairs:
        return f"{FLAGS['mapping']} {_METAVAR['mapping']}"
    words = [f"{FLAGS['mapping']} {_arg((a1 or a2) + '=' + (b1 or b2))}" for a1, a2, b1, b2 in pairs]
    return " ".join(words) + (" ..." if "..." in body else "")


def _bare(keyword: str) -> Callable[[re.Match[str]], str]:
    """A keyword named without its value: the flag, with what it takes unless the fix drops it."""

    def say(match: re.Match[str]) -> str:
        flag = FLAGS[keyword]
        if match[1] or keyword not in _METAVAR:  # "drop layout=": the flag alone
            return f"{match[1]}{flag}"
        return f"{flag} {_METAVAR[keyword]}"

    return say


# (pattern, replacement), applied in order: the forms with a value before the bare keyword
_RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # fixes that name the Python API, said as what the command line does instead
    (
        re.compile(
            r"left out by loading the source's other arrays as a dict \(read with weightport\.open_source\) "
            r"with layout='\w+'"
        ),
        "left out with --skip-layer LAYER",
    ),
    (
        re.compile(
            r"(?:with weightport\.open_source\(path\) as src: )?weightport\.load\(module, "
            r"\{k\.removeprefix\('([^']*)'\): (?:v for k, v in arrays\.items\(\)|src\.read\(k\) for k in src\.infos) "
            r"if k\.startswith\('\1'\)\}\)"
        ),
        lambda m: f"--source-prefix {_arg(m[1])}",
    ),
    (
        re.compile(r"with strict=False where the checkpoint lacks"),
        "with --lenient where the checkpoint lacks",
    ),
    (
        re.compile(
            r"and pass the dict: weightport\.load\(model, torch\.load\('([^']*)', weights_only=True\)(\S*?)\)"
        ),
        lambda m: (
            'and save it in a file weightport reads: python -c "import torch, weightport; weightport.save('
            f"torch.load('{m[1]}', weights_only=True){m[2]}, '{_safetensors(m[1])}')\", then load "
            f"{_arg(_safetensors(m[1]))}"
        ),
    ),
    # a renaming, which --map does for state-dict names
    (
        re.compile(r"(?m)^(- )?'([^']*)': (.*?)Fix: did you mean '([^']*)'(.*?)\? Rename it\b"),
        lambda m: (
            f"{m[1] or ''}'{m[2]}': {m[3]}Fix: did you mean '{m[4]}'{m[5]}? Rename it: --map "
            + _arg(f"{m[2]}={m[4]}")
        ),
    ),
    (re.compile(r"\? Rename it\b(?!:)"), "? Rename it: --map SOURCE=MODULE_PATH"),
    (
        re.compile(r"the source has '([^']*)': rename it to '([^']*)'"),
        lambda m: f"the source has '{m[1]}': rename it with --map {_arg(m[1] + '=' + m[2])}",
    ),
    (
        re.compile(r"check the names against module\.state_dict\(\)"),
        "check the names against the model's (its state_dict() keys) and the file's (weightport inspect SOURCE)",
    ),
    (re.compile(r"\bmapping=\{([^{}]*)\}"), _pairs),
    (re.compile(r"\bstrict=False\b"), FLAGS["strict"]),
    (re.compile(r"\bdry_run=True\b"), FLAGS["dry_run"]),
    (re.compile(r"\bcheck_outputs=False\b"), FLAGS["check_outputs"]),
    (re.compile(r"\bprogress=True\b"), FLAGS["progress"]),
    (
        re.compile(r"\ballow_nonfinite=True \(or a set of names\)"),
        f"{FLAGS['allow_nonfinite']} (or {FLAGS['allow_nonfinite']}=NAME,... for those tensors only)",
    ),
    (re.compile(r"\ballow_nonfinite=True\b"), FLAGS["allow_nonfinite"]),
    (
        re.compile(r"\b(prefix|layout|rtol|atol)=" + _QUOTED),
        lambda m: f"{FLAGS[m[1]]} {_arg(m[2] if m[2] is not None else m[3])}",
    ),
    *(
        (re.compile(rf"(drop |without )?\b{keyword}=(?![\w'\"])"), _bare(keyword))
        for keyword in ("mapping", "prefix", "example_inputs", "layout", "allow_nonfinite")
    ),
    # the keyword named as a word ("call order (example_inputs)", "in allow_nonfinite, a name")
    (re.compile(r"(?<![\w.-])(example_inputs|allow_nonfinite)\b(?!=)"), lambda m: FLAGS[m[1]]),
    (re.compile(r"\(see the error's \.problems\)"), "(--problems all lists them)"),
    (re.compile(r"\breport\.table\(\)"), "--full"),
    (re.compile(r"\bexpected=(?!\w)"), "output_0, output_1, ... in IO.npz"),
    # a second load of one tensor, in Python; on the command line through the file the first one writes
    (
        re.compile(r"\bweightport\.load\(model, \{'([^']*)': array\}, (?:strict=False|--lenient)\)"),
        lambda m: f"add {_arg(m[1])} to the file --out wrote and load that",
    ),
]


def speak_cli(text: str) -> str:
    """``text`` with the library's keyword arguments said as this command line's flags.

    >>> speak_cli("or pass allow_nonfinite=True (or a set of names) if they belong there")
    'or pass --allow-nonfinite (or --allow-nonfinite=NAME,... for those tensors only) if they belong there'
    >>> speak_cli("pass mapping= to place its layer; drop layout= (weightport reads it from the file)")
    'pass --map SOURCE=MODULE_PATH to place its layer; drop --layout (weightport reads it from the file)'
    >>> speak_cli("layout=1: X and Y batch-first")  # an ONNX attribute, not the keyword
    'layout=1: X and Y batch-first'
    """
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text
