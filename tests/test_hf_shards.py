"""transformers' sharded TF and Flax checkpoints (``save_pretrained(..., max_shard_size=...)``): the index and
its shards load as the one checkpoint they split, from the snapshot folder or the index itself, giving the
framework's own outputs (every weight random) and bit for bit what the unsharded file gives. An index that
does not match its shards, or a shard that is a link, is refused with the module unchanged.
"""

from __future__ import annotations

import json
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
from weightport import UncheckedConfigWarning

transformers = pytest.importorskip("transformers")

IDS = np.random.default_rng(1).integers(0, 99, (2, 7)).astype(np.int32)
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}


def _config() -> Any:
    return transformers.BertConfig(vocab_size=99, **SIZES)


def _tf_snapshots(root: Path) -> tuple[Path, Path, np.ndarray]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    model = transformers.TFBertModel(_config())
    model(model.dummy_inputs)
    rng = np.random.default_rng(3)
    for variable in model.weights:
        variable.assign(rng.normal(0.1, 0.3, tuple(variable.shape)).astype(np.float32))
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    model.save_pretrained(root / "whole")
    return root / "sharded", root / "whole", np.asarray(model(IDS, training=False).last_hidden_state)


def _flax_snapshots(root: Path) -> tuple[Path, Path, np.ndarray]:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    model = transformers.FlaxBertModel(_config(), seed=0)
    rng = np.random.default_rng(4)
    model.params = jax.tree_util.tree_map(
        lambda a: rng.normal(0.1, 0.3, np.shape(a)).astype(np.float32), model.params
    )
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    model.save_pretrained(root / "whole")
    return root / "sharded", root / "whole", np.asarray(model(IDS).last_hidden_state)


@pytest.fixture(scope="module", params=["tf", "flax"])
def snapshots(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path, np.ndarray]:
    root = tmp_path_factory.mktemp(f"shards_{request.param}")
    made = _tf_snapshots(root) if request.param == "tf" else _flax_snapshots(root)
    return (request.param, *made)


def _load(path: Path) -> torch.nn.Module:
    module = transformers.BertModel(_config()).eval()
    with warnings.catch_warnings():  # neither file records LayerNorm's epsilon: the config builds both
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        weightport.load(module, path)
    return module


def _index(folder: Path) -> Path:
    (index,) = folder.glob("*.index.json")
    return index


def test_the_shards_load_as_the_whole_checkpoint(snapshots: tuple[str, Path, Path, np.ndarray]) -> None:
    kind, sharded, whole, expected = snapshots
    assert len(json.loads(_index(sharded).read_text())["weight_map"]) > 1
    assert len(set(json.loads(_index(sharded).read_text())["weight_map"].values())) > 2
    reference = _load(whole)
    for path in (sharded, _index(sharded)):
        module = _load(path)
        with torch.no_grad():
            got = module(torch.from_numpy(IDS).long()).last_hidden_state.numpy()
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), kind
        theirs = reference.state_dict()
        assert all(torch.equal(t, theirs[n]) for n, t in module.state_dict().items())


def _copy(snapshots: tuple[str, Path, Path, np.ndarray], tmp_path: Path) -> Path:
    """A copy of the sharded snapshot to spoil."""
    copy = tmp_path / "copy"
    shutil.copytree(snapshots[1], copy)
    return copy


def test_an_index_that_does_not_match_its_shards_is_refused(
    snapshots: tuple[str, Path, Path, np.ndarray], tmp_path: Path
) -> None:
    copy = _copy(snapshots, tmp_path)
    index = _index(copy)
    data = json.loads(index.read_text())
    names = list(data["weight_map"])
    files = sorted(set(data["weight_map"].values()))
    moved = next(n for n in names if data["weight_map"][n] != files[0])
    data["weight_map"][moved] = files[0]  # listed in a shard that does not hold it
    index.write_text(json.dumps(data))
    module = transformers.BertModel(_config())
    refused(module, copy, rf"'{files[0]}'.*download the snapshot again")
    data["weight_map"][moved] = "../" + files[0]
    index.write_text(json.dumps(data))
    refused(module, copy, r"not a plain file name")


def test_a_shard_that_is_a_link_is_not_followed(
    snapshots: tuple[str, Path, Path, np.ndarray], tmp_path: Path
) -> None:
    copy = _copy(snapshots, tmp_path)
    shard = sorted(set(json.loads(_index(copy).read_text())["weight_map"].values()))[0]
    os.replace(copy / shard, tmp_path / shard)
    os.symlink(tmp_path / shard, copy / shard)
    refused(transformers.BertModel(_config()), copy, rf"shard '{shard}' is a symbolic link")


@pytest.mark.parametrize("name", ["Bart", "Marian"])
def test_tf_shards_of_variables_kept_under_their_full_name(tmp_path: Path, name: str) -> None:
    """transformers' sharded TF save keeps a variable built outside the model's scope (BART's shared embeddings)
    or of no layer (Marian's final_logits_bias) under its full name: the shards were refused ('download the
    snapshot again'); they load as the unsharded file, with the TF model's outputs."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    sizes = {"vocab_size": 99, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1}
    sizes |= {"encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 24}
    sizes |= {"decoder_ffn_dim": 24, "max_position_embeddings": 32, "pad_token_id": 98}
    config = getattr(transformers, f"{name}Config")(**sizes, decoder_start_token_id=98)
    tf_class = "TFBartModel" if name == "Bart" else "TFMarianMTModel"
    model = getattr(transformers, tf_class)(config)
    ids = IDS % 90
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, ::-1].copy()}
    model(inputs)
    rng = np.random.default_rng(5)
    for variable in model.weights:
        variable.assign(rng.normal(0.0, 0.3, tuple(variable.shape)).astype(np.float32))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    out = model(inputs, training=False)
    expected = np.asarray(out.last_hidden_state if name == "Bart" else out.logits)
    torch_class = "BartModel" if name == "Bart" else "MarianMTModel"
    module = getattr(transformers, torch_class)(config).eval()
    weightport.load(module, tmp_path / "sharded")
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v).long() for k, v in inputs.items()})
    got_np = (got.last_hidden_state if name == "Bart" else got.logits).numpy()
    np.testing.assert_allclose(got_np, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
