"""Core load speed and memory: in-memory arrays into an existing LSTM (369 MB of float32).

Prints, side by side from one run (median of interleaved rounds), each approach's
time as a ratio to the memcpy floor (``np.copyto`` into preallocated, touched
arrays, split over as many threads as torch and weightport use: ``--threads``, default
torch's own count) and to ``load_state_dict`` of ``torch.from_numpy`` tensors; extra peak
RSS during a load as a multiple of the model's bytes; and, for a small LSTM,
weightport's per-call time against ``load_state_dict``.

Run: .venv/bin/python bench/bench_core.py [--rounds 7] [--hidden 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import copy_parts, extra_peak, interleaved, print_ratios, split

import weightport


def arrays_for(module: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: rng.standard_normal(tuple(p.shape), dtype=np.float32) * 0.05
        for n, p in module.state_dict().items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    floor_name = f"memcpy floor (np.copyto, {args.threads} thread{'s' if args.threads > 1 else ''})"

    h = args.hidden
    lstm = torch.nn.LSTM(h, h, num_layers=4, bidirectional=True)
    arrays = arrays_for(lstm)
    nbytes = sum(a.nbytes for a in arrays.values())
    print(
        f"LSTM({h}, {h}, num_layers=4, bidirectional=True): {len(arrays)} tensors, {nbytes / 1e6:.0f} MB float32"
    )
    floor_parts = [
        part for v in arrays.values() for part in split(np.ones_like(v), v, args.threads)
    ]  # touched
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    params = dict(lstm.named_parameters())

    def floor() -> None:
        copy_parts(floor_parts, pool)

    def classic() -> None:
        for k, v in arrays.items():
            params[k].data = torch.tensor(v)

    def restore() -> None:  # undo classic's new storage so every case writes into the same memory
        lstm.load_state_dict(tensors)

    cases = {
        floor_name: floor,
        "load_state_dict(torch.from_numpy)": lambda: lstm.load_state_dict(tensors),
        "weightport.load (all checks)": lambda: weightport.load(lstm, arrays),
        "weightport.load (check_values=False)": lambda: weightport.load(lstm, arrays, check_values=False),
    }
    medians = interleaved(cases, args.rounds)
    classic_lstm = torch.nn.LSTM(h, h, num_layers=4, bidirectional=True)
    params = dict(classic_lstm.named_parameters())
    medians |= interleaved({"classic .data = torch.tensor(arr)": classic}, args.rounds)
    print_ratios(
        "Time (median of interleaved rounds)",
        medians,
        floor_name,
        ("load_state_dict(torch.from_numpy)",),
    )

    print("\nExtra peak RSS during one load (peak minus RSS before), as a multiple of the model's bytes")
    for name, fn in [
        ("weightport.load (all checks)", lambda: weightport.load(lstm, arrays)),
        ("weightport.load (check_values=False)", lambda: weightport.load(lstm, arrays, check_values=False)),
        ("load_state_dict(torch.from_numpy)", lambda: lstm.load_state_dict(tensors)),
    ]:
        print(f"  {name:<44} {extra_peak(fn) / nbytes:6.3f}x")

    small = torch.nn.LSTM(256, 256, num_layers=2, bidirectional=True)
    small_arrays = arrays_for(small, 1)
    small_tensors = {k: torch.from_numpy(v) for k, v in small_arrays.items()}
    per_call = interleaved(
        {
            "load_state_dict (small LSTM, 16 tensors)": lambda: small.load_state_dict(small_tensors),
            "weightport.load (small LSTM, 16 tensors)": lambda: weightport.load(small, small_arrays),
        },
        max(args.rounds, 31),
    )
    print_ratios("Small model per call", per_call, "load_state_dict (small LSTM, 16 tensors)")
    restore()


if __name__ == "__main__":
    main()
