"""A new user's command-line runs (issue 15), on real files made here: no Python internals reach them
(no warnings-module lines, no tracebacks without --debug), and every fix they print is a flag."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import weightport
from weightport.cli import main

MODELS = textwrap.dedent(
    """
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    def tagger():
        return Tagger()

    def lstm():
        return torch.nn.LSTM(3, 4, batch_first=True)

    def wide():
        return torch.nn.LSTM(3, 8, batch_first=True)
    """
)

# what no message to a command-line user may hold: Python's internals, the library's keywords
INTERNALS = [
    "Traceback",
    'File "',
    "warnings.warn",
    "UncheckedConfigWarning:",
    "report = weightport.load(",
    ".problems",
    "strict=False",
    "prefix=",
    "mapping=",
    "allow_nonfinite",
    "example_inputs",
    "layout='",
]


def speaks_cli(text: str) -> str:
    for word in INTERNALS:
        assert word not in text, f"{word!r} reached the user:\n{text}"
    assert not re.search(r"\.py:\d+: \w+Warning", text), text
    return text


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "weightport", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with models.py and an LSTM's state dict saved as lstm.npz."""
    (tmp_path / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    weightport.save(torch.nn.LSTM(3, 4, batch_first=True), tmp_path / "lstm.npz")
    return tmp_path


def test_an_lstm_state_dict_into_a_bigger_model_says_prefix_as_a_flag_and_the_flag_works(
    folder: Path,
) -> None:
    refused = run("load", "models:tagger", "lstm.npz", cwd=folder)
    assert refused.returncode == 2 and refused.stdout == ""
    assert speaks_cli(refused.stderr).startswith("weightport: error: ")
    assert "Fix: pass --prefix lstm. to load into that submodule." in refused.stderr
    loaded = run("load", "models:tagger", "lstm.npz", "--prefix", "lstm.", "--out", "tagger.npz", cwd=folder)
    assert loaded.returncode == 0, loaded.stderr
    assert speaks_cli(loaded.stdout).startswith("Loaded 4 tensors")
    lstm = {f"lstm.{k}" for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
    assert set(weightport.open_source(folder / "tagger.npz").infos) == lstm | {"head.weight", "head.bias"}


def test_debug_anywhere_shows_the_traceback_and_the_problems_once(folder: Path) -> None:
    for argv in (
        ("--debug", "load", "models:wide", "lstm.npz"),
        ("load", "--debug", "models:wide", "lstm.npz"),
        ("load", "models:wide", "lstm.npz", "--debug"),
    ):
        result = run(*argv, cwd=folder)
        assert result.returncode == 2, result.stderr
        assert (
            "Traceback" in result.stderr
            and "weightport.errors.LoadError: (its message follows)" in result.stderr
        )
        problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
        assert problems and all(result.stderr.count(line) == 1 for line in problems), result.stderr
        assert result.stderr.count("refused to load") == 1


def test_problems_n_all_and_json_hold_every_problem(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder)
    argv = ["load", "models.py:tagger", "lstm.npz"]
    assert main([*argv, "--problems", "2"]) == 2
    err = speaks_cli(capsys.readouterr().err)
    assert len([line for line in err.splitlines() if line.startswith("  - ")]) == 2
    more = re.search(r"\.\.\. and (\d+) more \(--problems all lists them\)", err)
    assert more is not None, err
    assert main([*argv, "--problems", "all"]) == 2
    every = capsys.readouterr().err
    assert "more (" not in every
    assert len([line for line in every.splitlines() if line.startswith("  - ")]) == 2 + int(more[1])

    assert main([*argv, "--json", "--problems", "1"]) == 2
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["schema"] == 1 and document["ok"] is False and document["command"] == "load"
    assert document["error"]["kind"] == "LoadError"
    problems = document["problems"]
    assert len(problems) > 2 and {"name", "expected", "found", "fix", "message"} <= set(problems[0])
    assert any(p["fix"] == "pass --prefix lstm. to load into that submodule" for p in problems)
    speaks_cli(out)


def test_load_json_and_the_note_that_nothing_was_written(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder)
    assert main(["load", "models.py:lstm", "lstm.npz"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith(
        "nothing was written: without --out the model is filled in memory only"
    )
    assert main(["--json", "load", "models.py:lstm", "lstm.npz", "--dry-run"]) == 0
    document = json.loads(capsys.readouterr().out)
    report = document["report"]
    assert (
        document["ok"] and document["wrote"] is None and report["dry_run"] and report["source"] == "lstm.npz"
    )
    assert report["bytes"] == 576 and report["tensors"][0]["target"] == "weight_ih_l0"
    assert report["tensors"][0]["shape"] == [16, 3] and document["problems"] == []


@pytest.mark.parametrize("out", ["out", "out.pt", "nowhere/out.npz"])
def test_an_out_that_cannot_be_written_is_refused_first_with_the_suffixes(
    folder: Path, out: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder)
    assert main(["load", "models.py:lstm", "lstm.npz", "--out", out]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot save to ''" not in captured.err
    if "/" in out:
        assert "there is no folder 'nowhere'" in captured.err
    else:
        assert (
            ".npz or .safetensors" in captured.err
            and "Fix: --out out.safetensors (or out.npz)" in captured.err
        )


def test_allow_nonfinite_alone_or_for_named_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    arrays = weightport.to_numpy(torch.nn.LSTM(3, 4, batch_first=True))
    arrays["bias_hh_l0"][0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    assert main(["load", "models.py:lstm", "nan.npz"]) == 2
    err = speaks_cli(capsys.readouterr().err)
    assert "pass --allow-nonfinite (or --allow-nonfinite=NAME,... for those tensors only)" in err
    assert main(["load", "--allow-nonfinite", "models.py:lstm", "nan.npz"]) == 0  # never takes the next word
    assert main(["load", "models.py:lstm", "nan.npz", "--allow-nonfinite=bias_hh_l0"]) == 0
    capsys.readouterr()
    assert main(["load", "models.py:lstm", "nan.npz", "--allow-nonfinite=bias_hh"]) == 2
    assert "in --allow-nonfinite, a name of a tensor" in speaks_cli(capsys.readouterr().err)


def test_help_says_what_the_tolerances_mean_and_their_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--rtol RTOL relative tolerance: an output passes where |actual - expected| <= atol + rtol * |expected|"
        in text
    )
    assert "(default: 1e-05)" in text and "(default: 1e-06)" in text
    for flag in ("--prefix", "--allow-nonfinite", "--example-input", "--problems", "--json", "--debug"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("weightport ")


def test_a_keras_weights_file_warns_once_in_one_line_and_verify_repeats_it_beside_a_failure(
    tmp_path: Path,
) -> None:
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.LSTM(4, return_sequences=True, go_backwards=True, name="lstm")]
    )
    rng = np.random.default_rng(1)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save_weights(tmp_path / "back.weights.h5")
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    np.savez(tmp_path / "io.npz", input_0=x, output_0=np.asarray(model(x)))
    (tmp_path / "models.py").write_text(MODELS.replace("def lstm():", "def plain():\n    return Plain()\n\ndef lstm():") + textwrap.dedent(
        """
        class Plain(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(3, 4, batch_first=True)

            def forward(self, x):
                return self.lstm(x)[0]
        """
    ))  # fmt: skip

    loaded = run("load", "models:plain", "back.weights.h5", cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    warnings = [line for line in loaded.stderr.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "weightport: warning: 'back.weights.h5' does not record"
    )
    assert re.search(r"go_backwards(, \w+)* \(assumed False\)", warnings[0]), warnings[0]
    speaks_cli(loaded.stderr + loaded.stdout)
    assert "go_backwards" not in loaded.stdout  # said once, on stderr

    failed = run("verify", "models:plain", "back.weights.h5", "io.npz", cwd=tmp_path)
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    assert "the load warned: 'back.weights.h5' does not record" in failed.stdout
    assert failed.stderr.count("weightport: warning:") == 1
    speaks_cli(failed.stderr + failed.stdout)

    as_json = run("verify", "models:plain", "back.weights.h5", "io.npz", "--json", cwd=tmp_path)
    document = json.loads(as_json.stdout)
    assert (
        as_json.returncode == 1
        and document["ok"] is False
        and document["verify"]["outputs"][0]["ok"] is False
    )
    assert document["warnings"] and re.search(
        r"go_backwards(, \w+)* \(assumed False\)", document["warnings"][0]
    )
    assert document["report"]["pairings"][0]["source_layer"] == "lstm"


def test_example_input_shows_the_call_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keras = pytest.importorskip("keras")
    (tmp_path / "head_first.py").write_text(
        textwrap.dedent(
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
    )
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(3)]
    )
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "in.npz", input_0=np.ones((2, 3), np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["load", "head_first.py:make", "m.keras"]) == 2
    err = speaks_cli(capsys.readouterr().err)
    assert "pass --example-input IO.npz (inputs for one forward pass" in err
    assert main(["load", "head_first.py:make", "m.keras", "--example-input", "in.npz"]) == 0
    out = speaks_cli(capsys.readouterr().out)
    assert "call order (--example-input)" in out


# --- fixes that name the Python API are said as what the command line does, and doing it works -------------


def _fix(err: str, pattern: str) -> re.Match[str]:
    found = re.search(pattern, err)
    assert found is not None, err
    return found


def test_a_misspelt_name_is_renamed_with_the_map_the_fix_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    arrays = weightport.to_numpy(torch.nn.LSTM(3, 4, batch_first=True))
    arrays["weight_hh_I0"] = arrays.pop("weight_hh_l0")
    np.savez(tmp_path / "typo.npz", **arrays)
    assert main(["load", "models.py:lstm", "typo.npz"]) == 2
    err = speaks_cli(capsys.readouterr().err)
    flag = _fix(err, r"Rename it: (--map \S+)\.")[1].split()
    assert flag == ["--map", "weight_hh_I0=weight_hh_l0"]
    assert main(["load", "models.py:lstm", "typo.npz", *flag, "--out", "fixed.npz"]) == 0
    np.testing.assert_array_equal(
        weightport.open_source(tmp_path / "fixed.npz").read("weight_hh_l0"), arrays["weight_hh_I0"]
    )


def test_a_checkpoint_of_a_bigger_model_loads_its_part_with_source_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    bigger = torch.nn.Sequential()
    bigger.add_module("bert", torch.nn.LSTM(3, 4, batch_first=True))
    bigger.add_module("cls", torch.nn.Linear(4, 2))
    weightport.save(bigger, tmp_path / "head.npz")
    assert main(["load", "models.py:lstm", "head.npz"]) == 2
    err = speaks_cli(capsys.readouterr().err)
    flag = _fix(err, r"load the source's 'bert\.' part: (--source-prefix \S+),")[1].split()
    assert main(["load", "models.py:lstm", "head.npz", *flag, "--out", "part.npz"]) == 0
    assert "from 'head.npz' (under 'bert.')" in capsys.readouterr().out
    part = weightport.open_source(tmp_path / "part.npz")
    for name, tensor in bigger.bert.state_dict().items():
        np.testing.assert_array_equal(part.read(name), tensor.numpy())


def test_a_layer_the_model_does_not_take_is_left_out_with_skip_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("h5py")
    golden = Path(__file__).resolve().parent / "golden" / "keras" / "model.weights.h5"  # an LSTM and a GRU
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    assert main(["load", "models.py:lstm", str(golden)]) == 2
    err = speaks_cli(capsys.readouterr().err)
    assert "a layer the model should not take is left out with --skip-layer LAYER" in err
    assert main(["load", "models.py:lstm", str(golden), "--skip-layer", "gur"]) == 2
    assert "(its layers: gru, lstm)" in capsys.readouterr().err
    assert (
        main(["load", "models.py:lstm", str(golden), "--skip-layer", "gru", "--out", "lstm.safetensors"]) == 0
    )
    captured = capsys.readouterr()
    assert "(layout keras)" in captured.out and captured.err.count("weightport: warning:") == 1
    source = weightport.open_source(golden)
    kernel = source.read("layers/lstm/cell/vars/0")
    np.testing.assert_array_equal(
        weightport.open_source(tmp_path / "lstm.safetensors").read("weight_ih_l0"), kernel.T
    )


def test_a_torch_pickle_is_converted_by_the_command_the_fix_prints(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text(MODELS)
    torch.manual_seed(4)
    model = torch.nn.LSTM(3, 4, batch_first=True)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    refused = run("load", "models:lstm", "m.pt", cwd=tmp_path)
    assert refused.returncode == 2
    command = _fix(speaks_cli(refused.stderr), r'python -c "([^"]*)", then load (\S+)\.')
    subprocess.run([sys.executable, "-c", command[1]], cwd=tmp_path, check=True, timeout=300)
    loaded = run("load", "models:lstm", command[2], "--out", "back.npz", cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    back = weightport.open_source(tmp_path / "back.npz")
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(back.read(name), tensor.numpy())


def test_an_unexpected_error_is_one_line_and_its_traceback_on_request(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.chdir(folder)
    monkeypatch.setattr(weightport, "load", broken)
    assert main(["load", "models.py:lstm", "lstm.npz"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "weightport: error: RuntimeError: CUDA error: out of memory (an unexpected error: weightport or a package "
        "it uses failed). Fix: --debug shows the traceback; please report it with the command line."
    ]
    assert main(["load", "models.py:lstm", "lstm.npz", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
