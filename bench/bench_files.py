"""Big-model loads from files: LSTM(1024, 1024, 4 layers, bidirectional), 369 MB of float32.

For each file format, loads into an existing model and into a model built on the
``meta`` device, each in a fresh process (so peak RSS is that load's own), in
interleaved rounds, every process on ``--threads`` threads (default 1, as the targets are
stated). Prints the median time as a ratio to the memcpy floor (``np.copyto`` of the same
bytes into preallocated, touched arrays, split over as many threads, measured in the same
run) and to the format's anchor: the format's own loader into an existing model (for Keras
``.weights.h5``, h5py's read of every dataset into NumPy, with no layout work), and for
meta builds the first-touch floor (map the file, allocate fresh tensors, copy the bytes in,
on as many threads). Each round runs the rows in another rotation, so that none always runs just
after the floor's big allocations. Extra peak RSS (peak minus RSS after imports and model construction,
file-backed pages included) is a multiple of the model's bytes. Files are read warm (from the
page cache), as the floors are. Imports happen before every clock starts.

Run: .venv/bin/python bench/bench_files.py [--rounds 7] [--hidden 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import copy_parts, split

HERE = Path(__file__).parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r})
from _common import copy_parts, reset_peak, rss_bytes, split
import numpy as np, torch
import weightport
case, path, hidden, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)

def build():
    return torch.nn.LSTM(hidden, hidden, num_layers=4, bidirectional=True)

def first_touch():  # the meta build's floor: map the .safetensors file, allocate tensors, copy in
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, np.uint8, "r", offset=8 + size)
    out = {{}}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=torch.float32)
        copy_parts(split(tensor.numpy().reshape(-1).view(np.uint8), data[begin:end], threads), pool)
        out[name] = tensor
    return out

def run():
    if case == "first-touch-floor":
        start = time.perf_counter()
        first_touch()
        return time.perf_counter() - start
    if case.startswith("meta:"):
        start = time.perf_counter()
        with torch.device("meta"):
            model = build()
        weightport.load(model, path, layout=kind_layout)
        return time.perf_counter() - start
    if case == "default-init+load_state_dict":
        arrays = dict(np.load(path))
        tensors = {{k: torch.from_numpy(v) for k, v in arrays.items()}}
        start = time.perf_counter()
        model = build()
        model.load_state_dict(tensors)
        return time.perf_counter() - start
    model = build()
    for p in model.parameters():
        p.detach().add_(0)  # touched, as a model in use is
    reset_peak()
    global base
    base = rss_bytes()
    start = time.perf_counter()
    if case.startswith("weightport:"):
        weightport.load(
            model, path, layout=kind_layout, check_values="nocheck" not in case, rollback="norollback" not in case
        )
    elif case == "safetensors.load_model":
        import safetensors.torch
        safetensors.torch.load_model(model, path)
    elif case == "np.load+load_state_dict":
        with np.load(path) as z:
            model.load_state_dict({{k: torch.from_numpy(z[k]) for k in z.files}})
    elif case == "torch.load(mmap)+load_state_dict":
        model.load_state_dict(torch.load(path, mmap=True, weights_only=True))
    elif case == "h5py.read":  # the HDF5 library's own read of every dataset; no layout work, no copy into the model
        import h5py
        with h5py.File(path, "r") as f:
            arrays = []
            f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    elif case == "np.load(.npy files)+load_state_dict":
        from pathlib import Path
        model.load_state_dict({{f.stem: torch.from_numpy(np.load(f)) for f in Path(path).glob("*.npy")}})
    else:
        raise SystemExit("unknown case " + case)
    return time.perf_counter() - start

kind_layout = "keras" if path.endswith(".h5") else None
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(threads) if threads > 1 else None
# Imports only, outside the measurement (h5py, safetensors, the reader and layout modules: opening the
# file reads its header); no load before the timed one, so each first call's own costs are timed, as
# a program that loads once pays them.
import safetensors.torch  # noqa: F401
from weightport.layouts import get_layout
from weightport.sources import open_source
if not path.endswith(".pt"):
    open_source(path).close()
    get_layout(kind_layout or "torch")
base = None
if case.startswith("meta:") or case.startswith("default-init") or case == "first-touch-floor":
    reset_peak(); base = rss_bytes()
seconds = run()
print(json.dumps({{"seconds": seconds, "extra": rss_bytes("VmHWM") - base}}))
"""


def write_files(folder: Path, hidden: int) -> tuple[dict[str, Path], int]:
    import torch

    import weightport

    torch.manual_seed(0)
    model = torch.nn.LSTM(hidden, hidden, num_layers=4, bidirectional=True)
    arrays = weightport.to_numpy(model)
    paths = {
        "safetensors": weightport.save(arrays, folder / "m.safetensors"),
        "npz": weightport.save(arrays, folder / "m.npz"),
    }
    npy = folder / "npy"
    npy.mkdir()
    for k, v in arrays.items():
        np.save(npy / f"{k}.npy", v)
    paths["npy-folder"] = npy
    torch.save(model.state_dict(), folder / "m.pt")
    paths["pt"] = folder / "m.pt"
    try:
        from weightport.layouts import get_layout

        keras = get_layout("keras")
        keras.save_weights_h5(model, folder / "m.weights.h5")
        paths["keras"] = folder / "m.weights.h5"
    except Exception as e:  # the Keras layout may not be built in this version
        print(f"(skipping Keras .weights.h5: {e})")
    return paths, sum(a.nbytes for a in arrays.values())


def floor_seconds(arrays: list[np.ndarray], rounds: int, threads: int) -> float:
    """np.copyto of every array into touched ones, each split over ``threads`` threads."""
    parts = [part for a in arrays for part in split(np.ones_like(a), a, threads)]
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds + 1):
            start = time.perf_counter()
            copy_parts(parts, pool if threads > 1 else None)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch and copy threads in every process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, nbytes = write_files(folder, args.hidden)
        st, npz, npy, pt = paths["safetensors"], paths["npz"], paths["npy-folder"], paths["pt"]
        st_anchor, npz_anchor = "safetensors.load_model", "np.load+load_state_dict"
        pt_anchor, init_anchor = "torch.load(mmap)+load_state_dict", "default-init+load_state_dict"
        npy_anchor, touch_anchor = "np.load(.npy files)+load_state_dict", "first-touch-floor"
        rows = [  # (label, case run by the child, file, anchor case or None)
            ("safetensors: existing model", "weightport:st", st, st_anchor),
            ("safetensors: existing, rollback=False", "weightport:st:norollback", st, st_anchor),
            (
                "safetensors: no value checks, rollback=False",
                "weightport:st:nocheck:norollback",
                st,
                st_anchor,
            ),
            ("safetensors.load_model (anchor)", st_anchor, st, None),
            ("npz (stored): existing model", "weightport:npz", npz, npz_anchor),
            ("npz (stored): existing, rollback=False", "weightport:npz:norollback", npz, npz_anchor),
            ("np.load + load_state_dict (anchor)", npz_anchor, npz, None),
            ("npy folder: existing model", "weightport:npy", npy, npy_anchor),
            ("npy folder: existing, rollback=False", "weightport:npy:norollback", npy, npy_anchor),
            ("np.load(each .npy) + load_state_dict (anchor)", npy_anchor, npy, None),
            ("torch.load(mmap) + load_state_dict (a .pt)", pt_anchor, pt, None),
            ("safetensors: meta model, build + load", "meta:st", st, touch_anchor),
            ("npz: meta model, build + load", "meta:npz", npz, touch_anchor),
            ("npy folder: meta model, build + load", "meta:npy", npy, touch_anchor),
            ("first-touch floor: map, allocate, copy (anchor)", touch_anchor, st, None),
            ("default init + load_state_dict", init_anchor, npz, touch_anchor),
        ]
        if "keras" in paths:
            h5_anchor = "h5py.read"
            rows[10:10] = [
                ("keras .weights.h5: existing model", "weightport:keras", paths["keras"], h5_anchor),
                (
                    "keras .weights.h5: existing, rollback=False",
                    "weightport:keras:norollback",
                    paths["keras"],
                    h5_anchor,
                ),
                ("h5py: read every dataset, nothing else (anchor)", h5_anchor, paths["keras"], None),
            ]
            rows.append(
                ("keras .weights.h5: meta model, build + load", "meta:keras", paths["keras"], touch_anchor)
            )
        script = folder / "child.py"
        script.write_text(CHILD.format(here=str(HERE)))
        results: dict[str, list[tuple[float, int]]] = {case: [] for _, case, _, _ in rows}
        from weightport.sources import open_source

        with open_source(paths["safetensors"]) as src:
            arrays = [src.read(n) for n in src.infos]
        floors = []
        for round_ in range(args.rounds):
            floors.append(floor_seconds(arrays, 3, args.threads))
            # each round starts at another row: no row is always first
            start = round_ * len(rows) // args.rounds
            for _, case, path, _ in rows[start:] + rows[:start]:
                out = subprocess.run(
                    [sys.executable, str(script), case, str(path), str(args.hidden), str(args.threads)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results[case].append((r["seconds"], r["extra"]))
        floor = statistics.median(floors)
        medians = {case: statistics.median(t for t, _ in v) for case, v in results.items()}
        peaks = {case: statistics.median(m for _, m in v) for case, v in results.items()}
        print(
            f"LSTM({args.hidden}, {args.hidden}, 4 layers, bidirectional): {nbytes / 1e6:.0f} MB; memcpy floor "
            f"{floor * 1e3:.1f} ms; {args.rounds} interleaved rounds, a fresh process per load, "
            f"{args.threads} thread(s) each"
        )
        print(f"{'load':<50} {'ms':>8} {'x floor':>8} {'x anchor':>9} {'extra peak':>11}")
        for label, case, _, anchor in rows:
            ratio = f"{medians[case] / medians[anchor]:8.2f}x" if anchor else " " * 9
            print(
                f"{label:<50} {medians[case] * 1e3:8.1f} {medians[case] / floor:7.2f}x {ratio} "
                f"{peaks[case] / nbytes:10.3f}x"
            )


if __name__ == "__main__":
    main()
