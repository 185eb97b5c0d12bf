"""Big-model loads from files: LSTM(1024, 1024, 4 layers, bidirectional), 369 MB of float32.

For each file format, loads into an existing model and into a model built on the
``meta`` device, each in a fresh process (so peak RSS is that load's own), in
interleaved rounds. Prints the median time as a ratio to the memcpy floor
(``np.copyto`` of the same bytes into preallocated, touched arrays, measured in
the same run) and to the format's anchor, and the extra peak RSS (peak minus RSS
after imports and model construction, file-backed pages included) as a multiple
of the model's bytes. Files are read warm (from the page cache), as the floor is.

Run: .venv/bin/python bench/bench_files.py [--rounds 7] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r})
from _common import reset_peak, rss_bytes
import numpy as np, torch
import weightport
case, path, hidden = sys.argv[1], sys.argv[2], int(sys.argv[3])

def build():
    return torch.nn.LSTM(hidden, hidden, num_layers=4, bidirectional=True)

def run():
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
    else:
        raise SystemExit("unknown case " + case)
    return time.perf_counter() - start

kind_layout = "keras" if path.endswith(".h5") else None
# Warm up outside the measurement: imports (h5py, safetensors, ...) and first calls cost time and RSS
# once per process, not per load.
import safetensors.torch  # noqa: F401
from weightport.layouts import get_layout
from weightport.sources import open_source
if not path.endswith(".pt"):
    open_source(path).close()
    get_layout(kind_layout or "torch")
weightport.load(torch.nn.LSTM(2, 2), weightport.to_numpy(torch.nn.LSTM(2, 2)))
base = None
if case.startswith("meta:") or case.startswith("default-init"):
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


def floor_seconds(nbytes_arrays: list[np.ndarray], rounds: int) -> float:
    dst = [np.ones_like(a) for a in nbytes_arrays]
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for d, a in zip(dst, nbytes_arrays):
            np.copyto(d, a)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, nbytes = write_files(folder, args.hidden)
        st, npz, npy, pt = paths["safetensors"], paths["npz"], paths["npy-folder"], paths["pt"]
        st_anchor, npz_anchor = "safetensors.load_model", "np.load+load_state_dict"
        pt_anchor, init_anchor = "torch.load(mmap)+load_state_dict", "default-init+load_state_dict"
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
            ("npy folder: existing model", "weightport:npy", npy, pt_anchor),
            ("npy folder: existing, rollback=False", "weightport:npy:norollback", npy, pt_anchor),
            ("torch.load(mmap) + load_state_dict (anchor)", pt_anchor, pt, None),
            ("safetensors: meta model, build + load", "meta:st", st, init_anchor),
            ("npz: meta model, build + load", "meta:npz", npz, init_anchor),
            ("npy folder: meta model, build + load", "meta:npy", npy, init_anchor),
            ("default init + load_state_dict (anchor)", init_anchor, npz, None),
        ]
        if "keras" in paths:
            rows.insert(10, ("keras .weights.h5: existing model", "weightport:keras", paths["keras"], None))
            rows.insert(
                11,
                (
                    "keras .weights.h5: existing, rollback=False",
                    "weightport:keras:norollback",
                    paths["keras"],
                    None,
                ),
            )
            rows.append(
                ("keras .weights.h5: meta model, build + load", "meta:keras", paths["keras"], init_anchor)
            )
        script = folder / "child.py"
        script.write_text(CHILD.format(here=str(HERE)))
        results: dict[str, list[tuple[float, int]]] = {case: [] for _, case, _, _ in rows}
        from weightport.sources import open_source

        with open_source(paths["safetensors"]) as src:
            arrays = [src.read(n) for n in src.infos]
        floors = []
        for _ in range(args.rounds):
            floors.append(floor_seconds(arrays, 3))
            for _, case, path, _ in rows:
                out = subprocess.run(
                    [sys.executable, str(script), case, str(path), str(args.hidden)],
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
            f"{floor * 1e3:.1f} ms; {args.rounds} interleaved rounds, a fresh process per load"
        )
        print(f"{'load':<46} {'ms':>8} {'x floor':>8} {'x anchor':>9} {'extra peak':>11}")
        for label, case, _, anchor in rows:
            ratio = f"{medians[case] / medians[anchor]:8.2f}x" if anchor else " " * 9
            print(
                f"{label:<46} {medians[case] * 1e3:8.1f} {medians[case] / floor:7.2f}x {ratio} "
                f"{peaks[case] / nbytes:10.3f}x"
            )


if __name__ == "__main__":
    main()
