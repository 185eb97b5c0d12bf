"""``weightport inspect --json``: schema 1, the same keys for every framework, weights apart from constants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from weightport.cli import main
from weightport.inspect import describe_source, format_description

GOLDEN = Path(__file__).resolve().parent / "golden"
TOP = {
    "schema",
    "source",
    "layout",
    "tensors",
    "total_bytes",
    "constants",
    "constant_bytes",
    "layers",
    "ignored",
}
TENSOR = {"name", "shape", "dtype", "bytes", "layer", "variable"}
LAYER = {"name", "kind", "config", "tensors", "variables", "not_ported"}


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads(json.dumps(describe_source(path)))
    return info  # type: ignore[no-any-return]


def _same_keys(info: dict) -> None:  # type: ignore[type-arg]
    assert set(info) == TOP and info["schema"] == 1
    for entry in info["tensors"] + info["constants"]:
        assert set(entry) == TENSOR
    for layer in info["layers"]:
        assert set(layer) == LAYER and isinstance(layer["config"], dict)
        assert set(layer["variables"]) <= set(layer["tensors"])
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["constant_bytes"] == sum(t["bytes"] for t in info["constants"])


def test_a_plain_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, weight=np.ones((2, 3), np.float32))
    info = _inspect(path, capsys)
    _same_keys(info)
    assert info["source"] == str(path) and info["layout"] == "torch"  # the path as given, not "'w.npz'"
    assert info["tensors"] == [
        {"name": "weight", "shape": [2, 3], "dtype": "float32", "bytes": 24, "layer": None, "variable": None}
    ]
    assert info["constants"] == [] and info["layers"] == [] and info["ignored"] == []


@pytest.mark.parametrize(
    "name", ["keras/model.keras", "keras/model.weights.h5", "flax/lstm.msgpack", "onnx/lstm.onnx"]
)
def test_framework_files_have_the_same_keys(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect(GOLDEN / name, capsys)
    _same_keys(info)
    assert info["source"] == str(GOLDEN / name) and info["layers"]
    held = {t for layer in info["layers"] for t in layer["tensors"]}
    assert held <= {t["name"] for t in info["tensors"]}
    for entry in info["tensors"]:
        if entry["layer"] is not None:
            layer = next(layer for layer in info["layers"] if layer["name"] == entry["layer"])
            assert entry["name"] in layer["tensors"] and entry["variable"] == layer["variables"].get(
                entry["name"]
            )


def test_flax_layers_have_config_and_variables(capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect(GOLDEN / "flax/lstm.msgpack", capsys)
    [cell] = info["layers"]
    assert cell["config"] == {} and cell["variables"]["params/cell/hf/bias"] == "hf/bias"
    assert {t["variable"] for t in info["tensors"]} >= {"ii/kernel", "hf/bias"}


def test_keras_variables_are_the_frameworks_names(capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect(GOLDEN / "keras/model.keras", capsys)
    lstm = next(layer for layer in info["layers"] if layer["name"] == "lstm")
    assert sorted(lstm["variables"].values()) == ["bias", "kernel", "recurrent_kernel"]
    assert lstm["config"]["units"] == 4 and lstm["not_ported"] is None


def test_onnx_shape_constants_are_not_weights(capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect(GOLDEN / "onnx/lstm.onnx", capsys)
    assert info["tensors"] and all(t["dtype"] == "float32" and t["layer"] for t in info["tensors"])
    assert any(c["dtype"] == "int64" for c in info["constants"])
    assert {c["name"] for c in info["constants"]}.isdisjoint(t["name"] for t in info["tensors"])
    assert main(["inspect", str(GOLDEN / "onnx/lstm.onnx")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("'lstm.onnx': 6 tensors, 2,944 bytes (layout onnx)")
    assert "Graph constants (not weights): " in text and "int64" not in text.split("Graph constants")[0]


def test_ignored_entries_are_name_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serialization = pytest.importorskip("flax.serialization")
    path = tmp_path / "state.msgpack"
    path.write_bytes(
        serialization.msgpack_serialize(
            {"params": {"Dense_0": {"kernel": np.ones((2, 3), np.float32)}}, "step": 3}
        )
    )
    info = _inspect(path, capsys)
    _same_keys(info)
    assert info["ignored"] and set(info["ignored"][0]) == {"name", "reason"}
    assert info["ignored"][0]["name"] == "step" and "not an array" in info["ignored"][0]["reason"]
    assert "Ignored: step (" in format_description(info)
