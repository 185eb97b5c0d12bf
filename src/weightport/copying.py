"""Copying a NumPy view into a torch tensor at memory speed, transposed views included.

A plain copy (same dtype, both contiguous, on the CPU) of 1 MiB or more into existing memory goes
through the compiled kernel's ``stream_copy``: non-temporal stores write the destination without
reading it into the cache first, a third less memory traffic than torch's ``copy_`` (whose stores
read each line before writing it); big copies are split over a few threads. Fresh memory (a new
tensor, ``fresh=True``) has its pages backed all at once first and is then streamed into the same
way, and :func:`copy_checked` fuses that copy with the NaN/Inf scan.

A transposed source (a Keras kernel ``(in, gates*hidden)``, or one gate's block of
its columns, going into PyTorch's ``(gates*hidden, in)``) goes through the compiled
kernel in ``_kernels.c`` (line-wide strips of whole destination lines, GIL released),
split over a few threads by rows when large. The NaN/Inf scan (:func:`all_finite`)
is split over the same threads. Where that extension was not built (no C compiler at install),
it is copied in bands of destination rows instead: each band's columns are gathered
into a small scratch buffer that stays in cache, then transposed into place by torch.

>>> import numpy as np, torch
>>> dst = torch.empty(3, 2)
>>> copy_into(dst, np.arange(6, dtype=np.float32).reshape(2, 3).T)
>>> dst.tolist()
[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from weightport.kernels import compiled as _kernels  # None: the torch fallbacks below do the work
from weightport.kernels import scan_layout
from weightport.tensors import as_torch, to_torch_dtype

__all__ = [
    "copy_into",
    "copy_array",
    "copy_checked",
    "all_finite",
    "BAND_ROWS",
    "PARALLEL_BYTES",
    "STREAM_BYTES",
]

BAND_ROWS = 128
PARALLEL_BYTES = 8 * 1024 * 1024
STREAM_BYTES = 1024 * 1024  # below this the destination stays in the cache: plain stores are as fast
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
T = TypeVar("T")


_CPUS = os.cpu_count() or 1  # read once: each call asks the system


def _threads() -> int:
    return max(1, min(4, torch.get_num_threads(), _CPUS))


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked child has the pool but not its threads
        # as many workers as any later call may use: each call submits _threads() tasks at most
        _pool = ThreadPoolExecutor(max_workers=min(4, _CPUS), thread_name_prefix="weightport-copy")
        _pool_pid = os.getpid()
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


def _kernel_fits(dst: torch.Tensor, src: np.ndarray) -> bool:
    """Whether the compiled kernel can do this copy: a same-dtype 2-D source laid out along the
    destination's columns (``src[i, j]`` at ``i * itemsize + j * stride``) into row-major rows,
    on the CPU, with no memory shared between the two."""
    size = src.itemsize
    if _kernels is None or src.ndim != 2 or src.strides[0] != size or dst.dim() != 2:
        return False  # the common case (a row-major source) leaves here
    rows, cols = src.shape
    if (
        size not in (2, 4, 8)
        or src.strides[1] <= size
        or src.strides[1] % size
        or rows < 2
        or dst.stride(1) != 1
        or dst.stride(0) < cols
        or not _plain_destination(dst, src)
    ):
        return False
    src_start = src.__array_interface__["data"][0]
    if src_start % size:
        return False  # an unaligned view (a mapped file at an odd offset): torch's copy handles it
    src_end = src_start + (rows - 1) * size + (cols - 1) * src.strides[1] + size
    dst_start = dst.data_ptr()
    dst_end = dst_start + ((rows - 1) * dst.stride(0) + cols) * size
    return _disjoint(src_start, src_end, dst_start, dst_end)


def _copy_kernel(dst: torch.Tensor, src: np.ndarray, start: int, stop: int) -> None:
    """Rows ``start:stop`` through the compiled kernel (which releases the GIL)."""
    assert _kernels is not None  # _kernel_fits said so
    size, row = src.itemsize, dst.stride(0)
    _kernels.transpose(
        dst.data_ptr() + start * row * size,
        src.__array_interface__["data"][0] + start * size,
        stop - start,
        src.shape[1],
        src.strides[1] // size,
        row,
        size,
    )


def _run(work: Callable[..., T], calls: list[tuple[Any, ...]]) -> list[T]:
    """``work(*args)`` for each ``args`` of ``calls``, on the copy threads where there is more than one."""
    if len(calls) == 1:
        return [work(*calls[0])]
    futures = [_executor().submit(work, *args) for args in calls]
    return [future.result() for future in futures]


def _stream(dst: int, src: int, nbytes: int) -> None:
    """``nbytes`` from address ``src`` to ``dst`` (not overlapping) by non-temporal stores, threaded."""
    assert _kernels is not None  # copy_array and _streamable said so
    _run(_kernels.stream_copy, [(dst + a, src + a, n) for a, n in _parts(nbytes)])


def _parts(nbytes: int) -> list[tuple[int, int]]:
    """``(first byte, byte count)`` of each thread's part of a copy, each starting on a page (so on
    an item of any size too)."""
    workers = _threads() if nbytes >= PARALLEL_BYTES else 1
    step = -(-nbytes // workers)
    step += -step % 4096
    return [(a, min(step, nbytes - a)) for a in range(0, nbytes, step)]


def _disjoint(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    """Whether byte ranges ``[a_start, a_end)`` and ``[b_start, b_end)`` share no byte."""
    return a_end <= b_start or b_end <= a_start


def _plain_destination(dst: torch.Tensor, src: np.ndarray) -> bool:
    """Whether ``dst`` takes ``src``'s items bit for bit: a CPU tensor of its shape and exact dtype
    (native byte order, no lazy conjugate or negation)."""
    return (
        dst.device.type == "cpu"
        and tuple(dst.shape) == src.shape
        and src.dtype.isnative
        and to_torch_dtype(src.dtype) == dst.dtype
        and not (dst.is_conj() or dst.is_neg())
    )


def copy_array(dst: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dst, src)``, streamed where both are C-contiguous arrays of one dtype and 1 MiB or more.

    >>> out = np.zeros(3, np.float32)
    >>> copy_array(out, np.arange(3, dtype=np.float32))
    >>> out.tolist()
    [0.0, 1.0, 2.0]
    """
    nbytes = src.nbytes
    if (
        _kernels is None
        or nbytes < STREAM_BYTES
        or dst.dtype != src.dtype
        or dst.shape != src.shape
        or not (dst.flags.c_contiguous and src.flags.c_contiguous and dst.flags.writeable)
        or not _disjoint(dst.ctypes.data, dst.ctypes.data + nbytes, src.ctypes.data, src.ctypes.data + nbytes)
    ):
        np.copyto(dst, src)
        return
    _stream(dst.ctypes.data, src.ctypes.data, nbytes)


def _streamable(dst: torch.Tensor, src: np.ndarray) -> bool:
    """Whether ``dst.copy_(src)`` is a plain byte copy of a size the compiled kernels take (streamed
    into existing memory, or fused with the scan into fresh memory)."""
    nbytes, start = src.nbytes, src.ctypes.data
    return (
        _kernels is not None
        and nbytes >= STREAM_BYTES
        and src.flags.c_contiguous
        and dst.is_contiguous()
        and _plain_destination(dst, src)
        and _disjoint(dst.data_ptr(), dst.data_ptr() + nbytes, start, start + nbytes)
    )


def copy_checked(dst: torch.Tensor, src: np.ndarray) -> bool | None:
    """``copy_into`` fresh memory (a new tensor never written), fused with the NaN/Inf scan: the
    source is read from memory once for both. The pages are backed first, all at once
    (:func:`_populated`), and then written by streamed stores; where they cannot be, by plain stores,
    which suit pages first touched as they are written.

    Returns whether every value was finite, with the copy made either way; None (nothing copied)
    where the compiled kernel cannot do it (another dtype, layout or device, or a small tensor):
    then copy and scan apart.

    >>> out = torch.empty(2**20)
    >>> copy_checked(out, np.full(2**20, 2.0, np.float32)) in (True, None)
    True
    """
    layout = scan_layout(dst.dtype)
    if layout is None or not _streamable(dst, src):
        return None
    assert _kernels is not None  # _streamable said so
    streamed = _populated(dst)
    destination, source = dst.data_ptr(), src.ctypes.data
    calls = [
        (destination + a, source + a, n // src.itemsize, *layout, streamed) for a, n in _parts(src.nbytes)
    ]
    return all(_run(_kernels.copy_finite, calls))


def _populated(fresh: torch.Tensor) -> bool:
    """Whether the pages of ``fresh`` (a new CPU tensor of 1 MiB or more) were backed all at once,
    split over the copy threads, rather than one fault per page as they are first written."""
    nbytes = fresh.numel() * fresh.element_size()
    if _kernels is None or nbytes < STREAM_BYTES or fresh.device.type != "cpu" or not fresh.is_contiguous():
        return False
    start = fresh.data_ptr()
    return all(_run(_kernels.populate, [(start + a, n) for a, n in _parts(nbytes)]))


def all_finite(tensor: torch.Tensor) -> bool | None:
    """Whether a contiguous CPU float tensor holds no NaN or Inf, in one read-only pass of the
    compiled scan (split over the copy threads when big); None where that scan cannot tell (no
    extension, another dtype or layout).

    >>> all_finite(torch.tensor([1.0, float("inf")])) in (False, None)
    True
    """
    layout = scan_layout(tensor.dtype)
    if _kernels is None or layout is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    start, size = tensor.data_ptr(), layout[0]
    calls = [(start + a, n // size, *layout) for a, n in _parts(tensor.numel() * size)]
    return all(_run(_kernels.all_finite, calls))


def copy_into(dst: torch.Tensor, src: np.ndarray, *, fresh: bool = False) -> None:
    """``dst.copy_(src)`` for a NumPy view of any strides; dtype casts as ``copy_`` does.

    ``fresh``: ``dst`` is memory never written before (a new tensor). Its pages are backed all at
    once first (:func:`_populated`), so that a contiguous copy streams into them as into existing
    memory (a model's tensors); where they cannot be, the system backs and zeroes each page as it is
    first touched, which leaves its lines in the cache, and the copy is made with plain stores.
    Transposed copies stream either way.
    """
    if src.flags.c_contiguous:  # the common case: one plain copy
        if _streamable(dst, src) and (not fresh or _populated(dst)):
            _stream(dst.data_ptr(), src.ctypes.data, src.nbytes)
        else:
            dst.copy_(as_torch(src))
        return
    if fresh:
        _populated(dst)
    if _kernel_fits(dst, src):
        work, length = _copy_kernel, src.shape[0]
    elif not _is_transposed(dst, src) or src.T.flags.c_contiguous or dst.device.type != "cpu":
        # Without the kernel, a whole transposed array goes through torch's own transposing copy,
        # in one call, like any other view; a block of columns of a wider array is gathered.
        dst.copy_(as_torch(src))
        return
    else:
        work, length = _copy_gathered, src.shape[0]
    nbytes = src.size * src.itemsize
    workers = _threads() if nbytes >= PARALLEL_BYTES else 1
    step = -(-length // workers)
    step += -step % BAND_ROWS
    _run(work, [(dst, src, a, min(a + step, length)) for a in range(0, length, step)])
