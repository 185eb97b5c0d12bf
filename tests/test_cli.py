"""The command line, run as a subprocess: demo, inspect, load, verify, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import weightport
from weightport.inspect import format_description


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


def test_load_refuses_an_out_suffix_before_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mymodels.py").write_text(FACTORY)
    src = weightport.save(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)), tmp_path / "w.npz"
    )
    result = run("load", "mymodels:make", str(src), "--out", str(tmp_path / "out.pt"), cwd=tmp_path)
    assert result.returncode == 2 and "Loaded" not in result.stdout
    assert "ends in '.pt'; weightport writes .npz or .safetensors files. Fix: --out " in result.stderr
    dry = run("load", "mymodels:make", str(src), "--dry-run", "--out", str(tmp_path / "o.npz"), cwd=tmp_path)
    assert dry.returncode == 0 and "not written" in dry.stdout and not (tmp_path / "o.npz").exists()


def test_bad_factory_and_shape_mismatch_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mymodels.py").write_text(FACTORY)
    src = weightport.save({"0.weight": np.ones((3, 3))}, tmp_path / "w.npz")
    bad = run("load", "mymodels-make", str(src), cwd=tmp_path)
    assert (
        bad.returncode == 2 and "module:function" in bad.stderr and "path/to/file.py:function" in bad.stderr
    )
    missing = run("load", "nomodule:make", str(src), cwd=tmp_path)
    assert missing.returncode == 2 and "no module 'nomodule' in the current directory" in missing.stderr
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


FAILING = textwrap.dedent(
    """
    import torch

    def boom():
        raise RuntimeError("no weights for you")

    def interrupted():
        raise KeyboardInterrupt

    class Weighted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, *xs):
            return torch.stack([x * (i + 1) for i, x in enumerate(xs)]) * self.scale

    def weighted():
        return Weighted()
    """
)


def test_a_failing_factory_is_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "facs.py").write_text(FAILING)
    src = weightport.save({"scale": np.ones(1)}, tmp_path / "w.npz")
    result = run("load", "facs:boom", str(src), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "weightport: error: the factory 'facs:boom' raised RuntimeError: no weights for you. "
        "Fix: make 'boom()' build the model with no arguments; --debug shows the traceback."
    ]
    debug = run("--debug", "load", "facs:boom", str(src), cwd=tmp_path)
    assert debug.returncode == 2 and 'raise RuntimeError("no weights for you")' in debug.stderr
    interrupted = run("load", "facs:interrupted", str(src), cwd=tmp_path)
    assert interrupted.returncode not in (0, 1, 2) and "KeyboardInterrupt" in interrupted.stderr


def test_a_failing_forward_is_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "facs.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    src = weightport.save(model, tmp_path / "w.npz")
    np.savez(tmp_path / "io.npz", input_0=np.ones((2, 5, 7), np.float32), output_0=np.ones((2, 5, 2)))
    result = run("verify", "facs:make", str(src), str(tmp_path / "io.npz"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "weightport: error: the module's forward on input_0 of shape (2, 5, 7) raised RuntimeError: "
    )
    assert line.endswith(
        "Fix: save the inputs in the shapes and order the module's forward takes; --debug shows the traceback."
    )
    debug = run("--debug", "verify", "facs:make", str(src), str(tmp_path / "io.npz"), cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "torch" in debug.stderr


def test_verify_orders_inputs_by_number_and_refuses_other_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "facs.py").write_text(FAILING)
    src = weightport.save({"scale": np.ones(1, np.float32)}, tmp_path / "w.npz")
    xs = {f"input_{i}": np.full(2, float(i), np.float32) for i in range(12)}
    y = np.stack([x * (i + 1) for i, x in enumerate(xs.values())])
    io = tmp_path / "io.npz"
    np.savez(io, **xs, output_0=y)
    ok = run("verify", "facs:weighted", str(src), str(io), cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr

    np.savez(io, **xs, output_0=y, extra=y)
    bad = run("verify", "facs:weighted", str(src), str(io), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "weightport: error: 'io.npz': array 'extra' is not named input_N or output_N. Fix: save the "
        "inputs as input_0, input_1, ... and the expected outputs as output_0, output_1, ..."
    ]
    np.savez(io, input_0=xs["input_0"], input_2=xs["input_2"], output_0=y)
    gap = run("verify", "facs:weighted", str(src), str(io), cwd=tmp_path)
    assert gap.returncode == 2 and "'io.npz': has input_0, input_2 but no input_1." in gap.stderr


def test_verify_without_outputs_says_it_uses_the_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "facs.py").write_text("import torch\ndef rnn():\n    return torch.nn.RNN(3, 4)\n")
    torch.manual_seed(0)
    src = weightport.save(torch.nn.RNN(3, 4), tmp_path / "w.npz")
    np.savez(tmp_path / "io.npz", input_0=np.ones((5, 2, 3), np.float32))
    result = run("verify", "facs:rnn", str(src), str(tmp_path / "io.npz"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "verify against the NumPy reference: OK (rtol=1e-05, atol=1e-06); 'io.npz' has no output_N, "
        "so the expected outputs are weightport.reference.forward's"
    )


def test_a_closed_pipe_ends_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # like `weightport demo | head -1` once head has gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "weightport", "demo"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_counts_are_pluralized() -> None:
    info = {
        "schema": 1,
        "source": "models/m.keras",
        "layout": "keras",
        "tensors": [
            {
                "name": "dense/kernel",
                "shape": [2, 2],
                "dtype": "float32",
                "bytes": 16,
                "layer": "dense",
                "variable": None,
            }
        ],
        "total_bytes": 16,
        "constants": [],
        "constant_bytes": 0,
        "layers": [
            {
                "name": "dense",
                "kind": "Dense",
                "config": {},
                "tensors": ["dense/kernel"],
                "variables": {},
                "not_ported": None,
            }
        ],
        "ignored": [],
    }
    text = format_description(info)
    assert text.startswith("'m.keras': 1 tensor, 16 bytes") and "  dense: Dense, 1 tensor\n" in text + "\n"


def test_inspect_a_folder_of_one_shard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    weightport.save({"a": np.ones(2, np.float32)}, tmp_path / "part-1.safetensors")
    result = run("inspect", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"1 shard in folder '{tmp_path.name}': 1 tensor, 8 bytes")


ONNX_FACTORY = textwrap.dedent(
    """
    import torch
    def relu():
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    def tanh():  # a port with the wrong activation: the weights load, the outputs differ
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    """
)


def _relu_mlp_onnx(tmp_path, x: torch.Tensor) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """ports.py with the ONNX factories, and m.onnx exported from a Linear-ReLU-Linear with random biases: the model."""
    (tmp_path / "ports.py").write_text(ONNX_FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notices
        torch.onnx.export(model.eval(), (x,), str(tmp_path / "m.onnx"), dynamo=False)
    return model


def test_verify_an_onnx_source_without_outputs_runs_it_with_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    x = torch.randn(5, 3)
    model = _relu_mlp_onnx(tmp_path, x)
    np.savez(tmp_path / "io.npz", input_0=x.numpy())

    ok = run("verify", "ports:relu", "m.onnx", "io.npz", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == (
        "verify against 'm.onnx' run by onnxruntime: OK (rtol=1e-05, atol=1e-06); 'io.npz' has no "
        "output_N, so the expected outputs are onnxruntime's"
    )
    bad = run("verify", "ports:tanh", "m.onnx", "io.npz", cwd=tmp_path)
    assert bad.returncode == 1 and "run by onnxruntime: FAILED" in bad.stdout, bad.stderr
    assert "FAIL output" in bad.stdout

    y = model(x).detach().numpy()  # given outputs still win over the file's
    np.savez(tmp_path / "io.npz", input_0=x.numpy(), output_0=y)
    given = run("verify", "ports:relu", "m.onnx", "io.npz", cwd=tmp_path)
    assert given.returncode == 0 and given.stdout.startswith("verify against expected outputs: OK")

    np.savez(tmp_path / "io.npz", input_0=x.numpy(), input_1=x.numpy())
    two = run("verify", "ports:relu", "m.onnx", "io.npz", cwd=tmp_path)
    assert two.returncode == 2 and "Traceback" not in two.stderr
    assert two.stderr.startswith("weightport: error: 'm.onnx' takes 1 input (")
    assert "but 2 arrays were given" in two.stderr


HEAD_FIRST = textwrap.dedent(
    """
    import torch
    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 3)  # declared first, called last
            self.body = torch.nn.Linear(3, 3)
        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))
    def make():
        return HeadFirst()
    """
)


def test_example_inputs_show_the_call_order_and_verify_uses_its_own_inputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keras = pytest.importorskip("keras")
    (tmp_path / "mymodels.py").write_text(HEAD_FIRST)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(3)]
    )
    rng = np.random.default_rng(4)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "m.keras")
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input_0=x)
    np.savez(tmp_path / "io.npz", input_0=x, output_0=np.asarray(model(x)))
    refused = run("load", "mymodels:make", str(tmp_path / "m.keras"), cwd=tmp_path)
    assert refused.returncode == 2 and "interchangeable" in refused.stderr
    loaded = run(
        "load", "mymodels:make", str(tmp_path / "m.keras"), "--example-inputs", "in.npz", cwd=tmp_path
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "by recorded order (Keras) and call order (--example-input)" in loaded.stdout
    ok = run("verify", "mymodels:make", str(tmp_path / "m.keras"), "io.npz", "--atol", "1e-5", cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr


def test_load_refuses_an_onnx_twin_that_computes_otherwise_and_the_flag_skips_the_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    _relu_mlp_onnx(tmp_path, torch.randn(5, 3))
    refused = run("load", "ports:tanh", "m.onnx", cwd=tmp_path)
    assert refused.returncode == 2 and "computes something else between its layers" in refused.stderr
    assert "pass --no-check-outputs" in refused.stderr, refused.stderr  # the CLI's flag, not the keyword
    assert run("load", "ports:relu", "m.onnx", cwd=tmp_path).returncode == 0
    assert run("load", "ports:tanh", "m.onnx", "--no-check-outputs", cwd=tmp_path).returncode == 0
