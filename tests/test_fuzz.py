"""A short deterministic batch of tests/fuzzing.py: damaged files only ever meet a WeightportError.

Each mutant runs in its own process under a memory limit and a timeout; an escape (any other
exception), a crash, a hang, NaN/Inf let in, or a refusal that changed the module fails the test
with the mutation that caused it. ``scripts/fuzz`` runs the long batch.
"""

from __future__ import annotations

import pytest

from fuzzing import FINDINGS, fuzz

# every seed file's format: .npz (stored and compressed), .safetensors, .npy, Keras .weights.h5 and
# .keras, Flax msgpack, ONNX
FORMATS = ("npz", "safetensors", "npy", "keras", "flax", "onnx")


@pytest.mark.parametrize("only", FORMATS)
def test_no_mutant_escapes(only: str) -> None:
    results = fuzz(25, first_seed=1000, timeout=20.0, only=only)
    assert len(results) >= 25
    assert [r for r in results if r[2] in FINDINGS] == []
    assert {r[2] for r in results} <= {"ok", "refused"}
