"""`import weightport` pulls in no optional framework; the public API is what __all__ says."""

from __future__ import annotations

import itertools
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


def test_a_meta_model_load_pulls_in_no_symbolic_shapes() -> None:
    """torch.empty_like of a meta tensor imports sympy (0.4 s); the fill of a meta model takes none."""
    code = (
        "import sys, numpy as np, torch, weightport\n"
        "with torch.device('meta'):\n    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)\n"
        "weightport.load(conv, {'weight': np.ones((4, 3, 3, 3), np.float32), 'bias': np.zeros(4, np.float32)})\n"
        "print(conv.weight.is_contiguous(memory_format=torch.channels_last), 'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


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


# The floors of the package, ground first (docs/design.md): a module imports only from its own floor or
# below, never up, and the imports that run when a module loads form no circle.
FLOORS: list[tuple[str, ...]] = [
    (
        "errors",
        "dtypes",
        "tensors",
        "torch_facts",
        "transforms",
        "boxes",
        "values",
        "copying",
        "staging",
        "call_order",
        "outputs",
        "options",
        "_kernels",
        "kernels",
    ),
    ("sources",),
    ("layouts",),
    ("plan", "recurrent_problems", "graph_check", "value_checks", "snapshot_config", "report", "progress"),
    ("apply", "distributed"),
    ("loading",),
    ("rnn", "reference", "verifying", "init_schemes", "initializers", "export", "inspect"),
    ("cli", "demo", "__main__", ""),
]


def _floor(module: str) -> int:
    name = module.removeprefix("weightport").removeprefix(".")
    for level, names in enumerate(FLOORS):
        if name.split(".")[0] in names:
            return level
    raise AssertionError(f"weightport.{name} is on no floor: add it to FLOORS and docs/design.md")


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Every module's weightport imports, each with whether it runs when the module loads."""
    import ast
    from pathlib import Path

    root = Path(weightport.__file__).parent
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts if path.name == "__init__.py" else parts[:-1]
        module = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        tree = ast.parse(path.read_text())
        skipped = {  # `if TYPE_CHECKING:` blocks never run
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for inner in branch.body
            for node in ast.walk(inner)
        }
        top = {id(node) for node in tree.body}
        out = found.setdefault(module, [])
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(n, id(node) in top) for n in names if n.split(".")[0] == "weightport"]
    return found


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{module} -> {name}"
        for module, names in _imports().items()
        for name, _ in names
        if name != "weightport" and _floor(name) > _floor(module)
    ]
    assert upward == []


def test_module_level_imports_form_no_circle() -> None:
    graph = {
        module: {n for n, at_load in names if at_load and n != module and n in _imports()}
        for module, names in _imports().items()
    }
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own submodules that import the package's base is not a circle
    assert [c for c in circles if not _through_package_init(c)] == []


def _through_package_init(circle: str) -> bool:
    names = circle.split(" -> ")
    return any(b.startswith(a + ".") for a, b in itertools.pairwise(names))


def test_export_reference_and_verify_stay_in_their_rooms() -> None:
    imports = _imports()
    exporters = sorted(m for m, names in imports.items() if any(n == "weightport.export" for n, _ in names))
    assert set(exporters) <= {"weightport", "weightport.cli"}
    for module in ("weightport.reference", "weightport.verifying"):
        assert not any(n.startswith("weightport.loading") for n, _ in imports[module])


def test_layouts_write_no_files() -> None:
    from pathlib import Path

    layouts = Path(weightport.__file__).parent / "layouts"
    writers = [
        str(p.relative_to(layouts))
        for p in layouts.rglob("*.py")
        if any(word in p.read_text() for word in ("atomic_write", "h5py.File(", "np.savez", 'open(path, "w'))
    ]
    assert writers == []


def test_no_source_file_is_over_600_lines() -> None:
    from pathlib import Path

    long = {
        str(p): n
        for p in Path(weightport.__file__).parent.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_loading_machinery_comes_in_with_the_package_only_after_torch() -> None:
    # torch first (a program about to load weights): the first load pays no imports, and still
    # neither ml_dtypes nor a file format's reader (imported when its file shows up) comes in;
    # weightport alone (the CLI) stays lazy.
    code = (
        "import sys{torch}; import weightport; "
        "print(sorted({{'weightport.loading', 'torch', 'ml_dtypes', 'weightport.sources.safetensors'}} & set(sys.modules)))"
    )
    runs = {
        order: subprocess.run(
            [sys.executable, "-c", code.format(torch=order)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for order in (", torch", "")
    }
    assert runs == {", torch": "['torch', 'weightport.loading']", "": "[]"}


def test_the_command_line_starts_without_torch(tmp_path: object) -> None:
    from pathlib import Path

    import numpy as np

    folder = Path(str(tmp_path))
    np.savez(folder / "small.npz", w=np.ones((2, 3), np.float32))
    code = (
        "import sys, weightport.cli\n"
        f"for argv in (['--version'], ['inspect', {str(folder / 'small.npz')!r}]):\n"
        "    try:\n        weightport.cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted({'torch', 'ml_dtypes'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert "weightport " in out and "small.npz" in out
