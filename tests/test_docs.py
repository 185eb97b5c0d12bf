"""The docs run as written: README.md and docs/*.md, block by block, and the API reference builds.

Every ```python block runs alone, in a fresh process in an empty folder (no block leans on one before
it). In ```console and ```bash blocks, the lines that start with `weightport ` or
`python -m weightport` run the same way; the others (installs, `scripts/test`) are for a reader.
An HTML comment on the line just above a block changes that, and must say why:

    <!-- docs-test: skip, <why it cannot run here> -->
    <!-- docs-test: after the python block above -->   (run in the folder that block made its files in)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import weightport

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"^(?:<!-- docs-test: (?P<directive>.*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$",
    re.M | re.S,
)
SHELL_LANGS = {"console", "bash", "sh", "shell"}
AFTER = "after the python block above"
RUNS = re.compile(r"^(?:\$ )?(weightport |python -m weightport)")
TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    directive: str | None
    setup: Block | None  # the python block to run first, in the same folder (AFTER)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[str]:
        lines = [line.strip() for line in self.body.splitlines()]
        return [line.removeprefix("$ ") for line in lines if RUNS.match(line)]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found: list[Block] = []
    last_python: Block | None = None
    for match in FENCE.finditer(text):
        directive = match["directive"]
        lang = match["lang"]
        line = text.count("\n", 0, match.start("lang")) + 1
        setup = last_python if directive == AFTER else None
        if directive == AFTER and setup is None:
            raise AssertionError(f"{path.name}:{line}: '{AFTER}', but no python block comes before it")
        block = Block(path, line, lang, match["body"], directive, setup)
        found.append(block)
        if lang == "python":
            last_python = block
    return found


ALL = [block for path in DOCS for block in blocks(path)]
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL = [b for b in ALL if b.lang in SHELL_LANGS and b.commands()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `weightport` and `python` resolve to this interpreter's environment, as after an install.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("PYTHONPATH", None)
    return env


def _run(command: list[str] | str, cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=_env(),
        shell=isinstance(command, str),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    )
    assert "Traceback" not in result.stderr, f"{what} printed a traceback:\n{result.stderr[-5000:]}"
    return result


def _run_python(block: Block, folder: Path) -> None:
    script = folder / "_docs_block.py"
    script.write_text(block.body)
    _run([sys.executable, script.name], folder, f"the python block at {block.name}")
    script.unlink()


def _skip_if_marked(block: Block) -> None:
    if block.directive is not None and block.directive.startswith("skip"):
        pytest.skip(f"{block.name}: {block.directive}")


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.name)
def test_python_block_runs_alone(block: Block, tmp_path: Path) -> None:
    _skip_if_marked(block)
    _run_python(block, tmp_path)


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.name)
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    _skip_if_marked(block)
    if block.setup is not None:
        _run_python(block.setup, tmp_path)
    for command in block.commands():
        _run(command, tmp_path, f"'{command}' ({block.name})")


def test_directives_are_known_and_say_why() -> None:
    for block in ALL:
        if block.directive is None or block.directive == AFTER:
            continue
        assert re.fullmatch(r"skip, \S.{10,}", block.directive), (
            f"{block.name}: a directive is '{AFTER}' or 'skip, <why it cannot run>', not {block.directive!r}"
        )


def test_docs_have_blocks_to_run() -> None:
    readme = [b for b in PYTHON if b.path == README]
    assert len(readme) >= 4
    assert len(SHELL) >= 1
    assert all(b.lang for b in ALL), [b.name for b in ALL if not b.lang]  # every fence names its language


def test_readme_first_screen_has_the_two_commands() -> None:
    first_screen = README.read_text().splitlines()[:12]
    commands = [line for line in first_screen if line.startswith("scripts/")]
    assert [c.split()[0] for c in commands] == ["scripts/demo", "scripts/test"]
    for command in commands:
        assert (ROOT / command.split()[0]).exists()


def test_links_between_docs_resolve() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_api_reference_builds_with_every_public_name(tmp_path: Path) -> None:
    out = tmp_path / "api"
    _run([sys.executable, str(ROOT / "docs" / "build_api.py"), str(out)], ROOT, "docs/build_api.py")
    page = (out / "weightport.html").read_text()
    documented = set(re.findall(r'<section id="([^"]+)"', page))
    submodules = {p.stem for p in (out / "weightport").glob("*.html")}
    missing = sorted(set(weightport.__all__) - documented - submodules)
    assert not missing, f"public names missing from the API reference: {missing}"
    assert {"layouts", "sources"} <= submodules
    assert (out / "index.html").exists()
