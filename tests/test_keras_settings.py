"""Keras settings that act outside the module, or that a file does not show, held against Keras's own
outputs: a Bidirectional's merge_mode, a weights-only file's unshown activation, a tf_keras norm axis
recorded made positive, and an EinsumDense no nn.Linear computes."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

import weightport  # noqa: E402


def randomize(model: Any, seed: int = 0) -> None:
    """Every weight random: biases non-zero, variances positive."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
            if "variance" in (getattr(w, "path", None) or w.name)
            else rng.uniform(-0.6, 0.6, w.shape).astype(np.float32)
            for w in model.weights
        ]
    )


def save(model: Any, path: Path, weights_only: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (model.save_weights if weights_only else model.save)(path)
    return path


def load(module: nn.Module, source: Any) -> list[str]:
    """Load, and return the messages of weightport's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(module, source)
    return [str(w.message) for w in caught if issubclass(w.category, weightport.UncheckedConfigWarning)]


def close(got: torch.Tensor, expected: Any) -> None:
    np.testing.assert_allclose(got.detach().numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)


# ---- Bidirectional merge_mode ------------------------------------------------------------------------------

H = 4
_MERGE = {
    "concat": lambda f, b: torch.cat([f, b], -1),
    "sum": lambda f, b: f + b,
    "ave": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


def _bidirectional(framework: Any, mode: str | None) -> Any:
    layer = framework.layers.Bidirectional(framework.layers.LSTM(H, return_sequences=True), merge_mode=mode)
    inputs = framework.Input((6, 3))
    model = framework.Model(inputs, layer(inputs))  # merge_mode=None returns two outputs: no Sequential
    randomize(model)
    return model


@pytest.mark.parametrize("mode", ["sum", "ave", "mul", None])
def test_a_merge_mode_other_than_concat_is_a_note_naming_the_merge(mode: str | None, tmp_path: Path) -> None:
    """PyTorch concatenates the two directions; Keras merges them as merge_mode says. The weights are the
    same, so the load goes on with a note naming the exact merge, which applied gives Keras's outputs."""
    x = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
    for framework, name in ((keras, "m.keras"), (tf_keras, "m.h5")):
        model = _bidirectional(framework, mode)
        expected = model(x)
        for source in (model, save(model, tmp_path / name)):
            module = nn.LSTM(3, H, batch_first=True, bidirectional=True)
            said = load(module, source)
            assert any(f"merge_mode={mode!r}" in s and "PyTorch concatenates" in s for s in said), said
            out = module(torch.from_numpy(x))[0]
            f, b = out[..., :H], out[..., H:]
            if mode is None:
                assert f"(out[..., :{H}], out[..., {H}:])" in " ".join(said)
                close(f, expected[0])
                close(b, expected[1])
            else:
                expression = {"sum": "{f} + {b}", "ave": "({f} + {b}) / 2", "mul": "{f} * {b}"}[mode]
                assert expression.format(f=f"out[..., :{H}]", b=f"out[..., {H}:]") in " ".join(said)
                close(_MERGE[mode](f, b), expected)
                assert not np.allclose(torch.cat([f, b], -1)[..., :H].detach().numpy(), np.asarray(expected))


def test_concat_gives_no_merge_note_and_a_weights_only_file_names_merge_mode(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((2, 6, 3)).astype(np.float32)
    model = _bidirectional(keras, "concat")
    module = nn.LSTM(3, H, batch_first=True, bidirectional=True)
    assert not any("merge_mode" in s for s in load(module, save(model, tmp_path / "m.keras")))
    close(module(torch.from_numpy(x))[0], model(x))
    for framework, name in ((keras, "m.weights.h5"), (tf_keras, "w.h5")):
        model = _bidirectional(framework, "sum")
        module = nn.LSTM(3, H, batch_first=True, bidirectional=True)
        said = load(module, save(model, tmp_path / name, weights_only=True))
        assert any("merge_mode (assumed 'concat'" in s for s in said), said
        out = module(torch.from_numpy(x))[0]
        close(out[..., :H] + out[..., H:], model(x))


def test_a_merged_layer_inside_a_multi_layer_rnn_is_refused(tmp_path: Path) -> None:
    """Layer 1 of a two-layer bidirectional nn.LSTM reads layer 0's directions concatenated: no forward
    can merge them in between."""
    model = keras.Sequential(
        [
            keras.Input((6, 3)),
            keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True), merge_mode="sum"),
            keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True)),
        ]
    )
    randomize(model)
    with pytest.raises(weightport.LoadError, match=r"merge_mode='sum'.*num_layers=1"):
        weightport.load(nn.LSTM(3, H, num_layers=2, batch_first=True, bidirectional=True), model)


# ---- what a weights-only file cannot show ----------------------------------------------------------------------


@pytest.mark.parametrize("framework", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_a_weights_only_dense_and_conv_warn_that_activation_is_unchecked(
    framework: Any, tmp_path: Path
) -> None:
    """The file holds kernels and biases only: a relu twin and a linear one load alike, so the warning names
    activation for each layer; the twin that applies it gives Keras's outputs."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    layers = framework.layers
    model = framework.Sequential(
        [
            framework.Input((5, 5, 3)),
            layers.Conv2D(4, 3, activation="relu", name="conv2d"),
            layers.Flatten(),
            layers.Dense(4, activation="tanh", name="dense"),  # named: the mapping below names it
        ]
    )
    randomize(model)
    name = "m.weights.h5" if framework is keras else "w.h5"

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(36, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
            return torch.tanh(self.fc(y.permute(0, 2, 3, 1).flatten(1)))

    twin = Twin()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(
            twin,
            save(model, tmp_path / name, weights_only=True),
            mapping={"dense": "fc"} if framework is keras else None,
            example_inputs=(torch.from_numpy(x),),
        )
    said = " ".join(
        str(w.message) for w in caught if issubclass(w.category, weightport.UncheckedConfigWarning)
    )
    assert said.count("activation (assumed none") == 2, said
    close(twin(torch.from_numpy(x)), model(x))


def test_a_square_weights_only_dense_warns_and_a_keras_file_notes(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu", name="dense")])
    randomize(model)
    module = nn.Linear(4, 4)
    said = load(module, save(model, tmp_path / "m.weights.h5", weights_only=True))
    assert any("Keras Dense 'dense'" in s and "activation (assumed none" in s for s in said), said
    close(torch.relu(module(torch.from_numpy(x))), model(x))
    said = load(nn.Linear(4, 4), save(model, tmp_path / "m.keras"))
    assert any("activation='relu'" in s for s in said), said


def test_a_weights_only_norm_and_embedding_name_their_unshown_settings(tmp_path: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 4, mask_zero=True),
            keras.layers.LayerNormalization(epsilon=1e-5),
        ]
    )
    randomize(model)
    twin = nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4, eps=1e-5))
    said = " ".join(load(twin, save(model, tmp_path / "m.weights.h5", weights_only=True)))
    for setting in ("mask_zero", "epsilon", "axis", "rms_scaling"):
        assert setting in said, said
    ids = np.random.default_rng(5).integers(1, 7, (2, 5)).astype(np.int32)
    close(twin(torch.from_numpy(ids).long()), model(ids))


# ---- a norm's axis from a tf_keras full-model .h5 ----------------------------------------------------------------


def _norms(framework: Any, axis: int) -> Any:
    inputs = framework.Input((4, 4))
    x = framework.layers.Dense(4)(inputs)
    x = framework.layers.LayerNormalization(axis=axis, epsilon=1e-5)(x)
    x = framework.layers.BatchNormalization(axis=axis, epsilon=1e-3)(x)
    return framework.Model(inputs, x)


class _Norms(nn.Module):
    def __init__(self, moved: bool) -> None:
        super().__init__()
        self.dense, self.ln, self.bn = nn.Linear(4, 4), nn.LayerNorm(4, eps=1e-5), nn.BatchNorm1d(4, eps=1e-3)
        self.moved = moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x)
        if self.moved:  # axis 1 normalized: moved last for the LayerNorm, as dim 1 for the BatchNorm
            return self.bn(self.ln(y.transpose(1, 2)).transpose(1, 2))
        return self.bn(self.ln(y).transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("axis", [1, -1])
def test_a_tf_keras_norm_axis_is_read_against_the_recorded_input_rank(axis: int, tmp_path: Path) -> None:
    """tf_keras records axis=-1 of a (4, 4) input as [2] and axis=1 as [1]; the rank comes from the input
    layer's recorded shape, through the Dense: axis 1 gets a note for each norm, the last axis none."""
    x = np.random.default_rng(6).standard_normal((2, 4, 4)).astype(np.float32)
    k3 = _norms(keras, axis)
    randomize(k3)
    legacy = _norms(tf_keras, axis)
    legacy.set_weights(k3.get_weights())
    expected = k3(x, training=False)
    for source in (save(legacy, tmp_path / "m.h5"), save(k3, tmp_path / "m.keras"), legacy):
        twin = _Norms(moved=axis == 1).eval()
        said = " ".join(load(twin, source))
        if axis == 1:
            assert "normalizes over axis [1]" in said and "axis 1 of its 3-D input" in said, said
        else:
            assert "normalizes over axis" not in said and "as the channels" not in said, said
        close(twin(torch.from_numpy(x)), expected)


def test_a_norm_axis_whose_input_rank_is_not_recorded_is_named(tmp_path: Path) -> None:
    """After a Lambda, nothing the file records gives the rank: the positive axis is named, not assumed last."""
    inputs = tf_keras.Input((4, 4))
    x = tf_keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = tf_keras.layers.LayerNormalization(axis=1, epsilon=1e-5)(x)
    model = tf_keras.Model(inputs, x)
    randomize(model)
    said = " ".join(load(nn.LayerNorm(4, eps=1e-5), save(model, tmp_path / "m.h5")))
    assert "axis [1]" in said and "no input rank" in said, said


# ---- an EinsumDense no nn.Linear computes ----------------------------------------------------------------------


class _Einsum(nn.Module):
    """What the refusal's fix says: the kernel and bias as Keras stores them, and the equation."""

    def __init__(self, equation: str, kernel: tuple[int, ...], bias: tuple[int, ...]) -> None:
        super().__init__()
        self.equation = equation
        self.kernel = nn.Parameter(torch.zeros(kernel))
        self.bias = nn.Parameter(torch.zeros(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, x, self.kernel) + self.bias


@pytest.mark.parametrize(
    ("equation", "bias_axes", "why"),
    [
        ("abc,bcd->abd", "d", "a separate kernel for each b"),
        ("abc,cd->abd", "bd", "bias_axes='bd') varies along 'b'"),
    ],
)
def test_an_einsum_dense_no_linear_computes_says_why_first_and_its_fix_works(
    equation: str, bias_axes: str, why: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(7).standard_normal((2, 5, 4)).astype(np.float32)
    for framework, name in ((keras, "m.keras"), (tf_keras, "m.h5")):
        model = framework.Sequential(
            [framework.Input((5, 4)), framework.layers.EinsumDense(equation, (5, 4), bias_axes=bias_axes)]
        )
        randomize(model)
        path = save(model, tmp_path / name)
        with pytest.raises(weightport.LoadError) as caught:
            weightport.load(nn.Linear(4, 4), path)
        lines = str(caught.value).splitlines()
        assert "EinsumDense" in lines[1] and why in lines[1] and f"'{equation}'" in lines[1], lines
        assert "load the .keras file" not in str(caught.value)

        source = weightport.open_source(path)
        named = dict(re.findall(r"'(kernel|bias)': source\.read\('([^']+)'\)", lines[1]))
        kernel, bias = named["kernel"], named["bias"]
        module = _Einsum(equation, source.infos[kernel].shape, source.infos[bias].shape)
        weightport.load(module, {"kernel": source.read(kernel), "bias": source.read(bias)})
        close(module(torch.from_numpy(x)), model(x))


def test_an_einsum_dense_beside_layers_that_pair_says_what_it_computes(tmp_path: Path) -> None:
    """A Dense pairs with the model's Linear; the EinsumDense after it, one no nn.Linear computes, is left:
    the hint on its tensors says why (it said 'load the .keras file', the file being loaded)."""
    model = keras.Sequential(
        [
            keras.Input((5, 4)),
            keras.layers.Dense(4),
            keras.layers.EinsumDense("abc,bcd->abd", (5, 4), bias_axes="d"),
        ]
    )
    randomize(model)
    path = save(model, tmp_path / "m.keras")
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(nn.Sequential(nn.Linear(4, 4)), path)
    message = str(caught.value)
    assert "computes what no nn.Linear does (" in message and "a separate kernel for each b" in message
    assert "load the .keras file" not in message


class _Pools(nn.Module):
    """conv -> a max pool 3/2 padded as TensorFlow's 'same' pads an even map -> conv -> an average pool 3/1
    'same' that leaves the padding out of the average -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 5, 1),
        )
        self.avg = nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(F.pad(self.c1(x), (0, 1, 0, 1), value=-float("inf")), 3, 2)
        return self.c3(self.avg(self.c2(h)))


def test_a_same_padded_pool_gives_a_note_saying_how_to_pool(tmp_path: Path) -> None:
    """Pools hold no weights, so nothing pairs them: a Keras pool padded 'same' loaded with no word (0.4-0.9
    off into PyTorch's default pools). The notes name each and how to pool; the twin built so gives Keras's
    outputs."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, padding="same"),
            layers.MaxPooling2D(3, 2, padding="same"),
            layers.Conv2D(4, 3, padding="same"),
            layers.AveragePooling2D(3, 1, padding="same"),
            layers.Conv2D(5, 1),
        ]
    )
    randomize(model)
    path = save(model, tmp_path / "m.keras")
    twin = _Pools().eval()
    with pytest.warns(weightport.ForwardNoteWarning) as caught:
        weightport.load(twin, path)
    said = " ".join(str(w.message) for w in caught)
    assert "MaxPooling2D" in said and "TensorFlow's 'same' rule" in said and "(pad with -inf)" in said
    assert "AveragePooling2D" in said and "padding=(1, 1), count_include_pad=False" in said
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
    close(twin(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1), model(x))


def test_a_strided_1x1_same_conv_pads_nothing_and_needs_no_note(tmp_path: Path) -> None:
    """'same' with a 1 x 1 kernel pads nothing at any stride (Xception's skip convs): it loaded with a note to pad
    the input in forward, its only warning, pointing at layers that need nothing."""
    model = keras.Sequential([keras.Input((7, 6, 3)), keras.layers.Conv2D(4, 1, strides=2, padding="same")])
    randomize(model)
    path = save(model, tmp_path / "m.keras")
    twin = nn.Conv2d(3, 4, 1, stride=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(twin, path)
    x = np.random.default_rng(3).standard_normal((2, 7, 6, 3)).astype(np.float32)
    close(twin(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1), model(x))
