"""Core load speed and memory: in-memory arrays into an existing LSTM (369 MB of float32).

Prints, side by side from one run (median of interleaved rounds), each approach's
time as a ratio to the memcpy floor (``np.copyto`` into preallocated, touched
arrays) and to ``load_state_dict`` of ``torch.from_numpy`` tensors; extra peak
RSS during a load as a multiple of the model's bytes; and, for a small LSTM,
weightport's per-call time against ``load_state_dict``.

Run: .venv/bin/python bench/bench_core.py [--rounds 7] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import extra_peak, interleaved, print_ratios

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
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    h = args.hidden
    lstm = torch.nn.LSTM(h, h, num_layers=4, bidirectional=True)
    arrays = arrays_for(lstm)
    nbytes = sum(a.nbytes for a in arrays.values())
    print(
        f"LSTM({h}, {h}, num_layers=4, bidirectional=True): {len(arrays)} tensors, {nbytes / 1e6:.0f} MB float32"
    )
    floor_dst = {k: np.empty_like(v) for k, v in arrays.items()}
    for v in floor_dst.values():
        v.fill(1)  # touched
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    params = dict(lstm.named_parameters())

    def floor() -> None:
        for k, v in arrays.items():
            np.copyto(floor_dst[k], v)

    def classic() -> None:
        for k, v in arrays.items():
            params[k].data = torch.tensor(v)

    def restore() -> None:  # undo classic's new storage so every case writes into the same memory
        lstm.load_state_dict(tensors)

    cases = {
        "memcpy floor (np.copyto)": floor,
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
        "memcpy floor (np.copyto)",
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
