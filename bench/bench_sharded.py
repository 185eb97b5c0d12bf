"""Sharded loads: LSTM(1024, 1024, 4 layers, bidirectional), 369 MB of float32, Shard(0) over 2 ranks.

Two processes (``torch.multiprocessing.spawn``, gloo on the CPU) load the same
``.safetensors`` file into the LSTM built on ``meta`` with every parameter a
DTensor placed ``Shard(0)`` on a 1-D mesh, two ways:

- ``weightport (own shard)``: ``weightport.load(model, source)``: each rank reads
  only the rows it holds, straight into its new local shard;
- ``whole checkpoint + slice``: each rank loads the whole checkpoint into a plain
  model (``weightport.load`` on meta: the fastest whole load there is), then
  slices its rows out (``DTensor.from_local``) and drops the rest.

Per rank it prints the bytes read from the source (the reader's own
``Source.bytes_read``) and the extra peak memory of the load (peak RSS, VmHWM
after resetting it with ``/proc/self/clear_refs``, minus the RSS with the rank's
own shards allocated and touched; file-backed pages included: nothing is
memory-mapped, reads are positioned ``pread``s), each as a ratio to the model's
bytes (target <= 0.55 per rank), and the median time of each way (interleaved
rounds, files warm in the page cache) as a ratio to the other. Each way's memory
is measured on the first load of a fresh pair of processes.

Run: .venv/bin/python bench/bench_sharded.py [--rounds 5] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import reset_peak, rss_bytes

import weightport
from weightport.sources import open_source

OWN = "weightport (own shard)"
WHOLE = "whole checkpoint + slice"


def build(hidden: int) -> nn.LSTM:
    return nn.LSTM(hidden, hidden, num_layers=4, bidirectional=True)


def sharded_meta(hidden: int, mesh: object) -> nn.LSTM:
    """The LSTM on meta, every parameter a meta DTensor placed Shard(0)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with torch.device("meta"):
        model = build(hidden)
    for name, p in list(model.named_parameters()):
        model._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
    model._init_flat_weights()
    return model


def rows(count: int, rank: int, world: int) -> slice:
    chunk = -(-count // world)
    start = min(rank * chunk, count)
    return slice(start, min(start + chunk, count))


def load_own(model: nn.LSTM, hidden: int, mesh: object, path: Path) -> tuple[nn.Module, int]:
    with open_source(path) as src:
        weightport.load(model, src)
        return model, src.bytes_read


def load_whole(model: nn.LSTM, hidden: int, mesh: object, path: Path) -> tuple[nn.Module, int]:
    from torch.distributed.tensor import DTensor, Shard

    with torch.device("meta"):
        whole = build(hidden)
    with open_source(path) as src:
        weightport.load(whole, src)
        nbytes = src.bytes_read
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, full in whole.named_parameters():
        local = full.detach()[rows(full.shape[0], rank, world)].clone()
        value = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
        model._parameters[name] = nn.Parameter(value)
    model._init_flat_weights()
    del whole
    return model, nbytes


CASES = {OWN: load_own, WHOLE: load_whole}


def own_shard_rss(hidden: int, mesh: object) -> int:
    """RSS with this rank's own shards allocated and touched (then freed again: glibc hands
    allocations this big back to the system, so RSS drops and the load's own shards raise it again)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in build(hidden).parameters()]
    shards = [
        torch.zeros((rows(s[0], rank, world).stop - rows(s[0], rank, world).start, *s[1:])) for s in shapes
    ]
    for shard in shards:
        shard.fill_(1.0)  # touched
    base = rss_bytes()
    del shards
    gc.collect()
    return base


def worker(
    rank: int, world: int, port: int, path: str, hidden: int, first: str, rounds: int, out: str
) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=10),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = sharded_meta(hidden, mesh)  # the skeleton exists before the load (DTensor's imports included)
        base = own_shard_rss(hidden, mesh)
        dist.barrier()
        reset_peak()
        model, nbytes = CASES[first](model, hidden, mesh, Path(path))
        peak = rss_bytes("VmHWM")
        with torch.no_grad():
            check = sum(float(p.to_local().double().sum()) for p in model.parameters())  # shards hold data
        del model
        gc.collect()
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(rounds):
            for name, fn in CASES.items():
                model = sharded_meta(hidden, mesh)
                dist.barrier()
                start = time.perf_counter()
                fn(model, hidden, mesh, Path(path))
                times[name].append(time.perf_counter() - start)
                del model
                gc.collect()
        mine = {
            "rank": rank,
            "bytes": nbytes,
            "extra": peak - base,
            "check": check,
            "times": {k: statistics.median(v) for k, v in times.items()} if rounds else {},
        }
        everyone: list[object] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            Path(out).write_text(repr(everyone))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(folder: Path, args: argparse.Namespace) -> tuple[int, dict[str, list[dict]]]:
    """Write the checkpoint, then run each way in a fresh pair of processes."""
    path = folder / "lstm.safetensors"
    torch.manual_seed(0)
    model = build(args.hidden)
    weightport.save(model, path)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    results: dict[str, list[dict]] = {}
    for first, rounds in ((OWN, args.rounds), (WHOLE, 0)):
        out = folder / "result.txt"
        torch.multiprocessing.spawn(
            worker,
            args=(args.world, free_port(), str(path), args.hidden, first, rounds, str(out)),
            nprocs=args.world,
            join=True,
        )
        results[first] = eval(out.read_text())  # our own repr of plain dicts
    return total, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_sharded_"))
    try:
        total, results = measure(folder, args)
    finally:
        shutil.rmtree(folder)
    timing = {r["rank"]: r["times"] for r in results[OWN]}
    print(
        f"\nSharded load: LSTM({args.hidden}, {args.hidden}, 4 layers, bidirectional), {total / 1e6:.1f} MB float32, "
        f"Shard(0) over {args.world} ranks (gloo, CPU), from .safetensors; torch {torch.__version__}"
    )
    print(f"  {'':<26} {'rank':>4}  {'bytes read':>12}  {'extra peak RSS':>14}  {'median time':>12}")
    for name in (OWN, WHOLE):
        for r in results[name]:
            t = timing[r["rank"]][name]
            ratio = t / timing[r["rank"]][WHOLE]
            print(
                f"  {name:<26} {r['rank']:>4}  {r['bytes'] / total:>10.3f} x  {r['extra'] / total:>12.3f} x  "
                f"{t * 1e3:>9.1f} ms  {ratio:5.2f}x {WHOLE}"
            )
    print("  (bytes read and extra peak RSS as multiples of the model's bytes; target <= 0.55 per rank)")
    sums = {name: [round(r["check"], 3) for r in results[name]] for name in results}
    assert sums[OWN] == sums[WHOLE], sums  # both ways give every rank the same shard
    assert all(math.isfinite(s) for s in sums[OWN])


if __name__ == "__main__":
    main()
