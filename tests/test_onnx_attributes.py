"""ONNX node attributes held against the PyTorch module: refused where PyTorch cannot compute the same,
a mismatch (saying which side to change) where the module is only built differently, and, where
accepted, outputs equal to onnxruntime's."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport.errors import (
    ForwardNoteWarning,
    LayoutError,
    LoadError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# Hand-built graphs whose outputs are a node's own (an RNN node's Y: sequence, directions, batch, hidden): the
# load's run of the graph cannot pair them with the module's outputs and says so; tests/test_onnx_graph_check.py
# tests that run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outputs were not compared:weightport.errors.UncheckedConfigWarning"
)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TOL = 1e-5


def save(path: Path, nodes: list, inits: dict[str, np.ndarray], inputs: dict, opset: int = 17) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def torch_export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(model.eval(), (x,), str(path), opset_version=17, dynamo=False, input_names=["x"])
    return path


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.6, 0.6, shape).astype(np.float32)


def refused(model: nn.Module, path: Path, error: type[Exception], match: str) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        weightport.load(model, path)
    assert snapshot(model) == before


def fresh(cls: Any, *args: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(7)
    return cls(*args, **kwargs)


# --- Conv: padding, auto_pad, kernel_shape ----------------------------------------------------------------


def test_padding_same_with_even_kernel_loads(tmp_path: Path) -> None:
    """torch writes padding='same' as auto_pad=SAME_UPPER: with an even kernel the odd pad goes at the end,
    as PyTorch's padding='same' puts it."""
    original = fresh(nn.Conv1d, 2, 3, 4, padding="same")
    x = torch.randn(1, 2, 9)
    path = torch_export(original, x, tmp_path / "m.onnx")
    model = fresh(nn.Conv1d, 2, 3, 4, padding="same", bias=True)
    nn.init.zeros_(model.weight)
    weightport.load(model, path)
    expected = run_ort(path, {"x": x.numpy()})[0]
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


def test_same_upper_into_fixed_padding_says_build_same(tmp_path: Path) -> None:
    path = torch_export(fresh(nn.Conv1d, 2, 3, 4, padding="same"), torch.randn(1, 2, 9), tmp_path / "m.onnx")
    refused(
        fresh(nn.Conv1d, 2, 3, 4, padding=1),
        path,
        LayoutError,
        r"pads begin \(1,\), end \(2,\) \(auto_pad=SAME_UPPER\) are what padding='same' pads.*"
        r"Fix: build it with padding='same'",
    )


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_from_torch_export_loads(tmp_path: Path, mode: str) -> None:
    """torch writes padding_mode other than zeros as a Pad node (circular: Slice and Concat) before a Conv
    with pads 0; the amounts are computed by the graph, so they are reported as unchecked."""
    original = fresh(nn.Conv2d, 2, 3, 3, padding=1, padding_mode=mode)
    x = torch.randn(1, 2, 6, 7)
    path = torch_export(original, x, tmp_path / "m.onnx")
    model = fresh(nn.Conv2d, 2, 3, 3, padding=1, padding_mode=mode)
    nn.init.zeros_(model.weight)
    with pytest.warns(UncheckedConfigWarning, match=r"how much the graph pads before Conv '/Conv'"):
        weightport.load(model, path)
    expected = run_ort(path, {"x": x.numpy()})[0]
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


def pad_conv_file(path: Path, pads: list[int], mode: str = "reflect") -> Path:
    nodes = [
        helper.make_node("Pad", ["X", "pads"], ["P"], mode=mode),
        helper.make_node("Conv", ["P", "W", "B"], ["Y"], name="conv", kernel_shape=[3]),
    ]
    inits = {"pads": np.array(pads, np.int64), "W": rand(3, 2, 3), "B": rand(3, seed=1)}
    return save(path, nodes, inits, {"X": [1, 2, 8]})


def test_stored_pad_before_conv_is_checked_and_loads(tmp_path: Path) -> None:
    path = pad_conv_file(tmp_path / "m.onnx", [0, 0, 2, 0, 0, 2])
    model = fresh(nn.Conv1d, 2, 3, 3, padding=2, padding_mode="reflect")
    weightport.load(model, path)  # the amounts are stored: checked, no warning
    x = rand(1, 2, 8, seed=2)
    expected = run_ort(path, {"X": x})[0]
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), expected, atol=TOL)


@pytest.mark.parametrize(
    ("pads", "kwargs", "error", "match"),
    [
        (
            [0, 0, 1, 0, 0, 1],
            {"padding": 2, "padding_mode": "reflect"},
            LayoutError,
            r"the Pad node before it pads begin \(1,\), end \(1,\), but '' has padding=\(2,\)",
        ),
        (
            [0, 0, 1, 0, 0, 2],
            {"padding": 1, "padding_mode": "reflect"},
            UnsupportedConfigError,
            r"pads begin \(1,\), end \(2,\)",
        ),
        (
            [0, 0, 1, 0, 0, 1],
            {"padding": 1, "padding_mode": "replicate"},
            LayoutError,
            r"the Pad node before it pads as padding_mode='reflect', but '' has padding=\(1,\), "
            r"padding_mode='replicate'. Fix: build it with the graph's padding",
        ),
    ],
)
def test_pad_before_conv_mismatch(
    tmp_path: Path, pads: list[int], kwargs: dict, error: type[Exception], match: str
) -> None:
    path = pad_conv_file(tmp_path / "m.onnx", pads)
    refused(fresh(nn.Conv1d, 2, 3, 3, **kwargs), path, error, match)


def test_padding_mode_without_pad_node_is_a_mismatch(tmp_path: Path) -> None:
    path = torch_export(fresh(nn.Conv1d, 2, 3, 3, padding=1), torch.randn(1, 2, 8), tmp_path / "m.onnx")
    refused(
        fresh(nn.Conv1d, 2, 3, 3, padding=1, padding_mode="reflect"),
        path,
        LayoutError,
        r"the Conv pads \(1,\) with zeros, but '' has padding=\(1,\), padding_mode='reflect'",
    )


def conv_file(path: Path, **attrs: Any) -> Path:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", **attrs)
    return save(path, [node], {"W": rand(3, 2, 3)}, {"X": [1, 2, 9]})


def test_auto_pad_same_with_stride_is_refused(tmp_path: Path) -> None:
    path = conv_file(tmp_path / "m.onnx", auto_pad="SAME_UPPER", strides=[2])
    run_ort(path, {"X": rand(1, 2, 9)})  # a valid graph
    refused(
        fresh(nn.Conv1d, 2, 3, 3, stride=2, padding=1, bias=False),
        path,
        UnsupportedConfigError,
        r"node 'conv' \(Conv\): auto_pad=SAME_UPPER with strides=\(2,\) pads each input so the output has "
        r"ceil\(length / stride\) steps.*Fix: re-export with explicit pads",
    )


@pytest.mark.parametrize("auto_pad", ["SAME_LOWER", "SAME_UPPER", "VALID"])
def test_auto_pad_with_stride_one_loads(tmp_path: Path, auto_pad: str) -> None:
    path = conv_file(tmp_path / "m.onnx", auto_pad=auto_pad)
    model = fresh(nn.Conv1d, 2, 3, 3, padding=0 if auto_pad == "VALID" else 1, bias=False)
    weightport.load(model, path)
    x = rand(1, 2, 9, seed=3)
    np.testing.assert_allclose(
        model(torch.from_numpy(x)).detach().numpy(), run_ort(path, {"X": x})[0], atol=TOL
    )


def test_kernel_shape_other_than_the_weight_is_malformed(tmp_path: Path) -> None:
    path = conv_file(tmp_path / "m.onnx", kernel_shape=[5])
    refused(
        fresh(nn.Conv1d, 2, 3, 3, bias=False),
        path,
        LayoutError,
        r"kernel_shape=\[5\] but its weight W has kernel \[3\]; the graph is malformed",
    )


# --- recurrent nodes: accepted attributes ----------------------------------------------------------------


def lstm_file(path: Path, *, seq_lens: bool = False, **attrs: Any) -> Path:
    inputs = ["X", "W", "R", "B"] + (["seq"] if seq_lens else [])
    node = helper.make_node("LSTM", inputs, ["Y"], name="rec", hidden_size=4, **attrs)
    graph_inputs: dict[str, Any] = {"X": [5, 2, 3]}
    inits = {"W": rand(1, 16, 3, seed=4), "R": rand(1, 16, 4, seed=5), "B": rand(1, 32, seed=6)}
    path = save(path, [node], inits, graph_inputs)
    if seq_lens:
        model = onnx.load(str(path))
        model.graph.input.append(helper.make_tensor_value_info("seq", TensorProto.INT32, [2]))
        onnx.save(model, str(path))
    return path


def test_activation_alpha_beta_of_default_activations_load(tmp_path: Path) -> None:
    """Sigmoid and Tanh take no alpha or beta: onnxruntime ignores them, and so does the load."""
    path = lstm_file(
        tmp_path / "m.onnx",
        activations=["Sigmoid", "Tanh", "Tanh"],
        activation_alpha=[2.0, 3.0, 4.0],
        activation_beta=[1.0, 1.0, 1.0],
    )
    model = fresh(nn.LSTM, 3, 4)
    weightport.load(model, path)
    x = rand(5, 2, 3, seed=7)
    y = run_ort(path, {"X": x})[0]  # (T, 1, B, H)
    np.testing.assert_allclose(model(torch.from_numpy(x))[0].detach().numpy(), y[:, 0], atol=TOL)


def test_sequence_lens_loads_and_matches_a_packed_input(tmp_path: Path) -> None:
    path = lstm_file(tmp_path / "m.onnx", seq_lens=True)
    model = fresh(nn.LSTM, 3, 4)
    with pytest.warns(
        ForwardNoteWarning, match=r"sequence_lens.*nn\.utils\.rnn\.pack_padded_sequence\(x, lengths\)"
    ):
        report = weightport.load(model, path)
    assert "sequence_lens: steps past each length give zeros" in str(report)
    x, lengths = rand(5, 2, 3, seed=8), np.array([5, 3], np.int32)
    y = run_ort(path, {"X": x, "seq": lengths})[0][:, 0]
    packed = nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths).long())
    out, _ = nn.utils.rnn.pad_packed_sequence(model(packed)[0], total_length=5)
    np.testing.assert_allclose(out.detach().numpy(), y, atol=TOL)
    assert not y[3:, 1].any()  # past the second sequence's length: zeros


def test_layout_one_is_noted(tmp_path: Path) -> None:
    path = lstm_file(tmp_path / "m.onnx", layout=1)
    report = weightport.load(fresh(nn.LSTM, 3, 4, batch_first=True), path)
    assert "layout=1: X and Y batch-first" in str(report)


# --- normalization ---------------------------------------------------------------------------------------


def bn_file(path: Path, opset: int = 17, **attrs: Any) -> Path:
    outputs = ["Y", "running_mean", "running_var"] if attrs.get("training_mode") else ["Y"]
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], outputs, name="bn", **attrs)
    inits = {"s": rand(3, seed=9), "b": rand(3, seed=10), "m": rand(3, seed=11), "v": 1 + rand(3, seed=12)}
    return save(path, [node], inits, {"X": [2, 3, 4]}, opset=opset)


def test_batchnorm_spatial_zero_is_refused(tmp_path: Path) -> None:
    refused(
        nn.BatchNorm1d(3),
        bn_file(tmp_path / "m.onnx", opset=8, spatial=0),
        UnsupportedConfigError,
        r"node 'bn' \(BatchNormalization\): spatial=0 \(opset 7-8\) keeps one mean and variance per "
        r"channel and position.*Fix: re-export with spatial=1",
    )


def test_batchnorm_momentum_and_training_mode_load(tmp_path: Path) -> None:
    """momentum only steers the running statistics' update in training; training_mode=1 normalizes with
    the batch's statistics, what the module does in train(): the weights are the same."""
    path = bn_file(tmp_path / "m.onnx", momentum=0.5, training_mode=1)
    model = nn.BatchNorm1d(3)
    with pytest.warns(ForwardNoteWarning, match=r"training_mode=1\): run the module in train\(\) mode"):
        report = weightport.load(model, path)
    assert "training_mode=1: normalizes with the batch's statistics" in str(report)
    x = rand(2, 3, 4, seed=13)
    np.testing.assert_allclose(
        model.train()(torch.from_numpy(x)).detach().numpy(), run_ort(path, {"X": x})[0], atol=1e-4
    )


# --- Gather and MatMul that are no Embedding or Linear ----------------------------------------------------


def test_gather_along_axis_one_says_why_the_embedding_is_empty(tmp_path: Path) -> None:
    node = helper.make_node("Gather", ["T", "I"], ["Y"], name="g", axis=1)
    path = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(rand(4, 6), "T")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    refused(
        fresh(nn.Embedding, 6, 4),
        path,
        weightport.LoadError,
        r"Gather node 'g' takes entries of the stored table 'T' along axis 1, while nn.Embedding looks up rows",
    )


def test_batched_matmul_says_why_the_linear_is_empty(tmp_path: Path) -> None:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    path = save(tmp_path / "m.onnx", [node], {"W": rand(2, 3, 4)}, {"X": [2, 5, 3]})
    refused(
        fresh(nn.Linear, 3, 4),
        path,
        weightport.LoadError,
        r"MatMul node 'mm' multiplies by the stored 3-D tensor 'W' \(2, 3, 4\), a batched product",
    )


# --- LayerNormalization axis; a bias the layer does not hold; example_inputs= leaves the module alone ------


@pytest.mark.parametrize(("axis", "scale"), [(1, (4,)), (2, (3, 4))])
def test_layer_norm_with_a_positive_axis_is_refused(
    tmp_path: Path, axis: int, scale: tuple[int, ...]
) -> None:
    """axis=1 of a (2, 3, 4) input normalizes the last two axes whatever Scale's shape: the graph does not
    record the input's rank, so a positive axis cannot be told from nn.LayerNorm's trailing ones."""
    path = save(
        tmp_path / "ln.onnx",
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis)],
        {"s": rand(*scale), "b": rand(*scale, seed=1)},
        {"x": [2, 3, 4]},
    )
    refused(
        nn.LayerNorm(scale), path, UnsupportedConfigError, rf"axis={axis} counts from the input's first axis"
    )


def test_a_one_value_bias_added_after_a_reshape_is_not_dropped(tmp_path: Path) -> None:
    """tf2onnx's Dense on a 3-D input: Reshape, MatMul, Reshape, Add. A Linear(4, 1)'s (1,) bias looked like a
    scalar constant of the graph's code, and the load wrote zeros into fc.bias; now it is refused."""
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["x2"]),
        helper.make_node("MatMul", ["x2", "W"], ["t"]),
        helper.make_node("Reshape", ["t", "s2"], ["t3"]),
        helper.make_node("Add", ["t3", "b"], ["y"]),
    ]
    inits = {
        "W": rand(4, 1),
        "b": np.array([2.5], np.float32),
        "s1": np.array([6, 4]),
        "s2": np.array([2, 3, -1]),
    }
    path = save(tmp_path / "dense.onnx", nodes, inits, {"x": [2, 3, 4]})
    refused(fresh(nn.Linear, 4, 1), path, LoadError, r"'b': expected a tensor the layout can place")


class Counting(nn.Module):
    """Its forward changes it: a non-persistent buffer counts the calls, and an Embedding with max_norm
    renormalizes the rows it looks up, in place."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4, max_norm=1.0)
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()), persistent=False)
        if extra:
            self.temperature = nn.Parameter(torch.ones(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.emb(ids))


def test_example_inputs_leave_the_module_as_it_was(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 2, 3]])
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Counting().eval(), (ids,), str(path), opset_version=17, dynamo=False)
    model = fresh(Counting, extra=True)
    with torch.no_grad():
        model.emb.weight.mul_(10)  # rows far above max_norm: a real forward would shrink them
    before = snapshot(model)
    calls = model.calls.clone()
    with pytest.raises(weightport.WeightportError, match="temperature"):
        weightport.load(model, path, example_inputs=(ids,))
    assert snapshot(model) == before and torch.equal(model.calls, calls)


def test_default_activations_in_lower_case_load(tmp_path: Path) -> None:
    """onnxruntime reads activation names in any case: 'sigmoid' is the default 'Sigmoid'."""
    path = lstm_file(tmp_path / "m.onnx", activations=["sigmoid", "tanh", "tanh"])
    model = fresh(nn.LSTM, 3, 4)
    weightport.load(model, path)
    x = rand(5, 2, 3, seed=7)
    y = run_ort(path, {"X": x})[0]
    np.testing.assert_allclose(model(torch.from_numpy(x))[0].detach().numpy(), y[:, 0], atol=TOL)


@pytest.mark.parametrize("kernel", [3, (2, 3)])
def test_padding_same_with_a_padding_mode_through_the_dynamo_exporter_loads(
    tmp_path: Path, kernel: int | tuple[int, int]
) -> None:
    """The dynamo exporter writes the Pad node's amounts; padding='same' pads the smaller half before."""
    original = fresh(nn.Conv2d, 2, 3, kernel, padding="same", padding_mode="reflect")
    x = torch.randn(1, 2, 6, 7)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original.eval(), (x,), str(path), dynamo=True, verbose=False)
    model = fresh(nn.Conv2d, 2, 3, kernel, padding="same", padding_mode="reflect")
    nn.init.zeros_(model.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        weightport.load(model, path)
    (y,) = run_ort(path, {ort.InferenceSession(str(path)).get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), y, atol=TOL)


class TwoShapes(nn.Module):
    """One Linear called on a 2-D and on a 3-D input: a Gemm, and a MatMul on a copy of the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a).sum() + self.fc(b)


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_linear_called_on_inputs_of_two_ranks_is_one_layer(tmp_path: Path, dynamo: bool) -> None:
    args = (torch.randn(3, 4), torch.randn(2, 5, 4))
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fresh(TwoShapes).eval(), args, str(path), dynamo=dynamo, verbose=False)
    model = TwoShapes()
    weightport.load(model, path, example_inputs=args)
    names = [i.name for i in ort.InferenceSession(str(path)).get_inputs()]
    (y,) = run_ort(path, dict(zip(names, (a.numpy() for a in args))))
    np.testing.assert_allclose(model(*args).detach().numpy(), y, atol=TOL)


class OwnBias(nn.Module):
    """BART's ``lm_head(x) + final_logits_bias``: the model adds a tensor of its own after a layer without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.lm_head = nn.Linear(6, 5, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.fc(x))) + self.final_logits_bias


@pytest.mark.parametrize("zero", [True, False])
def test_a_tensor_the_model_adds_after_a_layer_without_bias_is_placed_by_its_name(
    tmp_path: Path, zero: bool
) -> None:
    """It was taken for the layer's bias: refused with 'build it with bias=True', or (all zero) said missing."""
    original = fresh(OwnBias)
    if not zero:
        nn.init.uniform_(original.final_logits_bias, -1, 1)
    x = torch.randn(3, 4)
    path = torch_export(original, x, tmp_path / "m.onnx")
    model = OwnBias()
    nn.init.uniform_(model.final_logits_bias, 2, 3)
    weightport.load(model, path)
    (y,) = run_ort(path, {"x": x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), y, atol=TOL)
    assert torch.equal(model.final_logits_bias, original.final_logits_bias)


class NormAndUp(nn.Module):
    """A LayerNorm (below opset 17 the exporter writes it as ReduceMean, Sub, ..., Mul, Add: no ONNX node
    fills it as one layer, so it is kept under its parameters' names) and a ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.ln(torch.relu(self.conv(x))))


def test_modules_the_graph_computes_from_other_nodes_take_their_parameters_by_name(tmp_path: Path) -> None:
    original = fresh(NormAndUp)
    for p in original.parameters():
        nn.init.uniform_(p, -0.6, 0.6)
    x = torch.randn(1, 2, 6, 6)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original.eval(), (x,), str(path), opset_version=16, dynamo=False, input_names=["x"])
    model = NormAndUp()
    report = weightport.load(model, path)  # the ConvTranspose node is a layer now: its settings are checked
    assert {p.how for p in report.pairings if p.module_path.startswith("ln")} == {
        "by name (the initializer is the parameter)"
    }
    (y,) = run_ort(path, {"x": x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), y, atol=TOL)


class Cross(nn.Module):
    """nn.MultiheadAttention with a query other than its key and value, as in nn.TransformerDecoderLayer
    (``twice``: the value is the key times two, so each of the three projections goes out alone)."""

    def __init__(self, bias: bool = True, twice: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=bias)
        self.twice = twice

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv * 2 if self.twice else kv, need_weights=False)[0]


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.decoder(q, kv)


def _noisy(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # every bias non-zero: the exporter keeps each in its own initializer
    return model.eval()


def _cross_export(model: nn.Module, path: Path, dynamo: bool) -> tuple[torch.Tensor, torch.Tensor]:
    args = (torch.randn(2, 4, 8), torch.randn(2, 3, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=dynamo, verbose=False, input_names=["q", "kv"])
    return args


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls", [Cross, Decoder])
def test_cross_attention_loads_exactly(tmp_path: Path, dynamo: bool, cls: Any) -> None:
    """The in_proj goes out in two parts: unnamed query (d, d) and key-value (d, 2d) MatMuls that the
    dataflow into the named out_proj proves (legacy), or the named in_proj_weight split in the graph
    (dynamo). Loaded into a model of other values, the outputs are onnxruntime's."""
    path = tmp_path / "m.onnx"
    args = _cross_export(_noisy(cls(), 0), path, dynamo)
    model = _noisy(cls(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)  # num_heads is not in the weights
        report = weightport.load(model, path, example_inputs=args)
    attentions = [p for p in report.pairings if p.module_kind == "MultiheadAttention"]
    assert len(attentions) == (1 if cls is Cross else 4)
    assert all(p.how == "by name" for p in attentions)
    (expected,) = run_ort(path, {"q": args[0].numpy(), "kv": args[1].numpy()})
    np.testing.assert_allclose(model(*args).detach().numpy(), expected, atol=TOL)


def test_cross_attention_with_a_key_other_than_the_value_is_refused(tmp_path: Path) -> None:
    """Three projections of d outputs each: which is the key's and which the value's is not proven."""
    path = tmp_path / "m.onnx"
    args = _cross_export(_noisy(Cross(twice=True), 0), path, dynamo=False)
    model = Cross(twice=True)
    before = snapshot(model)
    with pytest.raises(
        LayoutError, match=r"nn.MultiheadAttention 'attn'.*query other than (its )?key and value"
    ):
        weightport.load(model, path, example_inputs=args)
    assert snapshot(model) == before


# --- a module whose forward uses its weight in another form than its layer does -----------------------------


class _ScaledConv(nn.Conv2d):
    """An equalized-learning-rate conv: its forward scales its weight, which an exporter folds into the W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * 0.5, self.bias)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _ScaledConv(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Transposed(nn.Module):
    """A square Linear whose weight the model uses transposed, through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.a(x).relu(), self.b.weight.t(), self.b.bias)


def _onnx(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_noisy(model, 0), (x,), str(path), dynamo=dynamo, verbose=False)
    return path


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_conv_whose_forward_changes_its_weight_takes_no_folded_constant(
    tmp_path: Path, dynamo: bool
) -> None:
    """The exporter folds weight * 0.5 into the stored W: loaded into the conv, the forward would scale it
    again. example_inputs= shows the forward changes it: refused; without, the load notes the risk."""
    x = torch.randn(1, 3, 6, 6)
    path = _onnx(_Scaled(), x, tmp_path / "m.onnx", dynamo)
    model = _noisy(_Scaled(), 1)
    before = snapshot(model)
    with pytest.raises(LayoutError, match=r"'conv' \(_ScaledConv\) takes no layer by structure"):
        weightport.load(model, path, example_inputs=x)
    assert snapshot(model) == before
    with pytest.raises(LoadError, match=r"computes something else between its layers"):
        weightport.load(model, path)  # without example_inputs, the run of the graph shows the scaling twice
    assert snapshot(model) == before
    with pytest.warns(
        UncheckedConfigWarning, match=r"'conv' \(_ScaledConv\): a subclass whose forward is its own"
    ):
        weightport.load(model, path, check_outputs=False)


@pytest.mark.parametrize("dynamo", [False, True])
def test_a_linear_used_transposed_by_the_model_is_refused(tmp_path: Path, dynamo: bool) -> None:
    """F.linear(x, b.weight.t()): the legacy exporter keeps 'b.weight' as it is for a Gemm with transB=0 (its
    name and the node read it two ways); the dynamo exporter folds the transpose into a constant of its own."""
    x = torch.randn(3, 4)
    path = _onnx(_Transposed(), x, tmp_path / "m.onnx", dynamo)
    model = _noisy(_Transposed(), 1)
    before = snapshot(model)
    message = (
        "takes no layer by structure"
        if dynamo
        else r"reads 'b.weight', which bears the name of the module's own"
    )
    with pytest.raises(LayoutError, match=message):
        weightport.load(model, path, example_inputs=x)
    assert snapshot(model) == before
    if not dynamo:  # the fix the message gives: the stored tensors by name
        with weightport.open_source(path) as source:
            weightport.load(model, source, layout="torch")
        (expected,) = run_ort(path, {_input_name(path): x.numpy()})
        np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


def _input_name(path: Path) -> str:
    return str(onnx.load(str(path)).graph.input[0].name)


def test_a_weight_the_graph_computes_from_the_parameter_loads_by_its_name(tmp_path: Path) -> None:
    """Without constant folding the graph computes weight * 0.5 from the stored 'conv.weight': the parameter
    itself, placed by its name (its settings noted unchecked), which gives onnxruntime's outputs."""
    x = torch.randn(1, 3, 6, 6)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_noisy(_Scaled(), 0), (x,), str(path), dynamo=False, do_constant_folding=False)
    model = _noisy(_Scaled(), 1)
    with pytest.warns(UncheckedConfigWarning, match=r"'conv' \(_ScaledConv\) took its parameters by name"):
        weightport.load(model, path, example_inputs=x)
    (expected,) = run_ort(path, {_input_name(path): x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


class _AsIs(_Transposed):
    """The same model with the weight used as it is, through F.linear in the parent's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.a(x).relu(), self.b.weight, self.b.bias)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("build", [_Transposed, _AsIs])
def test_a_square_weight_a_parent_applies_reads_two_ways_without_example_inputs(
    tmp_path: Path, build: type[nn.Module], rank: int
) -> None:
    """The dynamo exporter records that the node ran in the parent's forward and stores the matrix as a
    constant of its own ('t', 'val_2') for F.linear(x, b.weight) and F.linear(x, b.weight.t()) alike:
    square, it reads two ways, so it is refused; example_inputs= shows which, and the load gives
    onnxruntime's outputs (or is refused where the forward transposes the weight)."""
    x = torch.randn(*([2] * (rank - 1)), 4)
    path = _onnx(build(), x, tmp_path / "m.onnx", dynamo=True)
    model = _noisy(build(), 1)
    before = snapshot(model)
    if build is _AsIs and rank == 2:  # a Gemm reads the weight as it is: the exporter keeps its name
        weightport.load(model, path)
        (expected,) = run_ort(path, {_input_name(path): x.numpy()})
        np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)
        return
    with pytest.raises(LayoutError, match=r"ran in the model's own forward, not in 'b'.*reads two ways"):
        weightport.load(model, path)
    assert snapshot(model) == before
    if build is _Transposed:
        with pytest.raises(LayoutError, match="takes no layer by structure"):
            weightport.load(model, path, example_inputs=x)
        assert snapshot(model) == before
        return
    weightport.load(model, path, example_inputs=x)
    (expected,) = run_ort(path, {_input_name(path): x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


class _FunctionalAttention(nn.Module):
    """torchvision Swin's way: the block's forward applies its children's weights through F.linear."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj, self.transposed = nn.Linear(4, 12), nn.Linear(4, 4), transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        proj = self.proj.weight.t() if self.transposed else self.proj.weight
        return x + nn.functional.linear(q.sigmoid() * k + v, proj, self.proj.bias)


@pytest.mark.parametrize("transposed", [False, True])
def test_layers_a_block_applies_itself_pair_inside_it(tmp_path: Path, transposed: bool) -> None:
    """The dynamo exporter records each MatMul ran in 'blocks.N' (no child module ran): each takes the one
    module inside its block that fits. The square proj reads two ways, so example_inputs= is needed, which
    also refuses the forward that transposes it."""
    x = torch.randn(2, 3, 4)

    def build() -> nn.Module:
        return nn.Sequential(*(_FunctionalAttention(transposed) for _ in range(2)))

    path = _onnx(build(), x, tmp_path / "m.onnx", dynamo=True)
    model = _noisy(build(), 1)
    before = snapshot(model)
    with pytest.raises(LayoutError, match=r"ran in '0', not in '0.proj'.*Fix: pass example_inputs="):
        weightport.load(model, path)
    assert snapshot(model) == before
    if transposed:
        with pytest.raises(LayoutError):
            weightport.load(model, path, example_inputs=x)
        assert snapshot(model) == before
        return
    report = weightport.load(model, path, example_inputs=x)
    assert any("by the module it ran in ('1')" in p.how for p in report.pairings)
    (expected,) = run_ort(path, {_input_name(path): x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


class _Qkv(nn.Module):
    """Three projections of one shape run side by side: no order tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


def test_the_legacy_exporters_node_names_pair_layers_by_the_modules_they_spell(tmp_path: Path) -> None:
    """On a 3-D input torch.onnx.export(dynamo=False) stores each weight transposed under a name of its own
    ('onnx::MatMul_12'), but names each node by the modules it ran in ('/query/MatMul'): those pair the
    parallel projections, and the load gives onnxruntime's outputs."""
    x = torch.randn(2, 3, 4)
    path = _onnx(_Qkv(), x, tmp_path / "m.onnx", dynamo=False)
    assert not any(i.name.endswith(".weight") for i in onnx.load(str(path)).graph.initializer)
    model = _noisy(_Qkv(), 1)
    report = weightport.load(model, path)
    assert {p.module_path: p.how for p in report.pairings if p.module_path in ("query", "key")} == {
        "query": "by name",
        "key": "by name",
    }
    (expected,) = run_ort(path, {_input_name(path): x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)


class _Branches(nn.Module):
    """Two square Linears inside nn.Sequential blocks, side by side: no order or shape tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.right = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) * self.right(x)


def test_legacy_node_names_of_sequential_children_pair_them_by_name(tmp_path: Path) -> None:
    """The legacy exporter names an nn.Sequential's child from its parent on ('/right/right.0/right.0.0/MatMul'):
    each parallel Linear takes its own module, and the load gives onnxruntime's outputs."""
    x = torch.randn(2, 3, 4)
    path = _onnx(_Branches(), x, tmp_path / "m.onnx", dynamo=False)
    model = _noisy(_Branches(), 1)
    report = weightport.load(model, path)
    assert {p.module_path: p.how for p in report.pairings} == {"left.0": "by name", "right.0.0": "by name"}
    (expected,) = run_ort(path, {_input_name(path): x.numpy()})
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=TOL)
