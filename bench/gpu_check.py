"""GPU check (run only where a CUDA device is at hand): H2D throughput and cuDNN's flat buffer.

1. Loads a 400 MB LSTM's arrays into the same LSTM on the GPU with weightport, and prints the
   time as a ratio to a plain pinned ``tensor.to("cuda")`` of the same bytes (median of rounds).
2. Checks that after the load the Parameters are the same objects, still views of cuDNN's flat
   weight buffer, and that a forward pass raises no "not part of single contiguous chunk of
   memory" warning; and that the GPU module's output equals the CPU module's.

Run: python bench/gpu_check.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import weightport


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.manual_seed(0)
    cpu = torch.nn.LSTM(1024, 1024, num_layers=4, bidirectional=True)
    arrays = weightport.to_numpy(cpu)
    nbytes = sum(a.nbytes for a in arrays.values())
    gpu = torch.nn.LSTM(1024, 1024, num_layers=4, bidirectional=True).cuda()
    params = [id(p) for p in gpu.parameters()]
    pinned = [torch.from_numpy(a).pin_memory() for a in arrays.values()]

    def plain() -> None:
        for t in pinned:
            t.to("cuda", non_blocking=True)
        torch.cuda.synchronize()

    def ours() -> None:
        weightport.load(gpu, arrays)
        torch.cuda.synchronize()

    times: dict[str, list[float]] = {"pinned tensor.to('cuda')": [], "weightport.load": []}
    plain(), ours()
    for _ in range(args.rounds):
        for name, fn in (("pinned tensor.to('cuda')", plain), ("weightport.load", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["pinned tensor.to('cuda')"]
    print(f"{nbytes / 1e6:.0f} MB host -> device ({torch.cuda.get_device_name()})")
    for name, t in medians.items():
        print(
            f"  {name:<28} {t * 1e3:8.1f} ms  {nbytes / t / 1e9:6.1f} GB/s  {t / base:5.2f}x pinned .to('cuda')"
        )

    same_objects = [id(p) for p in gpu.parameters()] == params
    x = torch.randn(5, 2, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_gpu = gpu(x.cuda())[0].cpu()
    out_cpu = cpu(x)[0]
    err = (out_gpu - out_cpu).abs().max().item()
    print(f"  Parameters unchanged: {same_objects}; no flat-buffer warning; max |GPU - CPU| = {err:.2e}")
    return 0 if same_objects and err < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
