"""A source layer whose own name is a module's path pairs with that module, whatever order the model
declares its modules in (declaring ``head`` before ``body`` is common); checked against each framework's
own outputs. Order within kind still pairs the layers no name matches."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport import UncheckedConfigWarning
from weightport.call_order import CallOrder
from weightport.errors import LayoutError
from weightport.layouts.pairing import SourceLayer, module_slots, pair_layers

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class HeadFirst(nn.Module):
    """Declares ``head`` before ``body``; calls ``body`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 8)
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_names_outrank_order_and_order_fills_the_rest() -> None:
    model = nn.Sequential()
    model.add_module("b", nn.Linear(2, 2))
    model.add_module("a", nn.Linear(2, 2))
    model.add_module("c", nn.Linear(2, 2))
    layers = [SourceLayer("a", "Linear"), SourceLayer("x", "Linear"), SourceLayer("b", "Linear")]
    pairs = pair_layers(model, layers, None, framework="Test")
    assert [(p.source.name, p.slot.label, p.how) for p in pairs] == [
        ("a", "a", "by name"),
        ("x", "c", "by a unique kind and shape"),
        ("b", "b", "by name"),
    ]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_back_into_a_model_that_declares_layers_out_of_call_order(
    tmp_path: Path, dynamo: bool
) -> None:
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    source = HeadFirst().eval()
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracing notes
        torch.onnx.export(source, (x,), str(tmp_path / "m.onnx"), dynamo=dynamo, input_names=["x"])
    fresh = HeadFirst()
    report = weightport.load(fresh, tmp_path / "m.onnx")
    assert {(p.module_path, p.how) for p in report.pairings} == {("head", "by name"), ("body", "by name")}
    assert torch.allclose(fresh(x), source(x), atol=1e-6)


def test_keras_layers_named_as_the_modules(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    x = keras.Input((8,))
    out = keras.layers.Dense(8, name="head")(keras.layers.Dense(8, activation="relu", name="body")(x))
    model = keras.Model(x, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    inputs = rng.standard_normal((2, 8)).astype(np.float32)
    expected = np.asarray(model(inputs))
    for name in ("m.keras", "m.weights.h5"):
        (model.save if name.endswith(".keras") else model.save_weights)(tmp_path / name)
        fresh = HeadFirst()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)  # a weights-only file
            weightport.load(fresh, tmp_path / name)
        got = fresh(torch.from_numpy(inputs)).detach().numpy()
        assert np.abs(got - expected).max() < 1e-5, name


def test_flax_layers_named_as_the_modules(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    fnn = pytest.importorskip("flax.linen")
    serialization = pytest.importorskip("flax.serialization")

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # type: ignore[no-untyped-def]
            return fnn.Dense(8, name="head")(fnn.relu(fnn.Dense(8, name="body")(x)))

    inputs = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    variables = Net().init(jax.random.PRNGKey(0), inputs)
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map(
        lambda a: rng.uniform(-0.5, 0.5, a.shape).astype(np.float32), variables
    )
    (tmp_path / "m.msgpack").write_bytes(serialization.to_bytes(variables))
    fresh = HeadFirst()
    weightport.load(fresh, tmp_path / "m.msgpack")
    expected = np.asarray(Net().apply(variables, inputs))
    assert np.abs(fresh(torch.from_numpy(inputs)).detach().numpy() - expected).max() < 1e-5


# ---- the proofs, one by one, on pair_layers itself ----------------------------------------------------


def test_kinds_are_what_a_module_is_and_unknown_kinds_are_never_filled() -> None:
    class Conv1D(nn.Module):  # transformers' Conv1D: Linear-like, weight stored (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))
            self.bias = nn.Parameter(torch.zeros(4))

    attention = nn.MultiheadAttention(4, 2)  # one slot with its out_proj: a Dense never fills out_proj
    model = nn.ModuleDict({"attn": attention, "proj": Conv1D(), "out": nn.Linear(4, 4)})
    kinds = {slot.label: slot.kind for slot in module_slots(model)}
    assert kinds == {"attn": "MultiheadAttention", "proj": "other:Conv1D", "out": "Linear"}
    pairs = pair_layers(model, [SourceLayer("dense", "Linear")], None, framework="Test")
    assert [(p.slot.label, p.how) for p in pairs] == [("out", "by a unique kind and shape")]
    with pytest.raises(
        LayoutError,
        match=r"the source has 2 unpaired Linear layer\(s\) \(dense, dense_1\) but the model has only 1",
    ):
        pair_layers(
            model, [SourceLayer("dense", "Linear"), SourceLayer("dense_1", "Linear")], None, framework="Test"
        )
    with pytest.raises(
        LayoutError, match=r"the model has no nn.GRU \(it has modules of kinds weightport cannot fill"
    ):
        pair_layers(model, [SourceLayer("gru", "GRU")], None, framework="Test")


def test_interchangeable_layers_need_a_recorded_order_and_a_call_order() -> None:
    model = HeadFirst()  # equal shapes; declared head first, called body first
    layers = [
        SourceLayer("first", "Linear", order=("model", 0)),
        SourceLayer("second", "Linear", order=("model", 1)),
    ]
    with pytest.raises(LayoutError, match=r"interchangeable.*example_inputs=.*mapping="):
        pair_layers(model, layers, None, framework="Test")
    order = CallOrder(model, torch.zeros(1, 8))
    pairs = pair_layers(model, layers, None, framework="Test", call_order=order)
    assert [(p.source.name, p.slot.label) for p in pairs] == [("first", "body"), ("second", "head")]
    assert {p.how for p in pairs} == {"by recorded order (Test) and call order (example_inputs)"}
    unordered = [SourceLayer("first", "Linear"), SourceLayer("second", "Linear")]
    with pytest.raises(LayoutError, match=r"does not record the order of these layers"):
        pair_layers(model, unordered, None, framework="Test", call_order=order)
    split = [SourceLayer("a", "Linear", order=("dense", 0)), SourceLayer("b", "Linear", order=("other", 0))]
    with pytest.raises(LayoutError, match=r"as one sequence"):
        pair_layers(model, split, None, framework="Test", call_order=order)


class Residual(nn.Module):
    """A main branch and a shortcut of one shape, side by side (a ResNet block's ``conv3`` and
    ``downsample``), then a head that both feed."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(8, 8)
        self.shortcut = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.main(x)) + self.shortcut(x))


def test_layers_in_parallel_branches_are_refused_whatever_the_orders() -> None:
    model = Residual()
    order = CallOrder(model, torch.zeros(1, 8))
    assert order.feeds("main", "head") and order.feeds("shortcut", "head")
    assert not order.feeds("main", "shortcut") and not order.feeds("shortcut", "main")
    layers = [SourceLayer(name, "Linear", order=("model", i)) for i, name in enumerate(["a", "b", "c"])]
    # the source's order may list the shortcut first or second: either reading fits its recorded order
    with pytest.raises(LayoutError, match=r"'main' and 'shortcut' run in parallel branches.*mapping="):
        pair_layers(model, layers, None, framework="Test", call_order=order)
    pairs = pair_layers(model, layers, {"a": "main", "b": "shortcut"}, framework="Test", call_order=order)
    assert [(p.source.name, p.slot.label, p.how) for p in pairs][2] == (
        "c",
        "head",
        "by a unique kind and shape",
    )


def test_a_chain_through_operations_between_modules_pairs_by_order() -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late, self.early = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.early(x)
            return self.late(torch.cat([y[:, :4], y[:, 4:].flip(1)], dim=1).view(1, 8) * 2)

    model = Chain()
    layers = [
        SourceLayer("first", "Linear", order=("model", 0)),
        SourceLayer("second", "Linear", order=("model", 1)),
    ]
    pairs = pair_layers(model, layers, None, framework="Test", call_order=CallOrder(model, torch.zeros(1, 8)))
    assert [(p.source.name, p.slot.label) for p in pairs] == [("first", "early"), ("second", "late")]


def test_a_sequential_nested_in_a_custom_module_gives_no_call_order() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            self.extra = nn.Linear(2, 2)

    layers = [SourceLayer(f"l{i}", "Linear", order=("m", i)) for i in range(2)]
    pairs = pair_layers(Custom().blocks, layers, None, framework="Test")
    assert [p.slot.label for p in pairs] == ["0", "1"]
    with pytest.raises(LayoutError, match=r"the model has 3 modules that could take these 2 layers"):
        pair_layers(Custom(), layers, None, framework="Test")
    three = [SourceLayer(f"l{i}", "Linear", order=("m", i)) for i in range(3)]
    with pytest.raises(LayoutError, match=r"order in which the model calls these modules is not known"):
        pair_layers(Custom(), three, None, framework="Test")


def test_shapes_prove_what_order_cannot() -> None:
    """B fits one slot by shape and A none: one assignment places both (A's shapes then fail in the plan)."""
    model = nn.Sequential()
    model.add_module("wide", nn.Linear(2, 3))
    model.add_module("narrow", nn.Linear(2, 2))
    shapes = {0: (5, 5), 1: (2, 2)}
    layers = [SourceLayer("a", "Linear"), SourceLayer("b", "Linear")]
    pairs = pair_layers(
        model, layers, None, framework="T", fits=lambda i, s: tuple(s.module.weight.shape) == shapes[i]
    )
    assert [(p.source.name, p.slot.label, p.how) for p in pairs] == [
        ("a", "wide", "by a unique kind and shape"),
        ("b", "narrow", "by a unique kind and shape"),
    ]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[1][0][-1])


def test_a_wrapped_model_is_found_by_name_and_two_are_refused(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    x = keras.Input((5, 3))
    model = keras.Model(x, keras.layers.Dense(2, name="head")(keras.layers.LSTM(4, name="lstm")(x)))
    rng = np.random.default_rng(3)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "m.keras")
    inputs = rng.standard_normal((2, 5, 3)).astype(np.float32)
    expected = np.asarray(model(inputs))

    class Wrap(nn.Module):
        def __init__(self, *names: str) -> None:
            super().__init__()
            for name in names:
                self.add_module(name, Net())

    one = Wrap("net")
    report = weightport.load(one, tmp_path / "m.keras")
    assert report.scope == "net" and "Loaded into 'net'" in str(report)
    assert np.abs(one.net(torch.from_numpy(inputs)).detach().numpy() - expected).max() < 1e-5
    two = Wrap("a", "b")
    with pytest.raises(LayoutError, match=r"inside each of the submodules 'a', 'b'.*prefix='a.'"):
        weightport.load(two, tmp_path / "m.keras")
    weightport.load(two, tmp_path / "m.keras", prefix="b.")
    assert np.abs(two.b(torch.from_numpy(inputs)).detach().numpy() - expected).max() < 1e-5
