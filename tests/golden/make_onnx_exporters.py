"""Regenerate tests/golden/onnx_exporters/: ONNX files from exporters other than the ones the main tests run.

tests/test_onnx.py builds graphs with onnx.helper and exports with torch.onnx.export (opset 17, both
exporters). The files here come from:

- tf2onnx (``tf2onnx.convert.from_keras``) on Keras 2 models: LSTM, GRU (``reset_after=True``, written as
  ``linear_before_reset=1``), Bidirectional, stacked layers, Dense on 3-D input (MatMul -> Reshape -> Add),
  Conv1D (Unsqueeze -> 2-D Conv -> Squeeze -> Add), at opsets 9 and 13; and SimpleRNN and
  ``GRU(reset_after=False)``, which tf2onnx leaves as a ``Loop`` over the cell's ops (refused);
- ``torch.onnx.export(dynamo=False)`` at opsets 9, 11 and 13, and the opset-13 file re-saved three ways:
  weights as external data, weights as ``Constant`` nodes, and weights as float16 initializers each read
  through a ``Cast`` to float32 (as float16 storage converters write them); plus a model that applies one
  Linear twice and ties an Embedding to its output layer (``Identity`` nodes, shared initializers).

``io.npz`` holds, for each file ``<name>.onnx``, the input ``<name>/x`` and onnxruntime's output
``<name>/y`` (outputs of the refused files are not recorded). tests/test_onnx_exporters.py loads each
file into the equivalent PyTorch model and compares, without TensorFlow or onnxruntime.

Needs TensorFlow 2.15 (Keras 2), tf2onnx, onnx, onnxruntime and torch, in a scratch environment (tf2onnx
supports TensorFlow 2.13-2.15, which pins NumPy < 2 and ml_dtypes 0.3, hence onnx 1.17)::

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.17.0 onnx==1.17.0 'onnxruntime<1.24' torch==2.13.0
    /tmp/tfenv/bin/python tests/golden/make_onnx_exporters.py
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_exporter_models import Mixed, Shared  # beside this script: the test loads into the same models
from torch import nn

HERE = Path(__file__).parent / "onnx_exporters"
B, T, F = 2, 5, 3  # batch, time steps, features


# --- tf2onnx ---------------------------------------------------------------------------------------------


def keras_models() -> dict[str, tuple[Callable[[], Any], int]]:
    """name -> (builder of the Keras model, opset). The PyTorch twins are in tests/test_onnx_exporters.py."""
    import tensorflow as tf

    layers = tf.keras.layers

    def model(*stack: Callable[[], Any]) -> Callable[[], Any]:
        def build() -> Any:
            tf.keras.backend.clear_session()  # layer names restart at model/lstm/..., whatever came before
            x = tf.keras.Input((T, F))
            y = x
            for layer in stack:
                y = layer()(y)
            return tf.keras.Model(x, y)

        return build

    def bigru_lstm() -> Callable[[], Any]:
        return model(
            lambda: layers.Bidirectional(layers.GRU(4, return_sequences=True)),
            lambda: layers.LSTM(3),
            lambda: layers.Dense(2),
        )

    return {
        "tf_lstm_dense": (model(lambda: layers.LSTM(4, return_sequences=True), lambda: layers.Dense(2)), 13),
        "tf_bigru_lstm": (bigru_lstm(), 13),
        "tf_bigru_lstm_op9": (bigru_lstm(), 9),
        "tf_bilstm": (model(lambda: layers.Bidirectional(layers.LSTM(4))), 13),
        "tf_conv1d": (
            model(
                lambda: layers.Conv1D(4, 3, padding="same", activation="relu"),
                layers.Flatten,
                lambda: layers.Dense(2),
            ),
            13,
        ),
        "tf_simplernn": (model(lambda: layers.SimpleRNN(4, return_sequences=True)), 13),
        "tf_gru_reset_before": (model(lambda: layers.GRU(4, reset_after=False, return_sequences=True)), 13),
        # 'same' with stride 2 on 5 steps, kernel 4: 3 steps of padding, 1 before and 2 after (uneven pads)
        "tf_conv1d_same_stride2": (
            model(lambda: layers.Conv1D(4, 4, strides=2, padding="same"), layers.GlobalAveragePooling1D),
            13,
        ),
        # normalizations tf2onnx writes as arithmetic (refused): LayerNormalization as a BatchNormalization
        # over computed moments, then Mul and Add; a BatchNormalization after an activation as Mul and Add
        "tf_layernorm": (
            model(lambda: layers.Dense(4), lambda: layers.LayerNormalization(), lambda: layers.Dense(2)),
            13,
        ),
        "tf_dense_relu_bn": (
            model(
                lambda: layers.Dense(4, activation="relu"),
                layers.BatchNormalization,
                lambda: layers.Dense(2),
            ),
            13,
        ),
    }


REFUSED = ("tf_simplernn", "tf_gru_reset_before", "tf_layernorm", "tf_dense_relu_bn")  # no outputs needed


def write_keras(arrays: dict[str, np.ndarray]) -> None:
    import tensorflow as tf
    import tf2onnx

    tf.random.set_seed(0)
    rng = np.random.default_rng(1)
    for name, (build, opset) in keras_models().items():
        model = build()
        for weight in model.weights:  # every weight random, biases too (tf2onnx drops an Add of zeros)
            low = 0.5 if "variance" in weight.name else -0.6  # a BatchNorm's moving variance stays positive
            weight.assign(rng.uniform(low, low + 1.2, weight.shape).astype(np.float32))
        spec = [tf.TensorSpec((None, T, F), tf.float32, name="x")]
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
        path = HERE / f"{name}.onnx"
        onnx.save(proto, str(path))
        if name in REFUSED:
            continue
        x = rng.standard_normal((B, T, F)).astype(np.float32)
        (y,) = run(path, {"x": x})
        keras_y = model(x).numpy()
        assert np.abs(y - keras_y).max() < 1e-5, (name, np.abs(y - keras_y).max())
        arrays[f"{name}/x"], arrays[f"{name}/y"] = x, y


# --- torch.onnx.export (TorchScript exporter) --------------------------------------------------------------


def torch_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and batch-size advice
        torch.onnx.export(model.eval(), (x,), str(path), opset_version=opset, dynamo=False, input_names=["x"])


def as_constants(model: onnx.ModelProto) -> None:
    """Every initializer becomes a Constant node at the top of the graph, as some converters write."""
    nodes = [
        helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
        for i, t in enumerate(model.graph.initializer)
    ]
    model.graph.ClearField("initializer")
    rest = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes + rest)


def as_float16(model: onnx.ModelProto) -> None:
    """Float initializers stored as float16 and cast back to float32 where they are used.

    Half of them hold their values as raw bytes, half in ``int32_data`` (both are valid encodings).
    """
    casts, inits = [], []
    for i, t in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(t)
        if array.dtype != np.float32:
            inits.append(t)
            continue
        half = array.astype(np.float16)
        if i % 2:
            stored = numpy_helper.from_array(half, f"{t.name}_fp16")
        else:
            stored = TensorProto(name=f"{t.name}_fp16", data_type=TensorProto.FLOAT16, dims=half.shape)
            stored.int32_data.extend(half.reshape(-1).view(np.uint16).astype(np.int32).tolist())
        inits.append(stored)
        casts.append(
            helper.make_node("Cast", [stored.name], [t.name], name=f"cast_{i}", to=TensorProto.FLOAT)
        )
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(inits)
    rest = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(casts + rest)


def write_torch(arrays: dict[str, np.ndarray]) -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():  # float16-representable weights, so the float16 file computes the same thing
        for p in model.parameters():
            p.copy_(p.half().float())
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((B, T, F)).astype(np.float32))
    for opset in (9, 11, 13):
        path = HERE / f"torch_op{opset}.onnx"
        torch_export(model, x, path, opset)
        record(path, {"x": x.numpy()}, arrays)
    base = onnx.load(str(HERE / "torch_op13.onnx"))

    external = onnx.ModelProto()
    external.CopyFrom(base)
    path = HERE / "torch_external.onnx"
    onnx.save_model(
        external,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="torch_external.onnx.data",
        size_threshold=0,
    )
    record(path, {"x": x.numpy()}, arrays)

    for name, change in (("torch_constants", as_constants), ("torch_float16", as_float16)):
        changed = onnx.ModelProto()
        changed.CopyFrom(base)
        change(changed)
        onnx.checker.check_model(changed)
        path = HERE / f"{name}.onnx"
        onnx.save(changed, str(path))
        record(path, {"x": x.numpy()}, arrays)

    torch.manual_seed(0)
    ids = torch.randint(0, 7, (B, T))
    path = HERE / "torch_shared.onnx"
    torch_export(Shared(), ids, path, 13)
    record(path, {"x": ids.numpy()}, arrays)


# --- shared ----------------------------------------------------------------------------------------------


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def record(path: Path, feeds: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
    (y,) = run(path, feeds)
    arrays[f"{path.stem}/x"], arrays[f"{path.stem}/y"] = feeds["x"], y


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.iterdir():
        old.unlink()
    arrays: dict[str, np.ndarray] = {}
    write_keras(arrays)
    write_torch(arrays)
    np.savez_compressed(HERE / "io.npz", **arrays)
    total = sum(p.stat().st_size for p in HERE.iterdir())
    print(f"wrote {len(list(HERE.iterdir()))} files, {total} bytes, to {HERE}")


if __name__ == "__main__":
    main()
