"""A module's tensors out as NumPy arrays and files (``.npz``, ``.safetensors``).

Arrays are copies, never views of the module's memory. Files are written by their
format's module (:mod:`weightport.sources`), to a temporary name beside the target
and renamed into place, so a failed save never leaves half a file.

>>> import torch, weightport
>>> arrays = weightport.to_numpy(torch.nn.Linear(2, 3))
>>> {k: v.shape for k, v in arrays.items()}
{'weight': (3, 2), 'bias': (3,)}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from weightport.errors import SourceError
from weightport.sources import writer_for
from weightport.sources.npz import write as write_npz
from weightport.sources.safetensors import REFUSED as SAFETENSORS_REFUSED
from weightport.sources.safetensors import dtype_codes
from weightport.sources.safetensors import write as write_safetensors
from weightport.tensors import numpy_of

__all__ = [
    "to_numpy",
    "save",
    "save_path",
    "write_npz",
    "write_safetensors",
    "SAFETENSORS_REFUSED",
]


def __getattr__(name: str) -> Any:
    """``SAFETENSORS_DTYPES``: the format's dtype codes (made on first use: it imports ml_dtypes)."""
    if name == "SAFETENSORS_DTYPES":
        return dtype_codes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """Every tensor of ``module.state_dict()`` as a NumPy copy, by state-dict name.

    Raises:
        SourceError: a tensor NumPy cannot hold (complex32, a sparse or meta tensor), an uninitialized
            parameter of a lazy module, or a quantized module's packed state.
    """
    return {name: _exported(name, tensor) for name, tensor in module.state_dict().items()}


def _exported(name: str, tensor: object) -> np.ndarray:
    """State-dict tensor ``name`` as a NumPy copy of its values, bit for bit (bfloat16 and float8 through
    ml_dtypes; a tensor that requires grad, detached), else a SourceError saying why it has none to give."""
    if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:
        raise SourceError(
            f"'{name}': the state of a quantized module ({type(tensor).__name__}), not a tensor of values. "
            "Fix: export the float model, before it was quantized."
        )
    if is_lazy(tensor):  # a lazy module's: no shape, no values yet
        raise SourceError(
            f"'{name}': an uninitialized parameter of a lazy module (nn.LazyLinear and the like), which has no "
            "shape or values yet. Fix: run one forward pass first (module(example_input)), which gives it its "
            "shape, then export it."
        )
    if tensor.is_meta:  # checked here, where the tensor's name is known
        raise SourceError(
            f"'{name}': a tensor on the meta device, which has no values to export. Fix: give the module "
            "its values first (weightport.load(module, source) fills a meta-device module), then save it."
        )
    if tensor.layout != torch.strided:  # sparse (COO, CSR, ...): NumPy holds dense arrays only
        raise SourceError(
            f"'{name}': a sparse tensor ({tensor.layout}), where NumPy and the weight files hold dense "
            "arrays only. Fix: save it dense: weightport.save({k: v.to_dense().numpy() for k, v in "
            "module.state_dict().items()}, path)."
        )
    try:
        return numpy_of(tensor, copy=True)
    except (TypeError, RuntimeError):
        raise SourceError(
            f"'{name}': a {str(tensor.dtype).removeprefix('torch.')} tensor, a dtype NumPy cannot hold. "
            "Fix: convert it first (for complex32: tensor.to(torch.complex64))."
        ) from None


def save_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path :func:`save` can write (``.npz`` or ``.safetensors``), else a SourceError;
    callers check it before long work whose result it is to hold."""
    writer_for(path)
    return Path(path)


def save(module: nn.Module | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save a module's tensors (or a dict of arrays or torch tensors) to ``.npz`` or ``.safetensors`` by suffix.

    Loading the file back with :func:`weightport.load` restores the module exactly.
    """
    write = writer_for(path)  # before copying the module's tensors out
    if isinstance(module, nn.Module):
        arrays = to_numpy(module)
    else:  # torch tensors in a dict as a state dict's (bfloat16, requiring grad): copied out the same way
        arrays = {k: _exported(k, v) if isinstance(v, torch.Tensor) else v for k, v in module.items()}
    return write(arrays, Path(path))
