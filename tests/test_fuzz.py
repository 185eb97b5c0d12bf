"""A short deterministic batch of tests/fuzzing.py: damaged files only ever meet a WeightportError.

Each mutant runs in its own process under a memory limit and a timeout; an escape (any other
exception), a crash, a hang, NaN/Inf let in, or a refusal that changed the module fails the test
with the mutation that caused it. ``scripts/fuzz`` runs the long batch.
"""

from __future__ import annotations

import pytest

from fuzzing import FINDINGS, fuzz

# formats whose readers the batch covers (the HDF5, msgpack and ONNX readers join as they are hardened)
FORMATS = ("npz", "safetensors", "npy")


@pytest.mark.parametrize("only", FORMATS)
def test_no_mutant_escapes(only: str) -> None:
    results = fuzz(30, first_seed=1000, timeout=20.0, only=only)
    assert len(results) >= 30
    assert [r for r in results if r[2] in FINDINGS] == []
    assert {r[2] for r in results} <= {"ok", "refused"}
