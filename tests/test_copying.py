"""copy_into: every strided view lands exactly, on one thread and split over several."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from weightport import copying


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: k.T, id="whole-transposed"),
        pytest.param(lambda k: k[:, 300:600].T, id="column-block-transposed"),
        pytest.param(lambda k: k[:, 1:].T, id="ragged-block"),
        pytest.param(lambda k: k[::2].T, id="strided-rows"),
        pytest.param(lambda k: k, id="contiguous"),
        pytest.param(lambda k: k.astype(">f4").T, id="big-endian"),
        pytest.param(lambda k: k.astype(ml_dtypes.bfloat16).T, id="bfloat16"),
        pytest.param(lambda k: k.astype(np.float64).T, id="float64-cast"),
    ],
)
def test_copy_into_is_exact(monkeypatch, parallel: bool, make) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(copying, "PARALLEL_BYTES", 1 if parallel else 1 << 40)
    k = np.random.default_rng(0).standard_normal((300, 900)).astype(np.float32)
    view = make(k)
    dst = torch.empty(view.shape, dtype=torch.bfloat16 if view.dtype == ml_dtypes.bfloat16 else torch.float32)
    copying.copy_into(dst, view)
    expected = torch.from_numpy(np.ascontiguousarray(view.astype(np.float32))).to(dst.dtype)
    assert torch.equal(dst, expected)
