"""The compiled kernels of ``_kernels.c`` where the optional extension was built, and the float
layouts their value scan knows.

``compiled`` is the extension module, or None (no C compiler at install): every caller has a
torch or NumPy path for that case.

>>> import torch
>>> scan_layout(torch.float32) in ((4, False), None)
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

__all__ = ["compiled", "scan_layout"]

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
