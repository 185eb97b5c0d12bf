"""Mutation fuzzing of weightport's readers: damaged files of every format through ``weightport.load``.

Each seed is a real file (written by Keras, Flax, torch.onnx.export: tests/golden; or by NumPy and
weightport's own writers) with the module it loads into. Each mutant is the seed with one kind of
damage, chosen by a deterministic seed: bytes overwritten, a truncation, a run deleted or inserted,
a big integer planted (most often in the header). Every mutant runs in its own forked process under
an address-space limit and a timeout, through ``weightport.inspect.describe_source`` and
``weightport.load``; what comes back is one of

- ``ok`` (loaded; every value finite) or ``refused`` (a WeightportError, the module unchanged): fine;
- ``escape`` (another exception), ``crash`` (the process died), ``hang`` (the timeout),
  ``nonfinite`` (NaN/Inf let in), ``changed`` (refused, yet the module changed): findings.

Run the long batch with ``scripts/fuzz`` (``--help`` for its options); tests/test_fuzz.py runs a short
deterministic one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

GOLDEN = Path(__file__).parent / "golden"
__all__ = ["Seed", "seeds", "mutate", "probe", "run_one", "fuzz", "main"]
FINDINGS = ("escape", "crash", "hang", "nonfinite", "changed")
ADDRESS_SPACE_EXTRA = 2 << 30  # a mutant may make the process grow by this much before MemoryError


@dataclass(frozen=True)
class Seed:
    """A file of one format, and how to build the module it loads into."""

    name: str
    path: Path
    model: Callable[[], nn.Module]


class _Golden(nn.Module):
    """tests/golden/keras: Input((5, 3)) -> LSTM(4) -> GRU(2), batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 2, batch_first=True)


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))


def seeds(folder: Path) -> list[Seed]:
    """The seed files, written into ``folder`` where they are not golden files."""
    from weightport import save
    from weightport.export import to_numpy

    arrays = to_numpy(_small())
    npz, compressed, safetensors, npy = (folder / n for n in ("m.npz", "c.npz", "m.safetensors", "npy"))
    save(arrays, npz)
    np.savez_compressed(compressed, **arrays)
    save(arrays, safetensors)
    npy.mkdir(exist_ok=True)
    for name, array in arrays.items():
        np.save(npy / f"{name}.npy", array)
    found = [
        Seed("npz", npz, _small),
        Seed("npz-compressed", compressed, _small),
        Seed("safetensors", safetensors, _small),
        Seed("npy", npy / "0.weight.npy", _small),
        Seed("keras-weights-h5", GOLDEN / "keras" / "model.weights.h5", _Golden),
        Seed("keras-archive", GOLDEN / "keras" / "model.keras", _Golden),
        Seed("flax-msgpack", GOLDEN / "flax" / "lstm.msgpack", lambda: nn.LSTM(3, 4, batch_first=True)),
        Seed(
            "onnx",
            GOLDEN / "onnx" / "lstm.onnx",
            lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
        ),
    ]
    return [s for s in found if s.path.exists()]


def mutate(data: bytes, seed: int) -> tuple[bytes, str]:
    """One deterministic mutation of ``data``, and what it was."""
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    kind = int(rng.integers(5))
    header = min(len(buf), 1024)  # where the structure is: most damage goes there
    at = int(rng.integers(header if rng.random() < 0.7 else len(buf))) if buf else 0
    if kind == 0:
        count = int(rng.integers(1, 5))
        for i in range(count):
            if at + i < len(buf):
                buf[at + i] = int(rng.integers(256))
        return bytes(buf), f"overwrite {count} at {at}"
    if kind == 1:
        return bytes(buf[:at]), f"truncate at {at}"
    if kind == 2:
        run = int(rng.integers(1, 65))
        return bytes(buf[:at] + buf[at + run :]), f"delete {run} at {at}"
    if kind == 3:
        run = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
        return bytes(buf[:at] + run + buf[at:]), f"insert {len(run)} at {at}"
    value = [2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**40][int(rng.integers(5))]
    width = 4 if value < 2**32 else 8
    planted = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf[:at] + planted + buf[at + width :]), f"plant {value} at {at}"


def _state(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in module.state_dict().items()}


def probe(path: Path, model: Callable[[], nn.Module]) -> tuple[str, str]:
    """What weightport does with the file at ``path``: ``(outcome, detail)``."""
    import weightport
    from weightport.inspect import describe_source

    try:
        describe_source(path)
    except weightport.WeightportError:
        pass
    except BaseException as e:
        return "escape", f"inspect: {type(e).__name__}: {e}".splitlines()[0][:300]
    module = model()
    before = _state(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weightport.load(module, path)
    except weightport.WeightportError:
        return ("changed", "refused, but the module changed") if _state(module) != before else ("refused", "")
    except BaseException as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "escape", f"load: {type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"[:300]
    if not all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()):
        return "nonfinite", "NaN/Inf loaded"
    return "ok", ""


def _child(path: str, factory: Callable[[], nn.Module], send: multiprocessing.connection.Connection) -> None:
    size = _address_space()
    if size:
        resource.setrlimit(resource.RLIMIT_AS, (size + ADDRESS_SPACE_EXTRA, resource.RLIM_INFINITY))
    send.send(probe(Path(path), factory))


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(path: Path, factory: Callable[[], nn.Module], timeout: float) -> tuple[str, str]:
    """:func:`probe` in a forked process: crashes and hangs are outcomes too."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(str(path), factory, send))
    with warnings.catch_warnings():
        # JAX and TensorFlow, loaded by other tests, warn that forking a threaded process may
        # deadlock. The child touches neither (it reads one file with NumPy and torch), and the
        # timeout below turns any hang into an outcome all the same.
        warnings.simplefilter("ignore")
        process.start()
    send.close()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return "hang", f"no answer within {timeout} s"
    if receive.poll():
        return receive.recv()  # type: ignore[no-any-return]
    return "crash", f"exit code {process.exitcode}"


def fuzz(
    count: int, first_seed: int = 0, timeout: float = 20.0, only: str | None = None
) -> list[tuple[str, str, str, str]]:
    """``count`` mutants per seed file: ``(seed file, mutation, outcome, detail)`` for each."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in seeds(folder):
            if only and only not in seed.name:
                continue
            data = seed.path.read_bytes()
            for i in range(count):
                mutant, what = mutate(data, first_seed + i)
                path = folder / "mutants" / seed.path.name
                path.parent.mkdir(exist_ok=True)
                if seed.name == "npy":  # a folder of .npy: damage one file of it
                    path = folder / "mutant-npy"
                    path.mkdir(exist_ok=True)
                    for other in seed.path.parent.iterdir():
                        (path / other.name).write_bytes(other.read_bytes())
                    (path / seed.path.name).write_bytes(mutant)
                else:
                    path.write_bytes(mutant)
                outcome, detail = run_one(path, seed.model, timeout)
                results.append((seed.name, what, outcome, detail))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mutation-fuzz weightport's readers (see tests/fuzzing.py).")
    parser.add_argument("--mutants", type=int, default=500, help="mutants per seed file (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="first mutation seed (default 0)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per mutant (default 20)")
    parser.add_argument("--only", help="only seed files whose name contains this (npz, onnx, keras, ...)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = fuzz(args.mutants, args.seed, args.timeout, args.only)
    by_seed: dict[str, Counter[str]] = {}
    for seed, _, outcome, _ in results:
        by_seed.setdefault(seed, Counter())[outcome] += 1
    for seed, counts in by_seed.items():
        print(f"{seed:<18} " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    findings = [r for r in results if r[2] in FINDINGS]
    for seed, what, outcome, detail in findings[:50]:
        print(f"  {outcome:<9} {seed:<18} {what:<24} {detail}")
    print(f"{len(results)} mutants, {len(findings)} findings, {time.perf_counter() - start:.0f} s")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
