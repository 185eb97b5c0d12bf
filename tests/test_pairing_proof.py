"""Issue 10: a port is exact or refused, never silently wrong.

A source layer pairs with a module only on a proof: ``mapping=``, by name, by a unique kind and
shape, or by the order the source records (a ``.keras`` config, a legacy ``.h5``'s layer list, an
ONNX graph's node order, Flax's ``Dense_0 .. Dense_10`` numbers; never a file's key order) matched
with the order the model calls its modules in (an ``nn.Sequential``'s, or what one forward pass on
``example_inputs=`` shows). Layers of one kind and shape that no proof places are refused, with both
ways out named. Every model here has random non-zero biases, so a crossed pairing shows in the
outputs, which are compared with the framework's own (Keras, Flax, onnxruntime) to 1e-5.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from conftest import snapshot
from weightport import LayoutError, LoadReport, UncheckedConfigWarning, WeightportError

TOL = 1e-5
W = 4  # width of the interchangeable hidden layers
B = 3  # batch
HOWS = ("mapping=", "by name", "by a unique kind and shape", "by recorded order")
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORDERS = st.integers(2, 4).flatmap(lambda n: st.permutations(range(n)))  # declaration order of h0..h{n-1}
FORMS = st.sampled_from(["tensor", "tuple", "dict"])
SEEDS = st.integers(0, 2**16)


# --- helpers ------------------------------------------------------------------------------------------


def _keras() -> Any:
    return pytest.importorskip("keras")


def _flax() -> tuple[Any, Any, Any]:
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    serialization = pytest.importorskip("flax.serialization")
    return jax, linen, serialization


def _onnx() -> tuple[Any, Any]:
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def load(module: nn.Module, source: Any, **kw: Any) -> LoadReport:
    """weightport.load; a weights-only file's UncheckedConfigWarning is expected, any other warning fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, source, **kw)


def run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def assert_exact(module: nn.Module, x: np.ndarray, expected: np.ndarray, what: str) -> None:
    got = run(module, x)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    err = float(np.max(np.abs(got.astype(np.float64) - expected)))
    assert err < TOL, f"{what}: max error {err:.3g} (a crossed pairing?)"


def as_form(x: np.ndarray, form: str) -> Any:
    """``example_inputs`` as a tensor, a tuple of positional tensors, or a dict of keyword tensors."""
    tensor = torch.from_numpy(x.copy())
    return {"tensor": tensor, "tuple": (tensor,), "dict": {"x": tensor}}[form]


def randomize(weights: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Random values of the same shapes: biases non-zero, no two layers alike."""
    return [rng.uniform(-0.6, 0.6, np.shape(w)).astype(np.float32) for w in weights]


def randomize_torch(module: nn.Module, rng: np.random.Generator) -> nn.Module:
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(torch.from_numpy(rng.uniform(-0.6, 0.6, tuple(t.shape)).astype(np.float32)))
    return module.eval()


def no_hooks_left(module: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


# --- PyTorch models --------------------------------------------------------------------------------------


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ConvsCalledInReverse(nn.Module):
    """Declares ``late`` before ``early``; calls ``early`` first. NHWC in and out, as Keras."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(3, 3, 3, padding=1)
        self.early = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.early(x.permute(0, 3, 1, 2)))
        return self.late(h).permute(0, 2, 3, 1)


def convs_in_sequence() -> nn.Sequential:
    return nn.Sequential(
        Permute(0, 3, 1, 2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        Permute(0, 2, 3, 1),
    )


class CalledInOrder(nn.Module):
    """Hidden ``Linear(W, W)`` layers ``h0 .. h{n-1}`` declared in the order ``declared`` and called
    ``h0`` first, each followed by ReLU; then a ``Linear(W, 2)`` head."""

    def __init__(self, declared: Sequence[int]) -> None:
        super().__init__()
        for k in declared:
            self.add_module(f"h{k}", nn.Linear(W, W))
        self.head = nn.Linear(W, 2)
        self.depth = len(declared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.depth):
            x = torch.relu(self.get_submodule(f"h{k}")(x))
        return self.head(x)


def in_sequence(n: int) -> nn.Sequential:
    """The same network as an ``nn.Sequential`` in call order, its children named ``fc0``, ``act0``, ..."""
    parts: list[tuple[str, nn.Module]] = []
    for k in range(n):
        parts += [(f"fc{k}", nn.Linear(W, W)), (f"act{k}", nn.ReLU())]
    return nn.Sequential(OrderedDict([*parts, ("head", nn.Linear(W, 2))]))


def numbered(n: int) -> nn.Sequential:
    """The same network as a plain ``nn.Sequential`` (children ``0``, ``1``, ...)."""
    return nn.Sequential(*(m for _ in range(n) for m in (nn.Linear(W, W), nn.ReLU())), nn.Linear(W, 2))


def targets(n: int) -> list[str]:
    return [*(f"h{k}" for k in range(n)), "head"]


# --- the property every port must have -------------------------------------------------------------------


def exact_or_refused(
    make: Callable[[], nn.Module], source: Any, x: np.ndarray, expected: np.ndarray, what: str, **kw: Any
) -> LoadReport | None:
    """Load into a fresh model: either its outputs are the source's, or a WeightportError left the
    module bit for bit as it was. Never a load that computes something else."""
    module = make()
    before = snapshot(module)
    try:
        report = load(module, source, **kw)
    except WeightportError:
        assert snapshot(module) == before, f"{what}: a refused load changed the module"
        return None
    assert_exact(module, x, expected, what)
    assert all(p.how.startswith(HOWS) for p in report.pairings), (what, [p.how for p in report.pairings])
    return report


def exact(
    make: Callable[[], nn.Module], source: Any, x: np.ndarray, expected: np.ndarray, what: str, **kw: Any
) -> LoadReport:
    module = make()
    report = load(module, source, **kw)
    assert_exact(module, x, expected, what)
    assert all(p.how.startswith(HOWS) for p in report.pairings), (what, [p.how for p in report.pairings])
    return report


@dataclass
class Port:
    """One source of the hidden-layers network and what it should do."""

    what: str
    source: Any
    ordered: bool  # the source records the layers' order (so example_inputs= proves the pairing)
    mapping: dict[str, str] | None = None  # source layer -> module path in CalledInOrder
    kw: dict[str, Any] = field(default_factory=dict)


def check_port(
    port: Port,
    declared: Sequence[int],
    x: np.ndarray,
    expected: np.ndarray,
    form: str,
    sequential: Callable[[], nn.Module],
) -> None:
    n = len(declared)
    shuffled = lambda: CalledInOrder(declared)  # noqa: E731
    if port.mapping is not None:  # the oracle itself: pairing by hand reproduces the source's outputs
        report = exact(
            shuffled, port.source, x, expected, f"{port.what} mapping=", mapping=port.mapping, **port.kw
        )
        assert {p.how.split(";")[0] for p in report.pairings} == {"mapping="}
    exact_or_refused(shuffled, port.source, x, expected, f"{port.what} declared {list(declared)}", **port.kw)
    with_inputs = dict(port.kw, example_inputs=as_form(x, form))
    what = f"{port.what} declared {list(declared)} example_inputs ({form})"
    if port.ordered:
        report = exact(shuffled, port.source, x, expected, what, **with_inputs)
        hows = {p.module_path: p.how for p in report.pairings}
        assert all(hows[f"h{k}"].startswith("by recorded order") for k in range(n)), hows
    else:
        exact_or_refused(shuffled, port.source, x, expected, what, **with_inputs)
    exact(sequential, port.source, x, expected, f"{port.what} into an nn.Sequential in call order", **port.kw)


# --- 1. the case: two Conv2D of one shape, called in the reverse of their declaration order -------


@dataclass
class ConvFiles:
    x: np.ndarray
    sources: dict[str, tuple[Path, np.ndarray]]  # kind -> (file, that framework's own output)


CONV_KINDS = [".keras", ".weights.h5", "legacy save_weights .h5", "legacy model.save .h5"]
CONV_MAPPING = {"conv_first": "early", "conv_second": "late"}


def _keras_convs(K: Any) -> Any:
    return K.Sequential(
        [
            K.Input((5, 5, 3)),
            K.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv_first"),
            K.layers.Conv2D(3, 3, padding="same", name="conv_second"),
        ]
    )


@pytest.fixture(scope="module")
def conv_files(tmp_path_factory: pytest.TempPathFactory) -> ConvFiles:
    keras = _keras()
    pytest.importorskip("h5py")
    folder = tmp_path_factory.mktemp("convs")
    keras.backend.clear_session()
    keras.utils.set_random_seed(10)
    rng = np.random.default_rng(10)
    model = _keras_convs(keras)
    model.set_weights(randomize(model.get_weights(), rng))
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    model.save(folder / "m.keras")
    model.save_weights(folder / "m.weights.h5")
    sources = {".keras": (folder / "m.keras", expected), ".weights.h5": (folder / "m.weights.h5", expected)}
    try:
        import tf_keras
    except ImportError:
        return ConvFiles(x, sources)
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(10)
    legacy = _keras_convs(tf_keras)
    legacy.set_weights(model.get_weights())
    legacy_expected = legacy.predict(x, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras warns that .h5 is a legacy format
        legacy.save_weights(folder / "w.h5")
        legacy.save(folder / "full.h5")
    sources["legacy save_weights .h5"] = (folder / "w.h5", legacy_expected)
    sources["legacy model.save .h5"] = (folder / "full.h5", legacy_expected)
    return ConvFiles(x, sources)


def _conv_source(conv_files: ConvFiles, kind: str) -> tuple[Path, np.ndarray]:
    if kind not in conv_files.sources:
        pytest.skip("needs tf_keras to write legacy .h5 files: pip install --no-deps tf_keras")
    return conv_files.sources[kind]


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_convs_called_in_reverse_are_refused_without_example_inputs(conv_files: ConvFiles, kind: str) -> None:
    path, _ = _conv_source(conv_files, kind)
    module = ConvsCalledInReverse()
    before = snapshot(module)
    with pytest.raises(LayoutError, match=r"example_inputs=[\s\S]*mapping=") as caught:
        load(module, path)
    message = str(caught.value)
    for name in ("'conv_first'", "'conv_second'", r"\bearly\b", r"\blate\b"):  # both sides listed
        assert re.search(name, message), (name, message)
    assert snapshot(module) == before


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_convs_called_in_reverse_load_exactly_with_example_inputs(conv_files: ConvFiles, kind: str) -> None:
    path, expected = _conv_source(conv_files, kind)
    module = ConvsCalledInReverse()
    report = load(module, path, example_inputs=torch.from_numpy(conv_files.x.copy()))
    assert_exact(module, conv_files.x, expected, kind)
    assert {p.source_layer: p.module_path for p in report.pairings} == CONV_MAPPING
    assert all(p.how.startswith("by recorded order") for p in report.pairings), report.pairings
    assert "by recorded order" in str(report)
    assert no_hooks_left(module)


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_convs_called_in_reverse_load_exactly_with_mapping(conv_files: ConvFiles, kind: str) -> None:
    path, expected = _conv_source(conv_files, kind)
    module = ConvsCalledInReverse()
    report = load(module, path, mapping=CONV_MAPPING)
    assert_exact(module, conv_files.x, expected, kind)
    assert all(p.how.startswith("mapping=") for p in report.pairings), report.pairings
    assert "mapping=" in str(report)


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_convs_in_an_nn_sequential_load_exactly_without_example_inputs(
    conv_files: ConvFiles, kind: str
) -> None:
    path, expected = _conv_source(conv_files, kind)
    module = convs_in_sequence()
    report = load(module, path)
    assert_exact(module, conv_files.x, expected, kind)
    assert {p.source_layer: p.module_path for p in report.pairings} == {"conv_first": "1", "conv_second": "3"}
    assert all(p.how.startswith("by recorded order") for p in report.pairings), report.pairings


def test_example_inputs_leave_the_module_as_it_was(conv_files: ConvFiles) -> None:
    """The forward pass that shows the call order changes nothing: no weights, no mode, no hooks, no input."""
    path, _ = conv_files.sources[".keras"]
    module = ConvsCalledInReverse().train()
    before = snapshot(module)
    x = torch.from_numpy(conv_files.x.copy())
    report = load(module, path, example_inputs=x, dry_run=True)
    assert snapshot(module) == before
    assert all(m.training for m in module.modules())
    assert no_hooks_left(module)
    assert torch.equal(x, torch.from_numpy(conv_files.x))
    assert {p.source_layer: p.module_path for p in report.pairings} == CONV_MAPPING


class _SharedBlock(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.pos = shared  # the parent's module, reachable under a second path (timm's CoaT keeps cpe so)
        self.fc = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pos(x)))


class _SharedModule(nn.Module):
    def __init__(self, classes: int = 3, data_dependent: bool = False) -> None:
        super().__init__()
        self.pos = nn.Linear(W, W)
        self.blocks = nn.ModuleList([_SharedBlock(self.pos)])
        self.head = nn.Linear(W, classes)
        self.data_dependent = data_dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_dependent and bool(x.sum() > 1e9):  # needs values: the pass runs on copies, not meta
            x = x * 2
        return self.head(self.blocks[0](x))


@pytest.mark.parametrize("data_dependent", [False, True], ids=["meta-pass", "copies-pass"])
def test_example_inputs_leave_a_module_reachable_under_two_paths_as_it_was(
    data_dependent: bool, tmp_path: Path
) -> None:
    """torch's functional_call swaps a shared module's tensors once per path and restored the stand-ins: a
    refused load said 'nothing was written' and left the module's weights on meta. Now the pass leaves them
    as they were, a refused load changes nothing, and the same model loads exactly (onnxruntime's outputs)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    original = _SharedModule(data_dependent=data_dependent).eval()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 5, W)).astype(np.float32))
    path = tmp_path / "shared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original, (x,), str(path), dynamo=False)  # MatMul weights unnamed
    other_head = _SharedModule(classes=4, data_dependent=data_dependent).eval()
    before = snapshot(other_head)
    with pytest.raises(WeightportError):
        load(other_head, path, example_inputs=(x,))
    assert snapshot(other_head) == before
    twin = _SharedModule(data_dependent=data_dependent).eval()
    load(twin, path, example_inputs=(x,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(twin(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert twin.pos is twin.blocks[0].pos and not any(t.is_meta for t in twin.state_dict().values())


def test_example_inputs_with_a_module_built_on_the_meta_device(conv_files: ConvFiles) -> None:
    path, expected = conv_files.sources[".keras"]
    with torch.device("meta"):
        module = ConvsCalledInReverse()
    load(module, path, example_inputs=torch.from_numpy(conv_files.x.copy()))
    assert not any(t.is_meta for t in module.state_dict().values())
    assert_exact(module, conv_files.x, expected, "meta module")


# --- 2. properties: shuffled declaration order, every framework ----------------------------------------


@PROPERTY
@given(declared=ORDERS, seed=SEEDS, form=FORMS)
def test_keras_ports_are_exact_or_refused(declared: list[int], seed: int, form: str) -> None:
    keras = _keras()
    pytest.importorskip("h5py")
    n = len(declared)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((W,)),
            *(keras.layers.Dense(W, activation="relu") for _ in range(n)),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(randomize(model.get_weights(), rng))
    x = rng.standard_normal((B, W)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    mapping = dict(zip((layer.name for layer in model.layers), targets(n)))
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m.keras")
        model.save_weights(Path(tmp) / "m.weights.h5")
        for name in ("m.keras", "m.weights.h5"):
            port = Port(name, Path(tmp) / name, ordered=True, mapping=mapping)
            check_port(port, declared, x, expected, form, lambda: in_sequence(n))


def _flax_mlp(linen: Any, n: int) -> Any:
    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x: Any) -> Any:
            for _ in range(n):
                x = linen.relu(linen.Dense(W)(x))
            return linen.Dense(2)(x)

    return MLP()


@PROPERTY
@given(declared=ORDERS, seed=SEEDS, form=FORMS)
@example(declared=[7, 2, 10, 0, 5, 9, 1, 3, 8, 6, 4], seed=1, form="tensor")  # Dense_10 sorts before Dense_2
def test_flax_ports_are_exact_or_refused(declared: list[int], seed: int, form: str) -> None:
    jax, linen, serialization = _flax()
    n = len(declared)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, W)).astype(np.float32)
    mlp = _flax_mlp(linen, n)
    variables = mlp.init(jax.random.PRNGKey(seed), x)
    variables = jax.tree_util.tree_map(lambda a: randomize([a], rng)[0], variables)
    assert list(variables["params"]) == sorted(variables["params"])  # a file's key order is not Flax's
    expected = np.asarray(mlp.apply(variables, x))
    mapping = {f"Dense_{k}": target for k, target in enumerate(targets(n))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.msgpack"
        path.write_bytes(serialization.to_bytes(variables))
        check_port(
            Port("msgpack", path, ordered=True, mapping=mapping),
            declared,
            x,
            expected,
            form,
            lambda: in_sequence(n),
        )


def torch_onnx_export(model: nn.Module, x: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(model.eval(), (torch.from_numpy(x),), str(path), dynamo=False, input_names=["x"])


def run_onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    _, ort = _onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@PROPERTY
@given(declared=ORDERS, seed=SEEDS, form=FORMS)
def test_onnx_ports_are_exact_or_refused(declared: list[int], seed: int, form: str) -> None:
    onnx, _ = _onnx()
    n = len(declared)
    rng = np.random.default_rng(seed)
    true = randomize_torch(numbered(n), rng)
    x = rng.standard_normal((B, W)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch_onnx_export(true, x, path)
        expected = run_onnxruntime(path, x)
        gemms = [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Gemm"]
        assert len(gemms) == n + 1, gemms
        mapping = dict(zip(gemms, targets(n)))
        check_port(
            Port("onnx", path, ordered=True, mapping=mapping),
            declared,
            x,
            expected,
            form,
            lambda: in_sequence(n),
        )


@PROPERTY
@given(declared=ORDERS, seed=SEEDS, form=FORMS)
def test_weightport_exports_are_exact_or_refused(declared: list[int], seed: int, form: str) -> None:
    """weightport's own exports of the network in call order: Keras and Flax keys carry the order
    (``dense_1``, ``Dense_1``); ONNX-layout keys and state-dict names carry names only."""
    from weightport.layouts import flax as flax_layout
    from weightport.layouts import keras as keras_layout
    from weightport.layouts import onnx as onnx_layout

    pytest.importorskip("h5py")
    _, _, serialization = _flax()
    n = len(declared)
    rng = np.random.default_rng(seed)
    true = randomize_torch(in_sequence(n), rng)
    x = rng.standard_normal((B, W)).astype(np.float32)
    expected = run(true, x)
    labels = [*(f"fc{k}" for k in range(n)), "head"]
    with tempfile.TemporaryDirectory() as tmp:
        h5 = keras_layout.save_weights_h5(true, Path(tmp) / "w.weights.h5")
        keras_names = ["dense", *(f"dense_{k}" for k in range(1, n + 1))]
        flat = flax_layout.export(true, names={label: f"Dense_{k}" for k, label in enumerate(labels)})
        nested: dict[str, Any] = {}
        for key in sorted(flat):
            *parents, leaf = key.split("/")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = flat[key]
        msgpack_path = Path(tmp) / "params.msgpack"
        msgpack_path.write_bytes(serialization.to_bytes(nested))
        npz = weightport.save(true, Path(tmp) / "w.npz")
        ports = [
            Port("save_weights_h5", h5, ordered=True, mapping=dict(zip(keras_names, targets(n)))),
            Port(
                "flax export",
                msgpack_path,
                ordered=True,
                mapping={f"Dense_{k}": t for k, t in enumerate(targets(n))},
            ),
            Port("onnx export", onnx_layout.export(true), ordered=False, kw={"layout": "onnx"}),
            Port("weightport.save .npz", npz, ordered=False),
        ]
        for port in ports:
            check_port(port, declared, x, expected, form, lambda: in_sequence(n))


# --- 3. Flax names given by the model's author record no order -------------------------------------------


def _flax_projections(linen: Any) -> Any:
    class Projections(linen.Module):
        """setup-style: named query, key, value; called in that order (alphabetically: key, query, value)."""

        def setup(self) -> None:
            self.query = linen.Dense(W)
            self.key = linen.Dense(W)
            self.value = linen.Dense(W)

        def __call__(self, x: Any) -> Any:
            return self.value(linen.relu(self.key(linen.relu(self.query(x)))))

    return Projections()


class TorchProjections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(W, W)
        self.k_proj = nn.Linear(W, W)
        self.v_proj = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.k_proj(torch.relu(self.q_proj(x)))))


@pytest.mark.parametrize("form", ["msgpack", "pytree"])
def test_flax_layers_named_by_their_author_are_never_paired_by_key_order(tmp_path: Path, form: str) -> None:
    jax, linen, serialization = _flax()
    rng = np.random.default_rng(30)
    x = rng.standard_normal((B, W)).astype(np.float32)
    model = _flax_projections(linen)
    variables = model.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda a: randomize([a], rng)[0], variables)
    assert list(variables["params"]) == ["key", "query", "value"]  # sorted: not the call order
    expected = np.asarray(model.apply(variables, x))
    source: Any = variables
    kw: dict[str, Any] = {"layout": "flax"}  # an in-memory pytree's '/'-joined names
    if form == "msgpack":
        source, kw = tmp_path / "params.msgpack", {}
        source.write_bytes(serialization.to_bytes(variables))
    module = TorchProjections()
    before = snapshot(module)
    with pytest.raises(LayoutError, match=r"mapping=") as caught:
        load(module, source, **kw)
    for name in ("query", "key", "value", "q_proj", "k_proj", "v_proj"):
        assert re.search(rf"\b{name}\b", str(caught.value)), (name, str(caught.value))
    assert snapshot(module) == before
    with pytest.raises(LayoutError, match=r"mapping="):  # a forward pass orders the modules, not the source
        load(module, source, example_inputs=torch.from_numpy(x), **kw)
    assert snapshot(module) == before
    report = load(module, source, mapping={"query": "q_proj", "key": "k_proj", "value": "v_proj"}, **kw)
    assert_exact(module, x, expected, f"Flax {form} with mapping=")
    assert all(p.how.startswith("mapping=") for p in report.pairings), report.pairings


# --- 4. ONNX: initializer names, graph order, example_inputs -----------------------------------------------


class DeclaredBackwards(nn.Module):
    """Declares ``head``, ``second``, ``first``; calls ``first``, ``second``, ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(W, 2)
        self.second = nn.Linear(W, W)
        self.first = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


class RenamedBackwards(nn.Module):
    """Other attribute names, also declared against the call order: ``late`` runs after ``early``."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(W, W)
        self.early = nn.Linear(W, W)
        self.out = nn.Linear(W, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.late(torch.relu(self.early(x)))))


@dataclass
class OnnxFile:
    path: Path
    x: np.ndarray
    expected: np.ndarray


@pytest.fixture(scope="module")
def backwards_onnx(tmp_path_factory: pytest.TempPathFactory) -> OnnxFile:
    _onnx()
    rng = np.random.default_rng(40)
    model = randomize_torch(DeclaredBackwards(), rng)
    x = rng.standard_normal((B, W)).astype(np.float32)
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    torch_onnx_export(model, x, path)
    expected = run_onnxruntime(path, x)
    assert np.max(np.abs(expected - run(model, x))) < TOL  # the oracle agrees with the model exported
    return OnnxFile(path, x, expected)


def test_onnx_graph_loads_by_name_into_the_module_it_came_from(backwards_onnx: OnnxFile) -> None:
    module = DeclaredBackwards()
    report = load(module, backwards_onnx.path)
    assert_exact(module, backwards_onnx.x, backwards_onnx.expected, "by name")
    assert {(p.module_path, p.how) for p in report.pairings} == {
        ("first", "by name"),
        ("second", "by name"),
        ("head", "by name"),
    }


def test_onnx_graph_loads_by_recorded_order_into_an_nn_sequential(backwards_onnx: OnnxFile) -> None:
    module = nn.Sequential(
        OrderedDict(l0=nn.Linear(W, W), r0=nn.ReLU(), l1=nn.Linear(W, W), r1=nn.ReLU(), out=nn.Linear(W, 2))
    )
    report = load(module, backwards_onnx.path)
    assert_exact(module, backwards_onnx.x, backwards_onnx.expected, "nn.Sequential")
    hows = {p.module_path: p.how for p in report.pairings}
    assert hows["l0"].startswith("by recorded order") and hows["l1"].startswith("by recorded order"), hows
    assert hows["out"] == "by a unique kind and shape", hows


def test_onnx_graph_into_renamed_modules_declared_backwards(backwards_onnx: OnnxFile) -> None:
    module = RenamedBackwards()
    before = snapshot(module)
    with pytest.raises(LayoutError, match=r"example_inputs=[\s\S]*mapping=") as caught:
        load(module, backwards_onnx.path)
    assert re.search(r"\bearly\b", str(caught.value)) and re.search(r"\blate\b", str(caught.value))
    assert snapshot(module) == before
    report = load(module, backwards_onnx.path, example_inputs=torch.from_numpy(backwards_onnx.x.copy()))
    assert_exact(module, backwards_onnx.x, backwards_onnx.expected, "example_inputs")
    hows = {p.module_path: p.how for p in report.pairings}
    assert hows["early"].startswith("by recorded order") and hows["late"].startswith("by recorded order"), (
        hows
    )
    assert hows["out"] == "by a unique kind and shape", hows


def test_onnx_graph_into_renamed_modules_with_mapping(
    backwards_onnx: OnnxFile, onnx_gemms: list[str]
) -> None:
    """The oracle of the test above, through what exists today: pairing by hand."""
    module = RenamedBackwards()
    load(module, backwards_onnx.path, mapping=dict(zip(onnx_gemms, ["early", "late", "out"])))
    assert_exact(module, backwards_onnx.x, backwards_onnx.expected, "mapping=")


@pytest.fixture(scope="module")
def onnx_gemms(backwards_onnx: OnnxFile) -> list[str]:
    onnx, _ = _onnx()
    return [n.name for n in onnx.load(str(backwards_onnx.path)).graph.node if n.op_type == "Gemm"]


def test_a_mapping_side_is_for_layouts_with_one_way_cells_only() -> None:
    """':reverse' names one direction of a bidirectional RNN where a layout pairs one-way cells with sides
    (Flax); elsewhere a source's bidirectional layer fills both itself, and a one-way module has no side."""
    from weightport.layouts.pairing import pair_layers
    from weightport.layouts.slots import SourceLayer

    model = nn.Module()
    model.gru = nn.GRU(3, 4, bidirectional=True)
    model.one = nn.GRU(3, 4)
    layers = [SourceLayer("cell", "GRU")]
    with pytest.raises(
        LayoutError, match=r"Keras layers fill both directions .* map it to 'gru\[0\]' without ':reverse'"
    ):
        pair_layers(model, layers, {"cell": "gru[0]:reverse"}, framework="Keras")
    with pytest.raises(LayoutError, match=r"'one\[0\]' runs one direction"):
        pair_layers(model, layers, {"cell": "one[0]:reverse"}, framework="Flax", sides=True)
    (pair,) = pair_layers(model, layers, {"cell": "gru[0]:reverse"}, framework="Flax", sides=True)
    assert (pair.slot.label, pair.side, pair.how) == ("gru[0]", "reverse", "mapping= (reverse direction)")


# ---- a subclassed Keras model records no call order; a file path never names another layer's module ----


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def _subclassed(K: Any) -> Any:
    class HeadFirst(K.Model):  # type: ignore[misc, name-defined]
        """Declares head before body, calls body first: its layer list is not its call order."""

        def __init__(self) -> None:
            super().__init__()
            self.head = K.layers.Dense(4)
            self.body = K.layers.Dense(4)

        def call(self, x: Any) -> Any:
            return self.head(self.body(x))

    return HeadFirst()


@pytest.mark.parametrize("form", ["keras live", "tf_keras live", "tf_keras save_weights .h5"])
def test_a_subclassed_keras_model_records_no_call_order(form: str, tmp_path: Path) -> None:
    keras = pytest.importorskip("tf_keras") if form.startswith("tf_keras") else _keras()
    rng = np.random.default_rng(11)
    model = _subclassed(keras)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    model(x)
    model.set_weights(randomize(model.get_weights(), rng))
    expected = np.asarray(model(x))
    source: Any = model
    if form.endswith(".h5"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_weights(tmp_path / "w.h5")
        source = tmp_path / "w.h5"
    module = _Chain()
    before = snapshot(module)
    with pytest.raises(
        LayoutError, match="subclassed Keras model, which lists its layers in the order its attributes"
    ):
        load(module, source, example_inputs=torch.zeros(1, 4))
    assert snapshot(module) == before
    head, body = (layer.name for layer in model.layers)
    load(module, source, mapping={body: "fc1", head: "fc2"})
    assert_exact(module, x, expected, form)


@pytest.mark.parametrize("kind", ["live", ".keras", ".weights.h5"])
def test_a_keras_file_path_never_names_the_module_of_another_layer(kind: str, tmp_path: Path) -> None:
    """Keras files layer 'first' as 'layers/dense' (numbered per class) while another layer is named 'dense':
    a model keyed by Keras names takes each layer by its own name, not one by the other's path."""
    keras = _keras()
    rng = np.random.default_rng(12)
    inputs = keras.Input((4,))
    model = keras.Model(
        inputs, keras.layers.Dense(4, name="dense")(keras.layers.Dense(4, name="first")(inputs))
    )
    model.set_weights(randomize(model.get_weights(), rng))
    x = rng.standard_normal((3, 4)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    source: Any = {"live": model, ".keras": tmp_path / "m.keras", ".weights.h5": tmp_path / "m.weights.h5"}[
        kind
    ]
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict({"first": nn.Linear(4, 4), "dense": nn.Linear(4, 4)})

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.layers["dense"](self.layers["first"](t))

    module = Keyed()
    report = load(module, source)
    assert_exact(module, x, expected, kind)
    assert {p.source_layer: p.how.startswith("by name") for p in report.pairings} == {
        "first": True,
        "dense": True,
    }


def test_the_forward_pass_of_a_model_with_tied_weights_runs() -> None:
    """A tied tensor is given to the pass once (functional_call ties its other names and refuses both):
    the pass ran, and a head reading the embedding's weight as it is changes nothing."""
    from weightport.call_order import trace_calls

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.emb(x))))

    calls = trace_calls(TiedLM(), torch.tensor([[1, 2, 3]]))
    assert calls.order == {"emb": 0, "mid": 1, "head": 2}
    assert calls.changed == set()


@pytest.mark.parametrize("kind", ["live", ".keras"])
def test_a_name_two_keras_layers_share_is_not_taken_as_a_path(kind: str, tmp_path: Path) -> None:
    """An inner model reuses the name 'first': both are then named by their file paths, and the outer one's
    ('layers/dense', numbered per class) never pairs by name with the module of the layer named 'dense'."""
    keras = _keras()
    rng = np.random.default_rng(13)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="first")], name="inner")
    inputs = keras.Input((4,))
    model = keras.Model(
        inputs, keras.layers.Dense(4, name="dense")(inner(keras.layers.Dense(4, name="first")(inputs)))
    )
    model.set_weights(randomize(model.get_weights(), rng))
    x = rng.standard_normal((3, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    model.save(tmp_path / "m.keras")

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict({"first": nn.Linear(4, 4)})

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.layers["first"](t)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict(
                {"first": nn.Linear(4, 4), "inner": Inner(), "dense": nn.Linear(4, 4)}
            )

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.layers["dense"](self.layers["inner"](self.layers["first"](t)))

    module = Outer()
    load(module, model if kind == "live" else tmp_path / "m.keras", example_inputs=torch.zeros(1, 4))
    assert_exact(module, x, expected, kind)


def test_a_path_ending_in_the_layers_own_name_is_kept() -> None:
    """Flax names a listed layer 'encoder/layers_0/Dense_0' (module 'encoder.layers.0.Dense_0'); a top-level
    'Dense_0' beside it does not take that path from it, as a Keras layer's other name would."""
    from weightport.layouts.pairing import pair_layers
    from weightport.layouts.slots import SourceLayer

    model = nn.Module()
    model.Dense_0 = nn.Linear(2, 3)
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList([nn.Module()])
    model.encoder.layers[0].Dense_0 = nn.Linear(2, 3)
    layers = [
        SourceLayer("Dense_0", "Linear"),
        SourceLayer("encoder/layers_0/Dense_0", "Linear", paths=("encoder.layers.0.Dense_0",)),
    ]
    pairs = pair_layers(model, layers, None, framework="Flax")
    assert [(p.slot.label, p.how) for p in pairs] == [
        ("Dense_0", "by name"),
        ("encoder.layers.0.Dense_0", "by name"),
    ]


def test_every_group_that_cannot_be_paired_is_listed_in_one_refusal(tmp_path: Path) -> None:
    """Two groups of interchangeable layers (two convs of one shape, two Denses of another) in a model whose
    call order is unknown: one refusal lists both, so one mapping= can settle them (a model with many
    parallel branches took a round per group)."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    model = keras.Sequential(
        [keras.Input((5, 4)), *(layers.Conv1D(4, 1) for _ in range(2)), *(layers.Dense(3) for _ in range(3))]
    )
    model.save(tmp_path / "m.keras")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1)
            self.d1, self.d2, self.d3 = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    with pytest.raises(LayoutError) as caught:
        weightport.load(Net(), tmp_path / "m.keras")
    text = str(caught.value)
    assert text.startswith("2 groups of layers cannot be paired"), text
    assert "c1 (Conv1d (4, 4, 1))" in text and "d2 (Linear (3, 3))" in text, text
    assert "d1 (Linear" not in text  # its shape is its own: it pairs
