"""Host -> device copies through pinned buffers, overlapped with the host-side work.

Values bound for a GPU tensor are written (cast to the tensor's dtype) into one
of two pinned host buffers, band of rows by band of rows, and sent with
``copy_(non_blocking=True)`` while the other buffer is filled; a buffer is reused
only after its transfer's event has completed. The destination keeps its
storage, so Parameters and cuDNN's flat weight buffer stay as they were. On the
CPU (no pinned memory) the same code runs with plain buffers, which is how the
tests exercise it.

>>> import numpy as np, torch
>>> target = torch.zeros(3, 2)
>>> with Stager(torch.device("cpu"), pin=False, buffer_bytes=8) as stager:
...     stager.write(target, np.arange(6.0).reshape(2, 3).T)
>>> target.tolist()
[[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from weightport.tensors import to_numpy_dtype

__all__ = ["Stager", "DEFAULT_BUFFER_BYTES"]

DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024


class Stager:
    """Two reusable (pinned) host buffers and their transfer events, for one device."""

    def __init__(
        self, device: torch.device, *, pin: bool | None = None, buffer_bytes: int = DEFAULT_BUFFER_BYTES
    ):
        self.device = device
        self.pin = (device.type == "cuda") if pin is None else pin
        self.buffer_bytes = buffer_bytes
        self._buffers: list[torch.Tensor] = []
        self._events: list[Any] = [None, None]
        self._turn = 0

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        index = self._turn
        self._turn ^= 1
        event = self._events[index]
        if event is not None:
            event.synchronize()  # its last transfer must be done before the buffer is refilled
            self._events[index] = None
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._buffers[index].numel() < nbytes:
            self._buffers[index] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        return index, self._buffers[index]

    def write(self, target: torch.Tensor, value: np.ndarray) -> None:
        """Copy ``value`` (any strides, any dtype that casts) into ``target`` in bands of rows."""
        dtype = to_numpy_dtype(target.dtype)
        flat_target = target.detach()
        if value.ndim == 0 or target.dim() == 0:
            self._send(flat_target.reshape(-1), np.asarray(value).reshape(1), dtype)
            return
        row_bytes = math.prod(value.shape[1:]) * dtype.itemsize
        rows = max(1, self.buffer_bytes // max(1, row_bytes))
        for start in range(0, value.shape[0], rows):
            band = value[start : start + rows]
            self._send(flat_target[start : start + rows], band, dtype)

    def _send(self, destination: torch.Tensor, band: np.ndarray, dtype: np.dtype) -> None:
        nbytes = band.size * dtype.itemsize
        index, buffer = self._buffer(nbytes)
        host = buffer[:nbytes]
        staged = host.numpy().view(dtype).reshape(band.shape)
        np.copyto(staged, band, casting="unsafe")  # the cast happens here, on the host
        source = host.view(destination.dtype).reshape(destination.shape) if nbytes else host
        destination.copy_(source, non_blocking=self.pin)
        if self.pin and self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._events[index] = event

    def finish(self) -> None:
        """Wait until every transfer is done (the buffers may then be freed)."""
        for index, event in enumerate(self._events):
            if event is not None:
                event.synchronize()
                self._events[index] = None
