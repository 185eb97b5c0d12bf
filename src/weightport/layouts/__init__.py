"""Framework layouts, found by name through a registry so imports stay a tree.

>>> from weightport.layouts import get_layout, layout_names
>>> "torch" in layout_names()
True
>>> get_layout("torch").NAME
'torch'
"""

from __future__ import annotations

import importlib
from typing import cast

from weightport.errors import LayoutError
from weightport.layouts.base import Layout, LayoutPlan, Pairing, Rule

__all__ = [
    "Layout",
    "LayoutPlan",
    "Pairing",
    "Rule",
    "get_layout",
    "layout_names",
    "register_layout",
    "detect_layout",
]

_REGISTRY: dict[str, str] = {
    "torch": "weightport.layouts.torch",
    "keras": "weightport.layouts.keras",
    "flax": "weightport.layouts.flax",
    "onnx": "weightport.layouts.onnx",
}


def register_layout(name: str, module_path: str) -> None:
    """Add a layout module by import path; an existing name is never overwritten."""
    if name in _REGISTRY:
        raise LayoutError(f"layout '{name}' is already registered (as {_REGISTRY[name]}); pick another name")
    _REGISTRY[name] = module_path


def layout_names() -> list[str]:
    return sorted(_REGISTRY)


def get_layout(name: str) -> Layout:
    """The layout registered as ``name`` (a module or package meeting :class:`Layout`)."""
    try:
        path = _REGISTRY[name]
    except KeyError:
        raise LayoutError(
            f"unknown layout '{name}'. Fix: pass layout= one of {', '.join(map(repr, layout_names()))}, or leave "
            "it out (weightport reads it from the file)."
        ) from None
    try:
        return cast(Layout, importlib.import_module(path))
    except ModuleNotFoundError as e:
        if e.name == path:
            raise LayoutError(f"layout '{name}' is not available in this version of weightport") from None
        raise


def detect_layout(source: object) -> str:
    """The layout a source declares (``metadata['layout']``), else ``"torch"`` (names as in PyTorch)."""
    metadata = getattr(source, "metadata", {})
    return str(metadata.get("layout", "torch"))
