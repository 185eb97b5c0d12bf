"""The PyTorch layout: source names are state-dict names, values go in as they are.

Prefixes that ``torch.compile`` (``_orig_mod.``) and DataParallel (``module.``)
add are dropped when every source name carries them and the names without them are the module's
(where both readings are, the one that places every name; else the load is refused).

>>> import numpy as np, torch
>>> from weightport.sources import open_source
>>> src = open_source({"module.weight": np.ones((2, 2), np.float32), "module.bias": np.ones(2, np.float32)})
>>> [r.target for r in plan(torch.nn.Linear(2, 2), src).rules]
['weight', 'bias']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from weightport.errors import LayoutError
from weightport.layouts import adapters
from weightport.layouts.base import LayoutPlan, Rule, base_model_prefix
from weightport.sources.base import Source
from weightport.transforms import Transpose

if TYPE_CHECKING:
    import torch

    from weightport.call_order import CallOrder

NAME = "torch"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(names: list[str], module_names: set[str]) -> str:
    """The wrapper prefix to drop from every name ('' if none applies).

    The readings are the names as they are and with each prefix every name carries dropped in turn. The
    one complete reading (every name the module's) is taken; where none is complete, the one reading in
    which any name is the module's (or, where none, every prefix dropped, for the errors to name). Two
    complete readings, or two partial ones, are refused (a LayoutError listing them): a model with a
    submodule called ``module`` can take a DataParallel checkpoint's names either way.

    >>> strip_wrapper_prefixes(["module.w", "module.b"], {"module.w", "module.b", "w"})  # as they are: all
    ''
    >>> strip_wrapper_prefixes(["module.module.w", "module.w"], {"w", "module.w"})  # without: all
    'module.'
    """
    readings = [""]
    current = names
    changed = True
    while changed and current:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(n.startswith(prefix) for n in current):
                readings.append(readings[-1] + prefix)
                current = [n[len(prefix) :] for n in current]
                changed = True
    matched = {r: [n for n in names if n[len(r) :] in module_names] for r in readings}
    complete = [r for r in readings if len(matched[r]) == len(names)]
    partial = [r for r in readings if matched[r]]
    if len(complete) == 1:
        return complete[0]
    if not complete and len(partial) <= 1:
        return partial[0] if partial else readings[-1]
    said = "; ".join(_reading(r, names, matched[r]) for r in (complete or partial))
    choices = " or ".join(
        f"mapping={{n: n{f'.removeprefix({r!r})' if r else ''} for n in names}} ({'as they are' if not r else f'without {r!r}'})"
        for r in (complete or partial)
    )
    raise LayoutError(
        f"the source's names can be read {len(complete or partial)} ways, each with names of the module, and "
        f"weightport does not choose: {said}. Fix: name the reading with {choices}, where names are the source's "
        "tensor names (weightport.open_source(source).infos; pairs you name with mapping= are taken as they are); "
        "strict=False does not choose between them."
    )


def _reading(dropped: str, names: list[str], matched: list[str]) -> str:
    """One reading of ``names`` for a message: what it drops and how many of its names the module has."""
    how = f"without '{dropped}'" if dropped else "as they are"
    unmatched = [n[len(dropped) :] for n in names if n not in set(matched)]
    left = (
        f", not {', '.join(repr(n) for n in unmatched[:3])}{' ...' if len(unmatched) > 3 else ''}"
        if unmatched
        else ""
    )
    return f"{how}, {len(matched)} of {len(names)} are the module's{left}"


def plan(
    module: torch.nn.Module,
    source: Source,
    mapping: Mapping[str, str] | None = None,
    *,
    call_order: CallOrder | None = None,
) -> LayoutPlan:
    """One identity rule per source tensor; ``mapping`` renames source names first. A ``.safetensors``
    file that transformers wrote from a Flax or TensorFlow model (``__metadata__`` ``format``) holds that
    framework's names and layouts (Dense kernels ``(in, out)``), and is refused. A transformers snapshot
    of GPT-2 (and the other models whose ``config.json`` ``model_type`` builds transformers' ``Conv1D``)
    keeps ``c_attn``/``c_proj``/``c_fc``/``q_attn`` weights ``(in, out)``: into an ``nn.Linear`` they are
    transposed, square ones too, whose shape could not show it. Old names PyTorch's or transformers' loading
    accepts are renamed: ``weight_g``/``weight_v`` (weight norm), a norm's ``gamma``/``beta``. A transformers
    checkpoint of a model with a head goes into its base model as transformers' own loading takes it: the base
    model's part, its prefix (``bert.``) dropped; the head's tensors find no place. A transformers model with a
    ``_checkpoint_conversion_mapping`` (Llava's: ``save_pretrained`` writes the names older versions had)
    takes each name renamed by it as ``from_pretrained`` does (the first pattern that matches), where the
    renamed name is the model's and the name itself is not; each such rule's origin says so. A PEFT adapter goes
    by :mod:`weightport.layouts.adapters`: into a model with its layers as peft loads it, else refused."""
    _refuse_other_frameworks(source)
    mapping = dict(mapping or {})
    names = list(source.infos)
    unknown = [key for key in mapping if key not in source.infos]
    if unknown:
        close = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
        said = ", ".join(
            f"'{k}'" + (f" (did you mean '{close[k][0]}'?)" if close[k] else "") for k in unknown[:8]
        )
        raise LayoutError(
            f"mapping names {said}, which the source ({source.description}) does not hold: mapping= renames the source's "
            "tensors to the module's names. Fix: key it by the source's names (weightport inspect FILE lists them)."
        )
    adapter = adapters.plan(module, source, mapping, NAME)
    if adapter is not None:
        return adapter
    dropped = ""
    if any(n.startswith(WRAPPER_PREFIXES) for n in names):
        module_names = set(module.state_dict(keep_vars=True))
        dropped = strip_wrapper_prefixes([n for n in names if n not in mapping], module_names)
    own = {name: name[len(dropped) :] if name.startswith(dropped) else name for name in names}
    converted = _converted_names(module, [own[n] for n in names if n not in mapping])
    own = {
        name: converted.get(target, target) if name not in mapping else target for name, target in own.items()
    }
    base = _base_model_part(module, [own[n] for n in names if n not in mapping])
    own = {name: target.removeprefix(base) if name not in mapping else target for name, target in own.items()}
    legacy = [n for n in own.values() if n.endswith(_LEGACY_WEIGHT_NORM)]
    renamed = _weight_norm_names(module, legacy) if legacy else {}
    old_norms = [n for n in own.values() if n.rpartition(".")[2] in _OLD_NORM_NAMES]
    renamed.update(_norm_names(module, old_norms) if old_norms else {})
    conv1d = source.metadata.get("model_type") in _CONV1D_MODEL_TYPES
    rules = []
    for name in names:
        target = mapping.get(name, renamed.get(own[name], own[name]))
        origin = f"{source.description} '{name}'"
        if own[name] in converted.values() and name not in mapping:
            origin += f" (renamed by {type(module).__name__}._checkpoint_conversion_mapping, as from_pretrained does)"
        if conv1d and _into_linear(module, name, target):
            rules.append(Rule(target, (name,), Transpose((1, 0)), f"{origin} ({_CONV1D_SAID})"))
        else:
            rules.append(Rule(target, (name,), origin=origin))
    _refuse_rescaled(module, rules)
    return LayoutPlan(name=NAME, rules=rules)


def _refuse_rescaled(module: torch.nn.Module, rules: list[Rule]) -> None:
    """A module whose eval forward has rescaled weights in place (RWKV after a forward, ``layers_are_rescaled``)
    takes a checkpoint's unscaled ones only with its flag cleared, as ``from_pretrained``'s fresh model has it:
    written as they are, the next forward would not rescale them. A part of such a model loaded by itself (one
    block) is refused too: the flag is its holder's, and clearing it would rescale the blocks not loaded twice."""
    from weightport.torch_facts import rescaled_by_owner, rescaled_in_place

    rescaled = rescaled_in_place(module)
    hit, more = _written_among(rules, rescaled)
    if hit:
        flag = rescaled[hit[0]]
        raise LayoutError(
            f"'{hit[0]}'{more}: the model has run an eval forward, "
            f"which rescaled these weights in place ({flag}=True), while the source holds them unscaled, as "
            f"save_pretrained writes them: written as they are, the next forward would not rescale them and its "
            f"outputs would be wrong. Nothing was written. Fix: set model.{flag} = False before loading (the next "
            "eval forward rescales the loaded weights, as in from_pretrained's model), where the load writes all "
            "of them; or load into a model built again, before any forward."
        )
    held = rescaled_by_owner(module)
    hit, more = _written_among(rules, held)
    if hit:
        holder = held[hit[0]]
        raise LayoutError(
            f"'{hit[0]}'{more}: {type(module).__name__} is part of a {holder.partition('.')[0]} that has run an "
            f"eval forward, which rescaled these weights in place ({holder}=True), while the source holds them "
            "unscaled, as save_pretrained writes them: written as they are, the next forward would not rescale "
            "them and its outputs would be wrong (clearing the flag would rescale the parts not loaded twice). "
            "Nothing was written. Fix: scale the model back first (model.train(), one forward under "
            "torch.no_grad(), which multiplies every block back and clears the flag, then model.eval()), and "
            "load; or load into a model built again, before any forward."
        )


def _written_among(rules: list[Rule], names: Collection[str]) -> tuple[list[str], str]:
    """The rules' targets among ``names``, and " and N more" past the first, for a message."""
    hit = [r.target for r in rules if r.target in names]
    return hit, f" and {len(hit) - 1} more" if len(hit) > 1 else ""


def _converted_names(module: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Source names -> the module's, by the module's ``_checkpoint_conversion_mapping`` (regex -> replacement,
    the first pattern that matches, as transformers' ``key_mapping``): where the renamed name is the module's
    and the name is not.

    >>> import torch
    >>> model = torch.nn.Module(); model.lm_head = torch.nn.Linear(1, 1)
    >>> model._checkpoint_conversion_mapping = {"^language_model.lm_head": "lm_head"}
    >>> _converted_names(model, ["language_model.lm_head.weight", "other.weight"])
    {'language_model.lm_head.weight': 'lm_head.weight'}
    """
    conversion = getattr(module, "_checkpoint_conversion_mapping", None)
    if not isinstance(conversion, Mapping) or not conversion:
        return {}
    module_names = set(module.state_dict(keep_vars=True))
    renamed = {}
    for name in names:
        for pattern, replacement in conversion.items():
            new, count = re.subn(pattern, replacement, name)
            if count:
                if new in module_names and name not in module_names:
                    renamed[name] = new
                break
    return renamed


# transformers models whose checkpoints keep these modules as transformers' Conv1D, a Linear whose weight is
# stored (in, out): a snapshot's config.json names the model_type (their modeling code builds them so)
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
_CONV1D_SAID = "transformers' Conv1D stores it (in, out): transposed for nn.Linear"


def _into_linear(module: torch.nn.Module, name: str, target: str) -> bool:
    """Whether source tensor ``name`` is a Conv1D weight going into an ``nn.Linear``'s weight (transposed);
    into transformers' own Conv1D it goes as it is."""
    from torch import nn

    path, _, leaf = target.rpartition(".")
    if leaf != "weight" or name.rpartition(".")[0].rpartition(".")[2] not in _CONV1D_MODULES:
        return False
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(owner, nn.Linear)


_FRAMEWORK_FILES = {
    "flax": ("Flax", "flax_model.msgpack", "from_flax"),
    "tf": ("TensorFlow", "tf_model.h5", "from_tf"),
}


def _refuse_other_frameworks(source: Source) -> None:
    declared = source.metadata.get("safetensors", {}).get("format", "pt")
    if declared not in _FRAMEWORK_FILES:
        return
    framework, native, flag = _FRAMEWORK_FILES[declared]
    raise LayoutError(
        f"{source.description} was written by transformers from a {framework} model (its __metadata__ says "
        f"format='{declared}'): it holds {framework}'s names and layouts (Dense kernels stored (in, out)), not "
        f"PyTorch's, and read as PyTorch names it would load transposed or not at all. Fix: save the model with "
        f"save_pretrained(..., safe_serialization=False), which writes {native} (weightport ports it), or "
        f"convert the checkpoint with transformers ({flag}=True) and save it again."
    )


def _base_model_part(module: torch.nn.Module, names: list[str]) -> str:
    """The prefix (``bert.``) of the base model's part of a transformers checkpoint of a model with a head,
    where ``module`` is that base model and some of ``names`` drop into its own names without it; else ''."""
    prefix = base_model_prefix(module)
    if prefix is None:
        return ""
    module_names = set(module.state_dict(keep_vars=True))
    inside = f"{prefix}."
    return inside if any(n.startswith(inside) and n[len(inside) :] in module_names for n in names) else ""


# torch.nn.utils.weight_norm (deprecated) stored g and v as <name>_g, <name>_v; its successor,
# torch.nn.utils.parametrizations.weight_norm, holds them as parametrizations.<name>.original0 and
# original1, and its load_state_dict hook accepts the old names: so are they accepted here.
_LEGACY_WEIGHT_NORM = ("_g", "_v")


def weight_norm_name(name: str) -> str | None:
    """The name ``torch.nn.utils.parametrizations.weight_norm`` keeps an old weight-norm tensor under
    (``_g``: ``original0``, ``_v``: ``original1``), or None for a name of no such form. The one home of
    that fact: the PyTorch, transformers-TF and Flax layouts all accept the old names.

    >>> weight_norm_name("conv.weight_v"), weight_norm_name("weight_g"), weight_norm_name("conv.weight")
    ('conv.parametrizations.weight.original1', 'parametrizations.weight.original0', None)
    """
    path, _, leaf = name.rpartition(".")
    if not leaf.endswith(_LEGACY_WEIGHT_NORM):
        return None
    return (
        f"{path + '.' if path else ''}parametrizations.{leaf[:-2]}.original{0 if leaf.endswith('_g') else 1}"
    )


def _weight_norm_names(module: torch.nn.Module, legacy: list[str]) -> dict[str, str]:
    """Old weight-norm names -> the parametrization's, where the module has those and not the old ones, and
    the parametrization is torch's weight norm alone (another one of two tensors means something else by them)."""
    module_names = set(module.state_dict(keep_vars=True))
    renamed = {}
    for name in legacy:
        new = weight_norm_name(name)
        if (
            new is not None
            and name not in module_names
            and new in module_names
            and weight_normed(module, name)
        ):
            renamed[name] = new
    return renamed


def weight_normed(module: torch.nn.Module, name: str) -> bool:
    """Whether old weight-norm name ``name`` (``conv.weight_g``) falls on a tensor of ``module`` that
    ``torch.nn.utils.parametrizations.weight_norm`` parametrizes, and nothing else does.

    >>> import torch
    >>> from torch.nn.utils.parametrizations import weight_norm
    >>> weight_normed(torch.nn.Sequential(weight_norm(torch.nn.Linear(2, 2))), "0.weight_v")
    True
    >>> weight_normed(torch.nn.Linear(2, 2), "weight_v")
    False
    """
    from torch.nn.utils import parametrizations, parametrize

    path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return False
    tensor = leaf[:-2]
    if not parametrize.is_parametrized(owner, tensor):
        return False
    chain = getattr(owner.parametrizations, tensor)  # a ModuleDict of ParametrizationLists
    weight_norm = getattr(parametrizations, "_WeightNorm", None)
    return weight_norm is not None and len(chain) == 1 and type(chain[0]) is weight_norm


# Old TensorFlow-born checkpoints (BERT's) name a norm's weight and bias gamma and beta; transformers renames
# them as it loads: so are they renamed here, where the module is a norm of PyTorch's and has no such names.
_OLD_NORM_NAMES = {"gamma": "weight", "beta": "bias"}


def _norm_names(module: torch.nn.Module, old: list[str]) -> dict[str, str]:
    """``<norm>.gamma``/``.beta`` -> ``<norm>.weight``/``.bias`` where ``<norm>`` is an ``nn.LayerNorm``,
    ``nn.GroupNorm`` or ``nn.BatchNorm*d`` of the module."""
    from torch import nn

    module_names = set(module.state_dict(keep_vars=True))
    renamed = {}
    for name in old:
        path, _, leaf = name.rpartition(".")
        try:
            owner = module.get_submodule(path)
        except AttributeError:
            continue
        new = f"{path + '.' if path else ''}{_OLD_NORM_NAMES[leaf]}"
        norm = isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
        if norm and name not in module_names and new in module_names:
            renamed[name] = new
    return renamed


def export(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every state-dict tensor as a NumPy copy, under its own name."""
    from weightport.tensors import numpy_of

    return {name: numpy_of(t, copy=True) for name, t in module.state_dict().items()}


def describe(source: Source) -> list[dict[str, Any]]:
    """No layers: PyTorch's names are the model's own, one tensor each."""
    return []
