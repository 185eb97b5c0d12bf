"""Each format's own rules, as its specification states them: a file that breaks one is a SourceError.

The files are made with the formats' real writers (safetensors' package, NumPy, zipfile), then
damaged in the one way each test names; the module must be unchanged after the refusal.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import weightport
from conftest import refused, snapshot
from weightport import SourceError
from weightport.inspect import describe_source

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _refused(path: Path, match: str) -> None:
    module = torch.nn.Linear(3, 2)
    before = snapshot(module)
    with pytest.raises(SourceError, match=match):
        weightport.load(module, path)
    assert snapshot(module) == before
    with pytest.raises(SourceError, match=match):
        describe_source(path)  # what `weightport inspect` shows


def _safetensors(tmp_path: Path) -> tuple[bytes, dict[str, object], bytes]:
    path = tmp_path / "ok.safetensors"
    safetensors_numpy.save_file(
        {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}, str(path)
    )
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return raw, json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write(path: Path, header_text: bytes, data: bytes) -> Path:
    path.write_bytes(len(header_text).to_bytes(8, "little") + header_text + data)
    return path


def test_safetensors_written_by_its_package_loads(tmp_path: Path) -> None:
    _safetensors(tmp_path)
    module = torch.nn.Linear(3, 2)
    weightport.load(module, tmp_path / "ok.safetensors")
    assert module.weight.sum().item() == 6.0


def test_safetensors_repeated_key_is_refused(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    text = json.dumps(header).encode()
    entry = json.dumps(header["bias"]).encode()
    repeated = text[:-1] + b', "bias": ' + entry + b"}"  # the same key twice, offsets that agree
    _refused(_write(tmp_path / "r.safetensors", repeated, data), r"the key 'bias' appears twice")


def test_safetensors_gap_in_the_data_buffer_is_refused(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    begin, end = header["weight"]["data_offsets"]
    header["weight"]["data_offsets"] = [begin + 8, end + 8]  # 8 bytes of nothing before it
    path = _write(tmp_path / "g.safetensors", json.dumps(header).encode(), data + bytes(8))
    _refused(path, r"belong to no tensor|the first tensor starts at byte 8")


def test_safetensors_trailing_bytes_are_refused(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    path = _write(tmp_path / "t.safetensors", json.dumps(header).encode(), data + b"appended")
    _refused(path, r"8 bytes follow the last tensor")


def test_safetensors_header_over_the_format_limit_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes((100_000_001).to_bytes(8, "little") + b"{}")
    _refused(path, r"over the format's limit of 100,000,000")


def test_safetensors_shape_contradicting_the_byte_span_is_refused(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    header["weight"]["shape"] = [3, 3]
    _refused(
        _write(tmp_path / "s.safetensors", json.dumps(header).encode(), data),
        r"declares shape \[3, 3\]|\(3, 3\)",
    )


def test_safetensors_overlapping_spans_are_refused(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    header["bias"]["data_offsets"] = [16, 24]  # inside the weight's bytes
    _refused(_write(tmp_path / "o.safetensors", json.dumps(header).encode(), data), r"overlap")


def test_safetensors_metadata_must_map_strings_to_strings(tmp_path: Path) -> None:
    _, header, data = _safetensors(tmp_path)
    header["__metadata__"] = {"format": ["pt"]}
    _refused(_write(tmp_path / "m.safetensors", json.dumps(header).encode(), data), r"__metadata__")


def _npz(tmp_path: Path) -> Path:
    path = tmp_path / "w.npz"
    np.savez(path, weight=np.ones((2, 3), np.float32), bias=np.zeros(2, np.float32))
    return path


def test_npz_two_members_of_one_name_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for value in (np.ones((2, 3), np.float32), np.full((2, 3), 7, np.float32)):
            with z.open("weight.npy", "w") as f:
                np.lib.format.write_array(f, value)
    _refused(path, r"two members are named 'weight.npy'")


def test_npz_member_flagged_as_encrypted_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path)
    raw = bytearray(path.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # the last member's central directory entry: its flag bits at +8
    struct.pack_into("<H", raw, central + 8, struct.unpack_from("<H", raw, central + 8)[0] | 1)
    path.write_bytes(bytes(raw))
    _refused(path, r"flagged as encrypted")


def test_npz_damaged_deflate_stream_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(
        path, weight=np.arange(6, dtype=np.float32).reshape(2, 3), bias=np.zeros(2, np.float32)
    )
    raw = bytearray(path.read_bytes())
    local = raw.find(b"PK\x03\x04")  # the first member: its data after the name and the extra field
    name_length, extra_length = struct.unpack_from("<HH", raw, local + 26)
    start = local + 30 + name_length + extra_length
    raw[start + 20 : start + 24] = b"\xff\xff\xff\xff"  # inside the deflate stream
    path.write_bytes(bytes(raw))
    _refused(path, r"corrupt|not a readable")


def test_npy_header_length_beyond_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "h.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + (2**31).to_bytes(4, "little") + b"{}")
    with pytest.raises(SourceError, match=r"header length 2147483648 outside 0..65536"):
        weightport.open_source(path)


def test_npy_header_that_does_not_tokenize_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    literal = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3"  # never closed
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(literal).to_bytes(2, "little") + literal)
    with pytest.raises(SourceError, match=r"not a valid .npy header"):
        weightport.open_source(path)


def test_an_empty_onnx_file_is_not_an_empty_model(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _refused(path, r"an empty file \(0 bytes\), not an ONNX model")


def _onnx_with_external_data(tmp_path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    return path


def test_a_truncated_onnx_file_is_a_source_error(tmp_path: Path) -> None:
    path = _onnx_with_external_data(tmp_path)
    raw = path.read_bytes()
    for cut in (1, len(raw) // 3, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(SourceError, match=r"'m.onnx'"):
            weightport.open_source(path)


def test_onnx_external_data_in_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = _onnx_with_external_data(tmp_path)
    (tmp_path / "m.data").unlink()
    os.mkfifo(tmp_path / "m.data")  # opening it for reading would wait for a writer forever
    with pytest.raises(SourceError, match=r"'m.data'.*not a regular file"):
        weightport.open_source(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x81\xa1a" * 5000 + b"\xc0", r"StackError"),  # maps nested 5000 deep
        (b"\xdf\xff\xff\xff\xff", r"exceeds max_map_len"),  # a map declaring 4,294,967,295 entries
        (b"\xdd\xff\xff\xff\xff", r"exceeds max_array_len"),
    ],
)
def test_msgpack_nesting_and_declared_sizes_are_bounded(tmp_path: Path, content: bytes, match: str) -> None:
    pytest.importorskip("msgpack")
    path = tmp_path / "w.msgpack"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=match):
        weightport.open_source(path)


def test_an_expanded_target_is_refused_before_anything_is_written() -> None:
    """A stride-0 buffer passed the checks and failed half-way through the writes, blaming the source ('the
    file changed while it was being read') with another buffer already written and not put back."""
    m = torch.nn.Module()
    m.register_buffer("a", torch.zeros(3))
    m.register_buffer("x", torch.zeros(1, 3).expand(4, 3))
    m.register_buffer("z", torch.zeros(3))
    arrays = {"a": np.ones(3), "x": np.arange(12.0).reshape(4, 3), "z": np.ones(3)}
    refused(m, arrays, r"'x': expected a tensor with memory of its own.*an expanded tensor")
    m.x = m.x.clone()  # the fix it names
    weightport.load(m, arrays)
    assert torch.equal(m.x, torch.arange(12.0).reshape(4, 3).float())


def test_targets_whose_memory_overlaps_in_part_are_refused() -> None:
    """Two parameters viewing overlapping parts of one storage: the load succeeded and 'a' held [1, 7, 8]
    where the source gave [1, 2, 3]. A tie (the same view twice) still loads; interleaved columns of one
    storage share no element and load."""
    base = torch.zeros(4)
    m = torch.nn.Module()
    m.a, m.b = torch.nn.Parameter(base[:3]), torch.nn.Parameter(base[1:])
    refused(
        m,
        {"a": np.array([1.0, 2, 3]), "b": np.array([7.0, 8, 9])},
        r"'b': .*shares part of its memory with 'a'",
    )
    grid = torch.zeros(3, 2)
    cols = torch.nn.Module()
    cols.register_buffer("left", grid[:, 0])
    cols.register_buffer("right", grid[:, 1])
    weightport.load(cols, {"left": np.array([1.0, 2, 3]), "right": np.array([4.0, 5, 6])})
    assert grid.tolist() == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
