"""PEFT adapters (``adapter_model.safetensors``, adapter_config.json in or beside it) for the PyTorch layout.

Into a model that has the adapter's layers (a ``PeftModel``, or a model peft injected them into: both carry
``peft_config``), an adapter's tensors go where peft's own ``set_peft_model_state_dict`` puts them: the names
peft's ``get_peft_model_state_dict`` gives the model's tensors of the active adapter (``lora_A.default.weight``
saved as ``lora_A.weight``, a ``modules_to_save`` copy under the module's own name, a prompt's
``prompt_embeddings``), every other name as it is; the base model's weights, which the file does not hold, are
left as they are; adapter_config.json's settings, which no weight shows (``lora_alpha``, ``use_rslora``,
``target_modules``), are held against the model's ``peft_config``. Into any other module (the base model) an
adapter is refused: its tensors are updates to the base model's weights, or virtual-token inputs, not weights.

>>> _adapter_part("q.lora_A.weight"), _adapter_part("base_model.model.q.hada_w1_a"), _adapter_part("q.ia3_l")
('LoRA', 'LoHa', None)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from weightport.errors import LayoutError, a_or_an
from weightport.layouts.base import LayoutPlan, Rule
from weightport.sources.base import Source

if TYPE_CHECKING:
    import torch

# the modules a PEFT LoRA adapter adds to the layers it adapts (DoRA's magnitude vector too): its file holds
# their tensors, low-rank updates to the base model's weights rather than weights of it
_LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
# the prefixes of the tensors PEFT's other tuners add (IA3's ia3_l, LoHa's hada_w1_a, LoKr's lokr_w1, VeRA's
# vera_lambda_b, OFT's oft_r, BOFT's boft_R; AdaLoRA's lora_E) -> the tuner, where a name is under PEFT's
# base_model.model. prefix, as its save_pretrained writes them
_TUNER_PREFIXES = {
    "lora_": "LoRA", "ia3_": "IA3", "hada_": "LoHa", "lokr_": "LoKr", "vera_lambda_": "VeRA", "oft_": "OFT",
    "boft_": "BOFT",
}  # fmt: skip
# PEFT's prompt learning methods (its PromptLearningConfig's): the file holds virtual-token embeddings, one
# tensor, 'prompt_embeddings', that PEFT puts before the model's inputs (or its attention's keys and values)
_PROMPT_LEARNING = frozenset(
    {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CPT", "CARTRIDGE"}
)
_PROMPT = "prompt_embeddings"
_PEFT_PREFIX = "base_model.model."
# adapter_config.json's settings that leave the eval forward of a loaded adapter alone: where the adapter came
# from, peft's bookkeeping, training-time dropout, and initialisations that the loaded values replace
_NOT_OUTPUTS = frozenset(
    {
        "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "task_type", "inference_mode",
        "lora_dropout", "module_dropout", "rank_dropout", "dropout", "megatron_core",
        "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    }
)  # fmt: skip


def _adapter_part(name: str) -> str | None:
    """The PEFT tuner whose added tensor ``name`` is, or None."""
    parts = name.split(".")
    if _LORA_PARTS.intersection(parts):
        return "LoRA"
    if not name.startswith(_PEFT_PREFIX):
        return None
    return next((t for p, t in _TUNER_PREFIXES.items() for part in parts if part.startswith(p)), None)


def plan(module: torch.nn.Module, source: Source, mapping: Mapping[str, str], name: str) -> LayoutPlan | None:
    """The plan of an adapter ``source`` into ``module`` (a layout's ``name``), None where ``source`` is no
    adapter or ``module`` takes its names as they are (layers of its own called lora_A): refused where
    ``module`` has no such layers."""
    names = [n for n in source.infos if n not in mapping]
    kind = source.metadata.get("peft_type")
    config = getattr(module, "peft_config", None)
    if not isinstance(config, Mapping) or not config:
        _refuse(module, source, names)
        return None
    if kind is None and _PROMPT not in names and not any(_adapter_part(n) for n in names):
        return None
    adapter = _active(module, config)
    settings = config[adapter]
    _compare(source, settings, adapter)
    saved = _saved_names(module, adapter, settings, source)
    own = set(module.state_dict(keep_vars=True))
    # peft's file names start base_model.model. (a PeftModel's); into a model peft injected its layers into,
    # which has no such names, they are read without it, as set_peft_model_state_dict reads them
    prefixed = any(n.startswith(_PEFT_PREFIX) for n in own)
    key = {n: n if prefixed or n in own else n.removeprefix(_PEFT_PREFIX) for n in names}
    if kind is None and not any(key[n] in saved and n not in own for n in names):
        return None  # a state dict of the whole model (its names with the adapter's name in): by name
    rules = [Rule(mapping[n], (n,), origin=f"{source.description} '{n}' (mapping=)") for n in mapping]
    for n in names:
        said = f"{source.description} '{n}'"
        if key[n] in saved:
            said += f" (adapter '{adapter}': as peft's set_peft_model_state_dict names it)"
        rules.append(Rule(saved.get(key[n], key[n]), (n,), origin=said))
    written = {r.target for r in rules} | set(saved.values())
    unchecked = [] if "adapter_config" in source.metadata else [_NO_CONFIG]
    return LayoutPlan(name=name, rules=rules, kept=sorted(own - written), unchecked=unchecked)


_NO_CONFIG = (
    "the adapter's settings (adapter_config.json: r, lora_alpha, target_modules ...): the source has none, so "
    "they were not held against the model's peft_config"
)


def _active(module: torch.nn.Module, config: Mapping[str, Any]) -> str:
    """The one adapter of ``module`` an adapter file goes into: its only one, or its one active one."""
    if len(config) == 1:
        return str(next(iter(config)))
    active = getattr(module, "active_adapters", None)
    active = active() if callable(active) else active
    active = [active] if isinstance(active, str) else list(active or ())
    if len(active) == 1 and active[0] in config:
        return str(active[0])
    raise LayoutError(
        f"{type(module).__name__} has the PEFT adapters {', '.join(repr(a) for a in config)}, of which "
        f"{', '.join(repr(a) for a in active) or 'none'} are active, and an adapter file names none of them. "
        "Nothing was written. Fix: make the one it is for active first (model.set_adapter(name)), then load."
    )


def _saved_names(module: torch.nn.Module, adapter: str, settings: Any, source: Source) -> dict[str, str]:
    """The adapter file's names -> the module's tensors, by peft's own rule: the names peft's
    ``get_peft_model_state_dict`` saves the module's tensors under (matched back by the tensor itself, so every
    tuner's renaming is peft's). A prompt learning method's ``prompt_embeddings`` go into its prompt encoder's
    embedding, where that embedding is all the encoder holds (else the file holds what the encoder's layers made
    of it, which only peft's inference-mode model takes: refused)."""
    if getattr(settings, "is_prompt_learning", False):
        encoder = f"prompt_encoder.{adapter}."
        inside = [n for n in module.state_dict(keep_vars=True) if n.startswith(encoder)]
        if inside == [f"{encoder}embedding.weight"]:
            return {_PROMPT: inside[0]}
        raise LayoutError(
            f"{source.description} holds the virtual-token embeddings of a {_peft_type(settings)} adapter "
            f"(PEFT), as its prompt encoder made them, while the prompt encoder of {type(module).__name__} has "
            f"layers over its embedding ({', '.join(n.removeprefix(encoder) for n in inside[:4])}), which would "
            "be applied to them again. Nothing was written. Fix: load it as peft does, into a model in "
            "inference mode: model = PeftModel.from_pretrained(base_model, adapter_folder)."
        )
    from peft import get_peft_model_state_dict

    state = {n: t.detach() for n, t in module.state_dict(keep_vars=True).items()}  # one object per name
    named = {id(t): n for n, t in state.items()}
    saved = get_peft_model_state_dict(
        module, state_dict=state, adapter_name=adapter, save_embedding_layers=False
    )
    return {n: named[id(t)] for n, t in saved.items() if id(t) in named}


def _peft_type(settings: Any) -> str:
    return str(_plain(getattr(settings, "peft_type", "PEFT")))


def _plain(value: Any) -> Any:
    """A setting as adapter_config.json writes it: enums by value, sets (and lists, whose order and repeats
    peft's sets leave arbitrary) as sorted lists of their distinct items.

    >>> _plain({"value", "query"}) == _plain(["query", "value", "query"])
    True
    """
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted({repr(v): v for v in map(_plain, value)}.values(), key=repr)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _compare(source: Source, settings: Any, adapter: str) -> None:
    """adapter_config.json's settings against the model's ``peft_config[adapter]``: a difference in any that
    changes the outputs (not where it came from, dropout, or an initialisation the loaded values replace) is
    refused, each named."""
    given = source.metadata.get("adapter_config")
    if not isinstance(given, Mapping):
        return
    to_dict = getattr(settings, "to_dict", None)
    model = to_dict() if callable(to_dict) else dict(vars(settings))
    differ = [
        f"{key}: {_plain(given[key])!r} in the file, {_plain(model[key])!r} in the model"
        for key in sorted(given)
        if key in model
        and key not in _NOT_OUTPUTS
        and not key.startswith("init_")
        and _plain(given[key]) != _plain(model[key])
    ]
    if differ:
        raise LayoutError(
            f"{source.description}: the adapter's settings (adapter_config.json) are not those of the model's "
            f"adapter '{adapter}' (peft_config['{adapter}']), and no weight shows them: {'; '.join(differ)}. "
            "Loaded, the outputs would not be the adapter's. Nothing was written. Fix: build the model with the "
            "adapter's own settings, get_peft_model(base_model, PeftConfig.from_pretrained(adapter_folder)), or "
            "load it with peft: PeftModel.from_pretrained(base_model, adapter_folder)."
        )


def _refuse(module: torch.nn.Module, source: Source, names: list[str]) -> None:
    """A PEFT adapter (``...q_proj.lora_A.weight``, IA3's ``...q_proj.ia3_l``, a prompt's
    ``prompt_embeddings``) into a module without PEFT's layers (the base model): its tensors update the model's
    weights, or are inputs, and its other ones (modules_to_save) alone would load a model without the update.
    A module with layers of its own under such names (lora_A) takes them by name."""
    found = {n: _adapter_part(n) for n in names}
    updates = [n for n, tuner in found.items() if tuner is not None]
    kind = source.metadata.get("peft_type")
    own = set(module.state_dict(keep_vars=True))
    if not updates and kind is None and _PROMPT not in names:
        return
    if any(_adapter_part(n) for n in own) or (not updates and set(names) <= own):
        return  # a module with layers of its own under the adapter's names takes them by name
    if str(kind).upper() in _PROMPT_LEARNING or (_PROMPT in names and not updates):
        said = str(kind) if kind and kind != "unknown" else "prompt learning"
        raise LayoutError(
            f"{source.description} is {a_or_an(said)} adapter (PEFT): '{_PROMPT}' holds virtual-token "
            "embeddings that peft puts before the model's inputs (or its attention's keys and values) as it "
            f"runs, not weights of {type(module).__name__}, and prompt learning cannot be merged into the "
            "weights. Nothing was written. Fix: run the base model with its adapter through peft: "
            "model = PeftModel.from_pretrained(base_model, adapter_folder)."
        )
    listed = updates or names
    more = f" and {len(listed) - 1} more" if len(listed) > 1 else ""
    tuner = next((t for t in found.values() if t), None)
    said = _tuner_name(str(kind) if kind and kind != "unknown" else (tuner or "PEFT"))
    what = (
        "low-rank updates (lora_A, lora_B)"
        if said.upper() in ("LORA", "ADALORA") and tuner == "LoRA"
        else f"the {said} adapter's updates"
    )
    raise LayoutError(
        f"{source.description} is {a_or_an(said)} adapter (PEFT): '{listed[0]}'{more} are {what} "
        f"to the base model's weights, not weights of {type(module).__name__}, and the adapter's other tensors "
        "alone would load a model without its update. Nothing was written. Fix: merge the adapter into the base "
        "model with peft and load the result: merged = PeftModel.from_pretrained(base_model, adapter_folder)"
        ".merge_and_unload(); merged.save_pretrained(folder); weightport.load(model, folder); or load it into "
        "the base model with its adapter's layers: weightport.load(get_peft_model(base_model, "
        "PeftConfig.from_pretrained(adapter_folder)), adapter_folder)."
    )


def _tuner_name(peft_type: str) -> str:
    """PEFT's ``peft_type`` as its tuner is named (``"LOHA"`` is LoHa).

    >>> _tuner_name("LOHA"), _tuner_name("LoRA"), _tuner_name("C3A")
    ('LoHa', 'LoRA', 'C3A')
    """
    names = {t.upper(): t for t in _TUNER_PREFIXES.values()}
    return names.get(peft_type.upper(), peft_type)
