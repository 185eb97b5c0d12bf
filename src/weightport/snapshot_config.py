"""A transformers snapshot's ``config.json`` against the configuration of the model it is loaded into.

transformers records in ``config.json`` every setting the model was built with. Into a model of that family
(its ``config`` a ``PretrainedConfig``) whose own configuration differs, the weights may fit while the
forward does not: another norm eps, activation or head count gives other outputs with the same tensors.
Every difference is refused but those only training, initialization or generation reads (dropout,
initialization, generation's settings, output flags, a mixture of experts' loss terms and returned logits, its
router noise where the model type reads it in training alone, as Mixtral, not PhiMoE, does): a setting known
to change the forward (an eps, an activation, a head count, an embedding scale, where norms or positions go)
is said to; so are another model type (a Mistral snapshot into a Llama model: same tensors, another
attention), tied or untied output embeddings, and special token ids (CLIP pools its text at ``eos_token_id``,
BART starts its decoder at ``decoder_start_token_id``); of any other, whether it does is not known (ALBERT's
layer count over one shared layer, a padding id that position ids are made from). A list and a tuple of the
same values are the same setting (config.json has no tuples), and so are rope settings naming their kind
``type`` (transformers' legacy name) or ``rope_type``. Settings config.json records that the model's
configuration lacks (another transformers version wrote it) are reported unchecked. Nested configurations
(CLIP's ``text_config``) are compared setting by setting. A file alone (no config.json) records none of this:
loaded into a transformers model, that is reported unchecked.

Other projects' folders are held against the model's own record of how it was built, where it keeps one: a
diffusers model's ``config`` (every constructor argument; ``_class_name`` against its class), a timm model's
``pretrained_cfg['architecture']`` and the arguments ``timm.create_model`` recorded. A config file held
against nothing (an open_clip folder, a timm folder loaded into a model timm did not build) is never dropped
silently: its settings are reported unchecked.

>>> text, other = {"model_type": "t", "a": 1}, {"model_type": "t", "a": 2, "b": 0}
>>> sorted(config_differences({"layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "text_config": text},
...                           {"layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.0, "text_config": other}))
[('layer_norm_eps', 1e-12, 1e-05), ('text_config.a', 1, 2)]
>>> config_differences({"depths": [1, 2], "new_setting": 3}, {"depths": (1, 2)})
[]
>>> lacking_settings({"depths": [1, 2], "new_setting": 3, "dropout": 0.1}, {"depths": (1, 2)})
['new_setting']
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from weightport.errors import Problem

__all__ = [
    "config_differences",
    "lacking_settings",
    "snapshot_config_checks",
    "unrecorded_config_note",
    "folder_config_checks",
    "unchecked_config_note",
]

# settings that change the forward while every weight keeps its shape
_FORWARD = re.compile(
    r"(eps|epsilon)$|(^|_)(act|activation|activation_function|hidden_act|act_fn|hidden_activation)$|"
    r"feed_forward_proj|is_gated_act|partial_rotary_factor|rotary_pct|rotary_dim|(^|_)(n_head|num_heads|"
    r"num_attention_heads|num_key_value_heads|encoder_attention_heads|decoder_attention_heads)$|"
    r"scale_embedding|position_embedding_type|normalize_before|do_layer_norm_before|pre_norm|rope_theta|"
    r"rope_scaling|scale_attn|attn_logit_softcapping|final_logit_softcapping|layer_norm_type|"
    r"residual_in_fp32|use_qk_norm|sliding_window|relative_attention_num_buckets|"
    r"relative_attention_max_distance"
)
# settings whose difference has a reason of its own
_REASONS = {
    "model_type": "a model of another type: the weights fit both, the forwards differ (attention, norms, "
    "positions)",
    "tie_word_embeddings": "the output embedding tied to the input one the other way: the snapshot's tensors "
    "are not the model's (and T5 scales its decoder output only when tied)",
}
_TOKEN_ID = re.compile(r"^(bos|eos|pad|decoder_start|sep|cls|mask|unk)_token_id$")
# settings only training, initialization, generation or the outputs' packaging read
_IGNORED = re.compile(
    r"(?<!token_)dropout|drop_path|drop_rate|drop_block_rate|layerdrop|initializer|init_std|"
    r"^(forced_bos|forced_eos)_token_id$|^(id2label|label2id|num_labels|"
    r"architectures|_name_or_path|transformers_version|torch_dtype|dtype|use_cache|return_dict|"
    r"output_attentions|output_hidden_states|torchscript|problem_type|finetuning_task|tokenizer_class|"
    r"prefix|task_specific_params|auto_map|_commit_hash|gradient_checkpointing|chunk_size_feed_forward|"
    r"add_cross_attention|pruned_heads|_attn_implementation.*|"
    r"bad_words_ids|begin_suppress_tokens|suppress_tokens|forced_decoder_ids|max_length|"
    r"min_length|num_beams|.*_penalty|do_sample|early_stopping|temperature|top_k|top_p|typical_p|"
    r"num_return_sequences|output_scores|return_dict_in_generate|tf_legacy_loss|use_bfloat16|"
    r"cross_attention_hidden_size|is_encoder_decoder|classifier_dropout|"
    # a mixture of experts' router: logits returned, the loss's auxiliary terms (transformers 4.57 reads
    # these nowhere else)
    r"output_router_logits|router_aux_loss_coef|router_z_loss_coef)$"
)
# model types whose modeling code reads router_jitter_noise in training alone (transformers 4.57: the
# hidden states scaled by noise under `self.training`; llama4's reads it nowhere). PhiMoE's sparsemixer
# masks experts by it in eval too, so elsewhere a difference stays one weightport does not know about.
_JITTER_IN_TRAINING = frozenset(
    {"mixtral", "minimax", "switch_transformers", "gptsan-japanese", "llama4", "llama4_text"}
)
# settings holding a rope configuration, where 'type' is transformers' legacy name of 'rope_type'
_ROPE = ("rope_scaling", "rope_parameters")


def config_differences(
    recorded: Mapping[str, Any], built: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, built value)`` for each setting both hold with other values, but those only
    training, initialization or generation read; a nested configuration's (a dict naming its ``model_type``)
    settings each on their own (``text_config.hidden_act``), any other dict (``rope_scaling``) compared whole."""
    found = []
    for key, value in recorded.items():
        if key not in built or _ignored(key, recorded):
            continue
        own = built[key]
        if isinstance(value, Mapping) and isinstance(own, Mapping) and "model_type" in value:
            found += config_differences(value, own, f"{prefix}{key}.")
        elif not (_same(_rope(value), _rope(own)) if key in _ROPE else _same(value, own)):
            found.append((prefix + key, value, own))
    return found


def lacking_settings(recorded: Mapping[str, Any], built: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The settings ``recorded`` holds and ``built`` lacks (another transformers version wrote them), but
    those only training, initialization or generation read; nested configurations' too."""
    found = []
    for key, value in recorded.items():
        if _ignored(key, recorded):
            continue
        if key not in built:
            found.append(prefix + key)
        elif isinstance(value, Mapping) and isinstance(built[key], Mapping) and "model_type" in value:
            found += lacking_settings(value, built[key], f"{prefix}{key}.")
    return found


def _ignored(key: str, recorded: Mapping[str, Any]) -> bool:
    """Whether only training, initialization or generation read ``key`` of ``recorded`` (a configuration,
    whose ``model_type`` says who reads a router's noise).

    >>> _ignored("router_jitter_noise", {"model_type": "mixtral"}), _ignored("router_jitter_noise", {"model_type": "phimoe"})
    (True, False)
    """
    if key == "router_jitter_noise":
        return recorded.get("model_type") in _JITTER_IN_TRAINING
    return _IGNORED.search(key) is not None


def _rope(value: Any) -> Any:
    """A rope configuration with the legacy ``type`` read as ``rope_type``, as transformers reads it
    (``{"type": "linear", "factor": 2}`` is ``{"rope_type": "linear", "factor": 2}``).

    >>> _rope({"type": "linear", "factor": 2.0}) == _rope({"rope_type": "linear", "type": "linear", "factor": 2.0})
    True
    """
    if not isinstance(value, Mapping) or "type" not in value:
        return value
    found = {**value, "rope_type": value.get("rope_type", value["type"])}
    if found["rope_type"] == found["type"]:
        del found["type"]
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # config.json writes tuples as lists
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b) or abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)))
    return bool(a == b)


def _transformers_model(module: nn.Module) -> nn.Module | None:
    """The transformers model ``module`` is, or the first one it holds."""
    for sub in module.modules():
        if callable(getattr(getattr(sub, "config", None), "to_dict", None)) and hasattr(
            sub, "base_model_prefix"
        ):
            return sub
    return None


def _config_dict(model: nn.Module | None) -> Mapping[str, Any] | None:
    """The configuration of ``model`` (a :func:`_transformers_model`) as a dict; None where there is none."""
    found = getattr(model, "config").to_dict() if model is not None else None  # noqa: B009 (a config, not a Tensor)
    return found if isinstance(found, dict) else None


def _as_loaded(config: Any, recorded: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` as the configuration ``from_pretrained`` builds from it (its class's ``from_dict``): every
    setting config.json leaves out at that class's default, derived ones (a head size) derived as then."""
    try:
        found = type(config).from_dict(dict(recorded)).to_dict()
    except Exception:  # a config.json its class cannot read: what it records, over the shared defaults
        found = None
    if not isinstance(found, dict):
        return {**_base_defaults(), **recorded}
    return {**found, "model_type": recorded.get("model_type", found.get("model_type"))}


def snapshot_config_checks(
    module: nn.Module, recorded: Any, where: str, root: nn.Module | None = None
) -> tuple[list[Problem], list[str]] | None:
    """Problems for settings of ``recorded`` (a snapshot's ``config.json``) that change the forward and
    differ in ``module``'s transformers configuration, and notes for the other differences; None where
    ``module`` holds no transformers model (nothing to hold the file's configuration against). ``root``: the
    model ``module`` is part of (loaded with ``prefix=``), whose class says whether it is the snapshot's."""
    model = _transformers_model(module) if isinstance(recorded, dict) else None
    built = _config_dict(model)
    if model is None or built is None:
        return None
    recorded = _part_of(recorded, built)
    typed = "model_type" in recorded  # PretrainedConfig's own default, '', is no model type to compare with
    if typed:
        filled = _as_loaded(getattr(model, "config"), recorded)  # noqa: B009
    else:  # no class to read it with: what it records, over the settings every configuration shares
        filled = {**{k: v for k, v in _base_defaults().items() if k != "model_type"}, **recorded}
    # a model of a class the snapshot is not (its base, another head): its head may read token ids of its own
    whole = _transformers_model(root) if root is not None else None
    loaded_into = type(whole or model).__name__
    other_class = loaded_into not in (recorded.get("architectures") or [loaded_into])
    problems, notes = [], []
    for key, value, own in config_differences(filled, built):
        if other_class and _TOKEN_ID.match(key.rpartition(".")[2]):
            notes.append(
                f"{where}'s config.json records {key}={value!r}, the model has {own!r}: a special token's id, which "
                f"the snapshot's {', '.join(recorded['architectures'])} may read differently from this "
                f"{type(model).__name__} (its own head's setting): not checked"
            )
            continue
        problems.append(_differs(key, value, f"{key}={own!r}", where, "config.json", _FIXES["transformers"]))
    lacking = lacking_settings(recorded, built)
    if lacking:
        notes.append(
            f"{where}'s config.json records settings the model's configuration does not have ("
            + ", ".join(lacking)
            + "): written by another transformers version; whether the model reads them is not checked"
        )
    if not typed:
        notes.append(
            f"{where}'s config.json records no model_type, so whether it is a snapshot of a "
            f"'{built.get('model_type')}' model is not checked"
        )
    return problems, notes


def _differs(key: str, value: Any, own: str, where: str, file: str, fix: str) -> Problem:
    """The refusal of a setting ``key`` that ``file`` records as ``value`` and the model has as ``own``."""
    return Problem(
        f"config.{key}",
        f"{key}={value!r}, as {where}'s {file} records the model was built",
        f"the model was built with {own}: " + _reason(key.rpartition(".")[2]),
        fix,
    )


# how to build the model as each project's config file records it
_FIXES = {
    "transformers": "build the model from the snapshot's configuration (AutoConfig.from_pretrained(folder), or "
    "Model.from_pretrained's config)",
    "diffusers": "build the model from the folder's configuration (Model.from_config(Model.load_config(folder)), "
    "or Model.from_pretrained(folder))",
    "timm": "build the model as config.json records it (timm.create_model(config['architecture'], "
    "**config['model_args']))",
    "open_clip": "build the model from it (open_clip.create_model('local-dir:' + folder))",
}
# where each project's config file keeps the settings the model is built with (others: the whole file)
_MODEL_SETTINGS = {
    "timm": ("architecture", "num_classes", "global_pool", "model_args"),
    "open_clip": ("model_cfg",),
}


def folder_config_checks(
    module: nn.Module, folder: Mapping[str, Any], where: str, root: nn.Module | None = None
) -> tuple[list[Problem], list[str]] | None:
    """Problems and notes, as :func:`snapshot_config_checks`, for a folder's config file (``folder``:
    ``writer``, ``file``, ``settings``, as weightport.sources.snapshot reads it) against the record the
    model keeps of how it was built; None where it keeps none (nothing to hold the file against)."""
    writer, settings = folder.get("writer"), folder.get("settings")
    if not isinstance(settings, dict):
        return None
    if writer == "diffusers":
        return _diffusers_checks(module, settings, where)
    if writer == "timm":
        return _timm_checks(module, settings, where)
    if writer in (None, "transformers", "sentence-transformers"):
        return snapshot_config_checks(module, settings, where, root)
    return None


def unchecked_config_note(folder: Mapping[str, Any], where: str) -> str:
    """The note for a folder's config file held against nothing: the settings it records that may change
    the outputs, the forward's own (an eps, an activation, a head count) first.

    >>> unchecked_config_note({"writer": "open_clip", "file": "open_clip_config.json", "settings":
    ...     {"model_cfg": {"embed_dim": 16, "quick_gelu": True}}}, "folder 'f'")  # doctest: +ELLIPSIS
    "folder 'f''s open_clip_config.json (open_clip's) records how the model was built (embed_dim=16, quick_gelu=True), ...
    """
    writer, file, settings = folder.get("writer"), folder.get("file"), folder.get("settings") or {}
    kept = _MODEL_SETTINGS.get(str(writer))
    flat = _flat({k: v for k, v in settings.items() if kept is None or k in kept})
    if kept is not None:  # the part named for what it holds (model_cfg.quick_gelu): its setting's own name
        flat = [
            (k.partition(".")[2] if k.startswith(("model_cfg.", "model_args.")) else k, v) for k, v in flat
        ]
    flat.sort(key=lambda kv: not _FORWARD.search(kv[0].rpartition(".")[2]))
    shown = ", ".join(f"{k}={_short(v)}" for k, v in flat[:10]) + (
        f" and {len(flat) - 10} more" if len(flat) > 10 else ""
    )
    return (
        f"{where}'s {file} ({writer + chr(39) + 's' if writer else 'of no project weightport knows'}) records "
        f"how the model was built ({shown or 'no settings'}), and the model keeps no record of its own to hold "
        f"it against: settings that change the outputs while every weight fits (an activation, an eps, a head "
        f"count, a pooling) are not checked. Fix: {_FIXES.get(str(writer), 'build the model with these settings')}"
    )


def _flat(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``settings`` as (dotted key, value), nested dicts opened; private (``_``) and training-only ones left
    out."""
    found: list[tuple[str, Any]] = []
    for key, value in settings.items():
        if str(key).startswith("_") or _ignored(str(key), settings):
            continue
        if isinstance(value, Mapping):
            found += _flat(value, f"{prefix}{key}.")
        else:
            found.append((prefix + str(key), value))
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _diffusers_checks(
    module: nn.Module, recorded: dict[str, Any], where: str
) -> tuple[list[Problem], list[str]] | None:
    """A diffusers folder's config.json against the diffusers model's ``config`` (every constructor argument,
    as ``register_to_config`` records them), settings config.json leaves out at the class's defaults, as
    ``from_pretrained`` builds them."""
    model = next(
        (
            sub
            for sub in module.modules()
            if getattr(type(sub), "config_name", None) == "config.json"
            and isinstance(getattr(sub, "config", None), Mapping)
        ),
        None,
    )
    if model is None:
        return None
    built = {k: v for k, v in getattr(model, "config").items() if not str(k).startswith("_")}  # noqa: B009
    defaults = _defaults(type(model))
    given = {k: v for k, v in recorded.items() if not str(k).startswith("_")}
    filled = {**{k: v for k, v in defaults.items() if k in built}, **given}
    problems, fix = [], _FIXES["diffusers"]
    kind = recorded.get("_class_name")
    if kind and kind != type(model).__name__:
        problems.append(
            Problem(
                "config._class_name",
                f"a {kind}, as {where}'s config.json records the model",
                f"a {type(model).__name__}: a model of another class, whose forward may differ with the same "
                "tensors",
                f"build a {kind} ({kind}.from_pretrained(folder))",
            )
        )
    for key, value, own in config_differences(filled, built):
        problems.append(_differs(key, value, f"{key}={own!r}", where, "config.json", fix))
    lacking = [k for k in given if k not in built and not _ignored(k, given)]
    notes = [
        f"{where}'s config.json records settings the model's configuration does not have ({', '.join(lacking)}): "
        "written by another diffusers version; whether the model reads them is not checked"
    ]
    return problems, notes if lacking else []


def _defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls``'s constructor arguments (what diffusers builds a setting config.json leaves
    out with)."""
    import inspect

    try:
        parameters = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _timm_checks(
    module: nn.Module, recorded: dict[str, Any], where: str
) -> tuple[list[Problem], list[str]] | None:
    """A timm folder's config.json (``timm.models.push_to_hf_hub``'s: ``architecture``, ``model_args``)
    against the timm model's ``pretrained_cfg['architecture']`` and the arguments ``timm.create_model``
    recorded (timm's own ``get_model_args``, as the file's were written)."""
    model = next(
        (
            sub
            for sub in module.modules()
            if "architecture" in (_mapping(getattr(sub, "pretrained_cfg", None)) or {})
        ),
        None,
    )
    if model is None:
        return None
    problems, notes, fix = [], [], _FIXES["timm"]
    architecture, own = recorded.get("architecture"), (_mapping(model.pretrained_cfg) or {})["architecture"]
    if architecture != own:
        problems.append(
            Problem(
                "config.architecture",
                f"a {architecture}, as {where}'s config.json records the model",
                f"a {own}: another timm architecture, whose forward may differ with the same tensors (padding, "
                "activations, norms)",
                fix,
            )
        )
    args, built = recorded.get("model_args"), _timm_args(model)
    if not isinstance(args, Mapping) or built is None:
        notes.append(
            f"{where}'s config.json records "
            + (
                "no model_args"
                if not isinstance(args, Mapping)
                else "model_args, and the model keeps no record of its own (built by timm.create_model)"
            )
            + ": the model's arguments (activation, pooling, norms) are not checked"
        )
        return problems, notes
    given = {**{k: recorded[k] for k in ("num_classes", "global_pool") if k in recorded}, **args}
    for key, value, own_value in config_differences(given, built):
        problems.append(_differs(key, value, f"{key}={own_value!r}", where, "config.json", fix))
    given_to_timm = _mapping(getattr(model, "_model_args", None)) or {}
    for key in sorted(set(given).symmetric_difference(built)):
        if _ignored(key, given) or (key not in given and key not in given_to_timm):
            continue  # a trait timm reports of every model (in_chans): older timm wrote none of them
        if key in given:
            problems.append(
                _differs(
                    key, given[key], f"{key} left at the architecture's default", where, "config.json", fix
                )
            )
        else:
            problems.append(
                Problem(
                    f"config.{key}",
                    f"{key} at the architecture's default, as {where}'s config.json records none",
                    f"the model was built with {key}={built[key]!r}: " + _reason(key),
                    fix,
                )
            )
    return problems, notes


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _timm_args(model: nn.Module) -> dict[str, Any] | None:
    """The arguments ``timm.create_model`` built ``model`` with, as timm writes them to config.json (its
    ``get_model_args``: the recorded ``_model_args`` with the pooling and classes the model has now); None
    where it recorded none (a model built by its class)."""
    if not isinstance(getattr(model, "_model_args", None), Mapping):
        return None
    reader = getattr(sys.modules.get("timm.models._input"), "get_model_args", None)  # imported: timm built it
    try:
        found = reader(model) if reader is not None else getattr(model, "_model_args")  # noqa: B009
    except Exception:  # a timm whose reader fails on this model: what the factory recorded
        found = getattr(model, "_model_args")  # noqa: B009
    return dict(found)


def _part_of(recorded: dict[str, Any], built: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration ``recorded`` holds for a model of ``built``'s type: a composite's part (CLIP's
    ``vision_config`` for a ``CLIPVisionModel``, as that class's ``from_pretrained`` reads it), else
    ``recorded`` itself. The snapshot's architectures go with the part."""
    kind = built.get("model_type")
    if not kind or recorded.get("model_type") == kind:
        return recorded
    parts = [v for v in recorded.values() if isinstance(v, dict) and v.get("model_type") == kind]
    if len(parts) != 1:
        return recorded
    return {**parts[0], "architectures": recorded.get("architectures")}


def _reason(key: str) -> str:
    if key in _REASONS:
        return _REASONS[key]
    if _FORWARD.search(key):
        return "the weights fit both, the outputs differ"
    if _TOKEN_ID.match(key):
        return (
            "a special token's id, which a forward may read (pooling at the end token, the decoder's start)"
        )
    return "the weights fit both, and whether the outputs differ weightport does not know"


def unrecorded_config_note(module: nn.Module, where: str) -> str | None:
    """The note for weights of a transformers model read from a file alone: it records none of the settings
    config.json holds (None where ``module`` holds no transformers model)."""
    if _config_dict(_transformers_model(module)) is None:
        return None
    return (
        f"{where} records none of the transformers model's configuration the weights do not show (norm eps, "
        "activation, attention heads, positions): build the model from the config the weights were made "
        "with (a transformers snapshot folder, its config.json beside the weights, is checked against it)"
    )


def _base_defaults() -> dict[str, Any]:
    """The settings every transformers configuration has, at their defaults: save_pretrained writes them to
    config.json only where they differ (``is_decoder`` is recorded only when True)."""
    transformers = sys.modules.get("transformers")  # imported: the model is one of its classes
    base = getattr(transformers, "PretrainedConfig", None)
    found = base().to_dict() if base is not None else {}
    return found if isinstance(found, dict) else {}
