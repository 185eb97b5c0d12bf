"""PEFT adapters (weightport.layouts.adapters), written by peft itself (``save_pretrained``, weights random).

Into a model with the adapter's layers (``get_peft_model`` with the adapter's config, or ``inject_adapter_in_model``)
an adapter loads as peft's own ``PeftModel.from_pretrained`` loads it, whose outputs are the oracle, compared bit
for bit; settings of adapter_config.json no weight shows are held against the model's ``peft_config``. Into the
base model it is refused, with a fix that is run here.
"""

from __future__ import annotations

import copy
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import weightport
from conftest import refused, snapshot

transformers = pytest.importorskip("transformers")


def _peft() -> Any:
    import _vision

    _vision.allow_torchvision_import()  # transformers' modules peft imports reach torchvision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.22 on transformers 4.x: deprecation notice
        return pytest.importorskip("peft")


peft = _peft()
IDS = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _base() -> Any:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


BASE = _base()


def _out(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).last_hidden_state


def _saved(folder: Path, config: Any) -> torch.Tensor:
    """An adapter of ``config`` on the base model, every trainable tensor random, saved by peft to ``folder``;
    the outputs of the model that saved it."""
    model = peft.get_peft_model(copy.deepcopy(BASE), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return _out(model)


def _load(model: Any, source: Any, **options: Any) -> Any:
    """weightport.load, with no word that the model's configuration went unchecked: an adapter records its
    own settings (adapter_config.json, held against peft_config), not the base model's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", weightport.UncheckedConfigWarning)
        report = weightport.load(model, source, **options)
    assert not [w for w in caught if issubclass(w.category, weightport.UncheckedConfigWarning)]
    return report


ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
    "lora+modules_to_save": lambda: peft.LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["pooler"]
    ),
    "dora": lambda: peft.LoraConfig(r=2, target_modules=["query"], use_dora=True),
    "rslora": lambda: peft.LoraConfig(r=2, target_modules=["key"], use_rslora=True),
    "ia3": lambda: peft.IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
    ),
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=["query"]),
    "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["query"]),
    "vera": lambda: peft.VeraConfig(r=2, target_modules=["query", "value"], save_projection=True),
    "prompt tuning": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_an_adapter_loads_into_a_peft_model_as_peft_loads_it(tmp_path: Path, kind: str) -> None:
    """The folder and the file, into get_peft_model(base, PeftConfig.from_pretrained(folder)) (the refusal's
    fix): outputs bit for bit those of peft's own PeftModel.from_pretrained and of the model that saved it; the
    base weights (not in the file) left as they are. It was refused: 55 'missing' base weights, or with
    strict=False 'none of the names match' (peft inserts the adapter's name: lora_A.default.weight)."""
    expected = _saved(tmp_path, ADAPTERS[kind]())
    oracle = _out(peft.PeftModel.from_pretrained(copy.deepcopy(BASE), tmp_path))
    assert torch.equal(oracle, expected)
    for source in (tmp_path, tmp_path / "adapter_model.safetensors"):
        model = peft.get_peft_model(copy.deepcopy(BASE), peft.PeftConfig.from_pretrained(tmp_path))
        base = {
            n: t.clone() for n, t in model.state_dict().items() if ".default" not in n and "prompt" not in n
        }
        assert not torch.equal(_out(model), oracle)
        report = _load(model, source)
        assert torch.equal(_out(model), oracle)
        assert report.missing and all(torch.equal(model.state_dict()[n], t) for n, t in base.items())


def test_an_adapter_loads_into_a_model_peft_injected_its_layers_into(tmp_path: Path) -> None:
    """inject_adapter_in_model (transformers' and diffusers' integration: no base_model.model. prefix)."""
    config = ADAPTERS["lora+modules_to_save"]()
    expected = _saved(tmp_path, config)
    model = peft.inject_adapter_in_model(peft.PeftConfig.from_pretrained(tmp_path), copy.deepcopy(BASE))
    _load(model, tmp_path)
    assert torch.equal(_out(model), expected)


def test_an_adapter_goes_into_the_models_active_adapter(tmp_path: Path) -> None:
    """A model with two adapters, the second active: the file goes into it, as peft's load_adapter(folder,
    'other') would; the first is left as it was."""
    expected = _saved(tmp_path, ADAPTERS["lora"]())
    model = peft.get_peft_model(copy.deepcopy(BASE), peft.PeftConfig.from_pretrained(tmp_path))
    model.add_adapter("other", peft.PeftConfig.from_pretrained(tmp_path))
    model.set_adapter("other")
    first = {n: t.clone() for n, t in model.state_dict().items() if ".default." in n}
    _load(model, tmp_path)
    assert torch.equal(_out(model), expected)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in first.items())


@pytest.mark.parametrize(
    ("setting", "built"),
    [
        ("lora_alpha: 4 in the file, 16 in the model", {"lora_alpha": 16}),
        ("use_rslora: False in the file, True in the model", {"use_rslora": True}),
        (
            "target_modules: \\['query', 'value'\\] in the file, \\['query'\\] in the model",
            {"target_modules": ["query"]},
        ),
    ],
)
def test_settings_no_weight_shows_are_held_against_the_models(
    tmp_path: Path, setting: str, built: dict[str, Any]
) -> None:
    """adapter_config.json's lora_alpha, use_rslora, target_modules against peft_config['default']: refused,
    naming the setting, strict=False too (lora_alpha loaded silently: outputs differed from peft's)."""
    _saved(tmp_path, ADAPTERS["lora"]())
    settings = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]} | built
    for options in ({}, {"strict": False}):
        model = peft.get_peft_model(copy.deepcopy(BASE), peft.LoraConfig(**settings))
        refused(model, tmp_path, rf"not those of the model's adapter 'default'.*{setting}", **options)


def test_an_adapter_tensor_the_file_lacks_is_refused_not_the_base_weights(tmp_path: Path) -> None:
    """Strict over the adapter's own tensors only: a lora_B missing from the file is named, the base weights
    (never in an adapter file) are not."""
    from safetensors.torch import load_file, save_file

    _saved(tmp_path / "a", ADAPTERS["lora"]())
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "adapter_config.json", tmp_path / "b")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del tensors["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(tensors, tmp_path / "b" / "adapter_model.safetensors")
    model = peft.get_peft_model(copy.deepcopy(BASE), peft.PeftConfig.from_pretrained(tmp_path / "a"))
    error = refused(
        model, tmp_path / "b", r"(?s)1 problem.*layer\.1\.attention\.self\.value\.lora_B\.default\.weight"
    )
    assert "base_layer" not in str(error) and "embeddings" not in str(error)


PROMPTS = {
    "PROMPT_TUNING": lambda: peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
    "P_TUNING": lambda: peft.PromptEncoderConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, encoder_hidden_size=8
    ),
}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_a_prompt_learning_adapter_into_the_base_model_is_refused_with_a_fix_that_runs(
    tmp_path: Path, kind: str
) -> None:
    """Refused as virtual-token inputs that cannot be merged (it said 'updates to the base model's weights' and
    'merge_and_unload()', which a prompt-learning PeftModel does not have); the fix, run as it is written,
    gives the outputs of the model that saved the adapter."""
    expected = _saved(tmp_path, PROMPTS[kind]())
    for source in (tmp_path, tmp_path / "adapter_model.safetensors"):
        error = refused(
            copy.deepcopy(BASE), source, rf"is a {kind} adapter \(PEFT\): 'prompt_embeddings'.*virtual-token"
        )
        assert "merge" not in str(error).split("Fix:")[1]
    fix = re.search(
        r"Fix: .*: (model = PeftModel\.from_pretrained\(base_model, adapter_folder\))\.$", str(error)
    )
    assert fix is not None, str(error)
    scope = {"PeftModel": peft.PeftModel, "base_model": copy.deepcopy(BASE), "adapter_folder": str(tmp_path)}
    exec(fix.group(1), scope)
    assert torch.equal(_out(scope["model"]), expected)


def test_a_p_tuning_adapter_into_a_peft_model_with_its_encoder_is_refused(tmp_path: Path) -> None:
    """P-tuning's file holds what its prompt encoder (an MLP over the embedding) made: into a fresh PeftModel,
    whose encoder would run the MLP over it again, refused with peft's inference-mode loading as the fix."""
    expected = _saved(tmp_path, PROMPTS["P_TUNING"]())
    model = peft.get_peft_model(copy.deepcopy(BASE), PROMPTS["P_TUNING"]())
    refused(
        model,
        tmp_path,
        r"layers over its embedding.*PeftModel\.from_pretrained\(base_model, adapter_folder\)",
    )
    assert torch.equal(_out(peft.PeftModel.from_pretrained(copy.deepcopy(BASE), tmp_path)), expected)


def test_a_lora_adapter_into_the_base_model_names_fixes_that_run(tmp_path: Path) -> None:
    """The refusal's two fixes, each run: the merged model saved and loaded, and the base model with the
    adapter's layers; both give the outputs of the model that saved the adapter (within float rounding for the
    merge, which adds B @ A into each weight)."""
    expected = _saved(tmp_path / "a", ADAPTERS["lora+modules_to_save"]())
    model = copy.deepcopy(BASE)
    before = snapshot(model)
    error = str(refused(model, tmp_path / "a", r"is a LoRA adapter \(PEFT\).*merge_and_unload"))
    assert snapshot(model) == before
    merge = re.search(r"(merged = .*?); merged\.save_pretrained\(folder\)", error)
    assert merge is not None
    scope = {"PeftModel": peft.PeftModel, "base_model": copy.deepcopy(BASE), "adapter_folder": tmp_path / "a"}
    exec(merge.group(1), scope)
    scope["merged"].save_pretrained(tmp_path / "merged")
    _load(model, tmp_path / "merged")
    assert torch.allclose(_out(model), expected, atol=1e-5)
    into = re.search(r"weightport\.load\((get_peft_model\(base_model, .*?\)), adapter_folder\)", error)
    assert into is not None
    scope |= {"get_peft_model": peft.get_peft_model, "PeftConfig": peft.PeftConfig}
    scope["base_model"] = copy.deepcopy(BASE)  # the other fix, from the start (the merge changed this one)
    target = eval(into.group(1), scope)
    _load(target, tmp_path / "a")
    assert torch.equal(_out(target), expected)
