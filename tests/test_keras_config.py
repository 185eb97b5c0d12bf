"""Keras layer settings against the PyTorch module, on real Keras files and live models.

Settings that act outside the module (the input, the state, the output) load, and the pairing says
what ``forward`` must do; the outputs are compared with Keras's. Settings that change what the module
computes are refused; those a differently built module can match are mismatches saying how to build it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from weightport.errors import ForwardNoteWarning, LayoutError, LoadError, UnsupportedConfigError  # noqa: E402

B, T = 2, 6
TOL = 1e-5


def randomize(model: Any, rng: np.random.Generator) -> None:
    model.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in model.weights])


def sources(model: Any, tmp_path: Path) -> dict[str, Any]:
    model.save(tmp_path / "m.keras")
    return {".keras": tmp_path / "m.keras", "live": model}


def load(module: nn.Module, source: Any) -> str:
    """Loads, and returns the pairings' notes joined; the notes are a ForwardNoteWarning too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = weightport.load(module, source)
    noted = [str(w.message) for w in caught if issubclass(w.category, ForwardNoteWarning)]
    assert len(noted) == (1 if report.notes else 0) and all(note in noted[0] for note in report.notes), noted
    return " | ".join(p.how for p in report.pairings)


def channels_first(m: nn.Module, x: torch.Tensor, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    return m(F.pad(x.transpose(1, 2), pad)).transpose(1, 2)


# ---- accepted: same outputs, with the note the pairing gives -------------------------------------------

Run = Callable[[nn.Module, torch.Tensor], torch.Tensor]
ACCEPTED: dict[str, tuple[Callable[[], Any], tuple[int, ...], Callable[[], nn.Module], Run, str]] = {
    "go_backwards": (lambda: keras.layers.LSTM(4, go_backwards=True, return_sequences=True), (T, 3), lambda: nn.LSTM(3, 4, batch_first=True), lambda m, x: m(x.flip(1))[0], "flip the input in time"),
    "go_backwards_last_state": (lambda: keras.layers.GRU(4, go_backwards=True), (T, 3), lambda: nn.GRU(3, 4, batch_first=True), lambda m, x: m(x.flip(1))[1][0], "go_backwards=True"),
    "unroll_dropout": (lambda: keras.layers.GRU(4, unroll=True, dropout=0.3, recurrent_dropout=0.2), (T, 3), lambda: nn.GRU(3, 4, batch_first=True), lambda m, x: m(x)[1][0], "by a unique kind and shape"),
    "lstm_no_unit_forget_bias": (lambda: keras.layers.LSTM(4, unit_forget_bias=False), (T, 3), lambda: nn.LSTM(3, 4, batch_first=True), lambda m, x: m(x)[1][0][0], "by a unique kind and shape"),
    "conv_causal": (lambda: keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2), (T, 3), lambda: nn.Conv1d(3, 4, 3, dilation=2), lambda m, x: channels_first(m, x, (4, 0)), "left-pad the input by 4 steps"),
    "conv_same_stride_2": (lambda: keras.layers.Conv1D(4, 3, padding="same", strides=2), (T, 3), lambda: nn.Conv1d(3, 4, 3, stride=2), lambda m, x: channels_first(m, x, (0, 1)), "TensorFlow's padding='same' with stride (2,)"),
    "conv_same_stride_2_odd": (lambda: keras.layers.Conv1D(4, 3, padding="same", strides=2), (T + 1, 3), lambda: nn.Conv1d(3, 4, 3, stride=2), lambda m, x: channels_first(m, x, (1, 1)), "half of it (rounded down) before"),
    "conv_groups_dilation": (lambda: keras.layers.Conv1D(4, 2, groups=2, dilation_rate=2, padding="same"), (T, 4), lambda: nn.Conv1d(4, 4, 2, groups=2, dilation=2, padding="same"), channels_first, "by a unique kind and shape"),
    "conv_activation": (lambda: keras.layers.Conv1D(4, 2, activation="relu"), (T, 3), lambda: nn.Conv1d(3, 4, 2), lambda m, x: torch.relu(channels_first(m, x)), "activation='relu' after it"),
    "dense_activation": (lambda: keras.layers.Dense(4, activation="sigmoid"), (3,), lambda: nn.Linear(3, 4), lambda m, x: torch.sigmoid(m(x)), "activation='sigmoid' after it: apply it in forward"),
    "batch_norm_axis_1": (lambda: keras.layers.BatchNormalization(axis=1, center=False), (3, 4, 5), lambda: nn.BatchNorm2d(3, eps=1e-3), lambda m, x: m(x), "by a unique kind and shape"),
    "layer_norm_axis_1": (lambda: keras.layers.LayerNormalization(axis=1), (5, 4), lambda: nn.LayerNorm(5, eps=1e-3), lambda m, x: m(x.transpose(1, 2)).transpose(1, 2), "normalizes over axis [1] of its input: move that axis last"),
    "layer_norm_axis_minus_2": (lambda: keras.layers.LayerNormalization(axis=-2), (5, 4), lambda: nn.LayerNorm(5, eps=1e-3), lambda m, x: m(x.transpose(1, 2)).transpose(1, 2), "move that axis last"),
    "stacked_first_layer_backwards": (lambda: [keras.layers.LSTM(4, go_backwards=True, return_sequences=True), keras.layers.LSTM(4, return_sequences=True)], (T, 3), lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True), lambda m, x: m(x.flip(1))[0], "flip the input in time"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_settings_outside_the_module_load_with_a_note(name: str, tmp_path: Path) -> None:
    layer, shape, module, run, note = ACCEPTED[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    made = layer()
    model = keras.Sequential([keras.Input(shape), *(made if isinstance(made, list) else [made])])
    randomize(model, rng)
    for w in model.weights:
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 1.5, tuple(w.shape)).astype(np.float32))
    x = rng.standard_normal((B, *shape)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    for kind, source in sources(model, tmp_path).items():
        target = module().eval()
        assert note in load(target, source), kind
        with torch.no_grad():
            got = run(target, torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, atol=TOL, err_msg=f"{name} {kind}")


def test_stateful_layer_loads_and_the_state_is_passed_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((T, 3), batch_size=B), keras.layers.LSTM(4, stateful=True)])
    randomize(model, rng)
    x1, x2 = (rng.standard_normal((B, T, 3)).astype(np.float32) for _ in range(2))
    model.save(tmp_path / "m.keras")
    model(x1)
    expected = np.asarray(model(x2))  # carries the state x1 left
    target = nn.LSTM(3, 4, batch_first=True)
    assert "stateful=True): pass the returned h_n, c_n" in load(target, tmp_path / "m.keras")
    with torch.no_grad():
        _, state = target(torch.from_numpy(x1))
        _, (h, _) = target(torch.from_numpy(x2), state)
    np.testing.assert_allclose(h[0].numpy(), expected, atol=TOL)


def test_mask_zero_loads_and_packed_sequences_give_keras_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras.layers.LSTM(3),
        ]
    )
    randomize(model, rng)
    x = np.array([[3, 4, 0, 0, 0, 0], [1, 2, 3, 5, 9, 0]], np.int32)  # padded with 0 at the end
    expected = np.asarray(model(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 3, batch_first=True)

    for kind, source in sources(model, tmp_path).items():
        net = Net()
        assert "pack_padded_sequence" in load(net, source), kind
        ids = torch.from_numpy(x).long()
        packed = nn.utils.rnn.pack_padded_sequence(
            net.embed(ids), (ids != 0).sum(1), batch_first=True, enforce_sorted=False
        )
        with torch.no_grad():
            _, (h, _) = net.lstm(packed)
        np.testing.assert_allclose(h[0].numpy(), expected, atol=TOL, err_msg=kind)


def test_a_masking_layer_before_an_lstm_says_to_pack_and_packed_gives_keras_outputs(tmp_path: Path) -> None:
    """A ``Masking`` layer holds no weights, so only the graph shows it: the LSTM after it gets the note,
    and packing the sequences gives Keras's outputs (unpacked, the padded steps would count)."""
    rng = np.random.default_rng(12)
    model = keras.Sequential(
        [
            keras.Input((T, 3)),
            keras.layers.Masking(mask_value=0.0),
            keras.layers.Dense(3),
            keras.layers.LSTM(4),
        ]
    )
    randomize(model, rng)
    x = rng.standard_normal((B, T, 3)).astype(np.float32)
    lengths = np.array([2, 5])
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0  # padded at the end
    expected = np.asarray(model(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(3, 3)
            self.lstm = nn.LSTM(3, 4, batch_first=True)

    for kind, source in sources(model, tmp_path).items():
        net = Net()
        how = load(net, source)
        assert "Keras skips the masked steps (Masking 'masking' (mask_value=0) before it)" in how, (kind, how)
        with torch.no_grad():
            packed = nn.utils.rnn.pack_padded_sequence(
                net.dense(torch.from_numpy(x)),
                torch.from_numpy(lengths),
                batch_first=True,
                enforce_sorted=False,
            )
            _, (h, _) = net.lstm(packed)
        np.testing.assert_allclose(h[0].numpy(), expected, atol=TOL, err_msg=kind)


def test_a_layer_called_twice_fills_one_module_called_twice(tmp_path: Path) -> None:
    """A Keras layer applied twice holds one set of weights: into two modules it is refused, saying so;
    into one module called twice (two attributes tied to it) it loads, with Keras's outputs."""
    rng = np.random.default_rng(13)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(shared(shared(inputs))))
    randomize(model, rng)
    x = rng.standard_normal((B, 4)).astype(np.float32)
    expected = np.asarray(model(x))

    class Net(nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.l1 = nn.Linear(4, 4)
            self.l2 = self.l1 if tied else nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))

    example = (torch.zeros(1, 4),)
    for kind, source in sources(model, tmp_path).items():
        with pytest.raises(
            weightport.LayoutError, match="the Keras model calls 'shared' 2 times, with one set"
        ):
            weightport.load(Net(tied=False), source, example_inputs=example)
        net = Net(tied=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ForwardNoteWarning)  # the tanh to apply, said as a note
            weightport.load(net, source, example_inputs=example)
        with torch.no_grad():
            np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), expected, atol=TOL, err_msg=kind)


def test_channels_first_conv_holds_the_same_kernel(tmp_path: Path) -> None:
    """TensorFlow on CPU runs no channels-first conv; the twin channels-last model gives the outputs."""
    rng = np.random.default_rng(3)
    first = keras.Sequential(
        [keras.Input((2, 6, 7)), keras.layers.Conv2D(3, 3, data_format="channels_first")]
    )
    last = keras.Sequential([keras.Input((6, 7, 2)), keras.layers.Conv2D(3, 3)])
    randomize(first, rng)
    last.set_weights(first.get_weights())
    x = rng.standard_normal((B, 6, 7, 2)).astype(np.float32)
    expected = np.asarray(last(x)).transpose(0, 3, 1, 2)
    for kind, source in sources(first, tmp_path).items():
        conv = nn.Conv2d(2, 3, 3)
        load(conv, source)
        with torch.no_grad():
            got = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        np.testing.assert_allclose(got, expected, atol=TOL, err_msg=kind)


# ---- refused: no module computes what Keras does ------------------------------------------------------


REFUSED = {
    "bidirectional_go_backwards": (lambda: keras.layers.Bidirectional(keras.layers.LSTM(3, go_backwards=True, return_sequences=True), backward_layer=keras.layers.LSTM(3, return_sequences=True)), lambda: nn.LSTM(2, 3, bidirectional=True), r"Keras Bidirectional '\w+' wraps an LSTM with go_backwards=True.*halves of the output are swapped.*Fix: rebuild the Keras layer with go_backwards=False"),
    "simple_rnn_linear": (lambda: keras.layers.SimpleRNN(3, activation=None), lambda: nn.RNN(2, 3), r"Keras SimpleRNN '\w+' has activation='linear': nn.RNN offers nonlinearity='tanh' or 'relu' only"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_settings_the_module_cannot_compute_are_refused(name: str, tmp_path: Path) -> None:
    layer, module, message = REFUSED[name]
    model = keras.Sequential([keras.Input((T, 2)), layer()])
    for source in sources(model, tmp_path).values():
        with pytest.raises(UnsupportedConfigError, match=message):
            weightport.load(module(), source)


def test_legacy_bidirectional_go_backwards_is_refused_and_plain_one_loads(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(4)
    bi = tf_keras.Sequential(
        [tf_keras.Input((T, 2)), tf_keras.layers.Bidirectional(tf_keras.layers.GRU(3, go_backwards=True))]
    )
    one = tf_keras.Sequential([tf_keras.Input((T, 2)), tf_keras.layers.GRU(3, go_backwards=True)])
    one.set_weights([rng.uniform(-0.6, 0.6, tuple(w.shape)).astype(np.float32) for w in one.weights])
    x = rng.standard_normal((B, T, 2)).astype(np.float32)
    expected = np.asarray(one(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf_keras warns that .h5 is a legacy format
        bi.save(tmp_path / "bi.h5")
        one.save(tmp_path / "one.h5")
    for source in (tmp_path / "bi.h5", bi):
        with pytest.raises(UnsupportedConfigError, match="wraps a GRU with go_backwards=True"):
            weightport.load(nn.GRU(2, 3, bidirectional=True), source)
    for source in (tmp_path / "one.h5", one):
        gru = nn.GRU(2, 3, batch_first=True)
        assert "flip the input in time" in load(gru, source)
        with torch.no_grad():
            h = gru(torch.from_numpy(x).flip(1))[1][0]
        np.testing.assert_allclose(h.numpy(), expected, atol=TOL)


# ---- mismatched: a module built otherwise would match -------------------------------------------------


MISMATCHED = {
    "causal_padded": (lambda: keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2), lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=2), r"expected padding equivalent to Keras padding='causal', found padding=\(2,\)\. Fix: build the module with padding=0 \(PyTorch has no causal padding\) and left-pad the input by dilation \* \(kernel - 1\) = 4 steps"),
    "same_stride_2_padded": (lambda: keras.layers.Conv1D(3, 3, padding="same", strides=2), lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), r"Fix: build the module with padding=0 \(PyTorch's padding='same' needs stride 1\) and pad each spatial axis"),
    "same_unpadded": (lambda: keras.layers.Conv1D(3, 3, padding="same"), lambda: nn.Conv1d(2, 3, 3), r"found padding=\(0,\)\. Fix: build the module with padding='same'"),
    "valid_padded": (lambda: keras.layers.Conv1D(3, 3), lambda: nn.Conv1d(2, 3, 3, padding=1), r"Keras padding='valid', found padding=\(1,\)\. Fix: build the module with padding=0"),
    "padding_mode": (lambda: keras.layers.Conv1D(3, 3, padding="same"), lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), r"expected padding_mode='zeros' \(Keras pads with zeros\), found padding_mode='reflect'"),
    "groups": (lambda: keras.layers.Conv1D(4, 2, groups=2), lambda: nn.Conv1d(4, 4, 2), r"expected groups=2, found groups=1\. Fix: build the module with groups=2"),
    "dilation": (lambda: keras.layers.Conv1D(3, 2, dilation_rate=2), lambda: nn.Conv1d(2, 3, 2), r"expected dilation=\(2,\) \(Keras dilation_rate\), found dilation=\(1,\)"),
    "strides": (lambda: keras.layers.Conv1D(3, 2, strides=2), lambda: nn.Conv1d(2, 3, 2), r"expected stride=\(2,\) \(Keras strides\), found stride=\(1,\)"),
    "dense_use_bias": (lambda: keras.layers.Dense(3, use_bias=False), lambda: nn.Linear(2, 3), r"expected bias=False \(Keras use_bias=False\), found bias=True"),
    "conv_use_bias": (lambda: keras.layers.Conv1D(3, 2), lambda: nn.Conv1d(2, 3, 2, bias=False), r"expected bias=True \(Keras use_bias=True\), found bias=False"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_mismatches_say_how_to_build_the_module(name: str, tmp_path: Path) -> None:
    layer, module, message = MISMATCHED[name]
    shape = (T, 4) if name == "groups" else (T, 2)
    model = keras.Sequential([keras.Input(shape), layer()])
    for kind, source in sources(model, tmp_path).items():
        target = module()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(LoadError, match=message):
            weightport.load(target, source)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), kind


# ---- a Keras layer filling one layer of a multi-layer RNN must run as that layer does ---------------------


STACKED = {
    "inner_layer_backwards": ([keras.layers.LSTM(4, return_sequences=True), keras.layers.LSTM(4, go_backwards=True, return_sequences=True)], r"expected a layer that reads its input in time order \(layer 1 of nn.LSTM, fed by layer 0\), found Keras go_backwards=True"),
    "last_step_only": ([keras.layers.LSTM(4), keras.layers.RepeatVector(T), keras.layers.LSTM(4, return_sequences=True)], r"expected a layer returning every step \(layer 0 of nn.LSTM, read by layer 1\), found Keras return_sequences=False"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(STACKED))
def test_a_stacked_layer_that_runs_otherwise_is_a_mismatch(name: str, tmp_path: Path) -> None:
    layers, message = STACKED[name]
    model = keras.Sequential([keras.Input((T, 3)), *layers])
    for kind, source in sources(model, tmp_path).items():
        target = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(LoadError, match=message):
            weightport.load(target, source)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), kind


class Residual(nn.Module):
    """A residual block whose shortcut conv has the shape of the main branch's last one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.downsample = (
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 8, 1),
            nn.Conv2d(4, 8, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x))) + self.downsample(x)


def test_convs_in_parallel_branches_are_refused_and_a_mapping_loads_exactly(tmp_path: Path) -> None:
    """Keras lists the layers of parallel branches in either order (here the shortcut before the main
    branch's last conv); matching that list with the model's call order crossed them silently."""
    rng = np.random.default_rng(9)
    inputs = keras.Input((6, 6, 4))
    main = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="main_1")(inputs)
    shortcut = keras.layers.Conv2D(8, 1, name="shortcut")(inputs)
    out = keras.layers.Add()([keras.layers.Conv2D(8, 1, name="main_2")(main), shortcut])
    model = keras.Model(inputs, out)
    randomize(model, rng)
    x = rng.standard_normal((B, 6, 6, 4)).astype(np.float32)
    expected = np.asarray(model(x)).transpose(0, 3, 1, 2)
    example = (torch.zeros(1, 4, 6, 6),)
    for kind, source in sources(model, tmp_path).items():
        block = Residual()
        with pytest.raises(LayoutError, match=r"'conv2' and 'downsample' run in parallel branches"):
            weightport.load(block, source, example_inputs=example)
        mapping = {"main_1": "conv1", "main_2": "conv2", "shortcut": "downsample"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ForwardNoteWarning)  # main_1's relu, applied in forward
            weightport.load(block, source, mapping=mapping)
        with torch.no_grad():
            got = block(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        np.testing.assert_allclose(got, expected, atol=TOL, err_msg=kind)


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_a_quantized_layer_is_refused_with_the_reason(mode: str, tmp_path: Path) -> None:
    """Keras quantize(): the kernel is stored quantized with scales beside it; the refusal said use_bias=False."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the InputLayer has no quantize method
        model.quantize(mode)
    for kind, source in sources(model, tmp_path).items():
        target = nn.Linear(6, 8)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(
            UnsupportedConfigError, match=rf"Keras Dense '\w+' is quantized \(Keras quantize\('{mode}'\)\)"
        ):
            weightport.load(target, source)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), kind
