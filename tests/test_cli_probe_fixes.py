"""The command line on what a probe found: a factory that exits, a wrong --layout on PyTorch names, a
damaged ONNX file, and `load`'s help."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from weightport.cli import main

_names = itertools.count()

MLP = "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))\n"


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A working folder with a factory module of its own name (imports are cached) and mlp.npz."""
    name = f"cli_probe_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(
        MLP + "import sys\ndef exits():\n    sys.exit(0)\ndef fails():\n    raise SystemExit('usage: ...')\n"
    )
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    np.savez(tmp_path / "mlp.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    return tmp_path, name


@pytest.mark.parametrize("factory", ["exits", "fails"])
def test_a_factory_that_exits_is_an_error(work, factory, capsys) -> None:
    _, name = work
    assert main(["load", f"{name}:{factory}", "mlp.npz"]) == 2
    err = capsys.readouterr().err
    assert f"the factory '{name}:{factory}' exited (sys.exit(" in err
    assert "nothing was loaded" in err and f"Fix: make '{factory}()' return the model" in err


def test_a_factory_file_that_exits_on_import_is_an_error(work, capsys) -> None:
    folder, _ = work
    (folder / "script.py").write_text(MLP + "import sys\nsys.exit(0)\n")
    assert main(["load", "script.py:make", "mlp.npz"]) == 2
    err = capsys.readouterr().err
    assert "importing 'script.py'" in err and "exited (sys.exit(0)) before the factory ran" in err
    assert "if __name__ ==" in err


@pytest.mark.parametrize("layout", ["keras", "flax", "onnx"])
def test_a_wrong_layout_on_pytorch_names_says_so_first(work, layout, capsys) -> None:
    _, name = work
    assert main(["load", f"{name}:make", "mlp.npz", "--layout", layout]) == 2
    if layout == "onnx":  # the ONNX layout's own word on arrays without a graph
        err = " ".join(capsys.readouterr().err.split())
        assert "they look like PyTorch state-dict names. Fix: drop --layout onnx" in err
        return
    err = capsys.readouterr().err.splitlines()
    first = err[1].strip()  # the first problem, after the headline
    assert first.startswith("- '(layout)': expected names in the") and f"'{layout}' layout" in first
    assert "PyTorch state-dict names in 'mlp.npz' ('0.weight'" in first
    assert f"Fix: drop --layout {layout} (or pass --layout torch)" in first


def test_the_fix_of_a_wrong_layout_works(work, capsys) -> None:
    _, name = work
    assert main(["load", f"{name}:make", "mlp.npz", "--layout", "torch"]) == 0
    assert main(["load", f"{name}:make", "mlp.npz"]) == 0


def test_onnx_layout_on_pytorch_names_in_the_library_says_so() -> None:
    import weightport

    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with pytest.raises(weightport.LayoutError) as info:
        weightport.load(model, arrays, layout="onnx")
    text = str(info.value)
    assert "none has a '/' ('0.weight', '0.bias' ...): they look like PyTorch state-dict names" in text
    assert "Fix: drop layout='onnx'" in text
    weightport.load(model, arrays, layout="torch")  # the fix, followed


def test_load_help_says_it_saves_only_with_out(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["load", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "and save the result" not in out
    assert "(--out saves the result)" in out


def test_a_damaged_onnx_name_is_one_line_naming_file_and_node(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    from test_export_probe_fixes import damaged_onnx

    path = damaged_onnx(tmp_path, b"transB", b"\xffransB")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unexpected error" not in err
    assert "'model.onnx': node 0 (Gemm 'fc')" in err and "an attribute name is b'\\xffransB'" in err
    assert "Fix: re-export or re-download it." in err


@pytest.mark.parametrize("layout", ["keras", "flax"])
def test_a_wrong_layout_on_pytorch_names_in_the_library_says_so_first(layout: str) -> None:
    """layout='keras'/'flax' on arrays under the model's own state-dict names gave only the layout's generic
    refusal (its --map / strict=False fixes); the likely cause now goes first, and its fix loads."""
    import weightport

    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2))
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with pytest.raises(weightport.LoadError) as info:
        weightport.load(model, arrays, layout=layout)
    first = info.value.problems[0]
    assert first.name == "(layout)" and f"drop layout='{layout}'" in str(first)
    weightport.load(model, arrays, layout="torch")
