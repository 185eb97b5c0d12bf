"""Whole transformers Flax models (issue 12): GPT-2 and ViT, exact against Flax's own outputs and bit for
bit what transformers' own converter (``load_flax_checkpoint_in_pytorch_model``) writes.

GPT-2's ``FlaxConv1D`` stores its kernel ``(features, in)`` and transformers' ``Conv1D`` its weight
``(in, out)``: one transpose, which the square ``c_proj`` (32, 32) cannot show by shape, only by outputs.
ViT's ``cls_token`` and ``position_embeddings`` are the embeddings module's own params, in no layer.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport import UncheckedConfigWarning, WeightportError
from weightport.layouts import flax as flax_layout

transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

TOL = 1e-5  # max abs error, relative to the output's scale
IDS = np.random.default_rng(1).integers(0, 99, (2, 7)).astype(np.int32)
PIXELS = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)


class Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.m = inner


def _noisy(seed: int) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda x: np.asarray(x) + rng.normal(0.0, 0.1, np.shape(x)).astype(np.float32)


def _gpt2_config() -> Any:
    return transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64)


def _vit_config() -> Any:
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
    )


def _load(module: nn.Module, source: Any) -> weightport.LoadReport:
    with warnings.catch_warnings():  # neither side records LayerNorm's epsilon; both use the config's
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, source, layout="flax")


def _error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def _converted(model: nn.Module, path: Path) -> nn.Module:
    # from_pretrained(folder, from_flax=True) leaves every parameter on the meta device (transformers
    # 4.57.6, torch 2.13), so the converter it calls is given a built model instead.
    from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_flax_checkpoint_in_pytorch_model(model, str(path))


def _assert_same_state(loaded: nn.Module, reference: nn.Module) -> None:
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _save(model: Any, folder: Path, seed: int) -> Path:
    model.params = jax.tree_util.tree_map(_noisy(seed), model.params)  # sorted keys, as after training
    model.save_pretrained(folder)
    return folder / "flax_model.msgpack"


# --- GPT-2 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flax_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    model = transformers.FlaxGPT2Model(_gpt2_config(), seed=0)
    path = _save(model, tmp_path_factory.mktemp("flax_gpt2"), 1)
    return model, path, np.asarray(model(IDS).last_hidden_state)


def _gpt2_output(module: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(IDS).long()).last_hidden_state.numpy()


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_flax_gpt2_loads_exactly_and_as_transformers_converts(
    flax_gpt2: tuple[Any, Path, np.ndarray], wrap: bool
) -> None:
    flax_model, path, expected = flax_gpt2
    inner = transformers.GPT2Model(flax_model.config).eval()
    report = _load(Wrap(inner) if wrap else inner, path)
    assert _error(_gpt2_output(inner), expected) <= TOL
    assert {p.source_kind for p in report.pairings if p.module_kind == "Conv1D"} == {"FlaxConv1D"}
    assert {p.how for p in report.pairings} == {"by name"}
    assert all(name.startswith("m." if wrap else "") for name in report.written)
    assert len(report.written) == len(inner.state_dict())
    _assert_same_state(inner, _converted(transformers.GPT2Model(flax_model.config), path))


def test_flax_gpt2_square_c_proj_is_transposed(flax_gpt2: tuple[Any, Path, np.ndarray]) -> None:
    """c_proj is (32, 32): only the outputs tell a transposed kernel from one copied as is."""
    flax_model, path, expected = flax_gpt2
    module = transformers.GPT2Model(flax_model.config).eval()
    _load(module, path)
    kernel = np.asarray(flax_model.params["h"]["0"]["attn"]["c_proj"]["kernel"])
    assert kernel.shape[0] == kernel.shape[1]
    assert np.array_equal(module.h[0].attn.c_proj.weight.detach().numpy(), kernel.T)
    with torch.no_grad():
        module.h[0].attn.c_proj.weight.copy_(torch.from_numpy(kernel))  # as is: wrong
    assert _error(_gpt2_output(module), expected) > 100 * TOL


def test_flax_gpt2_export_runs_in_flax(flax_gpt2: tuple[Any, Path, np.ndarray]) -> None:
    """PyTorch GPT-2 -> Flax params (FlaxConv1D kernels (features, in)) -> FlaxGPT2Model gives its outputs."""
    from flax.traverse_util import unflatten_dict

    flax_model, _, _ = flax_gpt2
    torch.manual_seed(0)
    module = transformers.GPT2Model(flax_model.config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    arrays = flax_layout.export(module, api="nnx")  # transformers' params have no collection prefix
    assert arrays["h/0/attn/c_attn/kernel"].shape == (96, 32)
    params = unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    out = np.asarray(flax_model(IDS, params=params).last_hidden_state)
    assert _error(_gpt2_output(module), out) <= TOL
    again = transformers.GPT2Model(flax_model.config)
    _load(again, arrays)
    _assert_same_state(again, module)


def test_flax_dense_kernel_into_conv1d_is_refused_by_its_shape() -> None:
    """A Flax Dense keeps (in, out): into a Conv1D named like it, its transpose has the wrong shape."""
    module = transformers.GPT2Model(_gpt2_config())
    arrays = flax_layout.export(module, api="nnx")
    arrays["h/0/mlp/c_fc/kernel"] = np.ascontiguousarray(arrays["h/0/mlp/c_fc/kernel"].T)  # (32, 37)
    before = snapshot(module)
    with pytest.raises(WeightportError, match=r"h\.0\.mlp\.c_fc\.weight"):
        _load(module, arrays)
    assert snapshot(module) == before


# --- ViT -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flax_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    model = transformers.FlaxViTModel(_vit_config(), seed=0)
    path = _save(model, tmp_path_factory.mktemp("flax_vit"), 3)
    return model, path, np.asarray(model(PIXELS).last_hidden_state)


def _vit_output(module: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(PIXELS)).last_hidden_state.numpy()


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_flax_vit_loads_exactly_and_as_transformers_converts(
    flax_vit: tuple[Any, Path, np.ndarray], wrap: bool
) -> None:
    flax_model, path, expected = flax_vit
    inner = transformers.ViTModel(flax_model.config).eval()
    report = _load(Wrap(inner) if wrap else inner, path)
    assert _error(_vit_output(inner), expected) <= TOL
    own = {p.module_path: p.how for p in report.pairings if p.source_kind == "param"}
    assert own == {"embeddings.cls_token": "by name", "embeddings.position_embeddings": "by name"}
    assert len(report.written) == len(inner.state_dict())
    _assert_same_state(inner, _converted(transformers.ViTModel(flax_model.config), path))


def test_flax_vit_export_runs_in_flax(flax_vit: tuple[Any, Path, np.ndarray]) -> None:
    from flax.traverse_util import unflatten_dict

    flax_model, _, _ = flax_vit
    torch.manual_seed(1)
    module = transformers.ViTModel(flax_model.config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    arrays = flax_layout.export(module, api="nnx")
    assert arrays["embeddings/cls_token"].shape == (1, 1, 32)
    params = unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    out = np.asarray(flax_model(PIXELS, params=params).last_hidden_state)
    assert _error(_vit_output(module), out) <= TOL


def test_flax_vit_own_param_of_another_shape_is_refused(flax_vit: tuple[Any, Path, np.ndarray]) -> None:
    flax_model, path, _ = flax_vit
    module = transformers.ViTModel(
        transformers.ViTConfig(**{**flax_model.config.to_dict(), "image_size": 20})
    )
    before = snapshot(module)
    with pytest.raises(WeightportError, match=r"embeddings\.position_embeddings.*\(1, 26, 32\)"):
        _load(module, path)
    assert snapshot(module) == before


# --- with their heads ----------------------------------------------------------------------------------


def test_flax_gpt2_lm_head_and_vit_classifier_load_exactly(tmp_path: Path) -> None:
    """GPT-2's tied lm_head takes wte's value; ViT's classifier is a Dense under its own name."""
    gpt2 = transformers.FlaxGPT2LMHeadModel(_gpt2_config(), seed=0)
    path = _save(gpt2, tmp_path / "gpt2", 4)
    module = transformers.GPT2LMHeadModel(gpt2.config).eval()
    _load(module, path)
    with torch.no_grad():
        logits = module(torch.from_numpy(IDS).long()).logits.numpy()
    assert _error(logits, np.asarray(gpt2(IDS).logits)) <= TOL

    config = transformers.ViTConfig(**{**_vit_config().to_dict(), "num_labels": 3})
    vit = transformers.FlaxViTForImageClassification(config, seed=0)
    path = _save(vit, tmp_path / "vit", 5)
    module = transformers.ViTForImageClassification(config).eval()
    _load(module, path)
    with torch.no_grad():
        logits = module(torch.from_numpy(PIXELS)).logits.numpy()
    assert _error(logits, np.asarray(vit(PIXELS).logits)) <= TOL
    _assert_same_state(module, _converted(transformers.ViTForImageClassification(config), path))


def test_flax_distilbert_vocab_projector_bias_alone_loads_into_the_tied_linear(tmp_path: Path) -> None:
    """DistilBERT's vocab_projector is a bias in Flax, its kernel the tied word embeddings: it reads as a
    LayerNorm without scale, but by name it is nn.Linear's bias, the only reading that fills that module."""
    config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    flax_model = transformers.FlaxDistilBertForMaskedLM(config, seed=0)
    path = _save(flax_model, tmp_path, 6)  # noise makes the bias non-zero
    assert np.abs(np.asarray(flax_model.params["vocab_projector"]["bias"])).max() > 0
    module = transformers.DistilBertForMaskedLM(config).eval()
    report = _load(module, path)
    with torch.no_grad():
        logits = module(torch.from_numpy(IDS).long()).logits.numpy()
    assert _error(logits, np.asarray(flax_model(IDS).logits)) <= TOL
    projector = [p for p in report.pairings if p.module_path == "vocab_projector"]
    assert [p.source_kind for p in projector] == ["a Dense's bias alone"]
    _assert_same_state(module, _converted(transformers.DistilBertForMaskedLM(config), path))
    untied = transformers.DistilBertForMaskedLM(
        transformers.DistilBertConfig(**{**config.to_dict(), "tie_word_embeddings": False})
    )
    before = snapshot(untied)
    with pytest.raises(
        WeightportError, match=r"'vocab_projector\.weight': expected a value for it, found nothing"
    ):
        _load(untied, path)
    assert snapshot(untied) == before


def test_flax_wav2vec2_weight_normed_conv_fills_the_parametrization(tmp_path: Path) -> None:
    """Wav2Vec2's positional conv is weight-normed: Flax keeps weight_g, weight_v and bias beside each other
    (in no Flax layer), PyTorch's parametrization original0/original1 and the conv's bias: by their names."""
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )  # fmt: skip
    flax_model = transformers.FlaxWav2Vec2Model(config, seed=0)
    path = _save(flax_model, tmp_path, 7)
    audio = np.random.default_rng(8).standard_normal((2, 800)).astype(np.float32)
    module = transformers.Wav2Vec2Model(config).eval()
    report = _load(module, path)
    with torch.no_grad():
        got = module(torch.from_numpy(audio)).last_hidden_state.numpy()
    assert _error(got, np.asarray(flax_model(audio).last_hidden_state)) <= 1e-5
    normed = {p.module_path for p in report.pairings if "pos_conv_embed" in p.module_path}
    assert normed == {
        "encoder.pos_conv_embed.conv.bias",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    }
    _assert_same_state(module, _converted(transformers.Wav2Vec2Model(config), path))


def test_flax_resnet_basic_blocks_pair_by_the_name_of_their_list(tmp_path: Path) -> None:
    """Flax ResNet's basic block holds its two convs as a list in a module of the list's own name
    ('layer/layer_0', 'layer/layer_1'), PyTorch's in an nn.Sequential ('layer.0'): of one shape each, they
    pair by those names (none by shape or order), and the outputs are Flax's, BatchNorm statistics included."""
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    flax_model = transformers.FlaxResNetModel(config, seed=0)
    path = _save(flax_model, tmp_path, 9)
    module = transformers.ResNetModel(config).eval()
    report = _load(module, path)
    pixels = np.random.default_rng(10).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(pixels)).last_hidden_state.numpy()
    expected = np.asarray(flax_model(pixels).last_hidden_state)  # transformers takes NCHW in Flax too
    assert _error(got, expected) <= TOL
    assert {p.how for p in report.pairings} == {"by name"}
    assert any(p.module_path == "encoder.stages.0.layers.0.layer.1.convolution" for p in report.pairings)


def test_a_checkpoint_with_a_head_loads_into_its_base_model(tmp_path: Path) -> None:
    """A FlaxBertForMaskedLM snapshot ('bert/...', 'cls/...') into BertModel, whose base_model_prefix is
    'bert': the 'bert' part fills it by name, as transformers' loading takes it; the head's arrays have no
    place, so a strict load names them and strict=False loads the rest, giving the Flax base model's
    outputs."""
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    flax_model = transformers.FlaxBertForMaskedLM(config, seed=0)
    path = _save(flax_model, tmp_path, 11)
    base = transformers.FlaxBertModel(config, seed=0, add_pooling_layer=False)
    base.params = flax_model.params["bert"]
    module = transformers.BertModel(config, add_pooling_layer=False).eval()
    before = snapshot(module)
    with pytest.raises(WeightportError, match=r"'cls/predictions/bias'.*pass strict=False"):
        _load(module, path)
    assert snapshot(module) == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(module, path, layout="flax", strict=False)
    with torch.no_grad():
        got = module(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
    assert _error(got, np.asarray(base(IDS).last_hidden_state)) <= TOL
    assert report.ignored and all(name.startswith("cls/") for name in report.ignored), report.ignored
