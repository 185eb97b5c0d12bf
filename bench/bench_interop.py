"""Keras-layout LSTM and GRU weights (in memory, already read) into an existing PyTorch model.

Side by side in one run (median of interleaved rounds), each load as a ratio to the memcpy floor
on the same number of threads (``np.copyto`` of the same bytes into preallocated, touched arrays,
split over the threads):

- weightport.load(layout="keras"), every check on, on all threads and on one, and on all threads
  without the compiled kernels (torch's copy, as where no C compiler was found);
- the naive NumPy chain: transpose, gate reorder, ``np.ascontiguousarray``, then ``copy_``;
- ``param.copy_(torch.from_numpy(kernel).T)``, per gate block where the gates move (GRU).

The two baselines do weightport's work: they scan every array for NaN/Inf (a sum) before writing
and copy the biases too. At the end the model is zeroed, loaded once more, and its outputs are
compared with the original model's.

Run: .venv/bin/python bench/bench_interop.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import copy_parts, interleaved, print_ratios, split

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
    x = torch.randn(3, 1, hidden)
    with torch.no_grad():
        expected = model(x)[0]
    gates = KERAS_TO_TORCH[kind]
    params = dict(model.named_parameters())
    kernels = sorted(k for k in keras if k.endswith("vars/0"))
    recurrents = sorted(k for k in keras if k.endswith("vars/1"))
    biases = sorted(k for k in keras if k.endswith("vars/2"))
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads)

    parts = [part for v in keras.values() for part in split(np.ones_like(v), v, threads)]
    whole = [(np.ones_like(v), v) for v in keras.values()]

    def floor_threads() -> None:
        copy_parts(parts, pool)

    def floor_one() -> None:
        copy_parts(whole, None)

    def scanned() -> None:  # the baselines' value check: a finite sum means no NaN/Inf
        for k, v in keras.items():
            if not math.isfinite(float(torch.from_numpy(v).sum())):
                raise ValueError(f"{k} holds NaN/Inf")

    def copy_biases() -> None:
        for layer, b in enumerate(biases):
            bias = keras[b]
            if kind == "GRU":  # reset_after: (2, 3h), input bias then recurrent bias
                params[f"bias_ih_l{layer}"].copy_(torch.from_numpy(reorder(bias[0])))
                params[f"bias_hh_l{layer}"].copy_(torch.from_numpy(reorder(bias[1])))
            else:  # one bias: PyTorch's two sum to it
                params[f"bias_ih_l{layer}"].copy_(torch.from_numpy(reorder(bias)))
                params[f"bias_hh_l{layer}"].zero_()

    def reorder(a: np.ndarray) -> np.ndarray:  # Keras's gate order to PyTorch's, along the last axis
        h = a.shape[-1] // len(gates)
        return np.concatenate([a[..., g * h : (g + 1) * h] for g in gates], axis=-1)

    def naive() -> None:
        scanned()
        with torch.no_grad():
            copy_biases()
            for layer, (k, r) in enumerate(zip(kernels, recurrents)):
                params[f"weight_ih_l{layer}"].copy_(
                    torch.from_numpy(np.ascontiguousarray(reorder(keras[k]).T))
                )
                params[f"weight_hh_l{layer}"].copy_(
                    torch.from_numpy(np.ascontiguousarray(reorder(keras[r]).T))
                )

    def torch_transposed() -> None:
        scanned()
        with torch.no_grad():
            copy_biases()
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

    many, one = f"memcpy floor ({threads} threads)", "memcpy floor (1 thread)"
    medians = interleaved(
        {
            many: floor_threads,
            one: floor_one,
            f"weightport.load, all checks ({threads} threads)": lambda: weightport.load(
                model, keras, layout="keras"
            ),
            "weightport.load, all checks (1 thread)": one_thread,
            f"weightport.load, no compiled kernels ({threads} threads)": no_kernel,
            f"naive NumPy chain + copy_ ({threads} threads)": naive,
            f"copy_(from_numpy(kernel).T) per block ({threads} threads)": torch_transposed,
        },
        rounds,
    )
    print(f"compiled kernels: {'built' if kernel is not None else 'NOT BUILT'}")
    print_ratios("Time (median of interleaved rounds)", medians, many, (one,))
    print(
        f"  -> on {threads} threads {medians[f'weightport.load, all checks ({threads} threads)'] / medians[many]:.2f}x "
        f"its floor; on 1 thread {medians['weightport.load, all checks (1 thread)'] / medians[one]:.2f}x its floor"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        weightport.load(model, keras, layout="keras")
        error = float((model(x)[0] - expected).abs().max())
    assert error <= 1e-6, f"weights loaded wrongly: outputs differ by {error:.3g}"
    print(f"  outputs after a load into the zeroed model match the original's (max error {error:.1e})")


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
