"""The compiled kernels of ``_kernels.c`` where the optional extension was built, and the value scan.

``compiled`` is the extension module, or None (no C compiler at install): every caller has a
torch or NumPy path for that case.

>>> import torch
>>> all_finite(torch.tensor([1.0, float("inf")])) in (False, None)
True
"""

from __future__ import annotations

from types import ModuleType

import torch

compiled: ModuleType | None
try:
    from weightport import _kernels as compiled
except ImportError:  # the optional extension was not built
    compiled = None

__all__ = ["compiled", "all_finite", "scan_layout"]

# torch dtype -> (item size, whether it is bfloat16): the IEEE layouts the scan knows
_SCANNED = {
    torch.float16: (2, False),
    torch.bfloat16: (2, True),
    torch.float32: (4, False),
    torch.float64: (8, False),
}


def scan_layout(dtype: torch.dtype) -> tuple[int, bool] | None:
    """``(item size, is bfloat16)`` of a float dtype the compiled scan knows; None for the others
    (or where the extension was not built).

    >>> scan_layout(torch.bfloat16) in ((2, True), None)
    True
    """
    return None if compiled is None else _SCANNED.get(dtype)


def all_finite(tensor: torch.Tensor) -> bool | None:
    """Whether a contiguous CPU float tensor holds no NaN or Inf, in one read-only pass of the
    compiled scan; None where that scan cannot tell (no extension, another dtype or layout)."""
    layout = scan_layout(tensor.dtype)
    if compiled is None or layout is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return bool(compiled.all_finite(tensor.data_ptr(), tensor.numel(), *layout))
