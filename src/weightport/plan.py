"""The plan: every tensor a load will write, checked against the module before any write.

:func:`build_plan` checks names, shapes and dtypes from the source's infos alone
(no data read); :func:`weightport.value_checks.check_values` then reads the data once for
the checks that need values (NaN/Inf, float range, exact integer casts, tied weights).

>>> import numpy as np, torch
>>> from weightport.layouts import get_layout
>>> from weightport.sources import open_source
>>> lin = torch.nn.Linear(3, 2)
>>> src = open_source({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})
>>> plan = build_plan(lin, src, get_layout("torch").plan(lin, src))
>>> print(plan.problems[0])
'weight': expected shape (2, 3) = (out_features, in_features) of Linear(in_features=3, out_features=2), found shape (3, 2) from the given mapping 'weight'. Fix: pass an array of shape (2, 3); (3, 2) looks transposed: pass its .T.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from weightport import values
from weightport.dtypes import describe_dtype
from weightport.errors import Problem
from weightport.layouts.base import LayoutPlan, Rule
from weightport.layouts.quantized import Quantized
from weightport.options import NonFinite
from weightport.recurrent_problems import explain_recurrent_sizes
from weightport.sources.base import Source, TensorInfo
from weightport.tensors import shared_memory_problems
from weightport.torch_facts import (
    broken_tie,
    explain_shape,
    non_persistent_buffers,
    parametrized_fix,
    transformers_computed,
)

__all__ = ["Entry", "Plan", "build_plan", "NonFinite", "origin_of", "identity"]


@dataclass
class Entry:
    """One tensor to write: where it goes, where it comes from, how it is cast."""

    target: str
    tensor: torch.Tensor
    rule: Rule
    inputs: tuple[TensorInfo, ...]
    source_dtype: np.dtype
    check: str  # what the values need: see values.cast_kind
    aliases: tuple[str, ...] = ()  # other names of the same (tied) tensor
    # Set by check_values for a meta tensor whose values can be checked after they are read into its new
    # storage (a cast that keeps NaN/Inf as they are): the one read fills and checks; None: checked already.
    check_after_fill: bool | None = None

    @property
    def key(self) -> Hashable:
        """The tensor's identity: entries of one key are one (tied) tensor; see :func:`identity`."""
        return identity(self.tensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.tensor.element_size()

    def value(self, source: Source) -> np.ndarray:
        """The target's values: the rule's op over its source tensors, read whole (the one home of
        a rule's value; the writers read boxes of it through :mod:`weightport.boxes`)."""
        return self.rule.op(*(source.read(s) for s in self.rule.sources))

    def tie_problem(self, first: Entry) -> Problem:
        """The problem of a tied tensor given under two names with different values."""
        return Problem(
            self.target,
            f"the same values as '{first.target}' (they are one tied tensor)",
            f"different values ({origin_of(self.rule)}, and {origin_of(first.rule)})",
            "give the tied tensor once, or equal values under both names; where the source's model kept two "
            "weights there (a checkpoint of an untied model), build the module untied so each has its place "
            "(transformers: tie_word_embeddings=False in the config)",
        )

    @property
    def cast(self) -> str:
        """``'float64 -> float32'`` when the dtype changes, else ``''``."""
        src, dst = describe_dtype(self.source_dtype), describe_dtype(self.tensor.dtype)
        return "" if src == dst else f"{src} -> {dst}"


@dataclass
class Plan:
    """What a load will do, and every problem found with it."""

    module: nn.Module
    prefix: str
    layout: LayoutPlan
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def identity(tensor: torch.Tensor) -> Hashable:
    """One key per tensor the module holds: two tensor objects that view the same memory the same way (a
    buffer tied by sharing its storage, as transformers' SAM does) are one tensor; a meta, empty or
    distributed tensor is itself."""
    plain = type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout == torch.strided
    if not plain or tensor.is_meta or tensor.numel() == 0 or tensor.is_quantized:
        return id(tensor)
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


def _owner(module: nn.Module, name: str) -> nn.Module:
    path = name.rpartition(".")[0]
    return module.get_submodule(path) if path else module


# Why strict=False alone is no fix where both sides have tensors left over, seen from each side.
_MODULE_LACKS = (
    "not strict=False alone: the module also lacks values, and this may be one of them in a form weightport "
    "does not map"
)
_SOURCE_HOLDS = (
    "not strict=False alone: the source also holds tensors no rule reads, and one of them may be this tensor "
    "in a form weightport does not map"
)


def _left_over(name: str, torch_names: bool) -> str:
    """The fix for a source tensor no rule reads while the module also lacks values."""
    if torch_names:  # state-dict names: a name is all it takes
        return (
            f"give it the name of the module tensor it holds, converted to that tensor's layout "
            f"(mapping={{'{name}': 'module.tensor'}} renames it), or remove it if the model does not use it; "
            f"{_MODULE_LACKS}"
        )
    return (
        "pass mapping= to place its layer; if weightport has no rule for that layer, load the rest with "
        "strict=False, then this tensor, converted to the layout of the module tensor it holds: "
        f"weightport.load(model, {{'module.tensor': array}}, strict=False); {_MODULE_LACKS}"
    )


def _lacking(tensors: Mapping[str, torch.Tensor], optional: Collection[str], layout: LayoutPlan) -> list[str]:
    """The module tensors no rule gives a value (lazy and non-persistent ones aside)."""
    planned = {identity(tensors[r.target]) for r in layout.rules if r.target in tensors}
    return [
        n for n, t in tensors.items() if identity(t) not in planned and not is_lazy(t) and n not in optional
    ]


def _stray(tensors: Mapping[str, torch.Tensor], layout: LayoutPlan) -> bool:
    """Whether the source has tensors that no module tensor takes."""
    used = {s for r in layout.rules for s in r.sources}
    return any(r.target not in tensors for r in layout.rules) or any(n not in used for n in layout.unmatched)


def _suggest(
    name: str, lacking: list[str], given: Collection[str], optional: Collection[str], torch_names: bool
) -> str:
    """The fix for a source name the module lacks: a rename onto a module name still without a value, else
    removing it (said with the module name it looks like: one the source gives, or a buffer no checkpoint
    holds, ``given`` and ``optional``)."""
    # only names still without a value: renaming onto a given one would replace that value
    close = difflib.get_close_matches(name, lacking, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "? Rename it"
    if lacking:
        return _left_over(name, torch_names)
    alike = difflib.get_close_matches(name, [*given, *optional], n=1, cutoff=0.6)
    looks = ""
    if alike and alike[0] in given:
        looks = f" (it looks like '{alike[0]}', which the source gives already)"
    elif alike:
        looks = (
            f" (it looks like '{alike[0]}', a buffer the module computes itself, registered with "
            "persistent=False, which checkpoints leave out)"
        )
    return f"remove it{looks}, or pass strict=False to skip names the module does not have"


def _computed_on_meta(full: str, skipped: bool, where: str) -> Problem:
    """The problem of a tensor the model computes (which checkpoints leave out) left on the meta device."""
    if skipped:
        return Problem(
            full,
            "values for it (transformers' save_pretrained leaves it out: the model computes it as it is built)",
            f"nothing in {where}, and the module on the meta device",
            "build the model off meta, or give its values in the source",
        )
    return Problem(
        full,
        "values for it (a buffer registered with persistent=False, which checkpoints leave out, on the meta device)",
        f"nothing in {where}",
        "build the module's buffers off meta (create only the parameters on meta, e.g. "
        "accelerate.init_empty_weights(include_buffers=False)), or give its values in the source",
    )


def _parametrized_hint(name: str, names: Collection[str]) -> str | None:
    module_path, _, leaf = name.rpartition(".")
    original = f"{module_path + '.' if module_path else ''}parametrizations.{leaf}.original"
    found = [n for n in names if n.startswith(original)]
    if found:
        listed = " and ".join(f"'{n}'" for n in sorted(found))
        return f"'{name}' is computed by a parametrization from {listed}: {parametrized_fix(name, sorted(found))}"
    return None


def build_plan(
    module: nn.Module,
    source: Source,
    layout: LayoutPlan,
    *,
    strict: bool = True,
    prefix: str = "",
) -> Plan:
    """Check every rule of ``layout`` against ``module`` using infos only (no data read)."""
    plan = Plan(module=module, prefix=prefix, layout=layout)
    tensors = _tensors(module)
    optional = {n: t for n, t in non_persistent_buffers(module).items() if n not in tensors}
    tensors.update(optional)
    skipped, unloaded = transformers_computed(module)
    optional |= {n: tensors[n] for n in skipped if n in tensors}
    problems = plan.problems
    written: dict[Hashable, Entry] = {}
    targeted: set[Hashable] = set()
    seen_targets: set[str] = set()
    # Tensors on both sides left over: a source tensor may be a module tensor in a form no rule maps
    # (a packed in_proj_bias, a cls_token under another name), so no fix may say strict=False alone.
    lacking = _lacking(tensors, optional, layout)
    both_sides = bool(lacking) and _stray(tensors, layout)
    torch_names = layout.name == "torch"
    quantized = Quantized.of(source, layout, tensors)  # codes refused without their scales
    mismatched: dict[str, tuple[tuple[int, ...], Problem]] = {}  # target -> found shape, its problem

    for rule in layout.rules:
        target = rule.target
        full = prefix + target
        if target in seen_targets:
            problems.append(Problem(full, "one value", "two source rules for it", "give each tensor once"))
            continue
        seen_targets.add(target)
        if target not in tensors:
            if quantized.covers(rule.sources):
                continue  # a scale of codes refused below, named there
            if strict:
                given = [r.target for r in layout.rules if r.target in tensors and r.target not in optional]
                hint = (
                    _parametrized_hint(target, tensors)
                    or quantized.hint(rule.sources[0] if rule.sources else target)
                    or _suggest(target, lacking, given, optional, torch_names)
                )
                problems.append(
                    Problem(full, "a name the module has", f"an unknown name from {origin_of(rule)}", hint)
                )
            else:
                plan.ignored.extend(rule.sources or (target,))
            continue
        tensor = tensors[target]
        targeted.add(identity(tensor))
        if torch_names and target in unloaded and not tensor.is_meta:  # a checkpoint's, never loaded (see
            # transformers_computed); an ONNX graph computes with the file's own, which go in
            plan.ignored.extend(rule.sources or (target,))
            continue
        refusal = quantized.problem(full, tensor, rule, origin_of(rule))
        if refusal is not None:
            problems.append(refusal)
            continue
        entry = _entry(module, full, target, tensor, rule, source, problems, mismatched)
        if entry is None:
            continue
        first = written.get(identity(tensor))
        if first is not None:
            first.aliases = (*first.aliases, full)
            plan.entries.append(entry)  # kept so check_values compares the tied values
            continue
        written[identity(tensor)] = entry
        plan.entries.append(entry)

    problems += shared_memory_problems([(e.target, e.tensor) for e in plan.entries])
    explain_recurrent_sizes(module, prefix, source, mismatched, problems)
    if torch_names:
        problems.extend(_square_too(plan.entries, mismatched, prefix))
    used = {s for r in layout.rules for s in r.sources}
    plan.ignored.extend(layout.not_weights)
    for name in layout.unmatched:
        if name not in used and not quantized.covers((name,)):
            if strict:
                problems.append(
                    Problem(
                        name,
                        "a tensor the layout can place",
                        f"'{name}' in {source.description}",
                        layout.unmatched_hints.get(name)
                        or quantized.hint(name)
                        or (
                            _left_over(name, torch_names)
                            if both_sides
                            else "pass strict=False to skip it: the module has a value for every tensor without it"
                        ),
                    )
                )
            else:
                plan.ignored.append(name)

    for name, tensor in tensors.items():
        if identity(tensor) in targeted:
            continue
        if is_lazy(tensor):
            continue  # reported by _entry when targeted; lazy and untouched is fine
        if name in optional:
            if tensor.is_meta:
                problems.append(_computed_on_meta(prefix + name, name in skipped, source.description))
            targeted.add(identity(tensor))
            continue
        if strict and name not in layout.kept:
            problems.append(
                Problem(
                    prefix + name,
                    "a value for it",
                    f"nothing in {source.description}",
                    _missing_hint(name, layout.missing_hints)
                    or broken_tie(module, name)
                    or _set_aside(name, source.ignored)
                    or _suggest_missing(
                        name,
                        prefix + name,
                        [r.target for r in layout.rules if r.target not in tensors],
                        lacking,
                        both_sides,
                        torch_names,
                    ),
                )
            )
        elif tensor.is_meta:
            problems.append(
                Problem(
                    prefix + name,
                    "a value for it (it is on the meta device and has no data)",
                    f"nothing in {source.description}",
                    broken_tie(module, name) or "add it to the source, or build the module off meta",
                )
            )
        else:
            plan.missing.append(prefix + name)
        targeted.add(identity(tensor))  # report a tied group once
    return plan


def _square_too(
    entries: list[Entry], mismatched: dict[str, tuple[tuple[int, ...], Problem]], prefix: str
) -> list[Problem]:
    """Where some 2-D weights of a source come transposed, its square ones, which fit either way, may be
    transposed too (transformers' Conv1D stores every weight (in, out)): a problem for each, since loading
    them as they are after transposing only the others would be silently wrong."""
    flipped = [
        t for t, (found, problem) in mismatched.items() if len(found) == 2 and _TRANSPOSED in problem.fix
    ]
    square = [
        e.target
        for e in entries
        if len(e.shape) == 2
        and e.shape[0] == e.shape[1] > 1
        and e.rule.op.describe() == "as is"
        and e.target.rpartition(".")[2] == "weight"
    ]
    if not flipped or not square:
        return []
    others = ", ".join(f"'{prefix}{t}'" for t in flipped[:3]) + (" ..." if len(flipped) > 3 else "")
    return [
        Problem(
            prefix + name,
            "a weight stored as the module keeps it, (out, in)",
            f"a square shape, which reads either way, in a source whose weights {others} come transposed",
            "transpose it too where the source stores every weight (in, out), as transformers' Conv1D "
            "(GPT-2's c_attn, c_proj, c_fc) does: its shape cannot show it. Loading a transformers snapshot "
            "folder (config.json beside the weights) transposes GPT-2's Conv1D weights into nn.Linear itself",
        )
        for name in square
    ]


def _missing_hint(name: str, hints: dict[str, str]) -> str | None:
    """The layout's word on why the module that holds ``name`` got nothing, if it has one."""
    module = name.rpartition(".")[0]
    return hints.get(module)


def _set_aside(name: str, ignored: list[str]) -> str | None:
    """The fix where the source set aside an entry of ``name``'s own name (a ``.npy`` folder's link)."""
    found = next((entry for entry in ignored if entry.startswith((f"{name}.", f"{name} "))), None)
    return (
        None if found is None else f"the source set aside {found}: put the array itself there under that name"
    )


def _suggest_missing(
    name: str, full: str, unknown: list[str], lacking: list[str], both_sides: bool, torch_names: bool
) -> str:
    close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6)
    # a rename only where each is the other's closest: one source name is never offered to two tensors
    if close and difflib.get_close_matches(close[0], lacking, n=1, cutoff=0.6) == [name]:
        return f"the source has '{close[0]}': rename it to '{name}'"
    if not both_sides:
        return "add it to the source, or pass strict=False to leave it as it is"
    if torch_names:
        return (
            "add it to the source under this name, converted to this tensor's layout (mapping={'source name': "
            f"'{name}'}} renames a source tensor to it); {_SOURCE_HOLDS}"
        )
    return (
        "pass mapping= to place the source layer that holds it; if weightport has no rule for that layer, load "
        "the rest with strict=False, then this tensor, converted to its layout: "
        f"weightport.load(model, {{'{full}': array}}, strict=False); {_SOURCE_HOLDS}"
    )


def origin_of(rule: Rule) -> str:
    return rule.origin or ", ".join(rule.sources) or "the layout"


def _entry(
    module: nn.Module,
    full: str,
    target: str,
    tensor: torch.Tensor,
    rule: Rule,
    source: Source,
    problems: list[Problem],
    mismatched: dict[str, tuple[tuple[int, ...], Problem]],
) -> Entry | None:
    if is_lazy(tensor):
        problems.append(
            Problem(
                full,
                "an initialized tensor",
                "a lazy module's uninitialized parameter",
                "run one forward pass with a sample input first, or use the non-lazy module class",
            )
        )
        return None
    missing = [s for s in rule.sources if s not in source.infos]
    if missing:
        problems.append(
            Problem(
                full,
                f"source tensor(s) {', '.join(missing)}",
                f"none in {source.description}",
                "check the file, or pass mapping= to pair its layers",
            )
        )
        return None
    inputs = tuple(source.infos[s] for s in rule.sources)
    try:
        shape = tuple(rule.op.out_shape([i.shape for i in inputs]))
    except ValueError as e:
        origin = origin_of(rule)
        problems.append(
            Problem(
                full,
                f"source shapes that {rule.op.describe()} accepts",
                f"{e} ({origin})",
                "check the source layer's sizes against the module",
            )
        )
        return None
    expected = tuple(tensor.shape)
    if shape != expected:
        origin = origin_of(rule)
        why = explain_shape(_owner(module, target), target.rpartition(".")[2])
        exp = f"shape {why or expected}"
        via = f" after {rule.op.describe()}" if rule.op.describe() != "as is" else ""
        problems.append(Problem(full, exp, f"shape {shape} from {origin}{via}", _shape_fix(expected, shape)))
        mismatched[target] = (shape, problems[-1])
        return None
    if len(inputs) == 1:
        source_dtype = inputs[0].dtype
    else:
        source_dtype = np.result_type(*(i.dtype for i in inputs)) if inputs else np.dtype(np.float32)
    check, refusal = values.cast_kind(source_dtype, tensor.dtype)
    if refusal:
        problems.append(
            Problem(
                full,
                f"dtype {describe_dtype(tensor.dtype)}",
                f"{describe_dtype(source_dtype)} from {origin_of(rule)}",
                refusal,
            )
        )
        return None
    return Entry(full, tensor, rule, inputs, source_dtype, check)


_TRANSPOSED = "looks transposed: pass its .T"


def _shape_fix(expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    if len(expected) == 2 and found == expected[::-1]:
        return f"pass an array of shape {expected}; {found} {_TRANSPOSED}"
    if math.prod(expected) == math.prod(found):
        return f"pass an array of shape {expected} (same size: reshape it if the order is right)"
    return f"pass an array of shape {expected}, or build the module with sizes that match"
