"""Config files beside weights written by projects other than transformers (timm, diffusers, open_clip,
sentence-transformers): held against the model's own record where it keeps one, reported where not; their
variants, pipelines and adapters refused as the several readings they are.

The folders are written as the projects write them (timm by its own ``save_for_hf``; diffusers' layout by
hand, from a small model that records its constructor arguments as diffusers' ``register_to_config`` does);
the oracle is the source model's forward.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport import LoadError, SourceError, UncheckedConfigWarning

safetensors_torch = pytest.importorskip("safetensors.torch")


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + 0.1)
    return model.eval()


def _unchanged(model: nn.Module, before: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TinyDenoiser(nn.Module):
    """A model that records every constructor argument as diffusers' ``ConfigMixin`` does (``config_name``,
    ``config`` a read-only mapping); the settings change the forward, never a tensor's shape."""

    config_name = "config.json"

    def __init__(
        self, channels: int = 8, norm_num_groups: int = 4, act_fn: str = "silu", norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self._internal_dict = {
            "channels": channels,
            "norm_num_groups": norm_num_groups,
            "act_fn": act_fn,
            "norm_eps": norm_eps,
        }
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.act = {"silu": nn.SiLU(), "gelu": nn.GELU()}[act_fn]

    @property
    def config(self) -> Mapping[str, Any]:
        return MappingProxyType(self._internal_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


X = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))


def _diffusers_folder(
    folder: Path, model: TinyDenoiser, leave_out: tuple[str, ...] = (), **extra: Any
) -> Path:
    """``folder`` as diffusers' ``save_pretrained`` writes it: config.json (``_class_name``,
    ``_diffusers_version``, every argument) and diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(model).__name__, "_diffusers_version": "0.32.2", **model.config, **extra}
    config = {k: v for k, v in config.items() if k not in leave_out}
    (folder / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(model.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_a_diffusers_folder_into_a_model_built_as_it_records_loads_exactly(tmp_path: Path) -> None:
    source = _randomized(TinyDenoiser(norm_num_groups=2, act_fn="gelu"), 0)
    folder = _diffusers_folder(tmp_path / "unet", source)
    model = TinyDenoiser(norm_num_groups=2, act_fn="gelu").eval()
    report = weightport.load(model, folder)
    assert "a diffusers folder of TinyDenoiser" in report.source
    assert torch.equal(model(X), source(X))


@pytest.mark.parametrize(
    ("built", "setting"),
    [
        ({"norm_num_groups": 4}, "norm_num_groups"),
        ({"act_fn": "silu"}, "act_fn"),
        ({"norm_eps": 1e-2}, "norm_eps"),
    ],
)
def test_a_diffusers_setting_the_model_was_built_without_is_refused(
    tmp_path: Path, built: dict[str, Any], setting: str
) -> None:
    source = _randomized(TinyDenoiser(norm_num_groups=2, act_fn="gelu"), 0)
    folder = _diffusers_folder(tmp_path / "unet", source)
    model = TinyDenoiser(**{"norm_num_groups": 2, "act_fn": "gelu", **built}).eval()
    plain = TinyDenoiser(**{"norm_num_groups": 2, "act_fn": "gelu", **built}).eval()
    plain.load_state_dict(source.state_dict())
    assert not torch.allclose(plain(X), source(X))  # the weights fit, the outputs differ
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError, match=rf"config\.{setting}': expected {setting}=.*Model\.from_config"):
        weightport.load(model, folder)
    assert _unchanged(model, before)


def test_a_setting_diffusers_left_out_of_config_json_is_the_class_default(tmp_path: Path) -> None:
    source = _randomized(TinyDenoiser(), 0)  # norm_eps at its default, 1e-5: left out of config.json
    folder = _diffusers_folder(tmp_path / "unet", source, leave_out=("norm_eps",))
    with pytest.raises(
        LoadError, match=r"norm_eps=1e-05, as .*found the model was built with norm_eps=0\.01"
    ):
        weightport.load(TinyDenoiser(norm_eps=1e-2), folder)
    model = TinyDenoiser().eval()
    weightport.load(model, folder)
    assert torch.equal(model(X), source(X))


def test_a_diffusers_folder_of_another_class_is_refused(tmp_path: Path) -> None:
    source = _randomized(TinyDenoiser(), 0)
    folder = _diffusers_folder(tmp_path / "unet", source, _class_name="UNet2DModel")
    with pytest.raises(
        LoadError, match=r"config\._class_name': expected a UNet2DModel.*found a TinyDenoiser"
    ):
        weightport.load(TinyDenoiser(), folder)


def test_diffusers_variants_are_several_readings(tmp_path: Path) -> None:
    plain, half = _randomized(TinyDenoiser(), 0), _randomized(TinyDenoiser(), 1)
    folder = _diffusers_folder(tmp_path / "unet", plain)
    safetensors_torch.save_file(half.state_dict(), str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(
        SourceError, match=r"a diffusers folder with 2 weights files .*pass the file you mean"
    ):
        weightport.load(TinyDenoiser(), folder)
    model = TinyDenoiser().eval()  # the fix, followed
    weightport.load(model, folder / "diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(model(X), half(X))


def _shards(folder: Path, model: nn.Module, stem: str) -> None:
    """``model`` in two shards and their index, as save_pretrained names them for ``stem`` (a variant's:
    ``diffusion_pytorch_model.fp16``)."""
    state = model.state_dict()
    names = sorted(state)
    base, _, variant = stem.partition(".")
    index_name = f"{base}.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    weight_map = {}
    for i, part in enumerate((names[:2], names[2:])):
        file = f"{stem}-0000{i + 1}-of-00002.safetensors"
        safetensors_torch.save_file({n: state[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_diffusers_variants_are_several_readings(tmp_path: Path) -> None:
    folder = _diffusers_folder(tmp_path / "unet", _randomized(TinyDenoiser(), 0))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _shards(folder, _randomized(TinyDenoiser(), 0), "diffusion_pytorch_model")
    half = _randomized(TinyDenoiser(), 1)
    _shards(folder, half, "diffusion_pytorch_model.fp16")
    with pytest.raises(
        SourceError, match=r"2 weights files \(diffusion_pytorch_model\.safetensors\.index\.json"
    ):
        weightport.load(TinyDenoiser(), folder)
    model = TinyDenoiser().eval()
    weightport.load(model, folder / "diffusion_pytorch_model.safetensors.index.fp16.json")
    assert torch.equal(model(X), half(X))


def test_files_holding_the_same_names_are_several_readings_not_shards(tmp_path: Path) -> None:
    one, other = _randomized(nn.Linear(3, 2), 0), _randomized(nn.Linear(3, 2), 1)
    safetensors_torch.save_file(one.state_dict(), str(tmp_path / "model.safetensors"))
    safetensors_torch.save_file(other.state_dict(), str(tmp_path / "model.ema.safetensors"))
    with pytest.raises(SourceError, match=r"the same tensor names in 2 weights files .*one of"):
        weightport.load(nn.Linear(3, 2), tmp_path)
    model = nn.Linear(3, 2)
    weightport.load(model, tmp_path / "model.ema.safetensors")
    assert torch.equal(model.weight, other.weight)


def test_a_diffusers_pipeline_folder_is_refused_naming_its_models(tmp_path: Path) -> None:
    source = _randomized(TinyDenoiser(), 0)
    _diffusers_folder(tmp_path / "unet", source)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "TinyDenoiser"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        SourceError, match=r"a diffusers pipeline .*pass the folder .*/unet' \(TinyDenoiser\)\.$"
    ):
        weightport.load(TinyDenoiser(), tmp_path)
    model = TinyDenoiser().eval()
    weightport.load(model, tmp_path / "unet")
    assert torch.equal(model(X), source(X))


def test_a_folder_of_pickled_diffusers_weights_is_the_pickle_refusal(tmp_path: Path) -> None:
    folder = _diffusers_folder(tmp_path / "unet", TinyDenoiser())
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(SourceError, match=r"only in diffusion_pytorch_model\.bin, a pickle"):
        weightport.load(TinyDenoiser(), folder)


def test_an_open_clip_config_is_reported_not_dropped(tmp_path: Path) -> None:
    source = _randomized(nn.Sequential(nn.Linear(4, 4), nn.GELU()), 0)
    safetensors_torch.save_file(source.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {"embed_dim": 4, "quick_gelu": True, "text_cfg": {"heads": 2}},
        "preprocess_cfg": {},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.warns(
        UncheckedConfigWarning, match=r"open_clip_config\.json \(open_clip's\) .*quick_gelu=True"
    ):
        report = weightport.load(model, tmp_path)
    assert any("text_cfg.heads=2" in note for note in report.unchecked)
    assert torch.equal(model[0].weight, source[0].weight)


def test_a_config_of_no_known_project_is_reported_not_dropped(tmp_path: Path) -> None:
    # sentence-transformers' Dense: its activation is in config.json, not in the weights
    source = _randomized(nn.Linear(4, 3), 0)
    safetensors_torch.save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"in_features": 4, "out_features": 3, "activation_function": "torch.nn.modules.activation.Tanh"}
        )
    )
    with pytest.warns(
        UncheckedConfigWarning, match=r"activation_function='torch\.nn\.modules\.activation\.Tanh'"
    ):
        weightport.load(nn.Linear(4, 3), tmp_path)


def test_a_users_own_config_with_a_model_type_is_not_called_transformers(tmp_path: Path) -> None:
    """model_type alone, beside a weights file transformers does not name its own: the user's config is
    reported as of no project weightport knows (it was called a transformers snapshot, with
    AutoConfig.from_pretrained as the fix, which raises for its model_type)."""
    source = _randomized(nn.Linear(4, 3), 0)
    safetensors_torch.save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_size": 8}))
    model = nn.Linear(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UncheckedConfigWarning)
        weightport.load(model, tmp_path)
    said = " ".join(str(w.message) for w in caught if issubclass(w.category, UncheckedConfigWarning))
    assert "hidden_size=8" in said and "transformers" not in said and "AutoConfig" not in said
    assert torch.equal(model.weight, source.weight) and torch.equal(model.bias, source.bias)


def test_a_peft_adapter_beside_a_snapshot_is_another_reading(tmp_path: Path) -> None:
    base = _randomized(nn.Linear(4, 4), 0)
    safetensors_torch.save_file(base.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny", "architectures": ["Tiny"]}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    lora = {
        "base_model.model.lora_A.weight": torch.randn(2, 4),
        "base_model.model.lora_B.weight": torch.randn(4, 2),
    }
    safetensors_torch.save_file(lora, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        SourceError, match=r"PEFT adapter .*model\.safetensors, adapter_model\.safetensors.*merge_and_unload"
    ):
        weightport.load(nn.Linear(4, 4), tmp_path)
    model = nn.Linear(4, 4)  # the file alone: the model's own weights, as the fix says
    weightport.load(model, tmp_path / "model.safetensors")
    assert torch.equal(model.weight, base.weight)


def _timm() -> Any:
    from _vision import timm

    found = timm()
    pytest.importorskip("timm.models._hub")
    return found


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _timm_folder(tmp_path: Path, name: str, **args: Any) -> tuple[Path, nn.Module]:
    timm = _timm()
    source = _randomized(timm.create_model(name, num_classes=5, **args), 3)
    folder = tmp_path / name
    timm.models._hub.save_for_hf(source, str(folder), safe_serialization=True)
    return folder, source


def test_a_timm_folder_into_a_model_built_otherwise_is_refused(tmp_path: Path) -> None:
    timm = _timm()
    folder, source = _timm_folder(tmp_path, "resnet10t", act_layer="gelu", global_pool="max")
    same = timm.create_model("resnet10t", num_classes=5, act_layer="gelu", global_pool="max").eval()
    report = weightport.load(same, folder)
    assert "a timm folder of resnet10t" in report.source
    assert torch.equal(same(IMAGES), source(IMAGES))
    default = timm.create_model("resnet10t", num_classes=5).eval()
    plain = timm.create_model("resnet10t", num_classes=5).eval()
    plain.load_state_dict(source.state_dict())
    assert not torch.allclose(plain(IMAGES), source(IMAGES))
    before = {k: v.clone() for k, v in default.state_dict().items()}
    with pytest.raises(LoadError) as refused:
        weightport.load(default, folder)
    said = str(refused.value)
    assert "'config.act_layer': expected act_layer='gelu'" in said
    assert "'config.global_pool': expected global_pool='max'" in said and "timm.create_model" in said
    assert _unchanged(default, before)


def test_a_timm_folder_of_another_architecture_is_refused(tmp_path: Path) -> None:
    timm = _timm()
    folder, _ = _timm_folder(tmp_path, "tf_efficientnet_b0")
    with pytest.raises(
        LoadError, match=r"config\.architecture': expected a tf_efficientnet_b0.*efficientnet_b0"
    ):
        weightport.load(timm.create_model("efficientnet_b0", num_classes=5), folder)


def test_a_timm_folder_into_a_model_timm_kept_no_record_of_is_reported(tmp_path: Path) -> None:
    _timm()
    from timm.models.resnet import BasicBlock, ResNet

    folder, source = _timm_folder(tmp_path, "resnet18", act_layer="gelu")
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=5)  # its class, not timm.create_model: no record
    with pytest.warns(UncheckedConfigWarning, match=r"config\.json \(timm's\) .*act_layer='gelu'"):
        weightport.load(model, folder)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_a_transformers_vision_model_missing_a_tensor_is_refused_not_crashed() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    model = transformers.ResNetModel(config)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    del arrays["embedder.embedder.convolution.weight"]
    with pytest.raises(LoadError, match=r"embedder\.embedder\.convolution\.weight': expected a value for it"):
        weightport.load(transformers.ResNetModel(config), arrays)


def test_real_diffusers_settings_are_held_against_the_model(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    settings = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 16),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=8,
    )
    source = _randomized(diffusers.UNet2DModel(**settings), 0)
    source.save_pretrained(tmp_path)
    with pytest.raises(LoadError, match=r"config\.norm_num_groups': expected norm_num_groups=8"):
        weightport.load(diffusers.UNet2DModel(**{**settings, "norm_num_groups": 4}), tmp_path)
    model = diffusers.UNet2DModel(**settings).eval()
    weightport.load(model, tmp_path)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    assert torch.equal(model(x, 5).sample, source(x, 5).sample)


def test_a_sentence_transformers_folder_names_the_modules_it_does_not_read(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    saved = _randomized(transformers.BertModel(config), 4)
    saved.save_pretrained(tmp_path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    dense = _randomized(nn.Linear(16, 8), 5)
    (tmp_path / "2_Dense").mkdir()
    safetensors_torch.save_file(dense.state_dict(), str(tmp_path / "2_Dense" / "model.safetensors"))
    (tmp_path / "2_Dense" / "config.json").write_text(json.dumps({"activation_function": "torch.nn.Tanh"}))
    model = transformers.BertModel(config).eval()
    report = weightport.load(model, tmp_path)
    assert "a sentence-transformers folder, a transformers snapshot of BertModel" in report.source
    assert any(
        i.startswith("2_Dense/ (modules.json: sentence_transformers.models.Dense)") for i in report.ignored
    )
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.equal(model(ids).last_hidden_state, saved(ids).last_hidden_state)
    head = nn.Linear(16, 8)  # the fix: that folder into its module
    with pytest.warns(UncheckedConfigWarning, match="activation_function='torch.nn.Tanh'"):
        weightport.load(head, tmp_path / "2_Dense")
    assert torch.equal(head.weight, dense.weight)
