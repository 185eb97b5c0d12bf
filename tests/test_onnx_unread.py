"""A stored tensor that only arithmetic nodes read (tf2onnx writes a Keras BatchNormalization as Mul and Add
by two stored vectors): the strict refusal says which nodes read it, and that strict=False is right only
where the model does that arithmetic by itself; where the model has a BatchNorm there, taking it as folded
into the layer before would drop those values (strict=False loaded 2.2 off): refused with both readings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import refused

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

N = 8


def _dense_relu_bn_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Dense, ReLU, then a BatchNorm as tf2onnx writes it after an activation: Mul and Add by two stored
    vectors."""
    rng = np.random.default_rng(2)
    arrays = {
        "dense/kernel": rng.standard_normal((N, N)),
        "dense/bias": rng.standard_normal(N),
        "bn/mul": rng.uniform(0.5, 1.5, N),
        "bn/sub": rng.standard_normal(N),
        "dense_1/kernel": rng.standard_normal((N, N)),
        "dense_1/bias": rng.standard_normal(N),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "dense/kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["dense"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["dense"], ["relu"], name="relu"),
        helper.make_node("Mul", ["relu", "bn/mul"], ["scaled"], name="bn/mul_1"),
        helper.make_node("Add", ["scaled", "bn/sub"], ["bn"], name="bn/add_1"),
        helper.make_node("MatMul", ["bn", "dense_1/kernel"], ["mm_1"], name="dense_1/MatMul"),
        helper.make_node("Add", ["mm_1", "dense_1/bias"], ["out"], name="dense_1/BiasAdd"),
    ]
    graph = helper.make_graph(
        nodes,
        "dense_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()],
    )
    path = tmp_path / "dense_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path, {k: v.astype(np.float32) for k, v in arrays.items()}


def test_arithmetic_by_stored_vectors_is_refused_naming_its_nodes(tmp_path: Path) -> None:
    """A model with no BatchNorm there: the vectors are unplaced, and the message says what reads them."""
    path, _ = _dense_relu_bn_file(tmp_path)
    model = nn.Sequential(nn.Linear(N, N), nn.ReLU(), nn.Linear(N, N)).eval()
    refused(
        model,
        path,
        r"'bn/mul': expected a tensor the layout can place.*read by node 'bn/mul_1' \(Mul\).*"
        r"a BatchNorm written as Mul and Add\), strict=False would not give that layer these values",
    )


@pytest.mark.parametrize("strict", [True, False])
def test_a_batchnorm_written_as_mul_and_add_is_not_taken_as_folded(tmp_path: Path, strict: bool) -> None:
    """The model's BatchNorm after the Linear would be taken as folded into it (no BatchNormalization node),
    dropping the Mul and Add: strict=False loaded 2.2 off. Both readings are refused; the values the message
    names, loaded by name, give onnxruntime's outputs."""
    ort = pytest.importorskip("onnxruntime")
    path, arrays = _dense_relu_bn_file(tmp_path)
    model = nn.Sequential(nn.Linear(N, N), nn.ReLU(), nn.BatchNorm1d(N), nn.Linear(N, N)).eval()
    refused(
        model,
        path,
        r"'2' would be taken as a BatchNorm the exporter folded into '0'.*node 'bn/mul_1' \(Mul\), "
        r"'bn/add_1' \(Add\).*\('bn/mul', 'bn/sub'\).*Two readings",
        strict=strict,
        example_inputs=torch.zeros(2, N),
    )
    weightport.load(
        model,
        {
            "0.weight": arrays["dense/kernel"].T,
            "0.bias": arrays["dense/bias"],
            "2.weight": arrays["bn/mul"],
            "2.bias": arrays["bn/sub"],
            "2.running_mean": np.zeros(N, np.float32),
            "2.running_var": np.full(N, 1 - model[2].eps, np.float32),
            "3.weight": arrays["dense_1/kernel"].T,
            "3.bias": arrays["dense_1/bias"],
        },
        strict=False,
    )
    x = np.random.default_rng(0).standard_normal((1, N)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_weight_read_through_a_narrowing_cast_is_refused_naming_the_cast(tmp_path: Path) -> None:
    """float64 storage that a Cast rounds to float32 before the Gemm: the refusal names the Cast (it blamed
    constant folding alone); converting the array as the Cast does and loading it by name, as the fix says,
    gives onnxruntime's outputs."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(3)
    w64, b64 = rng.standard_normal((N, N)), rng.standard_normal(N)  # not exact in float32
    nodes = [
        helper.make_node("Cast", ["w64"], ["weight"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["b64"], ["bias"], name="cast_b", to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["x", "weight", "bias"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])],
        [numpy_helper.from_array(w64, "w64"), numpy_helper.from_array(b64, "b64")],
    )
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = nn.Linear(N, N)
    refused(
        model,
        path,
        r"'w64': expected a tensor the layout can place.*stored as float64 and read through node 'cast_w' "
        r"\(Cast to float32\), which rounds.*array\.astype\('float32'\)",
    )
    weightport.load(model, {"weight": w64.astype("float32"), "bias": b64.astype("float32")})
    x = rng.standard_normal((2, N)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
