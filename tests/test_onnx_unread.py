"""A stored tensor that only arithmetic nodes read (tf2onnx writes a Keras BatchNormalization as Mul and Add
by two stored vectors): the strict refusal says which nodes read it, and that strict=False is right only
where the model does that arithmetic by itself; it said 'the module has a value for every tensor without
it', and strict=False then loaded without the BatchNorm's values (2.2 off)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from conftest import refused

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

N = 8


def test_a_batchnorm_written_as_mul_and_add_is_refused_naming_its_nodes(tmp_path: Path) -> None:
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
    model = nn.Sequential(nn.Linear(N, N), nn.ReLU(), nn.BatchNorm1d(N), nn.Linear(N, N)).eval()
    refused(
        model,
        path,
        r"'bn/mul': expected a tensor the layout can place.*read by node 'bn/mul_1' \(Mul\).*"
        r"a BatchNorm written as Mul and Add\), strict=False would not give that layer these values",
    )
