"""``weightport.load``: arrays into a module, checked first, written in place, all or nothing.

>>> import numpy as np, torch, weightport
>>> rnn = torch.nn.RNN(3, 4)
>>> rng = np.random.RandomState(313)
>>> arrays = {name: rng.uniform(-0.5, 0.5, tuple(p.shape)) for name, p in rnn.named_parameters()}
>>> report = weightport.load(rnn, arrays)
>>> bool(np.allclose(rnn.weight_ih_l0.detach().numpy(), arrays["weight_ih_l0"]))
True
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Collection, Hashable, Iterator, Mapping
from functools import partial

import numpy as np
import torch
from torch import nn

from weightport.apply import LocalWrite
from weightport.call_order import CallOrder, ExampleInputs
from weightport.distributed import ShardedWrite, agree, has_dtensors
from weightport.dtypes import describe_dtype
from weightport.errors import (
    ForwardNoteWarning,
    LayoutError,
    LoadError,
    Problem,
    UncheckedConfigWarning,
    counted,
)
from weightport.layouts import detect_layout, get_layout
from weightport.layouts.base import Pairing, Rule
from weightport.layouts.folded import folded_batchnorms
from weightport.options import LoadOptions, NonFinite
from weightport.plan import Plan, build_plan
from weightport.progress import progress_callback
from weightport.report import LoadReport, ReportRow, remember_forward_notes
from weightport.sources import Source, SourceLike, open_source
from weightport.tensors import unwrap

__all__ = ["load", "plan_load", "unwrap"]


def _scope(module: nn.Module, prefix: str | None) -> tuple[nn.Module, str]:
    if not prefix:
        return module, ""
    path = prefix.rstrip(".")
    try:
        return module.get_submodule(path), path + "."
    except AttributeError:
        children = [n for n, _ in module.named_modules() if n]
        raise LoadError(
            [
                Problem(
                    prefix,
                    "the path of a submodule",
                    "no such submodule",
                    f"use one of {', '.join(children[:12]) or '(none: the module has no submodules)'}",
                )
            ],
            target=type(module).__name__,
        ) from None


def plan_load(module: nn.Module, source: Source, options: LoadOptions) -> Plan:
    """Everything :func:`load` checks but the values, without writing: the plan, problems included
    (the writer's ``read`` checks the values)."""
    root = unwrap(module)
    _refuse_quantized(root)
    scope, prefix_ = _scope(root, options.prefix)
    inputs = options.example_inputs
    order = None if inputs is None else CallOrder(root, inputs)  # run only if pairing needs it
    layout = get_layout(options.layout or detect_layout(source))
    layout_plan = layout.plan(scope, source, options.mapping, call_order=_within(order, prefix_))
    if layout_plan.scope:  # every layer pairs by name inside one submodule (a wrapped model): load into it
        scope, prefix_ = _scope(root, prefix_ + layout_plan.scope)
        inside = prefix_.rstrip(".")
        layout_plan = layout.plan(scope, source, options.mapping, call_order=_within(order, prefix_))
        layout_plan.scope = inside
    plan = build_plan(scope, source, layout_plan, strict=options.strict, prefix=prefix_)
    if layout_plan.scope and options.strict:
        plan.problems += _left_on_meta(root, prefix_)
    plan.ignored.extend(source.ignored)
    from weightport.snapshot_config import folder_config_checks, unchecked_config_note, unrecorded_config_note

    checked, folder = None, source.metadata.get("folder_config")
    if folder is not None:  # a config file beside the weights: the model must be built as it records
        checked = folder_config_checks(scope, folder, source.description, root)
    if checked is None:  # no config file held against the model's: what it would have answered is unchecked
        plan.layout.unchecked += plan.layout.config_unchecked
        if folder is not None:  # never dropped silently
            note: str | None = unchecked_config_note(folder, source.description)
        else:
            # an adapter records its own settings (adapter_config.json, held against peft_config), not the model's
            recorded = plan.layout.config_unchecked or "peft_type" in source.metadata
            note = None if recorded else unrecorded_config_note(scope, source.description)
        plan.layout.unchecked += [note] if note else []
    else:
        plan.problems += checked[0]
        plan.layout.unchecked += checked[1]
    folded = folded_batchnorms(scope, source, plan)
    if folded is not None:  # the fused weights alone would load, leaving each BatchNorm as it was
        plan.problems.append(folded)
    if not isinstance(options.allow_nonfinite, bool):
        plan.problems += _unknown_allowed(plan, options.allow_nonfinite)
    if not plan.entries:
        _explain_nothing_matched(plan, source, options.layout, scope, prefix_ or _describe(module))
    return plan


def _refuse_quantized(root: nn.Module) -> None:
    """A quantized module (torch.ao) keeps packed parameters and dtypes in its state dict, not tensors
    weightport can write."""
    odd = [
        name
        for name, value in root.state_dict(keep_vars=True).items()
        if not isinstance(value, torch.Tensor) or value.is_quantized
    ]
    if odd:
        raise LoadError(
            [
                Problem(
                    ", ".join(odd[:4]) + (" ..." if len(odd) > 4 else ""),
                    "float or integer tensors",
                    "the state of a quantized module (packed parameters, a dtype, quantized tensors)",
                    "load the float model, then quantize it (torch.ao.quantization.convert)",
                )
            ],
            target=type(root).__name__,
        )


def _left_on_meta(root: nn.Module, prefix: str) -> list[Problem]:
    """Where the load went into the submodule at ``prefix`` by itself (every source layer pairs inside it),
    the model's tensors outside it that are on the ``meta`` device: the load would leave them without
    values, and the model could not run."""
    tensors = [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]
    left = [name for name, t in tensors if t.is_meta and not name.startswith(prefix)]
    if not left:
        return []
    inside = prefix.rstrip(".")
    return [
        Problem(
            ", ".join(left[:4]) + (" ..." if len(left) > 4 else ""),
            "a value for every tensor of a model built on the meta device",
            f"{len(left)} tensor(s) outside '{inside}' on meta: the source's layers all pair inside '{inside}', "
            "so the load would leave them without values",
            f"pass prefix='{prefix}' to load into '{inside}' only, and give the others values yourself "
            "(module.to_empty(device=...) and their initialization, or another load)",
        )
    ]


def _within(order: CallOrder | None, prefix: str) -> CallOrder | None:
    """A call order of the whole model, with paths relative to the submodule at ``prefix``."""
    return None if order is None else order.within(prefix)


def _unknown_allowed(plan: Plan, allowed: Collection[str]) -> list[Problem]:
    """A problem for each ``allow_nonfinite`` name that is not a tensor being loaded."""
    targets = {entry.target for entry in plan.entries} | set(plan.missing)
    problems = []
    for name in sorted(set(allowed) - targets):
        close = [t for t in targets if t.endswith("." + name)] or difflib.get_close_matches(
            name, targets, n=1
        )
        problems.append(
            Problem(
                name,
                "in allow_nonfinite, a name of a tensor being loaded (the module's full state-dict name)",
                "no such tensor",
                f"write '{close[0]}'" if close else "check the name against the report's targets",
            )
        )
    return problems


def _explain_nothing_matched(
    plan: Plan, source: Source, layout: str | None, scope: nn.Module, label: str
) -> None:
    """With nothing planned: the likely cause goes first, before one problem per name; and a
    ``strict=False`` load that would write nothing from a non-empty source is a problem itself."""
    own = list(scope.state_dict(keep_vars=True))
    hint = _layout_hint(source, layout, own) or _prefix_hint(source, own)
    if plan.problems:
        if hint is not None:
            plan.problems.insert(0, hint)
    elif hint is not None and source.infos:  # strict=False: nothing would be written, for that reason
        plan.problems.append(hint)
    elif source.infos:
        names = list(source.infos)
        plan.problems.append(
            Problem(
                label,
                "at least one source tensor that names one of the module's",
                f"none of the source's {counted(len(names), 'name')} match (first: '{names[0]}')"
                if len(names) > 1
                else f"the source's one name does not match ('{names[0]}')",
                "check the names against module.state_dict(); pass prefix= to load into a submodule, "
                "layout= if the source is another framework's, or mapping= to pair them",
            )
        )


def _planned_with_layout_hint(module: nn.Module, source: Source, options: LoadOptions) -> Plan:
    """:func:`plan_load`, where a refusal under a ``layout=`` the source's names do not look like (PyTorch
    state-dict names of the model's own, read as Keras, Flax or ONNX) says so first."""
    try:
        plan = plan_load(module, source, options)
    except LayoutError as e:  # in PyTorch's own layout, the layout's refusal is the more specific word
        hint = None if options.layout in (None, "torch") else _torch_names_hint(module, source, options)
        if hint is None:
            raise
        raise LoadError([hint], target=_describe(module)) from e
    hint = _torch_names_hint(module, source, options) if plan.problems else None
    if hint is not None:
        plan.problems.insert(0, hint)
    return plan


def _torch_names_hint(module: nn.Module, source: Source, options: LoadOptions) -> Problem | None:
    """The likely cause where ``layout=`` names another framework's layout and at least half the source's
    names (it declares no layout of its own) are the model's state-dict names, none ending in that layout's
    own leaves; or, in PyTorch's layout, where the names the model lacks end in another framework's."""
    layout, prefix = options.layout, options.prefix or ""
    if layout == "onnx" or detect_layout(source) != "torch":
        return None  # a file that declares its layout gets _layout_hint's word; arrays as onnx, the layout's
    wanted = {n[len(prefix) :] for n in unwrap(module).state_dict() if n.startswith(prefix)}
    names = list(source.infos)
    matched = [n for n in names if n in wanted]
    if layout in (None, "torch"):  # where none matched, _layout_hint says it
        return _foreign_names_hint(source, [n for n in names if n not in wanted], wanted) if matched else None
    from weightport.layouts.flax.facts import leaves_framework

    framework = leaves_framework(names, layout)
    if framework in ("flax", "keras"):  # Flax's fc1.kernel beside fc1.bias: no PyTorch names
        return (
            None
            if framework == layout
            else _foreign_names_hint(source, names, wanted, f"the '{layout}' layout")
        )
    if not matched or len(matched) * 2 < len(names):
        return None
    return Problem(
        "(layout)",
        f"names in the '{layout}' layout",
        f"PyTorch state-dict names in {source.description} ({', '.join(repr(n) for n in matched[:2])}"
        f"{' ...' if len(matched) > 2 else ''}: {len(matched)} of its {len(names)} names are the model's own)",
        f"drop layout='{layout}' (or pass layout='torch'): the source is in PyTorch's layout",
    )


def _layout_hint(source: Source, layout: str | None, own: Collection[str]) -> Problem | None:
    """Why no name matched, when the layout is the likely cause."""
    declared = detect_layout(source)
    if layout is not None and layout != declared and declared != "torch":
        return Problem(
            "(layout)",
            f"the layout {source.description} is in",
            f"layout='{layout}', but the file is in the '{declared}' layout",
            "drop layout= (weightport reads it from the file)",
        )
    return _foreign_names_hint(source, list(source.infos), own) if (layout or declared) == "torch" else None


def _foreign_names_hint(
    source: Source, names: list[str], own: Collection[str], layout: str = ""
) -> Problem | None:
    """Why ``names`` are not in ``layout`` (PyTorch's by default), where their leaves or ``/`` show it; leaves
    the model's own names (``own``) end in too (a parameter named ``kernel``) show nothing."""
    from weightport.layouts.flax.facts import leaves_framework

    framework, joined = leaves_framework(names), [n for n in names if "/" in n]
    own_leaves = {name.rpartition(".")[2] for name in own}
    if framework in ("flax", "keras") and framework != leaves_framework(
        [n for n in names if re.split(r"[/.]", n)[-1] not in own_leaves]
    ):
        framework = None  # only leaves the model's own names end in too: PyTorch names of a module named so
    expected = f"names in {layout}" if layout else "PyTorch state-dict names (dotted: 'encoder.weight')"
    if framework in ("flax", "keras"):
        shown = ", ".join(repr(n) for n in sorted(names, key=lambda n: n.endswith("bias"))[:2])
        found = f"{'Flax' if framework == 'flax' else 'Keras'}'s names in {source.description} ({shown}"
        fix = (
            "pass layout='flax' for a Flax/JAX pytree or a flat Flax .npz (names joined by '/' or '.')"
            if framework == "flax"
            else "layout='keras' reads Keras's own files and models, not arrays named by layer: pass the live "
            "Keras model, weightport.load(module, keras_model), or save it with "
            "keras_model.save_weights('model.weights.h5') and load that file"
        )
        return Problem("(layout)", expected, f"{found}{' ...' if len(names) > 2 else ''})", fix)
    if not joined:
        return None
    found, fix = (
        (
            "PyTorch's names joined by '/'",
            "join them with '.': pass {name.replace('/', '.'): array for name, "
            "array in arrays.items()} (dict(np.load(path)) holds an .npz's arrays)",
        )
        if framework == "torch"
        else (
            "'/'-joined names",
            "rename them to the module's state-dict names (module.state_dict() lists "
            "them; mapping= renames), or pass layout= for the framework that wrote them",
        )
    )
    return Problem("(layout)", expected, f"{found} in {source.description} ('{joined[0]}')", fix)


def _prefix_hint(source: Source, module_names: list[str]) -> Problem | None:
    """Why no name matched, when one side's names carry a leading component the other's lack
    (a head model's checkpoint, ``bert.*``, into the bare model; or the other way round)."""
    names = list(source.infos)
    for have, want, side in ((names, module_names, "source"), (module_names, names, "module")):
        wanted = set(want)
        counts = Counter(n.split(".", 1)[0] for n in have if "." in n)
        for first, _ in counts.most_common(3):
            cut = len(first) + 1
            if sum(n[cut:] in wanted for n in have if n.startswith(first + ".")) * 2 >= len(wanted):
                if side == "module":
                    fix = f"pass prefix='{first}.' to load into that submodule"
                else:
                    part = f"k.removeprefix('{first}.')"
                    code = (
                        f"weightport.load(module, {{{part}: v for k, v in arrays.items() if k.startswith('{first}.')}})"
                        if source.in_memory
                        else f"with weightport.open_source(path) as src: weightport.load(module, {{{part}: "
                        f"src.read(k) for k in src.infos if k.startswith('{first}.')}})"
                    )
                    fix = (
                        f"load the source's '{first}.' part: {code}, with strict=False where the checkpoint "
                        "lacks some of the module's tensors (a head model's has no pooler); or build the model "
                        "the checkpoint was saved from"
                    )
                return Problem(
                    "(prefix)",
                    "names that match the module's state-dict names",
                    f"the {side}'s names start with '{first}.' where the other side's do not",
                    fix,
                )
    return None


def load(
    module: nn.Module,
    source: SourceLike,
    *,
    strict: bool = True,
    prefix: str | None = None,
    allow_nonfinite: NonFinite = False,
    dry_run: bool = False,
    layout: str | None = None,
    mapping: Mapping[str, str] | None = None,
    check_values: bool = True,
    rollback: bool = True,
    progress: bool | None = None,
    example_inputs: ExampleInputs | None = None,
    check_outputs: bool = True,
) -> LoadReport:
    """Load arrays into ``module``'s parameters and buffers, in place, all or nothing.

    Args:
        module: any ``nn.Module``; tensors on the ``meta`` device are materialized.
            DTensor parameters (a sharded model) make the load a collective:
            every rank calls it, and each reads only its own shard (see
            :mod:`weightport.distributed`).
        source: a mapping of state-dict names to arrays (NumPy, torch, lists), or a
            path to ``.npz``, a folder of ``.npy``, ``.safetensors``, or a framework file.
        strict: refuse names the module lacks and tensors the source lacks.
        prefix: load into the submodule at this path (``"encoder."``).
        allow_nonfinite: accept NaN/Inf (True, or a set of target names).
        dry_run: check everything and return the report without writing.
        layout: how the source names its tensors (``"torch"``, ``"keras"``,
            ``"flax"``, ``"onnx"``); inferred from the file when not given.
        mapping: source layer (or name) -> module path, overriding the pairing.
        check_values: scan values for NaN/Inf, range and exact casts (on by default).
        rollback: keep a copy of each tensor overwritten from a lazily read file so a
            read error mid-way puts everything back (costs memory up to the model's size).
        progress: show a progress bar (None: only for big loads on a terminal).
        example_inputs: inputs for one forward pass of ``module`` (a tensor, a tuple of
            positional inputs, or a dict of keyword inputs), run on meta tensors to learn
            the order the model calls its submodules in; pairing matches it with the
            order a framework file records where layers of one kind and shape could
            otherwise be swapped (the pass runs only then). The module is not changed by it.
        check_outputs: from an ONNX file, run its graph (onnxruntime) and the model with the
            planned tensors on the same inputs before writing, and refuse if their outputs differ
            (a model that computes something else between its layers). The inputs are
            ``example_inputs``, or random ones where every graph input is a float tensor of a
            known shape; where neither can be, a warning says the outputs were not compared.

    Returns:
        A :class:`LoadReport`; printing it shows the plan as a table.

    Raises:
        LoadError: with ``.problems``; the module is unchanged.
        SourceError: the source could not be read; the module is unchanged.
    """
    if not isinstance(module, nn.Module):
        raise LoadError(
            [
                Problem(
                    "module",
                    "a torch.nn.Module",
                    f"an object of type {type(module).__name__}",
                    "pass the model first and the arrays second: weightport.load(model, arrays)",
                )
            ],
            target=type(module).__name__,
        )
    started = time.perf_counter()
    options = LoadOptions(
        strict=strict,
        prefix=prefix,
        allow_nonfinite=allow_nonfinite,
        dry_run=dry_run,
        layout=layout,
        mapping=mapping,
        check_values=check_values,
        rollback=rollback,
        progress=progress,
        example_inputs=example_inputs,
        check_outputs=check_outputs,
    )
    with _no_cyclic_gc():  # a load allocates much; a full collection in it walks every object there is
        owned = not isinstance(source, Source)
        sharded = has_dtensors(unwrap(module))
        writer: LocalWrite | ShardedWrite
        if sharded:  # a collective: every rank reads its own shard, then the ranks agree
            src, plan, writer = _read_sharded(module, source, options, owned)
        else:
            src = open_source(source)
        try:
            if not sharded:
                plan = _planned_with_layout_hint(module, src, options)
                writer = LocalWrite(plan, src, options)
                writer.read()
            if plan.problems:
                raise LoadError(plan.problems, target=_describe(module))
            if (
                check_outputs and not sharded and plan.layout.name == "onnx"
            ):  # the graph vs the model, unwritten
                from weightport.graph_check import compare_with_graph  # onnxruntime's runner: graphs only

                differs, unrun = compare_with_graph(plan, src, unwrap(module), example_inputs, strict)
                if differs:
                    raise LoadError(differs, target=_describe(module))
                plan.layout.unchecked += unrun
            if plan.layout.unchecked:
                warnings.warn(
                    UncheckedConfigWarning(
                        f"{src.description} does not record these settings, so they were not checked against the "
                        f"module: {'; '.join(plan.layout.unchecked)}"
                    ),
                    stacklevel=2,
                )
            if plan.layout.forward_notes:
                warnings.warn(
                    ForwardNoteWarning(
                        f"{src.description}: for its outputs, the model's forward must also do this around the "
                        f"modules (not checked): {'; '.join(plan.layout.forward_notes)}"
                    ),
                    stacklevel=2,
                )
            if not dry_run:
                with progress_callback(plan, src, progress) as callback:
                    writer.commit(callback)
                remember_forward_notes(unwrap(module), plan.prefix, plan.layout.forward_notes)
            report = _report(plan, src, module, dry_run)
            report.seconds, report.values_checked = time.perf_counter() - started, check_values
            return report
        finally:
            if owned:
                src.close()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for one load, then as it was: the small objects a load allocates can
    set off a full collection, which walks every object of the process (torch's many: 60 ms measured inside a
    60 ms load of a 369 MB model). A load leaves no cycles that need freeing before it ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_sharded(
    module: nn.Module, given: SourceLike, options: LoadOptions, owned: bool
) -> tuple[Source, Plan, ShardedWrite]:
    """Open, plan, read and check this rank's part, then agree with every rank (see
    :func:`weightport.distributed.agree`); whatever fails here, every rank still agrees."""
    source: Source | None = None
    plan: Plan | None = None
    writer: ShardedWrite | None = None
    error: BaseException | None = None
    try:
        source = open_source(given)
        plan = plan_load(module, source, options)
        writer = ShardedWrite(plan, source, options)
        writer.read()
    except Exception as e:
        error = e
    try:
        agree(unwrap(module), plan, error, target=_describe(module))
    except BaseException:
        if owned and source is not None:
            source.close()
        raise
    assert source is not None and plan is not None and writer is not None
    return source, plan, writer


def _describe(module: nn.Module) -> str:
    return type(unwrap(module)).__name__


def _in_module_order(plan: Plan) -> list[Pairing]:
    """The layout's pairings in the order of the model's own modules (a file's order can be arbitrary)."""
    pairings = list(plan.layout.pairings)
    if len(pairings) < 2:
        return pairings
    from weightport.layouts.pairing import module_slots  # framework layouts' machinery, imported by them

    position = {slot.label: i for i, slot in enumerate(module_slots(plan.module))}
    return sorted(pairings, key=lambda p: position.get(p.module_path, len(position)))


def _report(plan: Plan, source: Source, module: nn.Module, dry_run: bool) -> LoadReport:
    seen: set[Hashable] = set()
    entries = []
    for entry in plan.entries:
        if entry.key not in seen:  # a tied tensor is one row
            seen.add(entry.key)
            entries.append(entry)
    if plan.layout.pairings:  # a framework's layout: rows in the model's own order, as its pairings
        position = {plan.prefix + name: i for i, name in enumerate(plan.module.state_dict(keep_vars=True))}
        entries.sort(key=lambda entry: position.get(entry.target, len(position)))
    # What the rows need, without the module's tensors (a kept report must not keep them alive);
    # the rows themselves are made when first asked for: most loads never look at them.
    facts = [(e.target, e.shape, e.tensor.dtype, e.source_dtype, e.rule, e.aliases) for e in entries]
    return LoadReport(
        module=_describe(module),
        source=source.description,
        layout=plan.layout.name,
        make_rows=partial(_rows, facts),
        ignored=list(plan.ignored),
        missing=list(plan.missing),
        pairings=_in_module_order(plan),
        unchecked=list(plan.layout.unchecked),
        notes=list(plan.layout.forward_notes),
        nbytes=sum(math.prod(shape) * dtype.itemsize for _, shape, dtype, *_ in facts),
        dry_run=dry_run,
        scope=plan.layout.scope,
    )


def _rows(
    facts: list[tuple[str, tuple[int, ...], torch.dtype, np.dtype, Rule, tuple[str, ...]]],
) -> list[ReportRow]:
    return [
        ReportRow(
            target=target,
            shape=shape,
            dtype=describe_dtype(dtype),
            source_dtype=describe_dtype(source_dtype),
            transform=rule.op.describe(),
            origin=rule.origin or ", ".join(rule.sources),
            aliases=aliases,
        )
        for target, shape, dtype, source_dtype, rule, aliases in facts
    ]
