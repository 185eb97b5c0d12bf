"""Every ```python block of the README runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(python_blocks()) >= 4


def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {index} failed:\n{block}") from e


def test_readme_first_screen_has_the_two_commands() -> None:
    first_screen = README.read_text().splitlines()[:12]
    commands = [line for line in first_screen if line.startswith("scripts/")]
    assert [c.split()[0] for c in commands] == ["scripts/demo", "scripts/test"]
    for command in commands:
        assert (README.parent / command.split()[0]).exists()
