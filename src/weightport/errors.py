"""One exception family for everything weightport raises.

Every class derives from :class:`WeightportError` and also from the builtin that
fits, so ``except ValueError`` keeps working. Messages say where (tensor, file,
layer), what was expected, what was found, and what to do.

>>> issubclass(LoadError, ValueError) and issubclass(LoadError, WeightportError)
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
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
    "ForwardNoteWarning",
    "a_or_an",
    "counted",
    "compact_names",
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
    """A load was refused; nothing was written. ``.problems`` lists every reason.

    The message lists them sorted, one line per cause: problems that differ only in the tensor they
    are about (the same expected, found and fix) share one line that names them all compactly.

    >>> error = LoadError([Problem(f"{i}.bias", "a value for it", "nothing in the given mapping",
    ...                            "add it to the source") for i in range(4)])
    >>> print(error)
    weightport refused to load into the module: 4 problems; nothing was written.
      - '{0..3}.bias' (4 tensors): expected a value for each, found nothing in the given mapping. Fix: for each, add it to the source.
    """

    def __init__(self, problems: list[Problem], *, target: str = "the module") -> None:
        self.problems = sorted(problems)
        self.target = target
        super().__init__(self.format())

    def lines(self) -> list[str]:
        """One line per cause (problems grouped as the message groups them), in order."""
        return [_group_line(group) for group in _group(self.problems)]

    def format(
        self, limit: int | None = MAX_LISTED_PROBLEMS, *, more: str = "see the error's .problems"
    ) -> str:
        """The message, listing at most ``limit`` lines (None: all); ``more`` says where the rest are."""
        count = len(self.problems)
        lines = [
            f"weightport refused to load into {self.target}: {counted(count, 'problem')}; nothing was written."
        ]
        causes = self.lines()
        shown = causes if limit is None else causes[:limit]
        lines += [f"  - {line}" for line in shown]
        if len(causes) > len(shown):
            lines.append(f"  ... and {len(causes) - len(shown)} more ({more})")
        return "\n".join(lines)


_EACH = {"a value for it": "a value for each", "one value": "one value for each"}
_QUOTED = re.compile(r"'[^']*'")


def _group(problems: Sequence[Problem]) -> list[list[Problem]]:
    """Problems that differ only in the numbers of the names they quote, where those numbers are their own
    name's (``'3.bias'`` ... ``from the given mapping '3.bias'``): one group each, in order."""
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        key = _QUOTED.sub(lambda quoted: _NUMBER.sub("#", quoted[0]), _text(p))
        groups.setdefault(key, []).append(p)
    out: list[list[Problem]] = []
    for members in groups.values():
        if len(members) == 1 or _merged(members) is not None:
            out.append(members)
        else:
            out += [[p] for p in members]
    return out


def _text(p: Problem) -> str:
    return f"expected {p.expected}, found {p.found}. Fix: {p.fix}."


def _merged(members: list[Problem]) -> str | None:
    """The line of ``members`` said at once: each quoted name that differs between them said compactly,
    where its numbers are the last numbers of each member's own name (else None: they are said apart)."""
    names = compact_names(p.name for p in members)
    slots = [_QUOTED.findall(_text(p)) for p in members]
    said: list[str] = []
    for values in zip(*slots):
        if len(set(values)) == 1:
            said.append(values[0])
            continue
        for p, value in zip(members, values):
            own = _NUMBER.findall(p.name)
            numbers = _NUMBER.findall(value)
            if not numbers or own[len(own) - len(numbers) :] != numbers:
                return None
        compact = compact_names(v.strip("'") for v in values)
        if len(compact) != 1 or len(names) != 1:
            return None
        said.append(f"'{compact[0]}'")
    first = members[0]
    expected = _EACH.get(first.expected, first.expected)
    text = _text(Problem(first.name, expected, first.found, "for each, " + first.fix))
    slot = iter(said)  # the same quoted names, in the same order: the words changed hold none
    text = _QUOTED.sub(lambda quoted: next(slot), text)
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"{quoted} ({counted(len(members), 'tensor')}): {text}"


def _group_line(group: list[Problem]) -> str:
    if len(group) == 1:
        return str(group[0])
    merged = _merged(group)
    assert merged is not None  # _group keeps only groups that merge
    return merged


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


class ForwardNoteWarning(UncheckedConfigWarning):
    """The source's layers do something the module does not (an activation after it, a flipped input,
    padding): the model's ``forward`` must do it, which weightport cannot check. ``weightport.verify``
    repeats these notes beside a failure. A subclass of :class:`UncheckedConfigWarning`, so one filter
    covers both."""


# ---- words: articles, counts, and names said compactly ------------------------------------------------

# Letters whose spoken name starts with a vowel sound: an RNN, an LSTM, an ONNX, an HDF5 file
_VOWEL_LETTERS = set("AEFHILMNORSX")
_SPELLED = ("nd", "nn", "np", "hdf", "h5", "mlp", "fp", "rnn", "lstm")  # lower-case names said so too


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article: a name in capitals is read letter by letter.

    >>> [a_or_an(w) for w in ("int", "RNN", "LSTM", "GRU", "ndarray", "Linear", "ONNX", "unit", "HDF5")]
    ['an int', 'an RNN', 'an LSTM', 'a GRU', 'an ndarray', 'a Linear', 'an ONNX', 'a unit', 'an HDF5']
    """
    lower = word.lower()
    if re.match(r"[A-Z]{2,}", word) or lower.startswith(_SPELLED):  # said letter by letter
        vowel = word[:1].upper() in _VOWEL_LETTERS
    else:
        vowel = lower[:1] in set("aeiou") and not lower.startswith(("uni", "uint", "use", "usu", "one", "eu"))
    return f"{'an' if vowel else 'a'} {word}"


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and ``noun``, plural unless the count is one.

    >>> counted(1, "output"), counted(3, "output"), counted(0, "tensor"), counted(2, "bias", "biases")
    ('1 output', '3 outputs', '0 tensors', '2 biases')
    """
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


_NUMBER = re.compile(r"\d+")


def compact_names(names: Iterable[str]) -> list[str]:
    """Names that differ only in their numbers said once, with the numbers in braces; and a name with
    and without ``_reverse`` (a bidirectional RNN's two directions) said once. Order of first appearance.

    >>> compact_names([f"lstm.weight_ih_l{k}{d}" for k in range(4) for d in ("", "_reverse")])
    ['lstm.weight_ih_l{0..3}{,_reverse}']
    >>> compact_names(["0.weight", "2.weight", "0.bias", "fc.weight"])
    ['{0,2}.weight', '0.bias', 'fc.weight']
    >>> compact_names(["a0.b0", "a0.b1", "a1.b0"])  # not every combination: said by the first number
    ['a0.b{0,1}', 'a1.b0']
    """
    found: dict[str, list[tuple[str, ...]]] = {}
    for name in dict.fromkeys(names):
        found.setdefault(_NUMBER.sub("#", name), []).append(tuple(_NUMBER.findall(name)))
    merged: list[str] = []
    for template, numbers in found.items():
        for pattern in _braced(template.split("#"), numbers):
            at = pattern.find("_reverse")
            base = pattern[:at] + pattern[at + len("_reverse") :]
            if at >= 0 and base in merged:
                merged[merged.index(base)] = base[:at] + "{,_reverse}" + base[at:]
            else:
                merged.append(pattern)
    return merged


def _braced(texts: list[str], numbers: list[tuple[str, ...]]) -> list[str]:
    """The texts between numbers joined by the names' numbers: one pattern with braces where they form
    every combination of each slot's values; otherwise split by the first number and tried again."""
    slots = [list(dict.fromkeys(n[i] for n in numbers)) for i in range(len(texts) - 1)]
    if math.prod(len(s) for s in slots) == len(numbers):
        return [texts[0] + "".join(_values(s) + t for s, t in zip(slots, texts[1:]))]
    return [
        texts[0] + first + rest
        for first in slots[0]
        for rest in _braced(texts[1:], [n[1:] for n in numbers if n[0] == first])
    ]


def _values(values: list[str]) -> str:
    """One slot's numbers: as they are, or in braces with runs of three or more as ``a..b``."""
    if len(values) == 1:
        return values[0]
    if not all(v == str(int(v)) for v in values):  # leading zeros: said as written
        return "{" + ",".join(values) + "}"
    runs: list[list[int]] = []
    for i in sorted(int(v) for v in values):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    said = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(said) + "}"
