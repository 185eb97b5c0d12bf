"""Keras -> PyTorch against the real Keras: same outputs on a random input, within 1e-5.

Every case builds a tiny Keras model with random weights and non-zero biases,
saves it as ``.weights.h5`` and ``.keras`` (and as legacy ``.h5`` with tf_keras,
when installed), loads each into the equivalent PyTorch model with
``weightport.load`` (and the live Keras model too), and compares outputs. The
reverse direction writes a PyTorch model with ``save_weights_h5`` and has Keras's
own ``model.load_weights`` read it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from weightport.errors import (  # noqa: E402
    ForwardNoteWarning,
    LayoutError,
    LoadError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
)
from weightport.layouts.keras import export, save_weights_h5  # noqa: E402

B, T = 2, 5
TOL = 1e-5


def max_error(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def assert_close(a: Any, b: Any, what: str) -> None:
    err = max_error(a, b)
    print(f"maxerr {what}: {err:.2e}")
    assert err <= TOL, f"{what}: max error {err}"


def randomize_keras(model: Any, rng: np.random.Generator) -> None:
    """Random weights, non-zero biases; positive moving variances."""
    values = []
    for w in model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.path:
            values.append(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            values.append(rng.uniform(-0.6, 0.6, shape).astype(np.float32))
    model.set_weights(values)


def randomize_torch(module: nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                low, high = (0.5, 1.5) if name.endswith("running_var") else (-0.6, 0.6)
                t.copy_(torch.from_numpy(rng.uniform(low, high, tuple(t.shape)).astype(np.float32)))


def load(module: nn.Module, source: Any, **kw: Any) -> list[str]:
    """weightport.load, returning the unchecked-config warnings it gave (no other warning allowed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(module, source, **kw)
    others = [str(w.message) for w in caught if not issubclass(w.category, UncheckedConfigWarning)]
    assert not others, others
    # notes on what forward must do (an activation after a Dense) are no unchecked settings
    unchecked = [w for w in caught if not issubclass(w.category, ForwardNoteWarning)]
    return [str(w.message) for w in unchecked if issubclass(w.category, UncheckedConfigWarning)]


# ---- the cases: a Keras model, the PyTorch equivalent, how to run it ----------------------------------


class Permuted(nn.Module):
    """Runs a channels-first module on channels-last input, as Keras lays it out."""

    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.convs = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = x.dim()
        to_first = (0, dims - 1, *range(1, dims - 1))
        to_last = (0, *range(2, dims), 1)
        return self.convs(x.permute(*to_first)).permute(*to_last)


class Mixed(nn.Module):
    """Conv1D -> LSTM -> Dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.permute(0, 2, 1)).permute(0, 2, 1)
        _, (h_n, _) = self.lstm(h)
        return self.fc(h_n[-1])


class EmbedLSTMSteps(nn.Module):
    """Embedding -> LSTM (every step) -> TimeDistributed(Dense): one Linear applied at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.embed(x))[0])


class ConvFlattenDense(nn.Module):
    """Conv2D -> Flatten -> Dense, flattened channels-last as Keras does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(4 * 5 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.permute(0, 3, 1, 2))  # NHWC input, as Keras takes it
        return self.fc(h.permute(0, 2, 3, 1).flatten(1))


class DenseBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def outputs(index: int = 0) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    return lambda m, x: m(x)[index]


def time_major(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x.transpose(0, 1))[0].transpose(0, 1)


def final_states(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, (h_n, _) = m(x)
    return torch.cat([h_n[0], h_n[1]], dim=1)


def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


@dataclass
class Case:
    layers: Callable[[Any], list[Any]]  # Keras layers from a keras module (keras or tf_keras)
    shape: tuple[int, ...]  # one input sample's shape
    torch: Callable[[], nn.Module]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    unchecked: bool = True  # a weights-only file leaves settings unchecked
    ints: int = 0  # integer inputs below this (Embedding)
    export_mapping: dict[str, str] | None = None  # Keras groups the torch model cannot name (wrappers)
    # a Dense after a Flatten of a map: only the forward pass shows the order the model flattens in
    flattens: bool = False


CASES: dict[str, Case] = {
    "simple_rnn_tanh": Case(
        lambda K: [K.layers.SimpleRNN(4, return_sequences=True)],
        (T, 3),
        lambda: nn.RNN(3, 4, batch_first=True),
        outputs(),
    ),
    "simple_rnn_relu": Case(
        lambda K: [K.layers.SimpleRNN(4, activation="relu", return_sequences=True)],
        (T, 3),
        lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
        outputs(),
    ),
    "lstm": Case(
        lambda K: [K.layers.LSTM(4, return_sequences=True)],
        (T, 3),
        lambda: nn.LSTM(3, 4, batch_first=True),
        outputs(),
    ),
    "lstm_time_major": Case(
        lambda K: [K.layers.LSTM(4, return_sequences=True)], (T, 3), lambda: nn.LSTM(3, 4), time_major
    ),
    "lstm_no_bias": Case(
        lambda K: [K.layers.LSTM(4, use_bias=False, return_sequences=True)],
        (T, 3),
        lambda: nn.LSTM(3, 4, bias=False, batch_first=True),
        outputs(),
    ),
    "gru": Case(
        lambda K: [K.layers.GRU(4, return_sequences=True)],
        (T, 3),
        lambda: nn.GRU(3, 4, batch_first=True),
        outputs(),
    ),
    "bidirectional_lstm_last": Case(
        lambda K: [K.layers.Bidirectional(K.layers.LSTM(3))],
        (T, 2),
        lambda: nn.LSTM(2, 3, bidirectional=True, batch_first=True),
        final_states,
    ),
    "bidirectional_gru_sequences": Case(
        lambda K: [K.layers.Bidirectional(K.layers.GRU(3, return_sequences=True))],
        (T, 2),
        lambda: nn.GRU(2, 3, bidirectional=True, batch_first=True),
        outputs(),
    ),
    "stacked_lstm": Case(
        lambda K: [K.layers.LSTM(4, return_sequences=True), K.layers.LSTM(4, return_sequences=True)],
        (T, 3),
        lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True),
        outputs(),
    ),
    "stacked_bidirectional_gru": Case(
        lambda K: [
            K.layers.Bidirectional(K.layers.GRU(3, return_sequences=True)),
            K.layers.Bidirectional(K.layers.GRU(3, return_sequences=True)),
        ],
        (T, 2),
        lambda: nn.GRU(2, 3, num_layers=2, bidirectional=True),
        time_major,
    ),
    "conv1d_lstm_dense": Case(
        lambda K: [K.layers.Conv1D(4, 2), K.layers.LSTM(5), K.layers.Dense(3)], (T, 3), Mixed, call
    ),
    "dense": Case(
        lambda K: [K.layers.Dense(5, activation="relu"), K.layers.Dense(2, use_bias=False)],
        (3,),
        lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2, bias=False)),
        call,
    ),
    "dense_x12_order": Case(
        lambda K: [K.layers.Dense(3) for _ in range(12)],
        (3,),
        lambda: nn.Sequential(*(nn.Linear(3, 3) for _ in range(12))),
        call,
    ),
    "conv1d_same_even_kernel": Case(
        lambda K: [K.layers.Conv1D(3, 2, padding="same")],
        (T, 2),
        lambda: Permuted(nn.Conv1d(2, 3, 2, padding="same")),
        call,
    ),
    "conv2d": Case(
        lambda K: [K.layers.Conv2D(4, 3, padding="same"), K.layers.Conv2D(2, (2, 3), strides=2)],
        (6, 7, 2),
        lambda: Permuted(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, (2, 3), stride=2)),
        call,
    ),
    "conv2d_flatten_dense": Case(
        lambda K: [K.layers.Conv2D(3, 3), K.layers.Flatten(), K.layers.Dense(2)],
        (6, 7, 2),
        ConvFlattenDense,
        call,
        flattens=True,
    ),
    "embedding": Case(
        lambda K: [K.layers.Embedding(10, 4)],
        (T,),
        lambda: nn.Embedding(10, 4),
        call,
        ints=10,
    ),
    "embedding_lstm_time_distributed_dense": Case(
        lambda K: [
            K.layers.Embedding(10, 4),
            K.layers.LSTM(5, return_sequences=True),
            K.layers.TimeDistributed(K.layers.Dense(3)),
        ],
        (T,),
        EmbedLSTMSteps,
        call,
        ints=10,
        export_mapping={"layers/time_distributed/layer": "fc"},
    ),
    "batch_normalization": Case(
        lambda K: [K.layers.Dense(4), K.layers.BatchNormalization()], (3,), DenseBN, call
    ),
    "layer_normalization": Case(
        lambda K: [K.layers.LayerNormalization()], (T, 4), lambda: nn.LayerNorm(4, eps=1e-3), call
    ),
}


def keras_model(K: Any, case: Case) -> Any:
    return K.Sequential([K.Input(case.shape, dtype="int32" if case.ints else "float32"), *case.layers(K)])


def make_input(case: Case, rng: np.random.Generator) -> np.ndarray:
    if case.ints:
        return rng.integers(0, case.ints, (B, *case.shape)).astype(np.int32)
    return rng.standard_normal((B, *case.shape)).astype(np.float32)


def torch_output(module: nn.Module, case: Case, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "Using padding='same' with even kernel", UserWarning
        )  # a copy, fine
        xt = torch.from_numpy(x.astype(np.int64) if case.ints else x)
        return case.run(module, xt).numpy()


def keras_output(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


# ---- Keras -> PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_keras_files_and_live_model_give_keras_outputs(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    model = keras_model(keras, case)
    randomize_keras(model, rng)
    x = make_input(case, rng)
    expected = keras_output(model, x)
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    sources: dict[str, Any] = {
        "weights.h5": tmp_path / "m.weights.h5",
        ".keras": tmp_path / "m.keras",
        "live": model,
    }
    for kind, source in sources.items():
        module = case.torch()
        unchecked = load(module, source, example_inputs=torch.from_numpy(x) if case.flattens else None)
        assert bool(unchecked) == (kind == "weights.h5" and case.unchecked), unchecked
        assert_close(torch_output(module, case, x), expected, f"{name} {kind}")


LEGACY = ["simple_rnn_relu", "lstm", "gru", "bidirectional_lstm_last", "stacked_lstm", "conv1d_lstm_dense", "dense_x12_order",
          "conv2d", "embedding", "batch_normalization", "layer_normalization", "lstm_no_bias",
          "embedding_lstm_time_distributed_dense"]  # fmt: skip


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_h5_from_tf_keras_gives_keras_outputs(name: str, tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    case = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    model = keras_model(tf_keras, case)
    randomize_keras_legacy(model, rng)
    x = make_input(case, rng)
    expected = np.asarray(model(x, training=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras warns that .h5 is a legacy format
        model.save_weights(tmp_path / "w.h5")
        model.save(tmp_path / "m.h5")
    sources = {
        "legacy save_weights": tmp_path / "w.h5",
        "legacy model.save": tmp_path / "m.h5",
        "live tf_keras": model,
    }
    for kind, source in sources.items():
        module = case.torch()
        unchecked = load(module, source)
        assert bool(unchecked) == (kind == "legacy save_weights" and case.unchecked), unchecked
        assert_close(torch_output(module, case, x), expected, f"{name} {kind}")


def randomize_keras_legacy(model: Any, rng: np.random.Generator) -> None:
    values = []
    for w in model.weights:
        low, high = (0.5, 1.5) if "moving_variance" in w.name else (-0.6, 0.6)
        values.append(rng.uniform(low, high, tuple(w.shape)).astype(np.float32))
    model.set_weights(values)


def test_bidirectional_last_output_is_both_final_states_not_the_last_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    case = CASES["bidirectional_lstm_last"]
    model = keras_model(keras, case)
    randomize_keras(model, rng)
    x = make_input(case, rng)
    module = case.torch()
    load(module, model)
    with torch.no_grad():
        out, _ = module(torch.from_numpy(x))
    expected = keras_output(model, x)
    assert_close(final_states(module, torch.from_numpy(x)).detach().numpy(), expected, "bidirectional h_n")
    assert max_error(out[:, -1].numpy(), expected) > 1e-2  # the backward half of out[:, -1] is its first step


def test_live_layer_alone() -> None:
    rng = np.random.default_rng(6)
    layer = keras.layers.GRU(3, return_sequences=True)
    x = rng.standard_normal((B, T, 2)).astype(np.float32)
    layer(x)
    layer.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(np.float32) for w in layer.get_weights()])
    module = nn.GRU(2, 3, batch_first=True)
    assert load(module, layer) == []
    assert_close(module(torch.from_numpy(x))[0].detach().numpy(), np.asarray(layer(x)), "live GRU layer")
    origins = [row.origin for row in weightport.load(module, layer, dry_run=True).rows]
    assert origins[0] == f"the Keras GRU '{layer.name}' kernel"  # the layer named once
    both = keras.layers.Bidirectional(keras.layers.GRU(3))
    both(x)
    rows = weightport.load(nn.GRU(2, 3, batch_first=True, bidirectional=True), both, dry_run=True).rows
    sides = {row.target: row.origin.split("'")[-1].split()[0] for row in rows}
    assert sides["weight_ih_l0"] == "forward_layer" and sides["weight_ih_l0_reverse"] == "backward_layer"


def test_plain_and_bidirectional_lstms_pair_by_direction_in_a_weights_file(tmp_path: Path) -> None:
    """A .weights.h5 keeps no order across classes: the module's directions give it."""
    rng = np.random.default_rng(7)
    model = keras.Sequential(
        [
            keras.Input((T, 2)),
            keras.layers.LSTM(3, return_sequences=True),
            keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True)),
            keras.layers.LSTM(2, return_sequences=True),
        ]
    )
    randomize_keras(model, rng)
    model.save_weights(tmp_path / "m.weights.h5")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.LSTM(2, 3, batch_first=True)
            self.b = nn.LSTM(3, 3, bidirectional=True, batch_first=True)
            self.c = nn.LSTM(6, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)[0])[0])[0]

    module = Net()
    load(module, tmp_path / "m.weights.h5")
    x = rng.standard_normal((B, T, 2)).astype(np.float32)
    assert_close(
        module(torch.from_numpy(x)).detach().numpy(), keras_output(model, x), "lstm + bidirectional order"
    )


class Branched(nn.Module):
    """Conv1D -> Bidirectional LSTM (a nested Sequential), then a GRU branch and a pooled Dense branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.lstm = nn.LSTM(6, 5, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 4, batch_first=True)
        self.proj = nn.Linear(10, 4)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(self.conv(x.transpose(1, 2)).transpose(1, 2))[0]
        return self.out(torch.cat([self.gru(h)[1][-1], self.proj(h.mean(1))], 1))


def branched_keras_model(K: Any) -> Any:
    inner = K.Sequential(
        [K.layers.Conv1D(6, 3), K.layers.Bidirectional(K.layers.LSTM(5, return_sequences=True))], name="enc"
    )
    inputs = K.Input((9, 4))
    h = inner(inputs)
    a = K.layers.GRU(4)(h)
    b = K.layers.Dense(4)(K.layers.GlobalAveragePooling1D()(h))
    return K.Model(inputs, K.layers.Dense(2)(K.layers.Concatenate()([a, b])))


@pytest.mark.parametrize("api", ["keras", "tf_keras"])
def test_nested_functional_model_with_branches(api: str, tmp_path: Path) -> None:
    """A nested model's layers fill their modules from every kind of file (legacy .h5 lists a nested
    model as one layer whose weights are named by its own layers)."""
    K = keras if api == "keras" else pytest.importorskip("tf_keras")
    rng = np.random.default_rng(11)
    model = branched_keras_model(K)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.standard_normal((B, 9, 4)).astype(np.float32)
    expected = keras_output(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras warns that .h5 is a legacy format
        if api == "keras":
            model.save_weights(tmp_path / "w.weights.h5")
            model.save(tmp_path / "m.keras")
            model.save(
                tmp_path / "m.h5"
            )  # Keras 3's legacy .h5 files the nested model's weights a level deeper
        else:
            model.save_weights(tmp_path / "w.h5")
            model.save(tmp_path / "m.h5")
    sources = [*sorted(tmp_path.iterdir()), model]
    for source in sources:
        module = Branched()
        load(module, source)
        assert_close(module(torch.from_numpy(x)).detach().numpy(), expected, f"branched {api} {source}")


@keras.saving.register_keras_serializable(package="weightport_tests")
class TwoEncoders(keras.Model):
    """A subclassed Keras model: its files name layers by attribute, with no order between them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = keras.layers.GRU(6, return_sequences=True)
        self.decoder = keras.layers.GRU(4)
        self.head = keras.layers.Dense(2)

    def call(self, x: Any) -> Any:
        return self.head(self.decoder(self.encoder(x)))


class TorchTwoEncoders(nn.Module):
    def __init__(self, names: tuple[str, str] = ("encoder", "decoder")) -> None:
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.GRU(3, 6, batch_first=True))
        setattr(self, names[1], nn.GRU(6, 4, batch_first=True))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, n) for n in self.names)
        return self.head(second(first(x)[0])[1][-1])


def test_subclassed_model_layers_pair_by_attribute_name(tmp_path: Path) -> None:
    """No recorded order between two GRUs: their attribute names, when the module's are the same."""
    rng = np.random.default_rng(12)
    model = TwoEncoders()
    x = rng.standard_normal((B, T, 3)).astype(np.float32)
    model(x)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    expected = keras_output(model, x)
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    for path in (tmp_path / "m.weights.h5", tmp_path / "m.keras"):
        module = TorchTwoEncoders()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)
            report = weightport.load(module, path)
        assert_close(module(torch.from_numpy(x)).detach().numpy(), expected, f"subclassed {path.name}")
        hows = {p.module_path: p.how for p in report.pairings}
        assert hows["encoder[0]"] == hows["decoder[0]"] == "by name"
        # listed in the model's order, although the file lists decoder before encoder
        assert [p.module_path for p in report.pairings] == ["encoder[0]", "decoder[0]", "head"]
        assert report.rows[0].target == "encoder.weight_ih_l0" and report.rows[-1].target == "head.bias"
    renamed = TorchTwoEncoders(("first", "second"))  # other names, no order: their shapes tell them apart
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(renamed, tmp_path / "m.weights.h5")
    assert {p.how for p in report.pairings if p.module_path != "head"} == {"by a unique kind and shape"}
    assert_close(renamed(torch.from_numpy(x)).detach().numpy(), expected, "subclassed, renamed")


def test_nested_model_order_comes_from_the_keras_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Dense(3)])
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inner(keras.layers.Dense(3)(inputs))))
    randomize_keras(model, rng)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    x = rng.standard_normal((B, 3)).astype(np.float32)
    module = nn.Sequential(*(nn.Linear(3, 3) for _ in range(4)))
    load(module, tmp_path / "m.keras")
    assert_close(module(torch.from_numpy(x)).detach().numpy(), keras_output(model, x), "nested .keras")
    with pytest.raises(
        LayoutError, match=r"'m.weights.h5' does not record the order of these layers as one sequence"
    ):
        load(nn.Sequential(*(nn.Linear(3, 3) for _ in range(4))), tmp_path / "m.weights.h5")


def test_mapping_overrides_the_pairing(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="first"), keras.layers.Dense(2, name="second")]
    )
    randomize_keras(model, rng)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.body = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    x = rng.standard_normal((B, 3)).astype(np.float32)
    net = Net()  # shapes differ: one way only to place both layers, whatever the declaration order
    assert {p.how for p in weightport.load(net, tmp_path / "m.keras").pairings} == {
        "by a unique kind and shape"
    }
    assert_close(net(torch.from_numpy(x)).detach().numpy(), keras_output(model, x), "unique fit")
    for path, mapping in [
        ("m.keras", {"first": "body", "second": "head"}),
        ("m.weights.h5", {"layers/dense": "body", "layers/dense_1": "head"}),
        ("m.weights.h5", {"first": "body", "second": "head"}),
    ]:
        module = Net()
        load(module, tmp_path / path, mapping=mapping)
        assert_close(module(torch.from_numpy(x)).detach().numpy(), keras_output(model, x), f"mapping {path}")


def test_pairing_error_lists_the_candidates(tmp_path: Path) -> None:
    model = keras.Sequential(
        [keras.Input((T, 3)), keras.layers.LSTM(4, return_sequences=True), keras.layers.LSTM(4)]
    )
    model.save(tmp_path / "m.keras")
    with pytest.raises(
        LayoutError,
        match=r"the source has 2 unpaired LSTM layer\(s\) \(lstm(_\d+)?, lstm_\d+\) but the model has only 1 free "
        r"module\(s\) that can take them \(\[0\] \(LSTM\(input_size=3, hidden_size=4\)\)\)",
    ):
        weightport.load(nn.LSTM(3, 4), tmp_path / "m.keras")


def test_weights_only_file_warns_which_settings_were_not_checked(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((T, 3)), keras.layers.GRU(4), keras.layers.LayerNormalization()])
    model.save_weights(tmp_path / "m.weights.h5")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 4)
            self.norm = nn.LayerNorm(4)

    with pytest.warns(UncheckedConfigWarning) as caught:
        weightport.load(Net(), tmp_path / "m.weights.h5")
    message = str(caught[0].message)
    assert "activation, recurrent_activation (assumed tanh, sigmoid)" in message
    assert "epsilon (the module has eps=1e-05; Keras's default is 1e-3)" in message
    assert "a .keras file (model.save('model.keras')) records these settings" in message


# ---- refusals and config checks on real files ---------------------------------------------------------


REFUSED = {
    "gru_reset_after_false": (lambda: keras.layers.GRU(3, reset_after=False), lambda: nn.GRU(2, 3), r"reset_after=False: Keras computes h~ = tanh\(x W_h \+ \(r \* h\) U_h \+ b_h\)"),
    "lstm_hard_sigmoid": (lambda: keras.layers.LSTM(3, recurrent_activation="hard_sigmoid"), lambda: nn.LSTM(2, 3), r"recurrent_activation='hard_sigmoid': nn.LSTM gates use the logistic sigmoid only"),
    "gru_relu": (lambda: keras.layers.GRU(3, activation="relu"), lambda: nn.GRU(2, 3), r"Keras GRU '\w+' has activation='relu': nn.GRU uses tanh only"),
    "simple_rnn_sigmoid": (lambda: keras.layers.SimpleRNN(3, activation="sigmoid"), lambda: nn.RNN(2, 3), r"activation='sigmoid': nn.RNN offers nonlinearity='tanh' or 'relu' only"),
    "layer_norm_rms": (lambda: keras.layers.LayerNormalization(rms_scaling=True), lambda: nn.LayerNorm(2), r"rms_scaling=True"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_settings_pytorch_cannot_express_are_refused(name: str, tmp_path: Path) -> None:
    layer, module, message = REFUSED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras itself deprecates rms_scaling
        model = keras.Sequential([keras.Input((T, 2)), layer()])
    model.save(tmp_path / "m.keras")
    with pytest.raises(UnsupportedConfigError, match=message):
        weightport.load(module(), tmp_path / "m.keras")
    if name == "gru_reset_after_false":  # the bias shape (3H,) gives it away without a config
        model.save_weights(tmp_path / "m.weights.h5")
        with pytest.raises(UnsupportedConfigError, match=message):
            weightport.load(module(), tmp_path / "m.weights.h5")


MISMATCHED = {
    "epsilon": (lambda: keras.layers.BatchNormalization(), lambda: nn.BatchNorm1d(2), r"eps=0\.001 \(Keras epsilon\), found eps=1e-05\. Fix: build the PyTorch module with eps=0\.001"),
    "nonlinearity": (lambda: keras.layers.SimpleRNN(3, activation="relu"), lambda: nn.RNN(2, 3), r"nonlinearity='relu' \(Keras activation\), found nonlinearity='tanh'"),
    "use_bias": (lambda: keras.layers.LSTM(3, use_bias=False), lambda: nn.LSTM(2, 3), r"bias=False \(Keras use_bias=False\), found bias=True"),
    "units": (lambda: keras.layers.GRU(3), lambda: nn.GRU(2, 4), r"hidden_size=3 \(Keras units\), found hidden_size=4"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_config_mismatches_say_how_to_build_the_module(name: str, tmp_path: Path) -> None:
    layer, module, message = MISMATCHED[name]
    model = keras.Sequential([keras.Input((T, 2)), layer()])
    model.save(tmp_path / "m.keras")
    target = module()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(LoadError, match=message):
        weightport.load(target, tmp_path / "m.keras")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ---- PyTorch -> Keras -----------------------------------------------------------------------------------


EXPORTED = [n for n in CASES if n != "lstm_time_major"]


@pytest.mark.parametrize("name", EXPORTED)
def test_keras_loads_what_save_weights_h5_wrote(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)) + 2)
    module = case.torch()
    randomize_torch(module, rng)
    path = save_weights_h5(module, tmp_path / "from_torch.weights.h5", case.export_mapping)
    model = keras_model(keras, case)
    model.load_weights(path)
    x = make_input(case, rng)
    assert_close(keras_output(model, x), torch_output(module, case, x), f"export {name}")


def test_export_keys_match_what_keras_writes(tmp_path: Path) -> None:
    import h5py

    model = keras_model(keras, CASES["conv1d_lstm_dense"])
    model.save_weights(tmp_path / "k.weights.h5")
    with h5py.File(tmp_path / "k.weights.h5") as f:
        keras_keys = set()
        f.visititems(lambda n, o: keras_keys.add(n) if isinstance(o, h5py.Dataset) else None)
    assert set(export(Mixed())) == keras_keys
