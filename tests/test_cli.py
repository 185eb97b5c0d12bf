"""The command line, run as a subprocess: demo, inspect, load, verify, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import weightport


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "weightport", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_demo_runs_end_to_end() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "verify against the NumPy reference: OK" in result.stdout
    assert "(4, 3) = (hidden_size, input_size) of RNN(input_size=3, hidden_size=4)" in result.stdout
    assert "The module is unchanged: True." in result.stdout


def test_inspect_json_and_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = weightport.save(torch.nn.LSTM(3, 4), tmp_path / "m.safetensors")
    result = run("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {t["name"]: t["shape"] for t in info["tensors"]}["weight_ih_l0"] == [16, 3]
    table = run("inspect", str(path))
    assert "weight_hh_l0  (16, 4)  float32" in table.stdout


def test_missing_file_is_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run("inspect", str(tmp_path / "nope.npz"))
    assert result.returncode == 2
    assert result.stderr.startswith("weightport: error: ") and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


FACTORY = textwrap.dedent(
    """
    import torch
    def make():
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    """
)


def test_load_and_verify_with_a_factory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mymodels.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    src = weightport.save(model, tmp_path / "w.npz")
    result = run("load", "mymodels:make", str(src), "--out", str(tmp_path / "out.safetensors"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Loaded 4 tensors" in result.stdout
    back = weightport.open_source(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(back.read("0.weight"), model[0].weight.detach().numpy())

    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    y = model(torch.from_numpy(x)).detach().numpy()
    np.savez(tmp_path / "io.npz", input_0=x, output_0=y)
    ok = run("verify", "mymodels:make", str(src), str(tmp_path / "io.npz"), cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    np.savez(tmp_path / "io.npz", input_0=x, output_0=y + 0.1)
    bad = run("verify", "mymodels:make", str(src), str(tmp_path / "io.npz"), cwd=tmp_path)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


def test_bad_factory_and_shape_mismatch_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mymodels.py").write_text(FACTORY)
    src = weightport.save({"0.weight": np.ones((3, 3))}, tmp_path / "w.npz")
    bad = run("load", "mymodels-make", str(src), cwd=tmp_path)
    assert bad.returncode == 2 and "package.module:function" in bad.stderr
    missing = run("load", "nomodule:make", str(src), cwd=tmp_path)
    assert missing.returncode == 2 and "cannot import 'nomodule'" in missing.stderr
    shape = run("load", "mymodels:make", str(src), "--lenient", cwd=tmp_path)
    assert shape.returncode == 2 and "'0.weight': expected shape (4, 3)" in shape.stderr


GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize(
    ("path", "layout", "layer"),
    [
        ("keras/model.keras", "keras", "lstm: LSTM, 3 tensors (units=4"),
        ("keras/model.weights.h5", "keras", "lstm: LSTM, 3 tensors"),
        ("onnx/lstm.onnx", "onnx", "/LSTM: LSTM, 3 tensors (hidden_size=4, direction=bidirectional)"),
        ("flax/lstm.msgpack", "flax", "cell: linen LSTMCell, 12 tensors"),
    ],
)
def test_inspect_framework_files_shows_layers(path: str, layout: str, layer: str) -> None:
    result = run("inspect", str(GOLDEN / path))
    assert result.returncode == 0, result.stderr
    assert f"(layout {layout})" in result.stdout and layer in result.stdout
    info = json.loads(run("inspect", str(GOLDEN / path), "--json").stdout)
    assert info["layout"] == layout and info["layers"] and all(t["bytes"] > 0 for t in info["tensors"])
