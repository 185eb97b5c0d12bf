"""torchvision and timm for the tests: real CNN zoos to port.

The torchvision wheels at hand are CUDA builds; installed without their dependencies beside the CPU torch,
their compiled ops (nms, roi_align, ...) do not register, and ``import torchvision`` fails registering
fake kernels for them. The models need none of them, so the module that registers them is replaced by
an empty one before the import.

>>> tv = torchvision()
>>> tv.models.resnet18(weights=None).fc.out_features
1000
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest


def allow_torchvision_import() -> None:
    """Make ``import torchvision`` work without its compiled ops (for every importer: transformers too)."""
    name = "torchvision._meta_registrations"
    if "torchvision" not in sys.modules:
        sys.modules.setdefault(name, types.ModuleType(name))


def torchvision() -> Any:
    """``torchvision``, imported without its compiled ops (skips the test where it is not installed)."""
    allow_torchvision_import()
    return pytest.importorskip("torchvision")


def timm() -> Any:
    """``timm`` (through :func:`torchvision`, which it imports)."""
    torchvision()
    return pytest.importorskip("timm")
