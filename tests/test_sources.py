"""Readers: sharded safetensors, npz member safety, streaming memory, infos before data, mapped views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from torch import nn

import weightport
from conftest import snapshot
from weightport import LoadError, SourceError
from weightport.export import write_safetensors
from weightport.layouts import get_layout
from weightport.sources import open_source


def _state(module: nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in module.state_dict().items()}


def _shard(tmp_path, state: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    names = list(state)
    half = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file_name, keys in parts.items():
        write_safetensors({k: state[k] for k in keys}, tmp_path / file_name)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path / "model.safetensors.index.json", index


def test_sharded_index_and_folder_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lstm = nn.LSTM(3, 4, num_layers=2)
    state = _state(lstm)
    index_path, _ = _shard(tmp_path, state)
    for given in (index_path, tmp_path):
        fresh = nn.LSTM(3, 4, num_layers=2)
        weightport.load(fresh, given)
        for k, v in weightport.to_numpy(fresh).items():
            np.testing.assert_array_equal(v, state[k])


def test_shard_outside_the_folder_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lstm = nn.LSTM(3, 4)
    index_path, index = _shard(tmp_path, _state(lstm))
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="not a plain file name"):
        weightport.load(lstm, index_path)
    assert snapshot(lstm) == before


def test_shard_behind_a_link_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lstm = nn.LSTM(3, 4)
    index_path, _ = _shard(tmp_path, _state(lstm))
    shard = tmp_path / "model-00001-of-00002.safetensors"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    shard.rename(outside)
    os.symlink(outside, shard)
    with pytest.raises(SourceError, match="not followed"):
        weightport.load(lstm, index_path)


def _hub_cache(tmp_path, state):  # type: ignore[no-untyped-def]
    """A Hugging Face cache snapshot: every file a link to a hash-named blob with no suffix."""
    files = tmp_path / "files"
    files.mkdir()
    _shard(files, state)
    blobs, snapshot_dir = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot_dir.mkdir(parents=True)
    for i, path in enumerate(sorted(files.iterdir())):
        path.rename(blobs / f"{i:040x}")
        os.symlink(f"../../blobs/{i:040x}", snapshot_dir / path.name)
    return snapshot_dir


def test_hub_cache_links_load_by_the_name_given_or_say_how(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The user's own path is a link to a suffixless blob: read by the name given. Links found inside a
    folder or an index stay unfollowed, with the way out in the message."""
    lstm = nn.LSTM(3, 4)
    state = _state(lstm)
    snapshot_dir = _hub_cache(tmp_path, state)
    single = snapshot_dir / "single.safetensors"
    write_safetensors(state, tmp_path / "blobs" / "single")
    os.symlink("../../blobs/single", single)
    fresh = nn.LSTM(3, 4)
    weightport.load(fresh, single)
    for k, v in weightport.to_numpy(fresh).items():
        np.testing.assert_array_equal(v, state[k])
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="expected a value for each"):  # one shard, read by its given name
        weightport.load(fresh, snapshot_dir / "model-00001-of-00002.safetensors")
    with pytest.raises(SourceError, match=r"symbolic link.*snapshot_download\(repo_id, local_dir=...\)"):
        weightport.load(fresh, snapshot_dir / "model.safetensors.index.json")
    with pytest.raises(SourceError, match=r"are symbolic links.*local_dir="):
        open_source(snapshot_dir.parent / "rev" / ".." / "rev")  # the folder itself
    assert snapshot(fresh) == before


def test_a_folder_with_one_index_reads_what_it_lists(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A hub repository may keep consolidated.safetensors beside the shards: the index decides."""
    lstm = nn.LSTM(3, 4)
    state = _state(lstm)
    _shard(tmp_path, state)
    write_safetensors({"other." + k: v for k, v in state.items()}, tmp_path / "consolidated.safetensors")
    fresh = nn.LSTM(3, 4)
    report = weightport.load(fresh, tmp_path)
    assert "consolidated.safetensors (not listed in model.safetensors.index.json)" in report.ignored
    for k, v in weightport.to_numpy(fresh).items():
        np.testing.assert_array_equal(v, state[k])


def test_a_shard_the_index_lists_but_the_folder_lacks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    index_path, _ = _shard(tmp_path, _state(nn.LSTM(3, 4)))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        SourceError, match=r"model-00002-of-00002.safetensors': no such file. Fix: check"
    ) as info:
        open_source(index_path)
    assert "link" not in str(info.value)


def test_name_in_two_shards_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_safetensors({"weight": np.ones((2, 3), np.float32)}, tmp_path / "a.safetensors")
    write_safetensors(
        {"weight": np.ones((2, 3), np.float32), "bias": np.ones(2, np.float32)}, tmp_path / "b.safetensors"
    )
    with pytest.raises(SourceError, match="'weight' is in both"):
        open_source(tmp_path)


def test_index_naming_a_missing_tensor_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    index_path, index = _shard(tmp_path, _state(nn.Linear(3, 2)))
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError, match="no shard holds"):
        open_source(index_path)


def _zip_with_member(path, member: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)


def test_npz_member_climbing_out_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    buf = io.BytesIO()
    np.save(buf, np.ones(2))
    _zip_with_member(tmp_path / "bad.npz", "../bias.npy", buf.getvalue())
    with pytest.raises(SourceError, match="leaves the archive"):
        open_source(tmp_path / "bad.npz")


def test_npz_member_whose_header_lies_about_its_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    buf = io.BytesIO()
    np.save(buf, np.ones(1000))
    data = buf.getvalue()[:-4000]  # header says 1000 values; 500 are stored
    _zip_with_member(tmp_path / "bad.npz", "bias.npy", data)
    with pytest.raises(SourceError, match="declares shape"):
        open_source(tmp_path / "bad.npz")


def test_infos_come_before_any_data(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = write_safetensors({"w": np.ones((2, 3), np.float32)}, tmp_path / "m.safetensors")
    from weightport.sources import files

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("data read while listing")

    monkeypatch.setattr(files, "read_exact", refuse)
    src = open_source(path)
    assert src.infos["w"].shape == (2, 3)


STREAM_CHECK = textwrap.dedent(
    """
    import sys, tracemalloc, numpy as np, torch, weightport
    path, kind = sys.argv[1], sys.argv[2]
    model = torch.nn.LSTM(512, 512, num_layers=2)   # 16 tensors, 8.4 MB; largest 1 MB
    weightport.load(model, path)  # warm imports and caches
    tracemalloc.start()
    weightport.load(model, path)
    peak = tracemalloc.get_traced_memory()[1]
    largest = max(p.numel() * 4 for p in model.parameters())
    print(peak, largest)
    """
)


@pytest.mark.parametrize("kind", ["safetensors", "npz", "npy-folder", "keras-weights-h5"])
def test_file_loads_stream_through_at_most_one_tensor(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    model = nn.LSTM(512, 512, num_layers=2)
    state = _state(model)
    if kind == "keras-weights-h5":  # kernels transposed straight out of the mapped file: no tensor copied
        pytest.importorskip("h5py")
        weightport.load(model, state)
        path = tmp_path / "m.weights.h5"
        get_layout("keras").save_weights_h5(model, path)
    elif kind == "safetensors":
        path = write_safetensors(state, tmp_path / "m.safetensors")
    elif kind == "npz":
        path = tmp_path / "m.npz"
        np.savez(path, **state)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        for k, v in state.items():
            np.save(path / f"{k}.npy", v)
    script = tmp_path / "check.py"
    script.write_text(STREAM_CHECK)
    out = subprocess.run(
        [sys.executable, str(script), str(path), kind], capture_output=True, text=True, check=True
    ).stdout
    peak, largest = (int(x) for x in out.split())
    total = sum(v.nbytes for v in state.values())
    assert peak <= largest + 512 * 1024, (peak, largest, total)  # never more than one tensor beyond the model
    if kind == "keras-weights-h5":
        assert peak <= 512 * 1024, (peak, largest, total)


def _files_of_every_kind(tmp_path, state: dict[str, np.ndarray]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    paths: dict[str, object] = {"safetensors": write_safetensors(state, tmp_path / "m.safetensors")}
    np.savez(tmp_path / "stored.npz", **state)
    paths["npz stored"] = tmp_path / "stored.npz"
    folder = tmp_path / "folder"
    folder.mkdir()
    for k, v in state.items():
        np.save(folder / f"{k}.npy", np.asfortranarray(v) if k.startswith("weight_ih") else v)
    paths["npy folder (C and Fortran order)"] = folder
    paths["sharded"] = _shard(tmp_path, state)[0]
    return paths


def test_mapped_views_equal_the_values_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``mapped`` (no copy) gives exactly what ``read`` gives, read-only; unmappable data says None."""
    state = _state(nn.LSTM(8, 6, num_layers=2))
    for kind, path in _files_of_every_kind(tmp_path, state).items():
        with open_source(path) as source:
            for name in source.infos:
                view = source.mapped(name)
                assert view is not None, (kind, name)
                assert not view.flags.writeable, (kind, name)
                assert view.shape == state[name].shape and view.dtype == state[name].dtype
                assert np.array_equal(view, source.read(name)), (kind, name)
                assert np.array_equal(view, state[name]), (kind, name)
    np.savez_compressed(tmp_path / "small.npz", **state)
    with open_source(tmp_path / "small.npz") as source:
        assert all(source.mapped(name) is None for name in source.infos)
    with open_source(dict(state)) as source:
        assert all(source.mapped(name) is None for name in source.infos)


def test_mapped_keras_datasets_equal_what_h5py_reads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "m.weights.h5"
    get_layout("keras").save_weights_h5(nn.GRU(5, 7, num_layers=2), path)
    with open_source(path) as source, h5py.File(path, "r") as f:
        assert source.infos
        for name in source.infos:
            view = source.mapped(name)
            assert view is not None and not view.flags.writeable, name
            assert np.array_equal(view, f[name][()]), name
    chunked = tmp_path / "chunked.h5"
    with h5py.File(chunked, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones((4, 3), np.float32), chunks=(2, 3))
    with open_source(chunked) as source:
        assert all(source.mapped(name) is None for name in source.infos)


def test_mapped_view_of_a_truncated_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = _state(nn.Linear(64, 64))
    path = write_safetensors(state, tmp_path / "m.safetensors")
    with open_source(path) as source:
        os.truncate(path, os.path.getsize(path) - 100)  # shrinks after the source checked the sizes
        last = max(source.infos, key=lambda n: source.offsets[n])  # type: ignore[attr-defined]
        with pytest.raises(SourceError, match=f"tensor '{last}' ends at byte .* Fix"):
            source.mapped(last)


def test_none_in_a_mapping_is_no_tensor() -> None:
    """A pytree's empty slot (Flax 0.10's ``bias: None`` of a layer built without one) is listed, not read;
    a module tensor it leaves without a value is still an error that names it."""
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    linear = nn.Linear(2, 3, bias=False)
    report = weightport.load(linear, {"weight": weight, "bias": None}, strict=False)
    assert report.ignored == ["bias (None, not an array)"]
    assert np.array_equal(linear.weight.detach().numpy(), weight)
    with_bias = nn.Linear(2, 3)
    before = {k: v.clone().numpy() for k, v in with_bias.state_dict().items()}
    with pytest.raises(LoadError, match=r"'bias': expected a value for it"):
        weightport.load(with_bias, {"weight": weight, "bias": None})
    assert all(np.array_equal(before[k], v.numpy()) for k, v in with_bias.state_dict().items())


def test_torch_tensors_in_a_mapping_give_their_values_or_a_clear_refusal() -> None:
    import torch

    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    linear = nn.Linear(3, 2, bias=False)
    weightport.load(linear, {"weight": base.neg()._neg_view()})  # a lazy negation view
    assert np.array_equal(linear.weight.detach().numpy(), base.numpy())
    before = linear.weight.detach().clone()
    for value, found in (
        (base.to_sparse(), "a torch.sparse_coo tensor, not a dense one"),
        (torch.empty(2, 3, device="meta"), "a tensor on the meta device"),
    ):
        with pytest.raises(SourceError, match=found):
            weightport.load(linear, {"weight": value})
    assert torch.equal(linear.weight.detach(), before)


def test_a_closed_source_is_a_source_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    linear = nn.Linear(2, 2)
    write_safetensors(
        {k: v.detach().numpy() for k, v in linear.state_dict().items()}, tmp_path / "m.safetensors"
    )
    source = open_source(tmp_path / "m.safetensors")
    source.close()
    before = snapshot(linear)
    with pytest.raises(SourceError, match=r"reading 'm.safetensors' failed: .*the source was not closed"):
        weightport.load(linear, source)
    assert snapshot(linear) == before
