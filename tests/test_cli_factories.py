"""FACTORY as ``module:function`` or ``path/to/file.py:function``: every failure one line that says where
the import looked, never Python's raw import error."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest
from torch import nn

from weightport.cli import main
from weightport.cli.factories import UsageError, load_factory

_names = itertools.count()


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """The working folder, with a factory module of a name of its own (imports are cached) whose file
    imports a neighbour, and a subfolder holding the same pair."""
    name = f"cli_factories_{next(_names)}"
    body = (
        "import torch\nfrom {helper} import SIZE\n"
        "def make():\n    return torch.nn.Linear(3, SIZE)\n"
        "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
        "model = torch.nn.Linear(1, 1)\n"
        "def boom():\n    raise RuntimeError('no weights for you')\n"
        "def not_a_model():\n    return 3\n"
    )
    for where in (tmp_path, tmp_path / "sub"):
        where.mkdir(exist_ok=True)
        (where / f"{name}.py").write_text(body.format(helper=f"{name}_helper"))
        (where / f"{name}_helper.py").write_text("SIZE = 4\n")
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    return tmp_path, name


def test_a_module_a_file_a_relative_file_and_a_file_in_another_folder(folder: tuple[Path, str]) -> None:
    path, name = folder
    for spec in (
        f"{name}:make",
        f"{name}.py:make",
        f"./{name}.py:make",
        f"sub/{name}.py:make",
        f"{path}/{name}.py:make",
    ):
        model = load_factory(spec)
        assert isinstance(model, nn.Linear) and model.out_features == 4, spec


def test_a_class_and_an_instance(folder: tuple[Path, str]) -> None:
    _, name = folder
    assert isinstance(load_factory(f"{name}.py:Net"), nn.Module)
    assert isinstance(load_factory(f"{name}:model"), nn.Linear)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("{name}", "must look like module:function (a module importable from the current directory) or path/to/file.py:function"),
        ("nomodule_here:make", "no module 'nomodule_here' in the current directory ({path}) or on Python's path. Fix: run weightport in the folder that holds nomodule_here.py, or name the file: path/to/nomodule_here.py:make."),
        ("./missing.py:make", "no file './missing.py' (looked for {path}/missing.py)"),
        ("{name}.py:mkae", "'{name}.py' ({path}/{name}.py) has no 'mkae'; it defines Net, boom, make, not_a_model"),
        ("{name}:mkae", "'{name}' (imported from {path}/{name}.py) has no 'mkae'"),
        ("{name}:boom", "the factory '{name}:boom' raised RuntimeError: no weights for you. Fix: make 'boom()' build the model with no arguments"),
        ("{name}:not_a_model", "returned a value of type int, not a torch.nn.Module"),
    ],
)  # fmt: skip
def test_failures_say_where_they_looked(folder: tuple[Path, str], spec: str, said: str) -> None:
    path, name = folder
    with pytest.raises(UsageError) as caught:
        load_factory(spec.format(name=name))
    assert said.format(name=name, path=path) in str(caught.value)


def test_an_import_failing_inside_the_factorys_file(folder: tuple[Path, str]) -> None:
    path, _ = folder
    (path / "broken.py").write_text("import not_installed_anywhere\n")
    (path / "syntax.py").write_text("def make(:\n")
    with pytest.raises(UsageError) as caught:
        load_factory("broken.py:make")
    assert str(caught.value).startswith(
        f"factory 'broken.py:make': importing 'broken.py' ({path}/broken.py) raised ModuleNotFoundError: No module "
        "named 'not_installed_anywhere'. Fix: install 'not_installed_anywhere', or where it is a file of your own"
    )
    with pytest.raises(UsageError, match=r"raised SyntaxError: .*syntax\.py, line 1"):
        load_factory("syntax.py:make")


def test_on_the_command_line_one_line_and_exit_2(
    folder: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = folder
    (path / "w.npz").write_bytes(b"")
    assert main(["load", "./nowhere.py:make", "w.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("weightport: error: factory './nowhere.py:make': no file")
    assert "Traceback" not in err
