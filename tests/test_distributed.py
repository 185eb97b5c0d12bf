"""Sharded models on torch.distributed (gloo, CPU): each rank reads only its own shard.

The box algebra and the region reads are tested in this process; the loads run in
2 and 3 processes started with ``torch.multiprocessing.spawn`` (one start per
world size, every check inside it), and compare each loaded DTensor, gathered,
with a single-process load of the same file.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from weightport.boxes import region_pieces
from weightport.distributed import has_dtensors
from weightport.errors import LoadError, UncheckedConfigWarning
from weightport.export import write_safetensors
from weightport.layouts import get_layout
from weightport.layouts.keras import save_weights_h5
from weightport.sources import open_source
from weightport.sources.files import contiguous_runs
from weightport.transforms import (
    Chain,
    Concat,
    Identity,
    Op,
    PadBlocks,
    ReorderBlocks,
    Reshape,
    Select,
    SliceBlocks,
    Stack,
    Sum,
    Transpose,
    Zeros,
)

dist = torch.distributed
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)

# ---- boxes through transforms (one process) -----------------------------------------------------------

CASES: list[tuple[Op, list[tuple[int, ...]]]] = [
    (Identity(), [(5, 3)]),
    (Transpose((1, 0)), [(4, 6)]),
    (Chain(ReorderBlocks(1, (1, 0, 2)), Transpose((1, 0))), [(2, 6)]),  # Keras GRU kernel
    (Chain(Select(1, 2), ReorderBlocks(0, (1, 0, 2))), [(2, 6)]),  # Keras GRU bias
    (Chain(Concat(1, 4), Transpose((1, 0))), [(3, 2)] * 4),  # Flax LSTM gate kernels
    (Chain(Stack(2), ReorderBlocks(1, (1, 0, 2))), [(6,), (6,)]),
    (PadBlocks(0, 2, 3), [(4,)]),  # Flax GRU bias_hh
    (Zeros((3, 4)), []),
    (Transpose((2, 1, 0)), [(2, 3, 4)]),  # Keras Conv1D kernel
    (Transpose((3, 2, 0, 1)), [(2, 2, 3, 4)]),  # Keras Conv2D kernel
    (Chain(Select(0, 2), SliceBlocks(0, 1, 2), ReorderBlocks(0, (0, 2, 3, 1))), [(2, 16, 3)]),  # ONNX LSTM
]


@st.composite
def case_and_region(draw: st.DrawFn) -> tuple[Op, list[np.ndarray], tuple[slice, ...]]:
    op, shapes = draw(st.sampled_from(CASES))
    inputs = [np.arange(math.prod(s)).reshape(s) + 1000 * i for i, s in enumerate(shapes)]
    region = []
    for size in op.out_shape(shapes):
        start = draw(st.integers(0, size))
        region.append(slice(start, draw(st.integers(start, size))))
    return op, inputs, tuple(region)


@settings(max_examples=300, deadline=None)
@given(case_and_region())
def test_region_pieces_give_exactly_the_region_of_the_output(case) -> None:  # type: ignore[no-untyped-def]
    op, inputs, region = case
    pieces = region_pieces(op, [a.shape for a in inputs], region)
    assert pieces is not None
    out = np.full(tuple(r.stop - r.start for r in region), -1)
    covered = np.zeros(out.shape, int)
    for piece in pieces:
        covered[piece.dst] += 1
        out[piece.dst] = 0 if piece.src is None else piece.view(inputs[piece.src][piece.region])
    assert (covered == 1).all()  # every element of the region comes from exactly one piece
    assert np.array_equal(out, op(*inputs)[region])


def test_region_pieces_read_the_matching_columns_of_a_transposed_kernel() -> None:
    (piece,) = region_pieces(Transpose((1, 0)), [(4, 10)], (slice(5, 10), slice(0, 4)))
    assert piece.region == (slice(0, 4), slice(5, 10))


def test_region_pieces_is_none_where_no_box_maps_to_a_box() -> None:
    assert region_pieces(Sum(2), [(3,), (3,)], (slice(0, 3),)) is None
    assert region_pieces(Reshape((2, 3), (6,)), [(2, 3)], (slice(0, 6),)) is None


@pytest.mark.parametrize(
    ("shape", "region"),
    [
        ((4, 3), (slice(1, 3), slice(0, 3))),
        ((4, 3), (slice(0, 4), slice(1, 2))),
        ((2, 3, 4), (slice(1, 2), slice(0, 2), slice(1, 4))),
        ((2, 3, 4), (slice(0, 2), slice(1, 3), slice(0, 4))),
        ((5,), (slice(2, 2),)),
        ((), ()),
    ],
)
def test_contiguous_runs_cover_the_region_in_order(shape, region) -> None:  # type: ignore[no-untyped-def]
    flat = np.arange(math.prod(shape)).reshape(shape)
    runs = list(contiguous_runs(shape, region))
    got = np.concatenate([np.arange(a, a + n) for a, n in runs]) if runs else np.array([], int)
    assert np.array_equal(got, flat[region].reshape(-1))


# ---- region reads, with the readers' own byte accounting ------------------------------------------------


def _files(folder: Path) -> dict[str, tuple[Path, str]]:
    """One file per reader, each holding 'w' = arange (6, 5) float32 (a Fortran-order one included)."""
    import h5py

    w = np.arange(30, dtype=np.float32).reshape(6, 5)
    out = {"safetensors": (write_safetensors({"w": w}, folder / "a.safetensors"), "w")}
    (folder / "shards").mkdir()
    write_safetensors({"w": w}, folder / "shards" / "part-1.safetensors")
    write_safetensors({"v": w[:1]}, folder / "shards" / "part-2.safetensors")
    out["sharded"] = (folder / "shards", "w")
    np.save(folder / "w.npy", np.asfortranarray(w))
    out["npy-fortran"] = (folder / "w.npy", "w")
    np.savez(folder / "stored.npz", w=w)
    out["npz-stored"] = (folder / "stored.npz", "w")
    np.savez_compressed(folder / "packed.npz", w=w)
    out["npz-compressed"] = (folder / "packed.npz", "w")
    with h5py.File(folder / "a.h5", "w") as f:
        f["layers/dense/vars/0"] = w
    out["h5"] = (folder / "a.h5", "layers/dense/vars/0")
    return out


@pytest.mark.parametrize(
    "reader", ["safetensors", "sharded", "npy-fortran", "npz-stored", "npz-compressed", "h5"]
)
@pytest.mark.parametrize(
    "region", [(slice(2, 5), slice(0, 5)), (slice(0, 6), slice(1, 3)), (slice(3, 4), slice(4, 5))]
)
def test_read_region_reads_only_the_region(tmp_path: Path, reader: str, region) -> None:  # type: ignore[no-untyped-def]
    path, name = _files(tmp_path)[reader]
    w = np.arange(30, dtype=np.float32).reshape(6, 5)
    with open_source(path) as src:
        got = src.read_region(name, region)
        assert np.array_equal(got, w[region])
        out = np.empty(got.shape, np.float32)
        assert src.read_region(name, region, out=out) is out and np.array_equal(out, w[region])
        if reader == "npz-compressed":  # decompressed in order, up to the region's last byte
            last = (region[0].stop - 1) * 5 + region[1].stop
            assert src.bytes_read == 2 * last * 4
        else:
            assert src.bytes_read == 2 * w[region].nbytes


def test_read_region_of_a_mapping_is_a_view_and_counted() -> None:
    w = np.arange(12.0).reshape(3, 4)
    src = open_source({"w": w})
    part = src.read_region("w", (slice(1, 3), slice(0, 2)))
    assert np.shares_memory(part, w) and np.array_equal(part, w[1:3, 0:2])
    assert src.bytes_read == part.nbytes


def test_a_reader_without_region_reads_falls_back_to_the_whole_tensor(tmp_path: Path) -> None:
    from weightport.sources.base import Source

    class Whole(Source):
        def read_into(self, name: str, out: np.ndarray) -> None:
            out[...] = np.arange(12.0).reshape(3, 4)
            self.bytes_read += out.nbytes

    src = Whole("'whole'", {"w": weightport.TensorInfo("w", (3, 4), np.dtype(np.float64))})
    assert np.array_equal(src.read_region("w", (slice(2, 3), slice(1, 3))), [[9.0, 10.0]])
    assert src.bytes_read == 12 * 8


def test_import_weightport_leaves_torch_distributed_tensor_unimported() -> None:
    for first in ("", "import torch; "):  # with torch first, the package imports its loading machinery
        code = f"import sys; {first}import weightport; print('torch.distributed.tensor' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False", first
    assert not has_dtensors(nn.Linear(2, 2))


# ---- sharded loads in 2 and 3 processes ------------------------------------------------------------------


class Net(nn.Module):
    """Conv, LSTM, GRU and Linear layers whose sizes split unevenly over 2 and 3 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.gru = nn.GRU(5, 3, batch_first=True)  # 9 gate rows: shards cut through gate blocks
        self.fc = nn.Linear(3, 7)  # 7 rows: 4 + 3 over 2 ranks, 3 + 3 + 1 over 3
        self.head = nn.Linear(7, 2)  # a bias of 2: the third rank holds none of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.conv(x).transpose(1, 2))
        out, _ = self.gru(out)
        return self.head(torch.tanh(self.fc(out)))


def _placements() -> dict[str, object]:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "conv.weight": Shard(1),  # 3 input channels
        "conv.bias": Replicate(),
        "lstm.weight_ih_l0": Shard(0),
        "lstm.weight_hh_l0": Shard(1),  # 5 columns
        "lstm.bias_ih_l0": Shard(0),
        "lstm.bias_hh_l0": Replicate(),
        "gru.weight_ih_l0": Shard(0),
        "gru.weight_hh_l0": Shard(0),
        "gru.bias_ih_l0": Shard(0),
        "gru.bias_hh_l0": Shard(0),
        "fc.weight": Shard(0),
        "fc.bias": Shard(0),
        "head.weight": Shard(1),
        "head.bias": Shard(0),
    }


def _shard(model: nn.Module, mesh: object, spread: int = 0) -> nn.Module:
    """Each parameter as a DTensor with its placement from :func:`_placements` (on meta: no data).

    On a 2-D mesh the placement goes on mesh dimension ``spread``, Replicate() on the other.
    """
    from torch.distributed.tensor import Replicate, distribute_tensor

    for name, placement in _placements().items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path)
        old = owner._parameters[leaf]
        assert old is not None
        placements = [placement] if mesh.ndim == 1 else [Replicate(), Replicate()]  # type: ignore[attr-defined]
        placements[spread] = placement
        owner._parameters[leaf] = nn.Parameter(distribute_tensor(old.detach(), mesh, placements))
    model.lstm._init_flat_weights()
    return model


def _meta_model(mesh: object) -> nn.Module:
    with torch.device("meta"):
        model = Net()
    return _shard(model, mesh)


def _single(path: Path, layout: str) -> dict[str, torch.Tensor]:
    model = Net()
    weightport.load(model, path, layout=layout)
    return model.state_dict()


def _locals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}  # type: ignore[operator]


def _same_everywhere(text: str) -> bool:
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, text)
    return all(t == text for t in everyone)


def _check_layouts(mesh: object, folder: Path) -> None:
    """Torch, Keras and Flax files: the gathered shards equal a single-process load; bytes read are the shards'."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from weightport.distributed import local_region

    placements = _placements()
    for layout, name in (("torch", "ref.safetensors"), ("keras", "ref.weights.h5"), ("flax", "ref_flax.npz")):
        path = folder / name
        single = _single(path, layout)
        model = _meta_model(mesh)
        with open_source(path) as src:
            weightport.load(model, src, layout=layout)
            read = src.bytes_read
        for pname, p in model.named_parameters():
            assert isinstance(p, DTensor) and not p.is_meta and p.placements == (placements[pname],), pname
            assert torch.equal(p.full_tensor(), single[pname]), (layout, pname)
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            region = local_region(p)
            assert region is not None
            assert tuple(r.start for r in region) == tuple(offset)
            assert tuple(p.to_local().shape) == tuple(shape)
        with open_source(path) as src:
            rules = [r for r in get_layout(layout).plan(Net(), src).rules if r.sources]
        # values that only move: each byte of this rank's boxes is read once; padded ones read less
        moved = {r.target for r in rules if r.op.value_preserving}
        padded = {r.target for r in rules} - moved
        params = dict(model.named_parameters())
        expected = sum(params[t].to_local().numel() * 4 for t in moved)
        assert expected <= read <= expected + sum(params[t].to_local().numel() * 4 for t in padded), layout
        if padded:
            continue
        assert read == expected, (layout, read, expected)
        sharded = sum(params[t].numel() * 4 for t in moved if isinstance(placements[t], Shard))
        replicated = sum(params[t].numel() * 4 for t in moved if not isinstance(placements[t], Shard))
        totals = torch.tensor([read - replicated])
        dist.all_reduce(totals)
        assert int(totals) == sharded  # the ranks split the sharded bytes between them
        assert read - replicated <= math.ceil(sharded / dist.get_world_size()) * 1.5


def _check_two_dim_meshes(mesh: object, folder: Path) -> None:
    """Meshes (world, 1) and (1, world): placements per mesh dimension, the load agreeing on the world group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from weightport.distributed import local_region

    world = dist.get_world_size()
    single = _single(folder / "ref.weights.h5", "keras")
    for shape, spread in (((world, 1), 0), ((1, world), 1)):
        grid = init_device_mesh("cpu", shape)
        with torch.device("meta"):
            model = _shard(Net(), grid, spread)
        weightport.load(model, folder / "ref.weights.h5")
        for pname, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), single[pname]), (shape, pname)  # type: ignore[operator]
            region = local_region(p)
            _, offset = compute_local_shape_and_global_offset(p.shape, grid, p.placements)  # type: ignore[attr-defined]
            assert region is not None and tuple(r.start for r in region) == tuple(offset)


def _check_fsdp2(mesh: object, folder: Path) -> None:
    """fully_shard on meta, loaded from Keras (transposed kernels), computes what the single model does."""
    from torch.distributed.fsdp import fully_shard

    single = Net()
    weightport.load(single, folder / "ref.weights.h5")
    with torch.device("meta"):
        model = Net()
    fully_shard(model, mesh=mesh)
    weightport.load(model, folder / "ref.weights.h5")
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), single(x), rtol=0, atol=1e-6)


def _check_in_place(mesh: object, folder: Path) -> None:
    """Existing shards are written in place (same storage), with and without rollback, and not by dry runs."""
    model = _shard(Net(), mesh)
    for p in model.parameters():
        p.to_local().detach().zero_()  # type: ignore[operator]
    pointers = {n: p.to_local().data_ptr() for n, p in model.named_parameters()}  # type: ignore[operator]
    weightport.load(model, folder / "ref.safetensors", dry_run=True)
    assert all(not p.to_local().any() for p in model.parameters())  # type: ignore[operator]
    for name, layout, rollback in (("ref.safetensors", "torch", True), ("ref.weights.h5", "keras", False)):
        weightport.load(model, folder / name, rollback=rollback)
        single = _single(folder / name, layout)
        for pname, p in model.named_parameters():
            assert p.to_local().data_ptr() == pointers[pname]  # type: ignore[operator]
            assert torch.equal(p.full_tensor(), single[pname]), (name, pname)  # type: ignore[operator]


def _check_bad_tensor(mesh: object, folder: Path) -> None:
    """A NaN in rows only rank 1 holds: no rank writes, every rank raises the same error naming both."""
    world = dist.get_world_size()
    chunk = -(-7 // world)
    model = _shard(Net(), mesh)
    weightport.load(model, folder / "ref.safetensors")
    before = _locals(model)
    with pytest.raises(LoadError) as info:
        weightport.load(model, folder / "bad.safetensors")
    message = str(info.value)
    pattern = (
        r"'fc\.weight': expected values that fit float32, found 1 NaN/Inf value \(first at index \(4, 2\): "
        rf"nan\) in 'bad\.safetensors' 'fc\.weight', in the shard \[{chunk}:{min(2 * chunk, 7)}, 0:3\] \(on rank 1\)"
    )
    assert re.search(pattern, message), message
    assert message.startswith("weightport refused to load into Net: 1 problem; nothing was written.")
    assert _same_everywhere(message)
    after = _locals(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    meta = _meta_model(mesh)
    with pytest.raises(LoadError, match=r"\(on rank 1\)"):
        weightport.load(meta, folder / "bad.safetensors")
    assert all(p.is_meta for p in meta.parameters())


def _check_rank_failure(mesh: object, folder: Path) -> None:
    """A file missing on one rank's machine: every rank raises the same LoadError, nothing is written."""
    rank = dist.get_rank()
    model = _meta_model(mesh)
    path = folder / ("missing.safetensors" if rank == 1 else "ref.safetensors")
    with pytest.raises(LoadError) as info:
        weightport.load(model, path)
    message = str(info.value)
    assert "'(rank 1)': expected a load that runs on every rank, found SourceError: " in message
    assert "missing.safetensors': no such file or folder" in message
    assert _same_everywhere(message)
    assert all(p.is_meta for p in model.parameters())


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("error")
    warnings.simplefilter("ignore", UncheckedConfigWarning)  # weights-only files: checked in test_keras
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        checks = (
            _check_layouts,
            _check_two_dim_meshes,
            _check_fsdp2,
            _check_in_place,
            _check_bad_tensor,
            _check_rank_failure,
        )
        for check in checks:
            check(mesh, Path(folder))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check passed. Under load, gloo's threads have aborted the interpreter's own exit once
    # ("terminate called without an active exception", SIGABRT): leave without that C++ teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference Net's weights in the torch, Keras and Flax layouts, and a copy with one NaN."""
    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    ref = Net()
    arrays = weightport.to_numpy(ref)
    write_safetensors(arrays, folder / "ref.safetensors")
    save_weights_h5(ref, folder / "ref.weights.h5")
    np.savez(folder / "ref_flax.npz", **get_layout("flax").export(ref))
    arrays["fc.weight"][4, 2] = np.nan  # row 4: rank 1's, over 2 ranks and over 3
    write_safetensors(arrays, folder / "bad.safetensors")
    return folder


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loads(world: int, files: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(files)), nprocs=world, join=True)
