"""The device path (pinned buffers, asynchronous copies), exercised on the CPU with the device abstracted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import random_state
from weightport import apply
from weightport.staging import Stager


@pytest.fixture
def staged_everywhere(monkeypatch) -> list[Stager]:  # type: ignore[no-untyped-def]
    made: list[Stager] = []

    def small_stager(device: torch.device) -> Stager:
        stager = Stager(device, pin=False, buffer_bytes=96)  # tiny: many bands, both buffers reused
        made.append(stager)
        return stager

    monkeypatch.setattr(apply, "goes_through_staging", lambda tensor: True)
    monkeypatch.setattr(apply, "Stager", small_stager)
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_staged_load_equals_direct_load(staged_everywhere, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    arrays = random_state(nn.LSTM(5, 6, num_layers=2, bidirectional=True), np.random.default_rng(0))
    direct = nn.LSTM(5, 6, num_layers=2, bidirectional=True).to(dtype)
    staged = nn.LSTM(5, 6, num_layers=2, bidirectional=True).to(dtype)
    params = [id(p) for p in staged.parameters()]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(apply, "goes_through_staging", lambda tensor: False)
        weightport.load(direct, arrays)
    weightport.load(staged, arrays)
    assert staged_everywhere, "the staged path was not taken"
    assert [id(p) for p in staged.parameters()] == params
    for (name, a), (_, b) in zip(direct.state_dict().items(), staged.state_dict().items()):
        assert torch.equal(a, b), name


def test_staged_transposed_and_scalar_values(staged_everywhere) -> None:  # type: ignore[no-untyped-def]
    lin = nn.Linear(7, 9)
    weight = np.arange(63, dtype=np.float64).reshape(7, 9).T  # a non-contiguous view
    bn = nn.BatchNorm1d(3)
    weightport.load(lin, {"weight": weight, "bias": np.ones(9)})
    np.testing.assert_array_equal(lin.weight.detach().numpy(), weight.astype(np.float32))
    state = random_state(bn, np.random.default_rng(1))
    state["num_batches_tracked"] = np.int64(11)
    weightport.load(bn, state)
    assert bn.num_batches_tracked.item() == 11


def test_stager_reuses_two_buffers() -> None:
    target = torch.zeros(40, 3)
    stager = Stager(torch.device("cpu"), pin=False, buffer_bytes=24)  # 2 rows per band, 20 bands
    stager.write(target, np.arange(120, dtype=np.float32).reshape(40, 3))
    stager.finish()
    assert len(stager._buffers) == 2
    np.testing.assert_array_equal(target.numpy(), np.arange(120, dtype=np.float32).reshape(40, 3))


def test_gpu_check_script_is_importable() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
