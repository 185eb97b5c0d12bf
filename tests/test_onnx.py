"""The ONNX reader and layout against onnxruntime, on exported and hand-built models.

onnxruntime is the oracle: a model is run there on a random input, its weights are loaded
with weightport into a freshly initialized PyTorch module, and the outputs must agree to
1e-5 (float32). Weights are random in every gate block, so a wrong gate order fails.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from conftest import refused, snapshot
from weightport.errors import (
    LayoutError,
    SourceError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
)
from weightport.layouts import onnx as onnx_layout
from weightport.sources import onnx as onnx_source
from weightport.sources import open_source

onnx = pytest.importorskip("onnx")
# Hand-built graphs whose outputs are a node's own (an RNN node's Y: sequence, directions, batch, hidden): the
# load's run of the graph cannot pair them with the module's outputs and says so; tests/test_onnx_graph_check.py
# tests that run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outputs were not compared:weightport.errors.UncheckedConfigWarning"
)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "onnx"
TOL = 1e-5
T, B = 5, 2  # sequence length, batch
BLOCKS = {"LSTM": 4, "GRU": 3, "RNN": 1}


# --- helpers ---------------------------------------------------------------------------------------------


def _ort() -> Any:
    return pytest.importorskip("onnxruntime")


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def torch_export(model: nn.Module, x: torch.Tensor, path: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice, its tracer's notes on Python values read from tensors,
        # and its advice about exporting RNNs with batch > 1: export noise, not results
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size", UserWarning)
        torch.onnx.export(
            model.eval(), (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], **kwargs
        )


def save_model(
    path: Path, nodes: list, inits: dict[str, np.ndarray], inputs: dict, outputs: list[str]
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(-0.6, 0.6, shape).astype(np.float32)


def recurrent_file(
    path: Path,
    rng: np.random.Generator,
    kind: str,
    *,
    direction: str = "forward",
    features: int = 3,
    hidden: int = 4,
    bias: bool = True,
    peepholes: np.ndarray | None = None,
    initial_state: float | None = None,
    **attrs: Any,
) -> tuple[Path, dict[str, np.ndarray]]:
    """One hand-built LSTM/GRU/RNN node with random weights; returns the file and the arrays.

    ``initial_state``: stores initial_h (and initial_c) filled with that value, as initializers.
    """
    d = 2 if direction == "bidirectional" else 1
    g = BLOCKS[kind]
    arrays = {"W": rand(rng, d, g * hidden, features), "R": rand(rng, d, g * hidden, hidden)}
    if bias:
        arrays["B"] = rand(rng, d, 2 * g * hidden)
    inputs = ["X", "W", "R", "B" if bias else "", "", "", "", ""]
    if initial_state is not None:
        for role, position in [("initial_h", 5)] + ([("initial_c", 6)] if kind == "LSTM" else []):
            arrays[role] = np.full((d, B, hidden), initial_state, np.float32)
            inputs[position] = role
    if peepholes is not None:
        arrays["P"] = peepholes
        inputs[7] = "P"
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(
        kind, inputs, outputs, name="rec", hidden_size=hidden, direction=direction, **attrs
    )
    return save_model(path, [node], arrays, {"X": [T, B, features]}, outputs), arrays


def as_torch_output(y: np.ndarray) -> np.ndarray:
    """ONNX's Y (T, D, B, H) as PyTorch's sequence output (T, B, D*H)."""
    t, d, b, h = y.shape
    return y.transpose(0, 2, 1, 3).reshape(t, b, d * h)


def make_rnn(kind: str, *args: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(1)  # a fresh random module: nothing in it matches the file by chance
    return getattr(nn, kind)(*args, **kwargs)


def max_err(a: Any, b: np.ndarray) -> float:
    error = float(np.abs(np.asarray(a.detach().numpy() if hasattr(a, "detach") else a) - b).max())
    print(f"maxerr {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}: {error:.2e}")  # pytest -s
    return error


# --- torch.onnx.export: real exported files, loaded into fresh models --------------------------------------


class Seq(nn.Module):
    def __init__(self, kind: str, bidirectional: bool, layers: int, bias: bool = True) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(
            3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True, bias=bias
        )
        self.head = nn.Linear(8 if bidirectional else 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize(("bidirectional", "layers"), [(False, 1), (True, 2)])
def test_torch_export_loads_into_a_fresh_model(
    tmp_path: Path, kind: str, bidirectional: bool, layers: int
) -> None:
    torch.manual_seed(0)
    exported = Seq(kind, bidirectional, layers)
    x = torch.randn(B, T, 3)
    torch_export(exported, x, tmp_path / "m.onnx")
    (expected,) = run_ort(tmp_path / "m.onnx", {"x": x.numpy()})
    torch.manual_seed(1)
    fresh = Seq(kind, bidirectional, layers).eval()
    assert max_err(fresh(x), expected) > 1e-2  # the fresh model really differs before loading
    report = weightport.load(fresh, tmp_path / "m.onnx")
    assert max_err(fresh(x), expected) < TOL
    pairs = [(p.module_path, p.how) for p in report.pairings]
    # the exporter names each node by the module it ran in ('/rnn/LSTM', '/head/Gemm'); a two-layer RNN's
    # nodes both name 'rnn', which holds two layers: those pair by kind and shape
    rnn = "by name" if layers == 1 else "by a unique kind and shape"
    assert pairs == [(f"rnn[{i}]", rnn) for i in range(layers)] + [("head", "by name")]


def dynamo_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """torch.onnx.export's default exporter (dynamo, through onnxscript)."""
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on flat weights and pytree deprecations
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, verbose=False)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_dynamo_export_loads_into_a_fresh_model(tmp_path: Path, kind: str) -> None:
    """The dynamo exporter's LSTM/GRU nodes: zero initial states stored, MatMul + Add heads."""
    torch.manual_seed(0)
    x = torch.randn(B, T, 3)
    dynamo_export(Seq(kind, True, 2), x, tmp_path / "m.onnx")
    (expected,) = run_ort(tmp_path / "m.onnx", {"x": x.numpy()})
    torch.manual_seed(1)
    fresh = Seq(kind, True, 2).eval()
    assert max_err(fresh(x), expected) > 1e-2
    report = weightport.load(fresh, tmp_path / "m.onnx")
    assert max_err(fresh(x), expected) < TOL
    assert [p.module_path for p in report.pairings] == ["rnn[0]", "rnn[1]", "head"]


def test_torch_dynamo_export_of_an_unrolled_rnn_is_refused_with_the_way_out(tmp_path: Path) -> None:
    """The dynamo exporter unrolls nn.RNN into per-step MatMul nodes: nothing maps back; say so."""
    torch.manual_seed(0)
    x = torch.randn(B, T, 3)
    dynamo_export(Seq("RNN", True, 2), x, tmp_path / "m.onnx")
    fresh = Seq("RNN", True, 2)
    before = snapshot(fresh)
    with pytest.raises(
        LayoutError, match=r"has no ONNX RNN node for 'rnn' \(RNN\).*unrolls.*Fix: export with .*dynamo=False"
    ):
        weightport.load(fresh, tmp_path / "m.onnx")
    assert snapshot(fresh) == before


def test_a_module_of_another_recurrent_kind_is_named_as_the_problem(tmp_path: Path) -> None:
    """An LSTM file into a GRU: the module is of the wrong class, not an unrolled export."""
    torch_export(nn.LSTM(3, 4), torch.randn(T, B, 3), tmp_path / "lstm.onnx")
    gru = nn.GRU(3, 4)
    before = snapshot(gru)
    with pytest.raises(
        LayoutError, match=r"has ONNX LSTM node\(s\) but no GRU node for the model itself"
    ) as info:
        weightport.load(gru, tmp_path / "lstm.onnx")
    assert "Fix: build the module as nn.LSTM" in str(info.value) and "unrolls" not in str(info.value)
    assert snapshot(gru) == before


def test_torch_export_without_bias_and_with_relu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported = nn.RNN(3, 4, nonlinearity="relu", bias=False)
    x = torch.randn(T, B, 3)
    torch_export(exported, x, tmp_path / "m.onnx")
    expected = run_ort(tmp_path / "m.onnx", {"x": x.numpy()})[0]
    fresh = make_rnn("RNN", 3, 4, nonlinearity="relu", bias=False)
    weightport.load(fresh, tmp_path / "m.onnx")
    assert max_err(fresh(x)[0], expected) < TOL


def test_torch_export_of_conv_and_linear(tmp_path: Path) -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(9, 2)
        )

    torch.manual_seed(0)
    x = torch.randn(B, 2, 5)
    torch_export(build(), x, tmp_path / "m.onnx")
    (expected,) = run_ort(tmp_path / "m.onnx", {"x": x.numpy()})
    torch.manual_seed(1)
    fresh = build().eval()
    report = weightport.load(fresh, tmp_path / "m.onnx")
    assert max_err(fresh(x), expected) < TOL
    assert [p.source_kind.split()[1] for p in report.pairings] == ["Conv", "Gemm"]


class Tagger(nn.Module):
    """Embedding -> Conv1d -> LayerNorm -> LSTM -> Linear: the Gather and LayerNormalization nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(self.lstm(self.norm(x))[0])


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_export_with_embedding_and_layer_norm(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    exported = Tagger().eval()
    with torch.no_grad():  # LayerNorm's affine parameters unlike their defaults
        exported.norm.weight.uniform_(0.5, 1.5)
        exported.norm.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 20, (B, T))
    path = tmp_path / "m.onnx"
    if dynamo:
        dynamo_export(exported, ids, path)
    else:
        torch_export(exported, ids, path)
    feed = onnx.load(str(path)).graph.input[0].name
    (expected,) = run_ort(path, {feed: ids.numpy()})
    torch.manual_seed(1)
    fresh = Tagger().eval()
    report = weightport.load(fresh, path)
    assert max_err(fresh(ids), expected) < TOL
    assert {p.module_path for p in report.pairings} == {"embed", "conv", "norm", "lstm[0]", "head"}


def test_batch_norm_folded_by_the_exporter_loads_as_its_eval_equivalent(tmp_path: Path) -> None:
    """Both exporters fold an eval-mode BatchNorm into the Conv before it: it loads as the identity plus the
    fused bias (exact in eval()), and the warning says its training statistics are not in the file."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    x = torch.randn(B, 2, T)
    torch_export(model, x, tmp_path / "m.onnx")
    fresh = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    with pytest.warns(UncheckedConfigWarning, match=r"folded into the layer before them \('1'\)"):
        report = weightport.load(fresh, tmp_path / "m.onnx")
    assert max_err(fresh(x), model(x).detach().numpy()) < TOL
    assert "folded into '0'" in next(p.how for p in report.pairings if p.module_path == "1")


def norm_file(path: Path, rng: np.random.Generator, op: str, channels: int, **attrs: Any) -> Path:
    """One BatchNormalization (N, C, L input) or LayerNormalization (N, L, C) node with random inputs."""
    if op == "BatchNormalization":
        inits = {
            "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            "B": rand(rng, channels),
            "mean": rand(rng, channels),
            "var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        }
        shape = [B, channels, T]
    else:
        inits = {"scale": rng.uniform(0.5, 1.5, channels).astype(np.float32), "B": rand(rng, channels)}
        shape = [B, T, channels]
    node = helper.make_node(op, ["X", *inits], ["Y"], name="norm", **attrs)
    return save_model(path, [node], inits, {"X": shape}, ["Y"])


@pytest.mark.parametrize("op", ["BatchNormalization", "LayerNormalization"])
def test_normalization_nodes_match_onnxruntime(tmp_path: Path, rng: np.random.Generator, op: str) -> None:
    path = norm_file(tmp_path / "m.onnx", rng, op, 4, epsilon=1e-3)
    x = rand(rng, B, 4, T) if op == "BatchNormalization" else rand(rng, B, T, 4)
    (expected,) = run_ort(path, {"X": x})
    module = (nn.BatchNorm1d(4, eps=1e-3) if op == "BatchNormalization" else nn.LayerNorm(4, eps=1e-3)).eval()
    report = weightport.load(module, path)
    assert max_err(module(torch.from_numpy(x)), expected) < TOL
    assert report.pairings[0].source_kind.startswith(f"ONNX {op}")


@pytest.mark.parametrize("op", ["BatchNormalization", "LayerNormalization"])
def test_normalization_settings_are_checked(tmp_path: Path, rng: np.random.Generator, op: str) -> None:
    path = norm_file(tmp_path / "m.onnx", rng, op, 4, epsilon=1e-3)
    module = nn.BatchNorm1d(4) if op == "BatchNormalization" else nn.LayerNorm(4)
    before = snapshot(module)
    with pytest.raises(
        LayoutError, match=r"epsilon=0.001 but '' was built with eps=1e-05.*Fix: build it with eps=0.001"
    ):
        weightport.load(module, path)
    # a BatchNorm without affine parameters (it still holds statistics); a LayerNorm without a bias
    if op == "BatchNormalization":
        partial, setting, held = nn.BatchNorm1d(4, eps=1e-3, affine=False), "affine", "scale 'scale'"
    else:
        partial, setting, held = nn.LayerNorm(4, eps=1e-3, bias=False), "bias", "B 'B'"
    with pytest.raises(
        LayoutError, match=rf"input {held} holds values but '' was built with {setting}=False"
    ):
        weightport.load(partial, path)
    assert snapshot(module) == before


def test_neutral_scale_and_bias_fit_a_module_without_them(tmp_path: Path, rng: np.random.Generator) -> None:
    inits = {
        "scale": np.ones(3, np.float32),
        "B": np.zeros(3, np.float32),
        "mean": rand(rng, 3),
        "var": np.full(3, 2.0, np.float32),
    }
    node = helper.make_node("BatchNormalization", ["X", *inits], ["Y"], name="bn")
    path = save_model(tmp_path / "m.onnx", [node], inits, {"X": [B, 3, T]}, ["Y"])
    module = nn.BatchNorm1d(3, affine=False).eval()
    weightport.load(module, path)
    x = rand(rng, B, 3, T)
    assert max_err(module(torch.from_numpy(x)), run_ort(path, {"X": x})[0]) < TOL


def test_layer_norm_over_fewer_axes_than_its_scale_is_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    inits = {"scale": np.ones((T, 4), np.float32)}
    node = helper.make_node("LayerNormalization", ["X", "scale"], ["Y"], name="ln", axis=-1)
    path = save_model(tmp_path / "m.onnx", [node], inits, {"X": [B, T, 4]}, ["Y"])
    with pytest.raises(
        UnsupportedConfigError, match=r"axis=-1 normalizes over the last 1 axes, but its Scale has 2"
    ):
        weightport.load(nn.LayerNorm((T, 4)), path)


def test_export_without_constant_folding_is_refused_with_the_way_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported = Seq("LSTM", False, 1)
    x = torch.randn(B, T, 3)
    torch_export(exported, x, tmp_path / "m.onnx", do_constant_folding=False)
    fresh = Seq("LSTM", False, 1)
    before = snapshot(fresh)
    with pytest.raises(
        LayoutError,
        match=r"node '/rnn/LSTM' \(LSTM\): input W '.*' is computed by the graph.*"
        r"layout='torch', strict=False",
    ):
        weightport.load(fresh, tmp_path / "m.onnx")
    assert snapshot(fresh) == before
    weightport.load(fresh, tmp_path / "m.onnx", layout="torch", strict=False)  # the advice works
    assert max_err(fresh(x), exported(x).detach().numpy()) == 0


# --- hand-built recurrent nodes --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_hand_built_recurrent_node(
    tmp_path: Path, rng: np.random.Generator, kind: str, direction: str
) -> None:
    attrs = {"linear_before_reset": 1} if kind == "GRU" else {}
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, kind, direction=direction, **attrs)
    x = rand(rng, T, B, 3)
    y, y_h = run_ort(path, {"X": x})[:2]
    model = make_rnn(kind, 3, 4, bidirectional=direction == "bidirectional")
    weightport.load(model, path)
    out, h_n = model(torch.from_numpy(x))
    if kind == "LSTM":
        h_n = h_n[0]
    assert max_err(out, as_torch_output(y)) < TOL
    assert max_err(h_n, y_h) < TOL


def test_lstm_gate_order_matters(tmp_path: Path, rng: np.random.Generator) -> None:
    """Loading ONNX's i,o,f,c blocks as if they were PyTorch's i,f,g,o gives other outputs."""
    path, arrays = recurrent_file(tmp_path / "m.onnx", rng, "LSTM")
    x = rand(rng, T, B, 3)
    y = as_torch_output(run_ort(path, {"X": x})[0])
    naive = make_rnn("LSTM", 3, 4)
    weightport.load(
        naive,
        {
            "weight_ih_l0": arrays["W"][0],
            "weight_hh_l0": arrays["R"][0],
            "bias_ih_l0": arrays["B"][0, :16],
            "bias_hh_l0": arrays["B"][0, 16:],
        },
    )
    assert max_err(naive(torch.from_numpy(x))[0], y) > 1e-2
    right = make_rnn("LSTM", 3, 4)
    weightport.load(right, path)
    assert max_err(right(torch.from_numpy(x))[0], y) < TOL


@pytest.mark.parametrize("activation", ["Tanh", "Relu"])
def test_rnn_activations(tmp_path: Path, rng: np.random.Generator, activation: str) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "RNN", activations=[activation])
    x = rand(rng, T, B, 3)
    (y, _) = run_ort(path, {"X": x})
    model = make_rnn("RNN", 3, 4, nonlinearity=activation.lower())
    weightport.load(model, path)
    assert max_err(model(torch.from_numpy(x))[0], as_torch_output(y)) < TOL
    with pytest.raises(LayoutError, match=rf"activation {activation} but '\[0\]' uses nonlinearity="):
        weightport.load(make_rnn("RNN", 3, 4, nonlinearity="relu" if activation == "Tanh" else "tanh"), path)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_reverse_node_needs_mapping_and_then_equals_a_flipped_forward_layer(
    tmp_path: Path, rng: np.random.Generator, kind: str
) -> None:
    attrs = {"linear_before_reset": 1} if kind == "GRU" else {}
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, kind, direction="reverse", **attrs)
    model = make_rnn(kind, 3, 4)
    before = snapshot(model)
    with pytest.raises(
        UnsupportedConfigError,
        match=r"node 'rec' \(\w+\): direction=reverse .* no reverse-only "
        r"layer.*mapping=\{'rec': 'module.path'\}",
    ):
        weightport.load(model, path)
    assert snapshot(model) == before
    with pytest.raises(LayoutError, match="cannot fill '\\[0\\]', a bidirectional layer"):
        weightport.load(make_rnn(kind, 3, 4, bidirectional=True), path, mapping={"rec": "[0]"})
    weightport.load(model, path, mapping={"rec": "[0]"})
    x = rand(rng, T, B, 3)
    y = run_ort(path, {"X": x})[0]
    flipped = model(torch.from_numpy(x).flip(0))[0].flip(0)
    assert max_err(flipped, as_torch_output(y)) < TOL


def test_forward_node_into_a_cell(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "GRU", direction="forward", linear_before_reset=1)
    x = rand(rng, T, B, 3)
    y = run_ort(path, {"X": x})[0][:, 0]
    torch.manual_seed(1)
    cell = nn.GRUCell(3, 4)
    weightport.load(cell, path)
    h = torch.zeros(B, 4)
    for t in range(T):
        h = cell(torch.from_numpy(x[t]), h)
        assert max_err(h, y[t]) < TOL


def _stacked_file(path: Path, rng: np.random.Generator, kind: str, d: int) -> Path:
    """Two recurrent nodes, the second reading the first's Y as (T, B, D*H), as exporters write it."""
    direction = "bidirectional" if d == 2 else "forward"
    g, h = BLOCKS[kind], 4
    attrs: dict[str, Any] = {"linear_before_reset": 1} if kind == "GRU" else {}
    inits = {}
    nodes = []
    source = "X"
    for layer, features in enumerate((3, d * h)):
        names = [f"W{layer}", f"R{layer}", f"B{layer}"]
        inits.update(
            {
                names[0]: rand(rng, d, g * h, features),
                names[1]: rand(rng, d, g * h, h),
                names[2]: rand(rng, d, 2 * g * h),
            }
        )
        nodes.append(
            helper.make_node(
                kind,
                [source, *names],
                [f"Y{layer}"],
                name=f"layer{layer}",
                hidden_size=h,
                direction=direction,
                **attrs,
            )
        )
        nodes.append(helper.make_node("Transpose", [f"Y{layer}"], [f"T{layer}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"T{layer}", "shape"], [f"S{layer}"]))
        source = f"S{layer}"
    graph_nodes = [
        helper.make_node(
            "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, 0, -1], np.int64))
        ),
        *nodes,
    ]
    return save_model(path, graph_nodes, inits, {"X": [T, B, 3]}, ["S1"])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("d", [1, 2])
def test_stacked_nodes_fill_one_multilayer_module(
    tmp_path: Path, rng: np.random.Generator, kind: str, d: int
) -> None:
    path = _stacked_file(tmp_path / "m.onnx", rng, kind, d)
    x = rand(rng, T, B, 3)
    (y,) = run_ort(path, {"X": x})
    model = make_rnn(kind, 3, 4, num_layers=2, bidirectional=d == 2)
    report = weightport.load(model, path)
    assert [(p.source_layer, p.module_path) for p in report.pairings] == [
        ("layer0", "[0]"),
        ("layer1", "[1]"),
    ]
    assert max_err(model(torch.from_numpy(x))[0], y) < TOL


def test_missing_bias_means_zero_biases(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "LSTM", bias=False)
    x = rand(rng, T, B, 3)
    y = run_ort(path, {"X": x})[0]
    model = make_rnn("LSTM", 3, 4)  # bias=True: its random biases become zeros
    report = weightport.load(model, path)
    assert not model.bias_ih_l0.any() and not model.bias_hh_l0.any()
    assert max_err(model(torch.from_numpy(x))[0], as_torch_output(y)) < TOL
    assert "has no B: zeros" in str(report)


def test_all_zero_peepholes_and_bias_are_accepted(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "LSTM", peepholes=np.zeros((1, 12), np.float32))
    x = rand(rng, T, B, 3)
    y = run_ort(path, {"X": x})[0]
    model = make_rnn("LSTM", 3, 4)
    weightport.load(model, path)
    assert max_err(model(torch.from_numpy(x))[0], as_torch_output(y)) < TOL
    path, _ = recurrent_file(tmp_path / "z.onnx", rng, "GRU", linear_before_reset=1)
    no_bias = make_rnn("GRU", 3, 4, bias=False)
    with pytest.raises(LayoutError, match=r"input B 'B' holds biases but '\[0\]' was built with bias=False"):
        weightport.load(no_bias, path)
    model_proto = onnx.load(str(path))
    model_proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((1, 24), np.float32), "B"))
    onnx.save(model_proto, str(path))
    weightport.load(no_bias, path)  # all-zero B fits bias=False


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_stored_zero_initial_states_are_accepted(tmp_path: Path, rng: np.random.Generator, kind: str) -> None:
    """torch.onnx.export's dynamo exporter stores zero initial_h/initial_c: PyTorch's own default."""
    attrs = {"linear_before_reset": 1} if kind == "GRU" else {}
    path, _ = recurrent_file(
        tmp_path / "m.onnx", rng, kind, direction="bidirectional", initial_state=0.0, **attrs
    )
    x = rand(rng, T, B, 3)
    y = run_ort(path, {"X": x})[0]
    model = make_rnn(kind, 3, 4, bidirectional=True)
    report = weightport.load(model, path)  # strict: the zero states count as placed
    assert max_err(model(torch.from_numpy(x))[0], as_torch_output(y)) < TOL
    assert len(report.rows) == 8 and not report.ignored


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_stored_non_zero_initial_states_are_refused(
    tmp_path: Path, rng: np.random.Generator, kind: str
) -> None:
    attrs = {"linear_before_reset": 1} if kind == "GRU" else {}
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, kind, initial_state=0.5, **attrs)
    x = rand(rng, T, B, 3)
    run_ort(path, {"X": x})  # a valid file that onnxruntime runs
    model = make_rnn(kind, 3, 4)
    before = snapshot(model)
    with pytest.raises(
        UnsupportedConfigError,
        match=rf"node 'rec' \({kind}\): input initial_h 'initial_h' is a stored, non-zero initial state.*"
        r"Fix: pass those values as h_0 when calling the module",
    ):
        weightport.load(model, path)
    assert snapshot(model) == before


def test_layout_attribute_changes_no_weights(tmp_path: Path) -> None:
    """layout=1 (batch-first I/O; onnxruntime's CPU provider refuses it) loads the same weights as layout=0
    into a batch_first=True module; into a time-first one it is refused (the I/O axes differ)."""
    loaded = []
    for layout in (0, 1):
        path, _ = recurrent_file(
            tmp_path / f"m{layout}.onnx", np.random.default_rng(3), "LSTM", layout=layout
        )
        model = make_rnn("LSTM", 3, 4, batch_first=bool(layout))
        weightport.load(model, path)
        loaded.append(weightport.to_numpy(model))
        if layout:
            refused(make_rnn("LSTM", 3, 4), path, "batch_first")
    assert all(np.array_equal(loaded[0][k], loaded[1][k]) for k in loaded[0])


# --- refusals on real files: the reason, the fix, and nothing written ------------------------------------


@pytest.mark.parametrize(
    ("kind", "attrs", "peepholes", "match"),
    [
        (
            "GRU",
            {},
            None,
            r"linear_before_reset=0 \(the ONNX default\).*r \* \(W_hn h \+ b_hn\).*Fix: re-export "
            r"the model with linear_before_reset=1",
        ),
        ("GRU", {"linear_before_reset": 0}, None, r"linear_before_reset=0"),
        (
            "LSTM",
            {},
            "random",
            r"input P 'P' holds non-zero peephole weights.*Fix: use a model without peepholes",
        ),
        ("LSTM", {"clip": 3.0}, None, r"clip=3.0 clamps the gates' inputs.*Fix: re-export without clip"),
        ("RNN", {"clip": 1.0}, None, r"clip=1.0 clamps"),
        (
            "LSTM",
            {"input_forget": 1},
            None,
            r"input_forget=1 couples the input and forget gates.*input_forget=0",
        ),
        (
            "LSTM",
            {"activations": ["HardSigmoid", "Tanh", "Tanh"]},
            None,
            r"activations=\['HardSigmoid', 'Tanh', 'Tanh'\]; PyTorch's LSTM uses \['Sigmoid', 'Tanh', 'Tanh'\]",
        ),
        ("RNN", {"activations": ["Sigmoid"]}, None, r"activations=\['Sigmoid'\]; PyTorch's RNN uses one"),
    ],
)
def test_refusals(
    tmp_path: Path, rng: np.random.Generator, kind: str, attrs: dict, peepholes: Any, match: str
) -> None:
    p = rand(rng, 1, 12) if peepholes == "random" else None
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, kind, peepholes=p, **attrs)
    x = rand(rng, T, B, 3)
    run_ort(path, {"X": x})  # a valid file that onnxruntime runs
    model = make_rnn(kind, 3, 4)
    before = snapshot(model)
    with pytest.raises(UnsupportedConfigError, match=rf"^'m.onnx' node 'rec' \({kind}\): {match}"):
        weightport.load(model, path)
    assert snapshot(model) == before


def test_several_refusals_are_reported_together(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "LSTM", clip=2.0, input_forget=1)
    with pytest.raises(
        UnsupportedConfigError,
        match=r"cannot be loaded into LSTM: 2 problems:\n  - .*clip=2.0"
        r".*\n  - .*input_forget=1",
    ):
        weightport.load(make_rnn("LSTM", 3, 4), path)


@pytest.mark.parametrize(
    ("module_kwargs", "match"),
    [
        (
            {"hidden_size": 5},
            r"hidden_size=4, but it is paired with \[0\] \(LSTM\(input_size=3, hidden_size=5\)\)",
        ),
        (
            {"hidden_size": 4, "bidirectional": True},
            r"direction=forward, but it is paired with .*bidirectional=False",
        ),
    ],
)
def test_module_settings_are_checked(
    tmp_path: Path, rng: np.random.Generator, module_kwargs: dict, match: str
) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "LSTM")
    with pytest.raises(LayoutError, match=match):
        weightport.load(make_rnn("LSTM", 3, **module_kwargs), path)


# --- Gemm, MatMul + Add, Conv ----------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(tmp_path: Path, rng: np.random.Generator, trans_b: int) -> None:
    weight = rand(rng, 4, 3)  # PyTorch's (out, in)
    stored = weight if trans_b else weight.T.copy()
    node = helper.make_node("Gemm", ["X", "Wt", "C"], ["Y"], name="fc", transB=trans_b)
    path = save_model(tmp_path / "m.onnx", [node], {"Wt": stored, "C": rand(rng, 4)}, {"X": [B, 3]}, ["Y"])
    x = rand(rng, B, 3)
    (y,) = run_ort(path, {"X": x})
    torch.manual_seed(1)
    lin = nn.Linear(3, 4)
    weightport.load(lin, path)
    assert max_err(lin(torch.from_numpy(x)), y) < TOL
    assert np.array_equal(lin.weight.detach().numpy(), weight)


def test_unnamed_nodes_are_named_by_op_and_position(tmp_path: Path, rng: np.random.Generator) -> None:
    nodes = [
        helper.make_node("Gemm", ["X", "W1"], ["H"], transB=1),
        helper.make_node("Gemm", ["H", "W2"], ["Y"]),
    ]
    path = save_model(
        tmp_path / "m.onnx", nodes, {"W1": rand(rng, 4, 3), "W2": rand(rng, 4, 2)}, {"X": [B, 3]}, ["Y"]
    )
    x = rand(rng, B, 3)
    (y,) = run_ort(path, {"X": x})
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    report = weightport.load(model, path)
    assert [(p.source_layer, p.module_path) for p in report.pairings] == [("Gemm#0", "0"), ("Gemm#1", "1")]
    assert max_err(model(torch.from_numpy(x)), y) < TOL


def test_weights_in_constant_nodes(tmp_path: Path, rng: np.random.Generator) -> None:
    """Some exporters keep weights in Constant nodes instead of initializers."""
    weight, bias = rand(rng, 3, 4), rand(rng, 1, 4)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(bias)),
        helper.make_node("Gemm", ["X", "w", "b"], ["Y"], name="fc"),
    ]
    path = save_model(tmp_path / "m.onnx", nodes, {}, {"X": [B, 3]}, ["Y"])
    x = rand(rng, B, 3)
    (y,) = run_ort(path, {"X": x})
    lin = nn.Linear(3, 4)
    weightport.load(lin, path)
    assert max_err(lin(torch.from_numpy(x)), y) < TOL


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"alpha": 2.0}, r"alpha=2.0 scales A\*B.*Fix: multiply B by alpha"),
        ({"beta": 0.5}, r"beta=0.5 scales C.*Fix: multiply C by beta"),
        ({"transA": 1}, r"transA=1 transposes the layer's input"),
    ],
)
def test_gemm_refusals(tmp_path: Path, rng: np.random.Generator, attrs: dict, match: str) -> None:
    shape = [3, B] if attrs.get("transA") else [B, 3]
    node = helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="fc", **attrs)
    path = save_model(
        tmp_path / "m.onnx", [node], {"W": rand(rng, 3, 4), "C": rand(rng, 4)}, {"X": shape}, ["Y"]
    )
    lin = nn.Linear(3, 4)
    before = snapshot(lin)
    with pytest.raises(UnsupportedConfigError, match=rf"node 'fc' \(Gemm\): {match}"):
        weightport.load(lin, path)
    assert snapshot(lin) == before


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_and_add(tmp_path: Path, rng: np.random.Generator, with_add: bool) -> None:
    """torch.onnx.export's form for 3-D inputs: MatMul(x, W.T) then Add(bias, ...); no Add: zero bias."""
    nodes = [helper.make_node("MatMul", ["X", "Wt"], ["mm"], name="fc/MatMul")]
    inits = {"Wt": rand(rng, 3, 4)}
    if with_add:
        nodes.append(helper.make_node("Add", ["fc.bias", "mm"], ["Y"], name="fc/Add"))
        inits["fc.bias"] = rand(rng, 4)
    else:
        nodes.append(helper.make_node("Relu", ["mm"], ["Y"]))
    path = save_model(tmp_path / "m.onnx", nodes, inits, {"X": [B, T, 3]}, ["Y"])
    x = rand(rng, B, T, 3)
    (y,) = run_ort(path, {"X": x})
    torch.manual_seed(1)
    lin = nn.Linear(3, 4)
    if not with_add:  # the Relu is the graph's, not the Linear's: the outputs differ, so it is applied here
        refused(lin, path, r"computes something else between its layers")
    weightport.load(lin, path, check_outputs=with_add)
    out = lin(torch.from_numpy(x))
    assert max_err(out if with_add else torch.relu(out), y) < TOL


@pytest.mark.parametrize(
    ("dims", "attrs", "module_kwargs"),
    [
        (1, {"pads": [1, 1], "strides": [2]}, {"padding": 1, "stride": 2}),
        (
            2,
            {"pads": [1, 0, 1, 0], "dilations": [1, 2], "group": 2},
            {"padding": (1, 0), "dilation": (1, 2), "groups": 2},
        ),
        (2, {"auto_pad": "SAME_UPPER"}, {"padding": "same"}),
    ],
)
def test_conv(tmp_path: Path, rng: np.random.Generator, dims: int, attrs: dict, module_kwargs: dict) -> None:
    group = attrs.get("group", 1)
    weight = rand(rng, 4, 2 // group, *([3] * dims))
    node = helper.make_node("Conv", ["X", "W", "Bc"], ["Y"], name="conv", **attrs)
    spatial = [6] * dims
    path = save_model(
        tmp_path / "m.onnx", [node], {"W": weight, "Bc": rand(rng, 4)}, {"X": [B, 2, *spatial]}, ["Y"]
    )
    x = rand(rng, B, 2, *spatial)
    (y,) = run_ort(path, {"X": x})
    torch.manual_seed(1)
    conv = getattr(nn, f"Conv{dims}d")(2, 4, 3, **module_kwargs)
    weightport.load(conv, path)
    assert max_err(conv(torch.from_numpy(x)), y) < TOL
    with pytest.raises(LayoutError, match=r"node 'conv' \(Conv\): (strides|pads)"):
        weightport.load(
            getattr(nn, f"Conv{dims}d")(
                2, 4, 3, groups=group, dilation=module_kwargs.get("dilation", 1), stride=3
            ),
            path,
        )


def test_conv_asymmetric_pads_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[0, 1])
    path = save_model(tmp_path / "m.onnx", [node], {"W": rand(rng, 4, 2, 3)}, {"X": [B, 2, 6]}, ["Y"])
    with pytest.raises(
        UnsupportedConfigError, match=r"pads begin \(0,\), end \(1,\): PyTorch's Conv pads both"
    ):
        weightport.load(nn.Conv1d(2, 4, 3), path)


# --- the reader: metadata, external data, bad files ------------------------------------------------------


def test_metadata_lists_nodes_with_plain_attributes(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = recurrent_file(
        tmp_path / "m.onnx", rng, "GRU", direction="bidirectional", linear_before_reset=1
    )
    with open_source(path) as src:
        assert src.metadata["layout"] == "onnx"
        assert src.metadata["initializers"] == ["W", "R", "B"]
        assert src.metadata["nodes"] == [
            {
                "op_type": "GRU",
                "domain": "",
                "name": "rec",
                "inputs": ["X", "W", "R", "B"],
                "outputs": ["Y", "Y_h"],
                "attributes": {"direction": "bidirectional", "hidden_size": 4, "linear_before_reset": 1},
            }
        ]
        assert src.infos["W"].shape == (2, 12, 3) and src.infos["W"].dtype == np.float32
        assert src.in_memory


def _external_file(
    tmp_path: Path, rng: np.random.Generator, location: str, *, offset: int = 0
) -> tuple[Path, Any]:
    """A Gemm whose weight W (3, 4) lives in external data at ``location``; the data file is written."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    weight = rand(rng, 3, 4)
    tensor = numpy_helper.from_array(weight, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(weight.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [B, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[tensor],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, weight


def test_external_data_inside_the_folder_is_read(tmp_path: Path, rng: np.random.Generator) -> None:
    path, weight = _external_file(tmp_path, rng, "data/w.bin", offset=8)
    (path.parent / "data").mkdir()
    (path.parent / "data" / "w.bin").write_bytes(b"\0" * 8 + weight.tobytes())
    lin = nn.Linear(3, 4, bias=False)
    report = weightport.load(lin, path)
    assert np.array_equal(lin.weight.detach().numpy(), weight.T)
    assert report.rows[0].origin == "'m.onnx' node 'fc' input B 'W'"
    x = rand(rng, B, 3)
    assert max_err(lin(torch.from_numpy(x)), run_ort(path, {"X": x})[0]) < TOL


def test_model_given_as_a_link_reads_external_data_beside_the_link(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """The link is the user's path: its external data is read beside it, as onnxruntime reads it (here the
    target's folder holds other bytes under the same name)."""
    path, weight = _external_file(tmp_path, rng, "w.bin")
    path.with_name("w.bin").write_bytes(rand(rng, 3, 4).tobytes())  # beside the target: not what is read
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "w.bin").write_bytes(weight.tobytes())
    link = beside / "m.onnx"
    link.symlink_to(path)
    lin = nn.Linear(3, 4, bias=False)
    weightport.load(lin, link)
    x = rand(rng, B, 3)
    assert np.array_equal(lin.weight.detach().numpy(), weight.T)
    assert max_err(lin(torch.from_numpy(x)), run_ort(link, {"X": x})[0]) < TOL


@pytest.mark.parametrize("location", ["./w.bin", "data/./w.bin"])
def test_external_data_at_a_dotted_path_inside_the_folder(
    tmp_path: Path, rng: np.random.Generator, location: str
) -> None:
    """'.' parts stay in the folder (onnxruntime reads them too); '..' is refused below."""
    path, weight = _external_file(tmp_path, rng, location)
    target = path.parent / location
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(weight.tobytes())
    lin = nn.Linear(3, 4, bias=False)
    weightport.load(lin, path)
    x = rand(rng, B, 3)
    assert max_err(lin(torch.from_numpy(x)), run_ort(path, {"X": x})[0]) < TOL


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink", "symlinked-folder", "past-end", "length"])
def test_unsafe_external_data_is_refused(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(rand(rng, 3, 4).tobytes())
    location = {
        "parent": "../outside.bin",
        "absolute": str(outside),
        "symlink": "link.bin",
        "symlinked-folder": "sub/outside.bin",
        "past-end": "w.bin",
        "length": "w.bin",
    }[case]
    path, _ = _external_file(tmp_path, rng, location, offset=8 if case == "past-end" else 0)
    folder = path.parent
    if case == "symlink":
        (folder / "link.bin").symlink_to(outside)
    elif case == "symlinked-folder":
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    elif case == "past-end":
        (folder / "w.bin").write_bytes(b"\0" * 48)  # 48 bytes: offset 8 + 48 runs past the end
    else:
        (folder / "w.bin").write_bytes(b"\0" * 48)
    if case == "length":
        model = onnx.load(str(path), load_external_data=False)
        model.graph.initializer[0].external_data[2].value = "40"
        onnx.save(model, str(path))
    opened: list[str] = []
    real_open = os.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    lin = nn.Linear(3, 4, bias=False)
    before = snapshot(lin)
    match = {
        "parent": r"external location '\.\./outside\.bin', which is not a plain relative path inside the model's "
        r"folder.*does not follow it",
        "absolute": "which is not a plain relative path",
        "symlink": r"'link\.bin', which is a symbolic link at 'link\.bin'",
        "symlinked-folder": r"which is a symbolic link at 'sub'",
        "past-end": r"tensor 'W' declares bytes 8\.\.56 but the file has 48 bytes",
        "length": r"declares shape \(3, 4\) of float32 \(48 bytes\) but its external data is 40 bytes long",
    }[case]
    with pytest.raises(SourceError, match=match):
        weightport.load(lin, path)
    assert snapshot(lin) == before
    assert not any("outside" in name for name in opened)


def test_external_file_that_shrinks_after_opening(tmp_path: Path, rng: np.random.Generator) -> None:
    path, weight = _external_file(tmp_path, rng, "w.bin")
    (path.parent / "w.bin").write_bytes(weight.tobytes())
    with open_source(path) as src:
        (path.parent / "w.bin").write_bytes(weight.tobytes()[:20])
        with pytest.raises(SourceError, match=r"declares bytes 0\.\.48 but the file has 20 bytes"):
            src.read("W")


def test_size_cap_is_checked_before_parsing(tmp_path: Path, rng: np.random.Generator, monkeypatch) -> None:
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "RNN")
    monkeypatch.setattr(onnx_source, "MAX_MODEL_BYTES", 100)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("parsed a file over the cap"))
    with pytest.raises(SourceError, match=r"'m.onnx': \d+ bytes, over the 100 bytes protobuf can parse"):
        open_source(path)


def test_corrupt_files(tmp_path: Path, rng: np.random.Generator) -> None:
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(SourceError, match=r"'g.onnx': not a valid ONNX model"):
        open_source(garbage)
    path, _ = recurrent_file(tmp_path / "m.onnx", rng, "RNN")
    model = onnx.load(str(path))
    model.graph.initializer[0].dims[1] = 5  # W claims (1, 5, 3) but holds 12 values
    onnx.save(model, str(path))
    with pytest.raises(
        SourceError, match=r"tensor 'W' declares shape \(1, 5, 3\) \(60 bytes\) but holds 48 bytes"
    ):
        open_source(path)


def test_unmatched_initializers_are_reported(tmp_path: Path, rng: np.random.Generator) -> None:
    nodes = [
        helper.make_node("Gemm", ["X", "W"], ["G"], name="fc", transB=1),
        helper.make_node("Mul", ["G", "scale"], ["Y"]),
    ]
    path = save_model(
        tmp_path / "m.onnx", nodes, {"W": rand(rng, 4, 3), "scale": rand(rng, 4)}, {"X": [B, 3]}, ["Y"]
    )
    with pytest.raises(weightport.LoadError, match=r"'scale': expected a tensor the layout can place"):
        weightport.load(nn.Linear(3, 4, bias=False), path)
    report = weightport.load(nn.Linear(3, 4, bias=False), path, strict=False)
    assert "scale" in report.ignored


# --- export(): the reverse, checked against onnxruntime and as a round trip -----------------------------


def test_exported_arrays_run_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, bidirectional=True)
    arrays = onnx_layout.export(lstm)
    node = helper.make_node(
        "LSTM", ["X", "[0]/W", "[0]/R", "[0]/B"], ["Y"], hidden_size=4, direction="bidirectional"
    )
    path = save_model(tmp_path / "m.onnx", [node], arrays, {"X": [T, B, 3]}, ["Y"])
    x = torch.randn(T, B, 3)
    assert max_err(lstm(x)[0], as_torch_output(run_ort(path, {"X": x.numpy()})[0])) < TOL


class Mixed(nn.Module):
    def __init__(self, kind: str, hidden: int, layers: int, bidirectional: bool, bias: bool) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(2, hidden, num_layers=layers, bidirectional=bidirectional, bias=bias)
        self.cell = getattr(nn, f"{kind}Cell")(2, hidden, bias=bias)
        self.fc = nn.Linear(hidden, 3, bias=bias)
        self.conv = nn.Conv2d(2, 3, 2, bias=bias)
        self.embed = nn.Embedding(5, 2)
        self.bn = nn.BatchNorm2d(3, affine=bias)
        self.ln = nn.LayerNorm((2, 3), elementwise_affine=bias)
        with torch.no_grad():  # running statistics unlike the defaults, so the round trip shows them
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 1.5)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["RNN", "LSTM", "GRU"]),
    hidden=st.integers(1, 4),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    bias=st.booleans(),
)
def test_export_then_load_is_the_identity(
    kind: str, hidden: int, layers: int, bidirectional: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    original = Mixed(kind, hidden, layers, bidirectional, bias)
    arrays = onnx_layout.export(original)
    torch.manual_seed(1)
    fresh = Mixed(kind, hidden, layers, bidirectional, bias)
    with pytest.warns(UncheckedConfigWarning, match="ONNX node attributes"):
        weightport.load(fresh, arrays, layout="onnx")
    want, got = weightport.to_numpy(original), weightport.to_numpy(fresh)
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_export_refuses_layers_without_an_onnx_node() -> None:
    with pytest.raises(LayoutError, match=r"cannot export Sequential to the ONNX layout: 1 \(PReLU\)"):
        onnx_layout.export(nn.Sequential(nn.Linear(2, 2), nn.PReLU(2)))


def test_keys_that_name_no_layer(rng: np.random.Generator) -> None:
    with pytest.raises(LayoutError, match=r"keys must be '<layer>/<ONNX input>'.*'lstm' name no layer"):
        weightport.load(nn.LSTM(2, 3), {"lstm/W": rand(rng, 1, 12, 2)}, layout="onnx")


# --- golden file: needs onnx and torch, not onnxruntime --------------------------------------------------


def test_golden_lstm() -> None:
    """tests/golden/make_onnx.py wrote lstm.onnx with torch.onnx.export and lstm.npz with onnxruntime."""
    expected = np.load(GOLDEN / "lstm.npz")
    model = make_rnn("LSTM", 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    weightport.load(model, GOLDEN / "lstm.onnx")
    y, (h_n, _) = model(torch.from_numpy(expected["x"]))
    assert max_err(y, expected["y"]) < TOL
    assert max_err(h_n, expected["h_n"]) < TOL
