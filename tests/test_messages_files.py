"""Files: what weightport writes gets the user's umask (as np.savez's files do), still atomically; and a
file weightport does not read (a PyTorch pickle) is answered with the way to read it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import SourceError
from weightport.sources.files import atomic_write

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX's")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_gives_the_files_the_umasks_mode_as_np_savez_does(
    umask: None, tmp_path: Path, mask: int, expected: int, suffix: str
) -> None:
    os.umask(mask)
    model = nn.Linear(3, 2)
    path = weightport.save(model, tmp_path / f"model{suffix}")
    np.savez(tmp_path / "numpy.npz", x=np.zeros(2))
    assert mode(path) == expected == mode(tmp_path / "numpy.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "numpy.npz"])  # no temporary left
    loaded = nn.Linear(3, 2)
    weightport.load(loaded, path)
    assert torch.equal(loaded.weight, model.weight)


def test_writing_over_a_file_keeps_its_mode_as_writing_into_it_would(umask: None, tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    weightport.save(nn.Linear(3, 2), path)
    path.chmod(0o640)
    weightport.save(nn.Linear(3, 2), path)
    assert mode(path) == 0o640


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(umask: None, tmp_path: Path) -> None:
    def fail(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.npz", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin"])
def test_a_pytorch_pickle_says_to_read_it_with_torch_load_weights_only(tmp_path: Path, name: str) -> None:
    source = nn.GRU(3, 4)
    path = tmp_path / name
    torch.save(source.state_dict(), path)
    target = nn.GRU(3, 4)
    with pytest.raises(
        SourceError, match=r"a PyTorch pickle \(torch\.save\).*torch\.load\(.*weights_only=True\)"
    ):
        weightport.load(target, path)
    weightport.load(target, torch.load(path, weights_only=True))  # the fix, followed
    assert torch.equal(target.weight_hh_l0, source.weight_hh_l0)


def test_a_bin_file_that_is_no_pickle_is_not_called_one(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(12, dtype=np.float32).tobytes())
    with pytest.raises(SourceError, match="not a format weightport reads") as info:
        weightport.load(nn.Linear(3, 4), path)
    assert "torch.load" not in str(info.value)


def test_a_bad_value_in_a_flax_file_names_the_file(tmp_path: Path) -> None:
    """A NaN in a Flax .msgpack was refused naming the Flax layer alone ('in Flax 'Dense_0' (Dense)'), not the
    file it is in; rules whose origin names the file (ONNX, Keras) are unchanged."""
    serialization = pytest.importorskip("flax.serialization")
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    state = {"params": {"Dense_0": {"kernel": kernel, "bias": np.array([np.nan, 0.0], np.float32)}}}
    path = tmp_path / "nan.msgpack"
    path.write_bytes(serialization.msgpack_serialize(state))
    module = nn.Linear(3, 2)
    with pytest.raises(
        weightport.LoadError, match=r"NaN/Inf value .* in Flax 'Dense_0' \(Dense\) of 'nan\.msgpack'"
    ):
        weightport.load(module, path)
