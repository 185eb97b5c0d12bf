"""A transformers snapshot's config.json held against the model: the model type, tied output embeddings and
special token ids, which the same tensors fit while the forward differs, and lists against tuples.

Each model here is saved by transformers itself; the oracle is the saved model's own output, and the same
weights put into the other model by ``load_state_dict`` (which checks no configuration) show the outputs
differ.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import weightport
from conftest import refused

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[5, 9, 2, 13, 7, 2, 4], [3, 8, 11, 2, 6, 12, 9]])
LLAMA = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
LLAMA |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (norm weights too), so no setting hides behind a default value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def _differ(saved: torch.nn.Module, other: torch.nn.Module, out: str, **inputs: Any) -> float:
    """The largest difference of ``other``'s outputs from ``saved``'s with ``saved``'s weights in it."""
    _missing, unexpected = other.load_state_dict(saved.state_dict(), strict=False)
    assert not unexpected
    with torch.no_grad():
        return float((getattr(saved(**inputs), out) - getattr(other(**inputs), out)).abs().max())


def test_a_snapshot_of_another_model_type_is_refused(tmp_path: Path) -> None:
    """A Mistral snapshot (sliding-window attention) fits a LlamaForCausalLM tensor for tensor, and the outputs
    differ: it loaded without a word (config.json's model_type was not compared, and sliding_window, which
    LlamaConfig lacks, was skipped)."""
    mistral = transformers.MistralConfig(**LLAMA, sliding_window=3, head_dim=8)
    saved = _randomized(transformers.MistralForCausalLM(mistral), 0)
    saved.save_pretrained(tmp_path / "mistral")
    llama = transformers.LlamaConfig(
        **LLAMA, bos_token_id=mistral.bos_token_id, eos_token_id=mistral.eos_token_id
    )
    assert _differ(saved, transformers.LlamaForCausalLM(llama).eval(), "logits", input_ids=IDS) > 1e-3
    refused(
        transformers.LlamaForCausalLM(llama),
        tmp_path / "mistral",
        r"'config\.model_type': expected model_type='mistral'.*built with model_type='llama': a model of "
        r"another type",
    )
    weightport.load(model := transformers.MistralForCausalLM(mistral).eval(), tmp_path / "mistral")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, saved(input_ids=IDS).logits)


@pytest.mark.parametrize("strict", [True, False])
def test_a_tied_snapshot_into_an_untied_model_names_the_tie(tmp_path: Path, strict: bool) -> None:
    """save_pretrained leaves a tied lm_head out: into an untied model the refusal asked for lm_head.weight or
    strict=False, which loaded it 1-9 off (lm_head left as built). It names tie_word_embeddings, strict or not."""
    saved = _randomized(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)), 1
    )
    saved.save_pretrained(tmp_path / "tied")
    untied = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False)
    refused(
        transformers.LlamaForCausalLM(untied),
        tmp_path / "tied",
        r"'config\.tie_word_embeddings': expected tie_word_embeddings=True.*built with "
        r"tie_word_embeddings=False: the output embedding tied to the input one the other way",
        strict=strict,
    )


def test_an_untied_t5_into_a_tied_one_is_refused_though_its_tensors_fit(tmp_path: Path) -> None:
    """T5 scales its decoder output by d_model**-0.5 only when tied: an untied snapshot whose lm_head equals its
    shared embedding fits a tied model exactly, and the outputs differ."""
    base = {"vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 1, "num_heads": 4}
    base |= {"relative_attention_num_buckets": 8, "decoder_start_token_id": 0}
    untied = transformers.T5ForConditionalGeneration(transformers.T5Config(**base, tie_word_embeddings=False))
    saved = _randomized(untied, 2)
    with torch.no_grad():
        saved.lm_head.weight.copy_(saved.shared.weight)
    saved.save_pretrained(tmp_path / "t5")
    tied = transformers.T5Config(**base, tie_word_embeddings=True)
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :3]}
    assert _differ(saved, transformers.T5ForConditionalGeneration(tied).eval(), "logits", **inputs) > 1e-3
    refused(
        transformers.T5ForConditionalGeneration(tied),
        tmp_path / "t5",
        r"'config\.tie_word_embeddings': expected tie_word_embeddings=False",
    )


def _clip(eos: int) -> Any:
    text = {"vocab_size": 30, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 12, "eos_token_id": eos}
    vision = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 8, "patch_size": 4}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    return transformers.CLIPTextModelWithProjection(config.text_config).eval()


def test_a_special_token_id_the_forward_reads_is_compared(tmp_path: Path) -> None:
    """CLIP's text model pools at its eos_token_id (the highest id where it is 2, as older snapshots record):
    another id loaded without a word, generation's token ids being taken as unread by the forward."""
    saved = _randomized(_clip(eos=2), 3)
    saved.save_pretrained(tmp_path / "clip")
    assert _differ(saved, _clip(eos=7), "text_embeds", input_ids=IDS) > 1e-3
    refused(
        _clip(eos=7),
        tmp_path / "clip",
        r"'config\.eos_token_id': expected eos_token_id=2.*a special token's id, which a forward may read",
    )


def test_a_model_built_with_tuples_loads_its_own_snapshot(tmp_path: Path) -> None:
    """config.json writes a tuple as a list: a ResNet built with depths=(1, 1) was refused against its own
    snapshot ("depths=[1, 1] recorded, built with depths=(1, 1)")."""
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), num_channels=3)
    saved = _randomized(transformers.ResNetModel(config), 4)
    for buffer in saved.buffers():
        buffer.random_(1, 3) if buffer.dtype == torch.long else buffer.uniform_(0.5, 1.5)
    saved.save_pretrained(tmp_path / "resnet")
    model = transformers.ResNetModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(model, tmp_path / "resnet")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images).pooler_output, saved(images).pooler_output)


def test_a_setting_the_models_configuration_lacks_is_reported_unchecked(tmp_path: Path) -> None:
    """A config.json written by another transformers version may record a setting this one's configuration
    does not have: it was skipped without a word; now the load says which, as unchecked."""
    saved = _randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 5)
    saved.save_pretrained(tmp_path / "llama")
    recorded = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**recorded, "attention_sink_size": 4}))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with pytest.warns(weightport.UncheckedConfigWarning, match=r"does not have \(attention_sink_size\)"):
        weightport.load(model, tmp_path / "llama")


def test_a_table_save_pretrained_leaves_out_is_left_as_the_model_computes_it(tmp_path: Path) -> None:
    """MarianMTModel's save_pretrained skips its sinusoidal position tables (_keys_to_ignore_on_save): a
    strict load of its own snapshot was refused asking for them; the model computes them as it is built."""
    config = transformers.MarianConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
        pad_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    saved = transformers.MarianMTModel(config).eval()
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "embed_positions" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    saved.save_pretrained(tmp_path / "marian")
    model = transformers.MarianMTModel(config).eval()
    weightport.load(model, tmp_path / "marian")
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, saved(**inputs).logits)
    with torch.device("meta"):  # built on meta, the tables have no values: refused, not left empty
        on_meta = transformers.MarianMTModel(config)
    with pytest.raises(
        weightport.WeightportError,
        match=r"embed_positions.weight' \(2 tensors\): expected values for it \(trans",
    ):
        weightport.load(on_meta, tmp_path / "marian")


def test_a_buffer_the_model_computes_is_not_taken_from_an_older_checkpoint(tmp_path: Path) -> None:
    """Older checkpoints hold buffers today's models register with persistent=False (BERT's position ids,
    Llama's rotary frequencies); from_pretrained never loads them. Other values in the file were written into
    the model (0.1-0.2 off); they are now ignored, as from_pretrained ignores them."""
    from safetensors.torch import load_file, save_file

    saved = _randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 7)
    saved.save_pretrained(tmp_path / "llama")
    tensors = load_file(tmp_path / "llama" / "model.safetensors")
    tensors["model.rotary_emb.inv_freq"] = saved.model.rotary_emb.inv_freq / 2
    save_file(tensors, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    report = weightport.load(model, tmp_path / "llama")
    assert report.ignored == ["model.rotary_emb.inv_freq"]
    expected = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, saved(input_ids=IDS).logits)
        assert torch.equal(model(input_ids=IDS).logits, expected(input_ids=IDS).logits)


def test_a_tie_undone_by_an_empty_weights_build_names_tie_weights(tmp_path: Path) -> None:
    """accelerate's init_empty_weights re-registers every parameter on meta, which undoes the model's ties: a
    tied snapshot then lacks lm_head, and the refusal said 'pass strict=False', refused again on meta. It names
    model.tie_weights(), after which the load is exact."""
    config = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)
    saved = _randomized(transformers.LlamaForCausalLM(config), 8)
    saved.save_pretrained(tmp_path / "tied")
    register = torch.nn.Module.register_parameter

    def on_meta(self: torch.nn.Module, name: str, param: Any) -> None:  # what init_empty_weights does
        register(self, name, param)
        if param is not None:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "register_parameter", on_meta)
        model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    for strict in (True, False):
        with pytest.raises(weightport.WeightportError, match=r"'lm_head.weight'.*call model.tie_weights\(\)"):
            weightport.load(model, tmp_path / "tied", strict=strict)
    model.tie_weights()
    weightport.load(model, tmp_path / "tied")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, saved(input_ids=IDS).logits)


@pytest.mark.parametrize("dropped", [("bos_token_id", "eos_token_id", "tie_word_embeddings"), ("head_dim",)])
def test_settings_config_json_leaves_out_are_filled_as_from_pretrained_fills_them(
    tmp_path: Path, dropped: tuple[str, ...]
) -> None:
    """An older or hand-written config.json lacks settings: from_pretrained fills them with its configuration
    class's defaults (derived ones, as a head size, derived again). They were filled with every configuration's
    shared defaults (no token ids, tied embeddings), refusing the model AutoConfig.from_pretrained(folder)
    builds, which is the saved one."""
    saved = _randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 9)
    saved.save_pretrained(tmp_path / "llama")
    recorded = json.loads((tmp_path / "llama" / "config.json").read_text())
    kept = {k: v for k, v in recorded.items() if k not in dropped}
    (tmp_path / "llama" / "config.json").write_text(json.dumps(kept))
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "llama")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(model, tmp_path / "llama")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def test_a_token_id_a_new_head_sets_is_noted_not_refused(tmp_path: Path) -> None:
    """A GPT-2 snapshot into GPT2ForSequenceClassification with a pad_token_id of its own (as fine-tuning sets
    it): its head reads that id, the snapshot's model does not have the head; reported unchecked, not refused."""
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    head = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**{**config.to_dict(), "pad_token_id": 3})
    )
    with pytest.warns(weightport.UncheckedConfigWarning, match=r"pad_token_id=None, the model has 3"):
        weightport.load(head, tmp_path / "gpt2", strict=False)
    refused(
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config.to_dict(), "pad_token_id": 3})),
        tmp_path / "gpt2",
        r"'config\.pad_token_id'",
    )


def test_a_composite_snapshot_loads_into_a_model_of_one_of_its_parts(tmp_path: Path) -> None:
    """CLIPVisionModel.config_class.from_pretrained(folder) reads the CLIP snapshot's vision_config: the model
    it builds was refused, its configuration held against CLIP's top level read as a vision config (defaults:
    hidden_size 768). The part's own settings are compared, and another one is still refused."""
    text = {"vocab_size": 30, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 12}
    vision = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 8, "patch_size": 4}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    saved = _randomized(transformers.CLIPModel(config), 10)
    saved.save_pretrained(tmp_path / "clip")
    part = transformers.CLIPVisionConfig.from_pretrained(tmp_path / "clip")
    model = transformers.CLIPVisionModel(part).eval()
    weightport.load(model, tmp_path / "clip", strict=False)  # the text tower and projections are not its
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(
            model(pixel_values=pixels).pooler_output, saved.vision_model(pixel_values=pixels).pooler_output
        )
    other = transformers.CLIPVisionConfig(**{**part.to_dict(), "hidden_act": "gelu"})
    refused(transformers.CLIPVisionModel(other), tmp_path / "clip", r"'config\.hidden_act'", strict=False)


def test_a_token_id_only_the_new_head_reads_is_noted_under_a_prefix_too(tmp_path: Path) -> None:
    """A GPT2Model snapshot into GPT2ForSequenceClassification's transformer (prefix=) with pad_token_id set, as
    the classification recipe does: the submodule is the snapshot's class, the model is not; noted, not refused."""
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    head = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**{**config.to_dict(), "pad_token_id": 3})
    )
    with pytest.warns(weightport.UncheckedConfigWarning, match=r"pad_token_id=None, the model has 3"):
        weightport.load(head, tmp_path / "gpt2", prefix="transformer.", strict=False)
