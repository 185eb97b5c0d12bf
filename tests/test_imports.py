"""`import weightport` pulls in no optional framework; the public API is what __all__ says."""

from __future__ import annotations

import subprocess
import sys

import weightport


def test_import_pulls_in_no_optional_framework() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import weightport, weightport.cli; "
        "heavy = {'h5py', 'onnx', 'msgpack', 'tensorflow', 'keras', 'jax', 'flax', 'tqdm', 'safetensors', "
        "'onnxruntime'}; print(sorted(heavy & (set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api() -> None:
    for name in (
        "load",
        "LoadReport",
        "LoadError",
        "WeightportError",
        "verify",
        "VerifyReport",
        "to_numpy",
        "save",
        "rnn",
        "reference",
    ):
        assert name in weightport.__all__ and hasattr(weightport, name)
    assert callable(weightport.reference.forward)
    assert issubclass(weightport.LoadError, ValueError)
