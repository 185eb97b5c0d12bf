"""Shared by the benchmarks: interleaved timing, peak-RSS measurement, ratio printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def extra_peak(run: Callable[[], object]) -> int:
    """Peak RSS during ``run`` minus RSS just before it."""
    reset_peak()
    before = rss_bytes()
    run()
    return rss_bytes("VmHWM") - before


def interleaved(cases: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Median seconds of each case, cases run in turn within each round (noise hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_ratios(title: str, medians: dict[str, float], anchor: str, others: tuple[str, ...] = ()) -> None:
    print(f"\n{title}")
    base = medians[anchor]
    for name, t in medians.items():
        extra = "".join(f"  {t / medians[o]:6.2f}x {o}" for o in others if o != name)
        print(f"  {name:<44} {t * 1e3:9.2f} ms  {t / base:6.2f}x {anchor}{extra}")


def split(dst: np.ndarray, src: np.ndarray, threads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``dst`` and ``src`` (one size) cut into ``threads`` flat (destination, source) parts."""
    d, a = dst.reshape(-1), src.reshape(-1)
    step = -(-a.size // threads)
    return [(d[i : i + step], a[i : i + step]) for i in range(0, a.size, step)]


def copy_parts(parts: list[tuple[np.ndarray, np.ndarray]], pool: ThreadPoolExecutor | None) -> None:
    """``np.copyto`` of each (destination, source) part, on ``pool``'s threads where given: the memcpy
    floor of a load on that many threads."""
    if pool is None:
        for d, a in parts:
            np.copyto(d, a)
    else:
        list(pool.map(lambda part: np.copyto(*part), parts))
