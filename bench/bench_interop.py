"""Keras-layout LSTM and GRU weights (in memory, already read) into an existing PyTorch model.

Side by side in one run (median of interleaved rounds), as ratios to the memcpy floor
(``np.copyto`` of the same bytes into preallocated, touched arrays):

- weightport.load(layout="keras"), every check on, on all cores and on one thread, and on all
  cores without the compiled transposing kernel (torch's copy, as where no C compiler was found);
- the naive NumPy chain: transpose, gate reorder, ``np.ascontiguousarray``, then ``copy_``;
- ``param.copy_(torch.from_numpy(kernel).T)``, per gate block where the gates move (GRU).

Run: .venv/bin/python bench/bench_interop.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved, print_ratios

import weightport
from weightport import copying
from weightport.layouts import get_layout

KERAS_TO_TORCH = {"LSTM": (0, 1, 2, 3), "GRU": (1, 0, 2)}  # z,r,h -> r,z,n


def case(kind: str, hidden: int, layers: int, rounds: int) -> None:
    torch.manual_seed(0)
    model = getattr(torch.nn, kind)(hidden, hidden, num_layers=layers)
    keras = get_layout("keras").export(model)  # Keras-layout arrays, as a .weights.h5 holds them
    nbytes = sum(a.nbytes for a in keras.values())
    print(f"\n{kind}({hidden}, {hidden}, num_layers={layers}) in Keras layout: {nbytes / 1e6:.0f} MB")
    floor_dst = {k: np.ones_like(v) for k, v in keras.items()}
    gates = KERAS_TO_TORCH[kind]
    params = dict(model.named_parameters())
    kernels = sorted(k for k in keras if k.endswith("vars/0"))
    recurrents = sorted(k for k in keras if k.endswith("vars/1"))

    def floor() -> None:
        for k, v in keras.items():
            np.copyto(floor_dst[k], v)

    def reorder(a: np.ndarray) -> np.ndarray:
        h = a.shape[-1] // len(gates)
        return np.concatenate([a[..., g * h : (g + 1) * h] for g in gates], axis=-1)

    def naive() -> None:
        with torch.no_grad():
            for layer, (k, r) in enumerate(zip(kernels, recurrents)):
                params[f"weight_ih_l{layer}"].copy_(
                    torch.from_numpy(np.ascontiguousarray(reorder(keras[k]).T))
                )
                params[f"weight_hh_l{layer}"].copy_(
                    torch.from_numpy(np.ascontiguousarray(reorder(keras[r]).T))
                )

    def torch_transposed() -> None:
        with torch.no_grad():
            for layer, (k, r) in enumerate(zip(kernels, recurrents)):
                for name, src in ((f"weight_ih_l{layer}", keras[k]), (f"weight_hh_l{layer}", keras[r])):
                    if gates == tuple(range(len(gates))):
                        params[name].copy_(torch.from_numpy(src).T)
                        continue
                    h = src.shape[1] // len(gates)
                    for i, g in enumerate(gates):
                        params[name][i * h : (i + 1) * h].copy_(
                            torch.from_numpy(src[:, g * h : (g + 1) * h]).T
                        )

    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            weightport.load(model, keras, layout="keras")
        finally:
            torch.set_num_threads(threads)

    kernel = copying._kernels

    def no_kernel() -> None:
        copying._kernels = None  # type: ignore[assignment]
        try:
            weightport.load(model, keras, layout="keras")
        finally:
            copying._kernels = kernel

    medians = interleaved(
        {
            "memcpy floor (np.copyto)": floor,
            f"weightport.load, all checks ({threads} threads)": lambda: weightport.load(
                model, keras, layout="keras"
            ),
            "weightport.load, all checks (1 thread)": one_thread,
            f"weightport.load, no compiled kernel ({threads} threads)": no_kernel,
            "naive NumPy chain + copy_": naive,
            "copy_(from_numpy(kernel).T) per block": torch_transposed,
        },
        rounds,
    )
    print(f"compiled transposing kernel: {'built' if kernel is not None else 'NOT BUILT'}")
    print_ratios("Time (median of interleaved rounds)", medians, "memcpy floor (np.copyto)")
    x = torch.randn(3, 1, hidden)
    weightport.load(model, keras, layout="keras")
    assert weightport.verify(model, x, rtol=1e-4, atol=1e-5), "weights loaded wrongly"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # arrays carry no Keras config
    case("LSTM", args.hidden, 2, args.rounds)  # 268 MB
    case("GRU", args.hidden, 3, args.rounds)  # 302 MB


if __name__ == "__main__":
    main()
