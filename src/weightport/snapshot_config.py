"""A transformers snapshot's ``config.json`` against the configuration of the model it is loaded into.

transformers records in ``config.json`` every setting the model was built with. Into a model of that family
(its ``config`` a ``PretrainedConfig``) whose own configuration differs, the weights may fit while the
forward does not: another norm eps, activation or head count gives other outputs with the same tensors.
Those settings (by their names: an eps, an activation, a head count, an embedding scale, where norms or
positions go) are refused; any other difference, but those that only training or generation reads
(dropout, initialization, token ids, output flags), is reported unchecked.

>>> sorted(config_differences({"layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1},
...                           {"layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.0}))
[('layer_norm_eps', 1e-12, 1e-05)]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from weightport.errors import Problem

__all__ = ["config_differences", "snapshot_config_checks"]

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
# settings only training, initialization, generation or the outputs' packaging read
_IGNORED = re.compile(
    r"dropout|drop_path|layerdrop|initializer|init_std|_token_id$|token_ids$|^(id2label|label2id|num_labels|"
    r"architectures|_name_or_path|transformers_version|torch_dtype|dtype|use_cache|return_dict|"
    r"output_attentions|output_hidden_states|torchscript|problem_type|finetuning_task|tokenizer_class|"
    r"prefix|task_specific_params|auto_map|_commit_hash|gradient_checkpointing|chunk_size_feed_forward|"
    r"tie_word_embeddings|is_decoder|add_cross_attention|pruned_heads|_attn_implementation.*|"
    r"model_type|bad_words_ids|begin_suppress_tokens|suppress_tokens|forced_decoder_ids|max_length|"
    r"min_length|num_beams|.*_penalty|do_sample|early_stopping|temperature|top_k|top_p|typical_p|"
    r"num_return_sequences|output_scores|return_dict_in_generate|tf_legacy_loss|use_bfloat16|"
    r"cross_attention_hidden_size|is_encoder_decoder|classifier_dropout|summary_.*)$"
)


def config_differences(recorded: Mapping[str, Any], built: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, built value)`` for each setting both hold with other values, but those only
    training, initialization or generation read."""
    return [
        (key, value, built[key])
        for key, value in recorded.items()
        if key in built and not _IGNORED.search(key) and not _same(value, built[key])
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b) or abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)))
    return bool(a == b)


def _model_config(module: nn.Module) -> Mapping[str, Any] | None:
    """The configuration of the transformers model ``module`` is, or the first one it holds."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        to_dict = getattr(config, "to_dict", None)
        if callable(to_dict) and hasattr(sub, "base_model_prefix"):
            found = to_dict()
            return found if isinstance(found, dict) else None
    return None


def snapshot_config_checks(
    module: nn.Module, recorded: Any, where: str
) -> tuple[list[Problem], list[str]] | None:
    """Problems for settings of ``recorded`` (a snapshot's ``config.json``) that change the forward and
    differ in ``module``'s transformers configuration, and notes for the other differences; None where
    ``module`` holds no transformers model (nothing to hold the file's configuration against)."""
    built = _model_config(module) if isinstance(recorded, dict) else None
    if built is None:
        return None
    problems, notes = [], []
    for key, value, own in config_differences(recorded, built):
        if _FORWARD.search(key):
            problems.append(
                Problem(
                    f"config.{key}",
                    f"{key}={value!r}, as {where}'s config.json records the model was built",
                    f"the model was built with {key}={own!r}: the weights fit both, the outputs differ",
                    "build the model from the snapshot's configuration "
                    "(AutoConfig.from_pretrained(folder), or Model.from_pretrained's config)",
                )
            )
        else:
            notes.append(
                f"whether config.json's {key}={value!r}, where the model has {own!r}, changes the forward"
            )
    return problems, notes
