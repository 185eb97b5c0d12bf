"""transformers snapshot folders the second probe found read wrongly: variant names, VLM checkpoint names,
settings that leave eval outputs alone, RWKV's in-place rescaling, DeBERTa-v2 TF names, PEFT adapters.

Every folder here is written by transformers itself (weights random); the oracle is the saved model's own
outputs (or TensorFlow's), compared bit for bit where the load is exact.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import weightport
from conftest import refused
from weightport import SourceError

transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES |= {"intermediate_size": 48, "num_key_value_heads": 2, "tie_word_embeddings": False}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _qwen(**changes: Any) -> Any:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES, **changes)).eval()


def _logits(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


IDS = torch.from_numpy(np.random.default_rng(1).integers(3, 90, (2, 9)))


# 1. save_pretrained(variant=...)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_a_variant_snapshot_is_checked_against_its_config_json(tmp_path: Path, shard: str | None) -> None:
    """model.fp16.safetensors (or its shards and model.safetensors.index.fp16.json) beside config.json: the
    folder is a snapshot, so a model built with another norm eps (other outputs, checked here) is refused;
    it loaded silently, config.json listed as ignored."""
    saved = _randomize(_qwen(), 7)
    saved.save_pretrained(tmp_path, variant="fp16", **({"max_shard_size": shard} if shard else {}))
    assert any(".fp16" in n for n in os.listdir(tmp_path)) and not (tmp_path / "model.safetensors").exists()
    other = _qwen(rms_norm_eps=0.5)
    other.load_state_dict(saved.state_dict())
    assert (_logits(other, input_ids=IDS) - _logits(saved, input_ids=IDS)).abs().max() > 1e-3
    refused(_qwen(rms_norm_eps=0.5), tmp_path, r"'config\.rms_norm_eps': expected rms_norm_eps=1e-06")
    same = _qwen()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = weightport.load(same, tmp_path)
    assert "transformers snapshot of Qwen2ForCausalLM" in report.source
    assert not any(i.startswith("config.json") for i in report.ignored)
    assert torch.equal(_logits(same, input_ids=IDS), _logits(saved, input_ids=IDS))


def test_two_variants_or_a_variant_beside_the_plain_file_are_refused_and_listed(tmp_path: Path) -> None:
    saved = _randomize(_qwen(), 7)
    saved.save_pretrained(tmp_path, variant="fp16")
    _randomize(_qwen(), 8).save_pretrained(tmp_path / "plain")
    shutil.copy(tmp_path / "plain" / "model.safetensors", tmp_path)
    error = refused(_qwen(), tmp_path, r"2 weights files \(model.safetensors, model.fp16.safetensors\)")
    assert isinstance(error, SourceError) and "Fix: pass the file you mean" in str(error)
    (tmp_path / "model.safetensors").rename(tmp_path / "model.ema.safetensors")
    refused(_qwen(), tmp_path, r"2 weights files \(model.ema.safetensors, model.fp16.safetensors\)")
    chosen = _qwen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # a file alone: config unchecked
        weightport.load(chosen, tmp_path / "model.fp16.safetensors")  # the fix it names
    assert torch.equal(_logits(chosen, input_ids=IDS), _logits(saved, input_ids=IDS))


def test_a_folder_with_config_json_and_weights_of_other_names_is_still_checked(tmp_path: Path) -> None:
    """config.json beside .safetensors files transformers does not name: read as a folder of them, and its
    config.json held against the model (it was listed as ignored, and another eps loaded)."""
    saved = _randomize(_qwen(), 7)
    saved.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    refused(_qwen(rms_norm_eps=0.5), tmp_path, r"'config\.rms_norm_eps'")
    same = _qwen()
    report = weightport.load(same, tmp_path)
    assert not any(i.startswith("config.json") for i in report.ignored)
    assert torch.equal(_logits(same, input_ids=IDS), _logits(saved, input_ids=IDS))


def test_the_variant_index_given_itself_reads_its_shards(tmp_path: Path) -> None:
    """model.safetensors.index.fp16.json passed as the path: read as the index it is (it was 'not a format
    weightport reads')."""
    saved = _randomize(_qwen(), 7)
    saved.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    loaded = _qwen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # a file alone: config unchecked
        weightport.load(loaded, tmp_path / "model.safetensors.index.fp16.json")
    assert torch.equal(_logits(loaded, input_ids=IDS), _logits(saved, input_ids=IDS))


# 2. transformers' _checkpoint_conversion_mapping


def _llava() -> Any:
    text = {"model_type": "llama", "vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "intermediate_size": 48, "num_key_value_heads": 2}
    vision = {"model_type": "clip_vision_model", "image_size": 16, "patch_size": 4, "hidden_size": 32}
    vision |= {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 40,
        "projection_dim": 16,
    }
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=110, image_seq_length=16
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


def test_a_llava_snapshot_loads_by_its_checkpoint_conversion_mapping(tmp_path: Path) -> None:
    """save_pretrained writes Llava's old names (language_model.model.*, language_model.lm_head); from_pretrained
    maps them back by _checkpoint_conversion_mapping, and so does the load now: bit for bit (it was refused,
    every name unknown), each renamed rule saying so."""
    saved = _randomize(_llava(), 1)
    saved.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert "language_model.lm_head.weight" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    loaded = _llava()
    report = weightport.load(loaded, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    ids = IDS[:1].repeat(1, 3)
    ids[0, 2:18] = 110
    pixels = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32))
    assert torch.equal(
        _logits(loaded, input_ids=ids, pixel_values=pixels),
        _logits(saved, input_ids=ids, pixel_values=pixels),
    )
    said = [r.origin for r in report.rows if r.target == "lm_head.weight"]
    assert (
        said and "_checkpoint_conversion_mapping" in said[0] and "'language_model.lm_head.weight'" in said[0]
    )
    renamed = [r for r in report.rows if f"'{r.target}'" not in r.origin]
    assert renamed and all("_checkpoint_conversion_mapping" in r.origin for r in renamed)


# 3. settings that leave eval outputs alone; rope_scaling's legacy 'type'

MOE = {**SIZES, "num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize(
    ("setting", "value"),
    [("output_router_logits", True), ("router_jitter_noise", 0.1), ("router_aux_loss_coef", 0.5)],
)
def test_a_routers_training_settings_load_and_match(tmp_path: Path, setting: str, value: Any) -> None:
    """A Mixtral built with another router noise, aux-loss weight or output_router_logits gives the same eval
    logits (checked here): it loads and matches (it was refused as 'whether the outputs differ ... not know')."""
    saved = _randomize(transformers.MixtralForCausalLM(transformers.MixtralConfig(**MOE)), 1)
    saved.save_pretrained(tmp_path)
    other = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MOE, setting: value})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(other, tmp_path)
    assert torch.equal(_logits(other, input_ids=IDS), _logits(saved, input_ids=IDS))


def test_a_router_noise_phimoe_reads_in_eval_stays_refused(tmp_path: Path) -> None:
    """PhiMoE's sparsemixer masks experts by router_jitter_noise in eval too (the outputs differ, checked): a
    model built with another is refused as unknown (it loaded silently, 'ignored' for every model type)."""
    phimoe = {**MOE, "max_position_embeddings": 64}
    saved = _randomize(transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**phimoe)), 3)
    saved.save_pretrained(tmp_path)
    config = transformers.PhimoeConfig(**phimoe, router_jitter_noise=0.3)
    other = transformers.PhimoeForCausalLM(config).eval()
    other.load_state_dict(saved.state_dict())
    assert (_logits(other, input_ids=IDS) - _logits(saved, input_ids=IDS)).abs().max() > 1e-3
    built = transformers.PhimoeForCausalLM(config).eval()
    before = {k: v.clone() for k, v in built.state_dict().items()}
    refused(
        built, tmp_path, r"'config\.router_jitter_noise': expected .*whether the outputs differ weightport"
    )
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in before.items())
    same = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**phimoe)).eval()
    weightport.load(same, tmp_path)
    assert torch.equal(_logits(same, input_ids=IDS), _logits(saved, input_ids=IDS))


LLAMA = {k: v for k, v in SIZES.items() if k != "tie_word_embeddings"}


def _llama(rope: dict[str, Any]) -> Any:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, rope_scaling=rope)).eval()


def test_rope_scaling_named_by_its_legacy_type_is_the_same_setting(tmp_path: Path) -> None:
    """{"type": "linear"} is transformers' old spelling of {"rope_type": "linear"}: the same scaling loads and
    matches bit for bit (it was refused); another factor, whose outputs differ (checked), stays refused."""
    saved = _randomize(_llama({"type": "linear", "factor": 2.0}), 2)
    saved.save_pretrained(tmp_path)
    same = _llama({"rope_type": "linear", "factor": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(same, tmp_path)
    ids = torch.arange(40).reshape(1, 40) % 90 + 3
    assert torch.equal(_logits(same, input_ids=ids), _logits(saved, input_ids=ids))
    other = _llama({"rope_type": "linear", "factor": 4.0})
    other.load_state_dict(saved.state_dict())
    assert (_logits(other, input_ids=ids) - _logits(saved, input_ids=ids)).abs().max() > 1e-4
    refused(_llama({"rope_type": "linear", "factor": 4.0}), tmp_path, r"'config\.rope_scaling': expected")


# 4. RWKV's in-place rescaling


def _rwkv() -> Any:
    config = transformers.RwkvConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, attention_hidden_size=32, intermediate_size=64,
        context_length=64, rescale_every=1,
    )  # fmt: skip
    return transformers.RwkvForCausalLM(config).eval()


def test_an_rwkv_that_ran_a_forward_is_refused_and_the_fix_loads_it_exactly(tmp_path: Path) -> None:
    """After one eval forward RWKV holds two weights per block divided in place (layers_are_rescaled=True):
    the checkpoint's unscaled weights written then gave wrong outputs (1.58 off, silently). Refused, module
    unchanged; the fix it names (clear the flag, as from_pretrained's model has it) gives the saved model's
    own outputs bit for bit."""
    saved = _randomize(_rwkv(), 5)
    saved.save_pretrained(tmp_path)
    ids = IDS[:1, :8]
    expected = _logits(saved, input_ids=ids)
    ran = _rwkv()
    _logits(ran, input_ids=ids)
    assert ran.rwkv.layers_are_rescaled
    refused(ran, tmp_path, r"'rwkv\.blocks\.0\.attention\.output\.weight' and 7 more: .*layers_are_rescaled=True.*"
            r"Fix: set model\.rwkv\.layers_are_rescaled = False")  # fmt: skip
    ran.rwkv.layers_are_rescaled = False
    weightport.load(ran, tmp_path)
    assert torch.equal(_logits(ran, input_ids=ids), expected)
    fresh = _rwkv()  # never ran: loads as it is
    weightport.load(fresh, tmp_path)
    assert torch.equal(_logits(fresh, input_ids=ids), expected)


def test_one_block_of_an_rwkv_that_ran_a_forward_is_refused_and_the_fix_loads_it_exactly() -> None:
    """The flag is the RwkvModel's, the load sees only its block (given alone, or under prefix=): block 3's
    unscaled weights written into the rescaled model gave outputs 1.86 off, silently. Refused, nothing
    written; the fix it names (scale the model back with a training forward) gives the saved model's own
    outputs bit for bit, and a block of a model that never ran loads as it is."""
    saved = _randomize(_rwkv(), 5)
    state = {k: v.clone() for k, v in saved.state_dict().items()}  # unscaled, as save_pretrained writes
    block = {k.removeprefix("rwkv.blocks.3."): v.numpy() for k, v in state.items() if ".blocks.3." in k}
    ids = IDS[:1, :8]
    expected = _logits(saved, input_ids=ids)
    ran = _rwkv()
    ran.load_state_dict(state)
    _logits(ran, input_ids=ids)  # rescales in place; the outputs are still the saved model's
    before = {k: v.clone() for k, v in ran.state_dict().items()}
    said = (
        r"'attention\.output\.weight' and 1 more: RwkvBlock is part of a RwkvModel .*layers_are_rescaled=True"
    )
    refused(ran.rwkv.blocks[3], block, said + r".*Fix: scale the model back first \(model\.train\(\)")
    refused(ran, block, said, prefix="rwkv.blocks.3.")
    assert all(torch.equal(v, ran.state_dict()[k]) for k, v in before.items())
    ran.train()
    with torch.no_grad():
        ran(input_ids=ids)
    ran.eval()
    weightport.load(ran.rwkv.blocks[3], block)
    assert torch.equal(_logits(ran, input_ids=ids), expected)
    fresh = _rwkv()
    fresh.load_state_dict(state)
    weightport.load(fresh.rwkv.blocks[3], block)
    assert torch.equal(_logits(fresh, input_ids=ids), expected)


# 5. DeBERTa-v2's TF layer names


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)  # DeBERTa's modeling
def test_a_deberta_v2_tf_checkpoint_loads_its_position_projections(tmp_path: Path) -> None:
    """TF DeBERTa-v2 (share_att_key=False) names the layers pos_proj / pos_q_proj, PyTorch pos_key_proj /
    pos_query_proj: the load gives TF's own outputs (it was refused, four tensors unplaced)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    config = transformers.DebertaV2Config(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    model = transformers.TFDebertaV2Model(config)
    model(model.dummy_inputs)
    rng = np.random.default_rng(4)
    for variable in model.weights:
        variable.assign(
            rng.normal(0.0, 0.1, tuple(variable.shape)).astype(np.float32) + ("gamma" in variable.name)
        )
    assert any("pos_q_proj" in v.name for v in model.weights)
    model.save_pretrained(tmp_path)
    ids = IDS[:, :8].numpy().astype(np.int32)
    expected = np.asarray(model(ids, training=False).last_hidden_state)
    loaded = transformers.DebertaV2Model(config).eval()
    report = weightport.load(loaded, tmp_path)
    assert any(r.target.endswith("pos_query_proj.weight") and "pos_q_proj" in r.origin for r in report.rows)
    out = _logits(loaded, input_ids=torch.from_numpy(ids).long()).numpy()
    assert np.abs(out - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


# 6. PEFT adapters


def _adapter(folder: Path, config_json: Path | None = None) -> None:
    """A LoRA adapter folder as peft's save_pretrained writes it (adapter_config.json, adapter_model.safetensors
    of base_model.model.* names: lora_A/lora_B and the modules_to_save)."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir()
    adapter = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**adapter, "modules_to_save": ["lm_head"]}))
    rng = np.random.default_rng(0)
    tensors = {"base_model.model.lm_head.weight": rng.standard_normal((97, 32), np.float32)}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            at = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{at}.lora_A.weight"] = rng.standard_normal((4, 32), np.float32)
            tensors[f"{at}.lora_B.weight"] = rng.standard_normal((out, 4), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if config_json is not None:
        shutil.copy(config_json, folder)


def test_a_lora_adapter_into_its_base_model_is_refused_saying_so(tmp_path: Path) -> None:
    """The folder, the file, with the base model's config.json beside, strict=False or not: refused as a LoRA
    adapter with the merge that works (it said 'unknown name'; with mapping= naming the head, strict=False
    would have loaded the head alone, without the update)."""
    _qwen().save_pretrained(tmp_path / "base")
    _adapter(tmp_path / "adapter")
    _adapter(tmp_path / "with_config", tmp_path / "base" / "config.json")
    said = r"is a LoRA adapter \(PEFT\): '.*lora_A.weight' and 7 more .*Fix: .*merge_and_unload\(\)"
    for source in (
        tmp_path / "adapter",
        tmp_path / "with_config",
        tmp_path / "adapter" / "adapter_model.safetensors",
    ):
        refused(_qwen(), source, said)
        refused(_qwen(), source, said, strict=False)
    refused(
        _qwen(),
        tmp_path / "adapter",
        said,
        strict=False,
        mapping={"base_model.model.lm_head.weight": "lm_head.weight"},
    )


def test_a_model_with_lora_layers_takes_its_adapters_names(tmp_path: Path) -> None:
    """A module that has lora_A/lora_B tensors of its own (a PEFT-wrapped model) loads them by name."""
    model = torch.nn.Module()
    model.q = torch.nn.Module()
    model.q.lora_A = torch.nn.Linear(8, 2, bias=False)
    model.q.lora_B = torch.nn.Linear(2, 8, bias=False)
    rng = np.random.default_rng(1)
    state = {"q.lora_A.weight": rng.standard_normal((2, 8), np.float32)}
    state["q.lora_B.weight"] = rng.standard_normal((8, 2), np.float32)
    weightport.load(model, state)
    assert np.array_equal(model.q.lora_B.weight.detach().numpy(), state["q.lora_B.weight"])


def test_a_snapshot_with_an_adapter_beside_it_is_refused_as_two_readings(tmp_path: Path) -> None:
    # transformers' from_pretrained applies the adapter where peft is installed: the base alone is one reading
    saved = _randomize(_qwen(), 7)
    saved.save_pretrained(tmp_path / "m")
    _adapter(tmp_path / "a")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "m")
    with pytest.raises(SourceError, match="PEFT adapter beside it.*the model alone: pass"):
        weightport.load(_qwen(), tmp_path / "m")
    loaded = _qwen()
    with pytest.warns(weightport.UncheckedConfigWarning):  # the file alone records no configuration
        weightport.load(loaded, tmp_path / "m" / "model.safetensors")
    assert torch.equal(_logits(loaded, input_ids=IDS), _logits(saved, input_ids=IDS))


def _other_adapter(folder: Path, peft_type: str, parts: dict[str, tuple[int, ...]]) -> None:
    """A PEFT adapter folder of another tuner: its tensors ``parts`` (a name -> shape) on q_proj and v_proj of
    each layer, the head as modules_to_save, adapter_config.json naming ``peft_type``."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir()
    adapter = {"peft_type": peft_type, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    (folder / "adapter_config.json").write_text(json.dumps(adapter))
    rng = np.random.default_rng(2)
    tensors = {"base_model.model.lm_head.weight": rng.standard_normal((97, 32), np.float32)}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            at = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors |= {f"{at}.{p}": rng.standard_normal(shape, np.float32) for p, shape in parts.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("peft_type", "tuner", "parts"),
    [
        ("IA3", "IA3", {"ia3_l": (16, 1)}),
        (
            "LOHA",
            "LoHa",
            {"hada_w1_a": (16, 4), "hada_w1_b": (4, 32), "hada_w2_a": (16, 4), "hada_w2_b": (4, 32)},
        ),
        ("LOKR", "LoKr", {"lokr_w1": (2, 2), "lokr_w2": (8, 16)}),
        ("VERA", "VeRA", {"vera_lambda_b": (16,), "vera_lambda_d": (4,)}),
        ("OFT", "OFT", {"oft_r": (4, 8, 8)}),
        ("BOFT", "BOFT", {"boft_R": (1, 4, 8, 8), "boft_s": (16, 1)}),
        ("C3A", "C3A", {"c3a_kernel": (4, 8, 8)}),  # a tuner known only by its adapter_config.json
    ],
)
def test_an_adapter_of_another_peft_tuner_is_refused_saying_so(
    tmp_path: Path, peft_type: str, tuner: str, parts: dict[str, tuple[int, ...]]
) -> None:
    """IA3, LoHa, LoKr, VeRA, OFT, BOFT adapters (their names, or adapter_config.json's peft_type) are refused as
    LoRA's are, with the merge that works, strict=False and a mapping of the head too; module unchanged (strict=
    False with mapping= loaded the head alone, without the update, the adapter's tensors 'ignored')."""
    _other_adapter(tmp_path / "adapter", peft_type, parts)
    said = rf"is an? {tuner} adapter \(PEFT\): 'base_model\.model\..*Fix: .*merge_and_unload\(\)"
    head = {"base_model.model.lm_head.weight": "lm_head.weight"}
    for source in (tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.safetensors"):
        for options in ({}, {"strict": False}, {"strict": False, "mapping": head}):
            refused(_qwen(), source, said, **options)
