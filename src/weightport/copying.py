"""Copying a NumPy view into a torch tensor at memory speed, transposed views included.

A transposed source (a Keras kernel ``(in, gates*hidden)`` going into PyTorch's
``(gates*hidden, in)``) is copied in bands of destination rows: each band's
columns are gathered into a small scratch buffer that stays in cache, then
transposed into place. Large tensors split their bands over a few threads
(NumPy and torch release the GIL while copying).

>>> import numpy as np, torch
>>> dst = torch.empty(3, 2)
>>> copy_into(dst, np.arange(6, dtype=np.float32).reshape(2, 3).T)
>>> dst.tolist()
[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from weightport.dtypes import as_torch

__all__ = ["copy_into", "BAND_ROWS", "PARALLEL_BYTES"]

BAND_ROWS = 128
PARALLEL_BYTES = 8 * 1024 * 1024
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, min(4, torch.get_num_threads(), os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="weightport-copy")
    return _pool


def _is_transposed(dst: torch.Tensor, src: np.ndarray) -> bool:
    """A 2-D source read along its columns into a row-major destination."""
    return (
        src.ndim == 2
        and dst.dim() == 2
        and dst.stride(1) == 1
        and src.strides[0] != 0
        and abs(src.strides[0]) < abs(src.strides[1])
        and src.shape[0] >= BAND_ROWS
    )


def _copy_gathered(dst: torch.Tensor, src: np.ndarray, start: int, stop: int) -> None:
    """Rows ``start:stop`` where ``src`` is a block of columns of a wider array (a gate of a Keras
    kernel): each band's columns are gathered (contiguous runs) into a small scratch buffer whose
    transpose torch copies with its fast path; torch would read the block one element at a time."""
    scratch = np.empty((src.shape[1], BAND_ROWS), src.dtype.newbyteorder("="))
    for a in range(start, stop, BAND_ROWS):
        b = min(a + BAND_ROWS, stop)
        # torch's fast transposing copy needs a contiguous source: the last, narrower band gets its own
        band = scratch if b - a == BAND_ROWS else np.empty((src.shape[1], b - a), scratch.dtype)
        np.copyto(band, src[a:b].T)
        dst[a:b].copy_(as_torch(band).T)


def copy_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """``dst.copy_(src)`` for a NumPy view of any strides; dtype casts as ``copy_`` does."""
    # A whole transposed array goes through torch's own transposing copy, in one call, like any
    # other view; only a block of columns of a wider array is gathered band by band.
    if not _is_transposed(dst, src) or src.T.flags.c_contiguous or dst.device.type != "cpu":
        dst.copy_(as_torch(src))
        return
    work, length = _copy_gathered, src.shape[0]
    nbytes = src.size * src.itemsize
    workers = _threads() if nbytes >= PARALLEL_BYTES else 1
    if workers == 1:
        work(dst, src, 0, length)
        return
    step = -(-length // workers)
    step += -step % BAND_ROWS
    futures = [_executor().submit(work, dst, src, a, min(a + step, length)) for a in range(0, length, step)]
    for future in futures:
        future.result()
