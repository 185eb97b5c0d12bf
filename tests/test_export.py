"""Export: to_numpy copies, save to .npz/.safetensors, and load(save(m)) is the identity."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from conftest import snapshot
from weightport import SourceError


def test_to_numpy_copies_never_alias() -> None:
    lin = nn.Linear(2, 2)
    arrays = weightport.to_numpy(lin)
    arrays["weight"][:] = 42
    assert lin.weight.max() < 42


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_save_then_load_restores_exactly(tmp_path, suffix: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.LSTM(3, 4, bidirectional=True), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].num_batches_tracked.fill_(3)
    path = weightport.save(model, tmp_path / f"m{suffix}")
    other = nn.Sequential(nn.LSTM(3, 4, bidirectional=True), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(dtype)
    weightport.load(other, path)
    assert {k: v[0] for k, v in snapshot(other).items()} == {k: v[0] for k, v in snapshot(model).items()}


def test_our_safetensors_match_the_reference_library(tmp_path) -> None:  # type: ignore[no-untyped-def]
    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2], np.int64),
        "c": np.ones(3, np.float16),
    }
    path = weightport.save(arrays, tmp_path / "x.safetensors")
    back = safetensors.numpy.load_file(str(path))
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    ref = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(arrays, str(ref))
    src = weightport.open_source(ref)
    for k, v in arrays.items():
        np.testing.assert_array_equal(src.read(k), v)


def test_bfloat16_survives_safetensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    path = weightport.save(lin, tmp_path / "m.safetensors")
    src = weightport.open_source(path)
    assert src.infos["weight"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_save_refuses_unknown_suffix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceError, match=r"\.npz or \.safetensors"):
        weightport.save(nn.Linear(2, 2), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    suffix=st.sampled_from([".npz", ".safetensors"]),
    seed=st.integers(0, 1000),
)
def test_property_export_then_load_is_identity(tmp_path_factory, sizes, suffix, seed) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    model = nn.Sequential(*layers)
    path = weightport.save(model, tmp_path_factory.mktemp("e") / f"m{suffix}")
    torch.manual_seed(seed + 1)
    fresh = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])
    weightport.load(fresh, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
