"""What a probe found in export and in the readers: names save must refuse, damaged headers and names,
messages that misnamed the problem, Keras's export of nn.MultiheadAttention, and the summed RNN biases."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import weightport
from weightport.layouts import get_layout


def _linear_state() -> tuple[torch.nn.Linear, dict[str, torch.Tensor]]:
    model = torch.nn.Linear(3, 2)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def damaged_onnx(folder: Path, old: bytes, new: bytes) -> Path:
    """A one-Gemm ONNX model whose serialized bytes have ``old`` replaced by ``new`` (same length)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc.weight")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "fc.bias")
    node = helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight, bias],
    )
    data = helper.make_model(graph).SerializeToString()
    assert len(old) == len(new) and old in data
    path = folder / "model.onnx"
    path.write_bytes(data.replace(old, new))
    assert onnx.load(str(path), load_external_data=False)  # protobuf reads it: the bytes are only not UTF-8
    return path


# 1. ONNX names that are not UTF-8


def test_onnx_round_trip_still_loads(tmp_path) -> None:
    path = damaged_onnx(tmp_path, b"transB", b"transB")
    model = torch.nn.Linear(3, 2)
    weightport.load(model, path)
    assert torch.equal(model.weight, torch.ones(2, 3))


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        (b"transB", b"\xffransB", "node 0 (Gemm 'fc'): an attribute name is b'\\xffransB'"),
        (b"fc.bias", b"fc.b\xffas", "initializer 1 is b'fc.b\\xffas'"),
    ],
)
def test_undecodable_onnx_names_are_a_source_error(tmp_path, old, new, where) -> None:
    path = damaged_onnx(tmp_path, old, new)
    model, before = _linear_state()
    with pytest.raises(weightport.SourceError) as info:
        weightport.load(model, path)
    text = str(info.value)
    assert text.startswith("'model.onnx': ") and where in text
    assert "not UTF-8 text" in text and text.endswith("Fix: re-export or re-download it.")
    assert _unchanged(model, before)


def test_an_undecodable_node_name_is_refused_not_replaced(tmp_path) -> None:
    path = damaged_onnx(tmp_path, b"\x1a\x02fc", b"\x1a\x02f\xff")  # the node's name field
    with pytest.raises(weightport.SourceError, match=r"node 0 \(Gemm 'f\ufffd'\): its name is b'f\\xff'"):
        weightport.open_source(path)


# 2. save refuses names its files cannot give back


@pytest.mark.parametrize(
    ("name", "suffix", "why"),
    [
        ("__metadata__", "safetensors", "the format keeps that header key for the file's metadata"),
        ("\\back", "npz", "would leave the archive"),
        ("nul\x00", "npz", "it holds a NUL byte"),
    ],
)
def test_save_refuses_names_load_would_refuse(tmp_path, name, suffix, why) -> None:
    module = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.randn(2))})
    path = tmp_path / f"n.{suffix}"
    with pytest.raises(weightport.SourceError) as info:
        weightport.save(module, path)
    text = str(info.value)
    assert text.startswith(f"{name!r}: cannot be saved to 'n.{suffix}': ") and why in text
    assert "Fix: save to ." in text
    assert not path.exists()
    other = tmp_path / f"n.{'npz' if suffix == 'safetensors' else 'safetensors'}"
    weightport.save(module, other)  # the fix, followed: the other format keeps the name
    fresh = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.zeros(2))})
    weightport.load(fresh, other)
    assert torch.equal(fresh[name], module[name])


@pytest.mark.parametrize("name", ["file", "allow_pickle", "a/b", "x.npy"])
def test_npz_names_np_savez_would_take_for_its_arguments_round_trip(tmp_path, name) -> None:
    arrays = {name: np.arange(3, dtype=np.float32), "other": np.ones(2, np.float32)}
    path = weightport.save(arrays, tmp_path / "n.npz")
    with weightport.open_source(path) as source:
        assert sorted(source.infos) == sorted(arrays)
        assert np.array_equal(source.read(name), arrays[name])
    with np.load(path) as loaded:  # still a file NumPy reads
        assert np.array_equal(loaded[name], arrays[name])


def test_save_refuses_a_climbing_name_in_a_dict(tmp_path) -> None:
    with pytest.raises(
        weightport.SourceError, match=r"^'a/../b': cannot be saved to 'n.npz': .* leave the archive"
    ):
        weightport.save({"a/../b": np.ones(2)}, tmp_path / "n.npz")


def test_save_refuses_object_arrays(tmp_path) -> None:
    with pytest.raises(weightport.SourceError, match=r"'x': cannot be saved to 'n.npz': an array of Python"):
        weightport.save({"x": np.array([{}, 1], dtype=object)}, tmp_path / "n.npz")


# 3. safetensors headers and BOOL bytes


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


WEIGHT = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize("offsets", [[24.0, 32], [24, 32.5], [True, 32]])
def test_non_integer_data_offsets_are_corrupt(tmp_path, offsets) -> None:
    header = {"weight": WEIGHT, "bias": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}
    path = _safetensors(tmp_path / "f.safetensors", header, bytes(32))
    model, before = _linear_state()
    with pytest.raises(weightport.SourceError) as info:
        weightport.load(model, path)
    text = str(info.value)
    assert "'f.safetensors': tensor 'bias' has a malformed header entry" in text
    assert "expected integer 'shape' and 'data_offsets'" in text and "the file is corrupt" in text
    assert _unchanged(model, before)


@pytest.mark.parametrize("check_values", [True, False])
def test_bool_bytes_other_than_0_and_1_are_corrupt(tmp_path, check_values) -> None:
    header = {"weight": WEIGHT, "bias": {"dtype": "BOOL", "shape": [2], "data_offsets": [24, 26]}}
    path = _safetensors(tmp_path / "b.safetensors", header, bytes(24) + b"\x01\x07")
    model, before = _linear_state()
    with pytest.raises(weightport.SourceError) as info:
        weightport.load(model, path, check_values=check_values)
    text = str(info.value)
    assert text.startswith("'b.safetensors': tensor 'bias' is BOOL but holds byte 7 at index (1,)")
    assert "a BOOL is stored as 0 or 1" in text and "Fix: re-create or re-download it." in text
    assert _unchanged(model, before)


def test_bool_round_trip(tmp_path) -> None:
    mask = np.array([[True, False], [False, True]])
    path = weightport.save({"mask": mask}, tmp_path / "m.safetensors")
    with weightport.open_source(path) as source:
        assert np.array_equal(source.read("mask"), mask)


# 6. messages that named the wrong problem


def test_saving_a_sparse_tensor_says_sparse_and_its_fix_works(tmp_path) -> None:
    module = torch.nn.Module()
    module.register_buffer("t", torch.eye(3).to_sparse())
    with pytest.raises(weightport.SourceError) as info:
        weightport.save(module, tmp_path / "s.npz")
    text = str(info.value)
    assert text.startswith("'t': a sparse tensor (torch.sparse_coo)") and "dtype" not in text
    path = tmp_path / "s.npz"
    weightport.save({k: v.to_dense().numpy() for k, v in module.state_dict().items()}, path)  # the fix
    with weightport.open_source(path) as source:
        assert np.array_equal(source.read("t"), np.eye(3, dtype=np.float32))


def test_saving_a_meta_tensor_names_it(tmp_path) -> None:
    module = torch.nn.Module()
    module.register_buffer("t", torch.empty(3, device="meta"))
    with pytest.raises(weightport.SourceError, match=r"^'t': a tensor on the meta device"):
        weightport.save(module, tmp_path / "m.npz")


def test_a_shard_that_is_a_folder_has_a_fix(tmp_path) -> None:
    weightport.save({"weight": np.ones((2, 3), np.float32)}, tmp_path / "a.safetensors")
    (tmp_path / "sub").mkdir()
    index = {"metadata": {}, "weight_map": {"weight": "a.safetensors", "bias": "sub"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(weightport.SourceError) as info:
        weightport.load(torch.nn.Linear(3, 2), tmp_path)
    assert "shard 'sub' is a folder, where the index expects a .safetensors file. Fix: " in str(info.value)


def test_an_upper_case_npy_suffix_gets_the_file_name_to_use(tmp_path) -> None:
    np.save(tmp_path / "weight.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "bias.NPY", np.zeros(2, np.float32))  # np.save writes bias.NPY.npy
    with pytest.raises(weightport.LoadError) as info:
        weightport.load(torch.nn.Linear(3, 2), tmp_path)
    text = str(info.value)
    assert "bias.NPY.npy (np.save added '.npy' after '.NPY': rename it bias.npy)" in text
    assert "rename it to 'bias'" not in text
    os.rename(tmp_path / "bias.NPY.npy", tmp_path / "bias.npy")  # the fix, followed
    weightport.load(torch.nn.Linear(3, 2), tmp_path)


def test_a_config_without_model_type_compares_no_model_type() -> None:
    pytest.importorskip("transformers")
    from weightport.snapshot_config import snapshot_config_checks

    class Config:
        def to_dict(self) -> dict:
            return {"model_type": "bert", "hidden_act": "gelu"}

    class Model(torch.nn.Module):
        base_model_prefix = "bert"
        config = Config()

    problems, notes = snapshot_config_checks(Model(), {"hidden_act": "gelu"}, "'snap'")  # type: ignore[misc]
    assert not [p for p in problems if "model_type" in p.name]
    assert any("records no model_type" in note for note in notes)
    problems, notes = snapshot_config_checks(Model(), {"model_type": "gpt2"}, "'snap'")  # type: ignore[misc]
    assert [p.name for p in problems if "model_type" in p.name] == ["config.model_type"]


# 7. Keras export of nn.MultiheadAttention


def test_keras_export_of_a_bare_multihead_attention_loads_back() -> None:
    source = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    arrays = get_layout("keras").export(source)
    assert not any(k.startswith("layers/dense") for k in arrays)  # out_proj is output_dense, once
    target = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(target, arrays, layout="keras")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


# 8. the summed RNN biases, said


@pytest.mark.parametrize("layout", ["keras", "flax"])
def test_summed_biases_are_noted_and_outputs_survive(layout) -> None:
    torch.manual_seed(0)
    source = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    arrays = get_layout(layout).export(source)
    assert len(arrays.notes) == 4  # two layers, two directions
    assert "bias_ih_l0 + bias_hh_l0" in arrays.notes[0] and "not the same tensors" in arrays.notes[0]
    target = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(target, arrays, layout=layout)
    x = torch.randn(5, 2, 3)
    assert torch.allclose(source(x)[0], target(x)[0], atol=1e-6)
    assert not torch.equal(source.bias_hh_l0, target.bias_hh_l0) or not torch.equal(
        source.bias_ih_l0, target.bias_ih_l0
    )


def test_layers_without_two_biases_have_no_notes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GRU(4, 2))
    assert get_layout("keras").export(model).notes == []  # Keras's GRU keeps both biases
