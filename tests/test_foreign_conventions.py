"""Files and names saved by other frameworks' conventions, each read as that framework wrote it or refused
naming what it is, with a fix that works.

- An ``.npy`` / ``.npz`` member of ml_dtypes' float8_e5m2 (np.save writes descr ``'<f1'``, a type NumPy has
  not) is refused as an ml_dtypes array whose type is lost, not as a corrupt file.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import numpy as np
import pytest
import torch

import weightport
from conftest import refused

# --- np.save of ml_dtypes' float8_e5m2 ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_float8_e5m2_saved_by_numpy_is_refused_as_a_lost_ml_dtype(tmp_path: Path, suffix: str) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2)
    if suffix == ".npz":
        path = tmp_path / "fc.npz"
        np.savez(path, weight=weight, bias=rng.standard_normal(2).astype(np.float32))
        source: Path = path
        where = "'fc.npz' member 'weight'"
    else:
        (tmp_path / "fc").mkdir()
        np.save(tmp_path / "fc" / "weight.npy", weight)
        np.save(tmp_path / "fc" / "bias.npy", rng.standard_normal(2).astype(np.float32))
        source = tmp_path / "fc"
        where = "'fc/weight.npy'"
    error = refused(
        torch.nn.Linear(2, 2),
        source,
        "holds dtype '<f1', a 1-byte float NumPy has no type for: np.save writes "
        r"an ml_dtypes array .* losing its type\. Fix: save it as float32",
        weightport.SourceError,
    )
    assert where in str(error) and "corrupt" not in str(error)
    # the fix works: the same values saved as float32 load exactly
    np.savez(tmp_path / "fixed.npz", weight=weight.astype(np.float32), bias=np.zeros(2, np.float32))
    module = torch.nn.Linear(2, 2)
    weightport.load(module, tmp_path / "fixed.npz")
    assert np.array_equal(module.weight.detach().numpy(), weight.astype(np.float32))
