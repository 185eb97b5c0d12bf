"""Graphs in the exact form tf2onnx writes them, made from real Keras weights, loaded into the PyTorch twin.

- A Keras BatchNormalization tf2onnx does not fold (after a Conv2D with a bias, a DepthwiseConv2D, a Dense
  without bias) is ``Mul`` then ``Add`` right after the layer's node: it loads into the model's BatchNorm
  (it was refused as possibly folded, "after an activation"); a bias-free twin is refused saying to build
  the layer with a bias, which then loads.
- Conv -> Flatten -> Dense with a dynamic batch computes the ``Reshape``'s target shape (``Shape``,
  ``Gather``, ``Slice``, ``Concat``): still a flatten to two axes (it loaded 8 off with
  ``check_outputs=False``, the two readings unseen).
- A Keras 3 GRU (``reset_after=True``) left in a ``Loop``: the refusal says so from the loop's weight
  shapes (it blamed ``GRU(reset_after=False)``), and its fix (the Keras weights file) loads exactly.

Oracles: onnxruntime's outputs of each graph, and Keras's own for the weights it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightport
from conftest import refused

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
keras = pytest.importorskip("keras")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

EPS = 1e-3  # Keras's BatchNormalization default


def _save(path: Path, nodes: list[Any], inits: dict[str, np.ndarray], x: list[Any], out: list[Any]) -> Path:
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _close(got: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol * max(1.0, float(np.abs(expected).max())))


def _randomize(model: Any, rng: np.random.Generator) -> None:
    for layer in model.layers:
        values = []
        for var, value in zip(layer.weights, layer.get_weights()):
            low = 0.5 if ("variance" in var.path or "gamma" in var.path) else -1.0
            values.append(rng.uniform(low, 1.5, value.shape).astype(value.dtype))
        layer.set_weights(values)


def _fresh(model: nn.Module, seed: int = 3) -> nn.Module:
    """``model`` in eval() with random values everywhere, running statistics too (a kept one would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model.eval()


# --- a BatchNormalization written as Mul and Add -------------------------------------------------------------


def _keras_cnn(rng: np.random.Generator) -> Any:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6, use_bias=False, name="fc1")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc2")(x))
    _randomize(model, rng)
    return model


def _scale_shift(model: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """tf.nn.batch_normalization's eval form, as tf2onnx stores it: x * scale + (beta - mean * scale)."""
    gamma, beta, mean, var = model.get_layer(name).get_weights()
    scale = (gamma / np.sqrt(var + np.float32(EPS))).astype(np.float32)
    return scale, (beta - mean * scale).astype(np.float32)


def _tf2onnx_cnn(path: Path, model: Any, conv_bias: np.ndarray | None = None) -> Path:
    """The graph tf2onnx 1.17 writes for :func:`_keras_cnn` (out/c1_cnn.onnx of the probe): Conv (bias kept),
    then the BatchNorm as ``Mul`` by ``(1, C, 1, 1)`` and ``Add``; the Dense's as ``(6,)`` vectors."""
    kernel, bias = model.get_layer("conv1").get_weights()
    depthwise, dw_bias = model.get_layer("dw").get_weights()
    inits = {
        "conv1/kernel": kernel.transpose(3, 2, 0, 1).copy(),
        "conv1/Squeeze:0": bias if conv_bias is None else conv_bias,
        "dw/kernel": depthwise.transpose(2, 3, 0, 1).copy(),
        "dw/Squeeze:0": dw_bias,
        "fc1/kernel": model.get_layer("fc1").get_weights()[0],
        "fc2/kernel": model.get_layer("fc2").get_weights()[0],
        "fc2/bias": model.get_layer("fc2").get_weights()[1],
        "axes": np.array([2, 3], np.int64),
    }
    for bn, shape in (("bn1", (1, 4, 1, 1)), ("bn2", (1, 4, 1, 1)), ("bn3", (6,))):
        scale, shift = _scale_shift(model, bn)
        inits[f"{bn}/batchnorm/mul:0"], inits[f"{bn}/batchnorm/sub:0"] = (
            scale.reshape(shape),
            shift.reshape(shape),
        )

    def norm(bn: str, x: str) -> list[Any]:
        return [
            helper.make_node(
                "Mul", [x, f"{bn}/batchnorm/mul:0"], [f"{bn}/mul_1"], name=f"{bn}/batchnorm/mul_1"
            ),
            helper.make_node(
                "Add", [f"{bn}/mul_1", f"{bn}/batchnorm/sub:0"], [bn], name=f"{bn}/batchnorm/add_1"
            ),
        ]

    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["nchw", "conv1/kernel", "conv1/Squeeze:0"], ["c1"], name="conv1", pads=[1] * 4
        ),
        *norm("bn1", "c1"),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node(
            "Conv", ["r1", "dw/kernel", "dw/Squeeze:0"], ["c2"], name="dw", group=4, pads=[1] * 4
        ),
        *norm("bn2", "c2"),
        helper.make_node("Relu", ["bn2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
        helper.make_node("Squeeze", ["pool", "axes"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc1/kernel"], ["f1"], name="fc1"),
        *norm("bn3", "f1"),
        helper.make_node("MatMul", ["bn3", "fc2/kernel"], ["f2"], name="fc2"),
        helper.make_node("Add", ["f2", "fc2/bias"], ["out"]),
    ]
    return _save(path, nodes, inits, ["N", 8, 8, 3], ["N", 3])


class Cnn(nn.Module):
    """The PyTorch twin of :func:`_keras_cnn` on NHWC input; ``bias``: whether the convs hold one."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4, eps=EPS)
        self.dw, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=bias), nn.BatchNorm2d(4, eps=EPS)
        self.fc1, self.bn3 = nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, eps=EPS)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.permute(0, 3, 1, 2))))
        x = F.relu(self.bn2(self.dw(x)))
        return self.fc2(self.bn3(self.fc1(x.mean((2, 3)))))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    rng = np.random.default_rng(11)
    model = _keras_cnn(rng)
    path = _tf2onnx_cnn(tmp_path_factory.mktemp("bn") / "cnn.onnx", model)
    return model, path, rng.standard_normal((2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("example", [False, True], ids=["registered", "called"])
def test_a_batchnorm_written_as_mul_and_add_loads_into_the_batchnorm_after_the_layer(
    cnn: tuple[Any, Path, np.ndarray], example: bool
) -> None:
    keras_model, path, x = cnn
    model = _fresh(Cnn())
    with pytest.warns(
        weightport.UncheckedConfigWarning, match=r"write.* as Mul and Add.*'bn1', 'bn2', 'bn3'"
    ):
        report = weightport.load(model, path, example_inputs=(torch.from_numpy(x),) if example else None)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    _close(got, _run(path, x))
    _close(got, np.asarray(keras_model.predict(x, verbose=0)), 1e-4)
    for bn in ("bn1", "bn2", "bn3"):
        scale, shift = _scale_shift(keras_model, bn)
        module: Any = getattr(model, bn)
        assert np.array_equal(module.weight.detach().numpy(), scale)
        assert np.array_equal(module.bias.detach().numpy(), shift)
        assert not module.running_mean.any() and module.num_batches_tracked == 0
        assert torch.all(module.running_var == torch.tensor(1 - EPS))
    assert np.array_equal(model.conv1.bias.detach().numpy(), keras_model.get_layer("conv1").get_weights()[1])
    assert "BatchNorm as Mul and Add" in str(report)


def test_a_bias_free_twin_is_refused_with_the_fix_that_loads(cnn: tuple[Any, Path, np.ndarray]) -> None:
    """Folded, the BatchNorm would take the conv's bias and drop the Mul and Add; as those nodes, the conv
    must add its bias itself. The refusal says so (not "after an activation"); the fix is the twin above."""
    _, path, _ = cnn
    error = refused(
        _fresh(Cnn(bias=False)),
        path,
        r"'bn1' would be taken as a BatchNorm the exporter folded into 'conv1'.*right after it scale and shift.*"
        r"'conv1' must add the node's bias 'conv1/Squeeze:0' itself\. Fix: build 'conv1' with bias=True",
    )
    assert "activation" not in str(error) and "Fix: build 'dw' with bias=True" in str(error)


def test_a_zero_bias_leaves_both_readings_and_is_refused(tmp_path: Path) -> None:
    """An all-zero bias fits a folded BatchNorm's shift as well as a bias-free conv: both readings stand."""
    rng = np.random.default_rng(12)
    path = _tf2onnx_cnn(tmp_path / "zero.onnx", _keras_cnn(rng), conv_bias=np.zeros(4, np.float32))
    refused(
        _fresh(Cnn(bias=False)),
        path,
        r"'bn1', the BatchNorm after 'conv1', reads two ways: as node 'bn1/batchnorm/mul_1' \(Mul\) and "
        r"'bn1/batchnorm/add_1' \(Add\).*or as a BatchNorm the exporter folded into 'conv1'",
    )


def test_a_batchnorm_after_an_activation_is_refused_naming_it(tmp_path: Path) -> None:
    """Mul and Add past a Relu: the model's modules cannot show whether its BatchNorm runs before or after."""
    rng = np.random.default_rng(13)
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32),
        "shift": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "shift"], ["out"], name="add"),
    ]
    path = _save(tmp_path / "after.onnx", nodes, inits, [1, 8, 8, 3], [1, 4, 8, 8])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    refused(
        model,
        path,
        r"node 'mul' \(Mul\), 'add' \(Add\) after it, past 'relu' \(Relu\),.*after the activation",
    )


# --- a flatten whose target shape the graph computes ---------------------------------------------------------


def _keras_flat(rng: np.random.Generator) -> Any:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(5, name="fc")(keras.layers.Flatten()(x)))
    _randomize(model, rng)
    return model


def _tf2onnx_flat(path: Path, model: Any) -> Path:
    """tf2onnx's graph of :func:`_keras_flat` for a dynamic batch (the probe's out/c1e_bNone.onnx): the
    target shape is ``Concat(Slice(Cast(Gather(Shape(map), [0, 2, 3, 1])), 0, 1), [144])``."""
    kernel, bias = model.get_layer("conv").get_weights()
    dense, dense_bias = model.get_layer("fc").get_weights()
    inits = {
        "conv/kernel": kernel.transpose(3, 2, 0, 1).copy(),
        "conv/Squeeze:0": bias,
        "fc/kernel": dense,
        "fc/bias": dense_bias,
        "Const__28": np.array([0, 2, 3, 1], np.int64),
        "const_axes__15": np.array([0], np.int64),
        "const_ends__12": np.array([1], np.int64),
        "const_fold_opt__30": np.array([144], np.int32),
    }
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv/kernel", "conv/Squeeze:0"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1], name="Transpose__22"),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Gather", ["shape", "Const__28"], ["nhwc_shape"]),
        helper.make_node("Cast", ["nhwc_shape"], ["shape32"], to=TensorProto.INT32),
        helper.make_node(
            "Slice", ["shape32", "const_axes__15", "const_ends__12", "const_axes__15"], ["batch"]
        ),
        helper.make_node("Concat", ["batch", "const_fold_opt__30"], ["target32"], axis=0),
        helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["nhwc", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc/kernel"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "fc/bias"], ["out"]),
    ]
    return _save(path, nodes, inits, ["N", 8, 8, 3], ["N", 5])


class Flat(nn.Module):
    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.channels_last = nn.Conv2d(3, 4, 3), nn.Linear(144, 5), channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.fc((y.permute(0, 2, 3, 1) if self.channels_last else y).flatten(1))


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    rng = np.random.default_rng(14)
    model = _keras_flat(rng)
    path = _tf2onnx_flat(tmp_path_factory.mktemp("flat") / "flat.onnx", model)
    return model, path, rng.standard_normal((2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["torch-flatten", "permuted-flatten"])
def test_a_computed_flatten_shape_is_still_a_flatten(
    flat: tuple[Any, Path, np.ndarray], channels_last: bool
) -> None:
    keras_model, path, x = flat
    refused(
        _fresh(Flat(channels_last)),
        path,
        r"node 'fc/MatMul' \(MatMul\) reads a flattened channels-last map \(Transpose 'Transpose__22'.*"
        r"\(positions, channels: 4\).*Fix: pass example_inputs=",
        check_outputs=False,
    )
    model = _fresh(Flat(channels_last))
    weightport.load(model, path, example_inputs=(torch.from_numpy(x),), check_outputs=False)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    _close(got, _run(path, x))
    _close(got, np.asarray(keras_model.predict(x, verbose=0)), 1e-4)


# --- a GRU left in a Loop ------------------------------------------------------------------------------------


def test_a_gru_left_in_a_loop_is_named_from_its_weights_and_the_keras_file_loads(tmp_path: Path) -> None:
    """tf2onnx 1.17 leaves a Keras 3 GRU (reset_after=True, the default) in a Loop whose loop-carried inputs
    are its bias (2, 3H), kernel and recurrent kernel (the probe's out/c1f_GRU.onnx): the refusal says that,
    and the fix it gives (the Keras weights file) loads into nn.GRU with Keras's outputs."""
    rng = np.random.default_rng(15)
    inputs = keras.Input((6, 3))
    keras_model = keras.Model(
        inputs, keras.layers.Dense(2, name="fc")(keras.layers.GRU(4, name="gru")(inputs))
    )
    _randomize(keras_model, rng)
    kernel, recurrent, bias = keras_model.get_layer("gru").get_weights()
    names = [
        "gru/split/ReadVariableOp/resource:0",
        "gru/Cast/ReadVariableOp/resource:0",
        "gru/Cast_1/resource:0",
    ]
    carried = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["h", *names]]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"])]
        + [helper.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in carried],
        "while_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            *carried,
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(f"{v.name}_out", TensorProto.FLOAT, None) for v in carried],
    )
    inits = {
        "max": np.array(6, np.int64),
        "true": np.array(True),
        "zeros": np.zeros((1, 4), np.float32),
        names[0]: bias,
        names[1]: kernel,
        names[2]: recurrent,
        "fc/kernel": keras_model.get_layer("fc").get_weights()[0],
        "fc/bias": keras_model.get_layer("fc").get_weights()[1],
    }
    nodes = [
        helper.make_node("Loop", ["max", "true", "zeros", *names], ["h", "b", "k", "r"], name="gru/while_loop",
                         body=body),
        helper.make_node("MatMul", ["h", "fc/kernel"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc/bias"], ["out"]),
    ]  # fmt: skip
    path = _save(tmp_path / "gru.onnx", nodes, inits, ["N", 6, 3], ["N", 2])

    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.gru(x)[1][-1])

    error = refused(
        _fresh(Gru()),
        path,
        r"Loop node 'gru/while_loop' runs the recurrence.*their shapes are a Keras GRU\(reset_after=True\)'s "
        r"\(kernel \(3, 12\), recurrent kernel \(4, 12\), bias \(2, 12\)\).*Load the Keras weights file instead",
    )
    assert "computes what no PyTorch GRU does" not in str(error)
    keras_model.save_weights(tmp_path / "model.weights.h5")
    model = _fresh(Gru())
    with pytest.warns(weightport.UncheckedConfigWarning, match="GRU 'gru'"):  # a .weights.h5 has no config
        weightport.load(model, tmp_path / "model.weights.h5")
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    _close(got, np.asarray(keras_model.predict(x, verbose=0)), 1e-4)
