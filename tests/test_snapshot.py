"""A transformers snapshot folder (``save_pretrained``'s output): read as the one weights file it holds.

The folders here are written by transformers itself; the oracle is loading the weights file inside
the folder directly, and, for Flax BERT, the Flax model's own output.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import weightport
from conftest import refused, snapshot
from weightport import SourceError

transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(2).integers(0, 99, (2, 7)).astype(np.int32)
# Flax's msgpack does not record LayerNorm's epsilon (transformers' config.json does): said as a warning where
# the file is loaded alone
pytestmark = pytest.mark.filterwarnings("ignore::weightport.UncheckedConfigWarning")


def _config() -> Any:
    return transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )


@pytest.fixture(scope="module")
def flax_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    pytest.importorskip("flax")
    model = transformers.FlaxBertModel(_config(), seed=0)
    folder = tmp_path_factory.mktemp("flax_bert")
    model.save_pretrained(folder)
    return folder, np.asarray(model(IDS).last_hidden_state)


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(_config()).eval()


def test_a_snapshot_folder_loads_as_the_file_it_holds(flax_folder: tuple[Path, np.ndarray]) -> None:
    folder, expected = flax_folder
    from_folder, from_file = _bert(), _bert()
    report = weightport.load(from_folder, folder)
    weightport.load(from_file, folder / "flax_model.msgpack")
    assert "transformers snapshot of BertModel" in report.source
    assert all(
        torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), from_file.state_dict().values())
    )
    with torch.no_grad():
        out = from_folder(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
    assert np.abs(out - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_two_weights_files_are_two_readings_refused_and_listed(
    flax_folder: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "both"
    folder.mkdir()
    for name in ("config.json", "flax_model.msgpack"):
        (folder / name).write_bytes((flax_folder[0] / name).read_bytes())
    _bert().save_pretrained(tmp_path / "pt")  # model.safetensors of other (random) weights
    (folder / "model.safetensors").write_bytes((tmp_path / "pt" / "model.safetensors").read_bytes())
    module = _bert()
    before = snapshot(module)
    with pytest.raises(
        SourceError, match=r"2 weights files \(model.safetensors, flax_model.msgpack\)"
    ) as info:
        weightport.load(module, folder)
    assert "flax_model.msgpack'" in str(info.value) and "Fix: pass the file you mean" in str(info.value)
    assert snapshot(module) == before
    weightport.load(module, folder / "flax_model.msgpack")  # the fix it names loads


def test_a_pickle_only_snapshot_is_refused(tmp_path: Path) -> None:
    _bert().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    with pytest.raises(SourceError, match=r"pytorch_model.bin, a pickle, which weightport never loads"):
        weightport.load(_bert(), tmp_path)


def test_a_linked_weights_file_inside_the_folder_is_not_followed(
    flax_folder: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_bytes((flax_folder[0] / "config.json").read_bytes())
    (tmp_path / "flax_model.msgpack").symlink_to(flax_folder[0] / "flax_model.msgpack")
    with pytest.raises(SourceError, match=r"'flax_model.msgpack' is a symbolic link"):
        weightport.load(_bert(), tmp_path)
    weightport.load(_bert(), tmp_path / "flax_model.msgpack")  # the user's own path is resolved once


@pytest.mark.parametrize("config", [b"{not json", b"[1, 2]"])
def test_a_broken_config_is_a_source_error(
    flax_folder: tuple[Path, np.ndarray], tmp_path: Path, config: bytes
) -> None:
    (tmp_path / "config.json").write_bytes(config)
    (tmp_path / "flax_model.msgpack").write_bytes((flax_folder[0] / "flax_model.msgpack").read_bytes())
    with pytest.raises(SourceError, match=r"config.json"):
        weightport.open_source(tmp_path)
    assert json.loads((flax_folder[0] / "config.json").read_text())["architectures"] == ["BertModel"]


@pytest.mark.filterwarnings("error::weightport.UncheckedConfigWarning")
def test_a_snapshots_config_json_answers_what_its_weights_file_does_not(
    flax_folder: tuple[Path, np.ndarray],
) -> None:
    """From the folder, config.json is held against the model's own configuration, so the Flax LayerNorm
    epsilon the msgpack does not record is checked: no warning; the file alone still warns."""
    folder, expected = flax_folder
    module = _bert()
    weightport.load(module, folder)
    with torch.no_grad():
        out = module(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
    assert np.abs(out - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    with pytest.warns(weightport.UncheckedConfigWarning, match="Flax LayerNorm's epsilon"):
        weightport.load(_bert(), folder / "flax_model.msgpack")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("layer_norm_eps", 0.1), ("hidden_act", "relu"), ("num_attention_heads", 2)],
)
def test_a_model_built_with_another_forward_setting_is_refused(
    tmp_path: Path, setting: str, value: Any
) -> None:
    """The weights fit a BertModel built with another eps, activation or head count, and its outputs differ
    (checked here): the snapshot's config.json says how the model was built, so the load is refused."""
    torch.manual_seed(0)
    saved = transformers.BertModel(_config()).eval()
    saved.save_pretrained(tmp_path / "bert")
    other = transformers.BertModel(transformers.BertConfig(**{**_config().to_dict(), setting: value})).eval()
    other.load_state_dict(saved.state_dict())  # the same weights: only the setting differs
    ids = torch.from_numpy(IDS).long()
    with torch.no_grad():
        assert (other(ids).last_hidden_state - saved(ids).last_hidden_state).abs().max() > 1e-4
    refused(
        transformers.BertModel(transformers.BertConfig(**{**_config().to_dict(), setting: value})),
        tmp_path / "bert",
        rf"'config\.{setting}': expected {setting}=.*config\.json records.*Fix: build the model from the snapshot",
    )


def test_settings_only_training_reads_load_and_any_other_difference_is_refused(tmp_path: Path) -> None:
    """Another dropout loads as it is (eval outputs equal); a setting of the model's own that weightport does
    not know is refused, saying so (it loaded with a warning: such settings change outputs, as ALBERT's layer
    count over its one shared layer does)."""
    torch.manual_seed(0)
    saved = transformers.BertModel(transformers.BertConfig(**_config().to_dict(), my_setting=1)).eval()
    saved.save_pretrained(tmp_path / "bert")
    ids = torch.from_numpy(IDS).long()
    dropout = transformers.BertModel(
        transformers.BertConfig(**{**_config().to_dict(), "hidden_dropout_prob": 0.3, "my_setting": 1})
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(dropout, tmp_path / "bert")
    with torch.no_grad():
        assert torch.equal(dropout(ids).last_hidden_state, saved(ids).last_hidden_state)
    custom = transformers.BertModel(transformers.BertConfig(**_config().to_dict(), my_setting=2)).eval()
    refused(
        custom,
        tmp_path / "bert",
        r"'config\.my_setting': expected my_setting=1.*built with my_setting=2: the weights fit both, and "
        r"whether the outputs differ weightport does not know",
    )


def _roberta(**changes: Any) -> Any:
    config = transformers.RobertaConfig(**{**_config().to_dict(), "pad_token_id": 1, **changes})
    return transformers.RobertaModel(config).eval()


def _albert(**changes: Any) -> Any:
    sizes = {"embedding_size": 16, "num_hidden_layers": 2, **changes}
    config = transformers.AlbertConfig(**{**_config().to_dict(), **sizes})
    return transformers.AlbertModel(config).eval()


@pytest.mark.parametrize(
    ("build", "setting", "value"),
    [(_roberta, "pad_token_id", 3), (_albert, "num_hidden_layers", 4), (_roberta, "is_decoder", True)],
)
def test_settings_the_forward_reads_that_no_name_shows_are_refused(
    tmp_path: Path, build: Callable[..., Any], setting: str, value: Any
) -> None:
    """RoBERTa makes position ids from its padding id; ALBERT runs its one shared layer num_hidden_layers
    times; is_decoder makes attention causal: the same weights give other outputs (checked here), and each
    loaded with a warning or none."""
    torch.manual_seed(0)
    saved = build()
    saved.save_pretrained(tmp_path / "m")
    twin = build(**{setting: value})
    twin.load_state_dict(saved.state_dict())
    ids = torch.from_numpy(IDS % 90 + 5).long()
    with torch.no_grad():
        assert (twin(ids).last_hidden_state - saved(ids).last_hidden_state).abs().max() > 1e-4
    refused(build(**{setting: value}), tmp_path / "m", rf"'config\.{setting}': expected {setting}=")


def test_a_nested_config_is_compared_setting_by_setting(tmp_path: Path) -> None:
    """CLIP's text_config as config.json records it lacks settings the built one has: the same model loads
    without a word (it warned on every CLIP folder), and another text activation is refused by its name."""
    text = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 12}
    vision = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 8, "patch_size": 4}

    def clip(**changes: Any) -> Any:
        config = transformers.CLIPConfig(
            text_config={**text, **changes}, vision_config=vision, projection_dim=8
        )
        return transformers.CLIPModel(config).eval()

    torch.manual_seed(0)
    clip().save_pretrained(tmp_path / "clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(clip(), tmp_path / "clip")
    refused(clip(hidden_act="gelu"), tmp_path / "clip", r"'config\.text_config\.hidden_act': expected")


def test_a_weights_file_alone_says_the_configuration_is_unchecked(tmp_path: Path) -> None:
    """model.safetensors without its config.json: into a transformers model, the load warns that the file
    records none of its configuration (a model built with another eps loaded without a word)."""
    torch.manual_seed(0)
    transformers.BertModel(_config()).eval().save_pretrained(tmp_path / "bert")
    with pytest.warns(weightport.UncheckedConfigWarning, match=r"records none of the transformers model's"):
        weightport.load(transformers.BertModel(_config()), tmp_path / "bert" / "model.safetensors")


@pytest.mark.parametrize(("setting", "value"), [("dense_act_fn", "gelu_new"), ("feed_forward_proj", "gelu")])
def test_a_t5_built_with_another_feed_forward_activation_is_refused(
    tmp_path: Path, setting: str, value: str
) -> None:
    """T5 names its activation dense_act_fn (set from feed_forward_proj): the same weights with another one
    give other outputs (checked here), and the load is refused; it loaded with a 'whether ... changes the
    forward' warning."""
    base = {
        "vocab_size": 50,
        "d_model": 16,
        "d_kv": 4,
        "d_ff": 24,
        "num_layers": 1,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "relu",
    }
    torch.manual_seed(0)
    saved = transformers.T5EncoderModel(transformers.T5Config(**base)).eval()
    saved.save_pretrained(tmp_path / "t5")

    def other() -> Any:
        if setting == "feed_forward_proj":  # read when the config is made
            return transformers.T5EncoderModel(transformers.T5Config(**{**base, setting: value})).eval()
        config = transformers.T5Config(**base)
        setattr(config, setting, value)  # made from feed_forward_proj there; set after it, as a model may
        return transformers.T5EncoderModel(config).eval()

    twin = other()
    twin.load_state_dict(saved.state_dict())
    ids = torch.from_numpy(IDS % 50).long()
    with torch.no_grad():
        assert (twin(ids).last_hidden_state - saved(ids).last_hidden_state).abs().max() > 1e-4
    refused(other(), tmp_path / "t5", rf"'config\.{setting}': expected {setting}=")
