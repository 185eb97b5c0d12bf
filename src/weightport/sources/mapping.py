"""A source over arrays already in memory: a dict of NumPy arrays, tensors, lists.

Values are converted once when the source is made (``np.asarray``; torch tensors
through ``.detach().cpu()``), and refused when no real array can be made of them
(ragged lists, strings, objects). Nested mappings are flattened with ``/``.

>>> import numpy as np
>>> src = MappingSource.from_mapping({"dense": {"kernel": np.ones((2, 3))}})
>>> list(src.infos)
['dense/kernel']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightport.dtypes import is_numeric, non_numeric
from weightport.errors import SourceError, a_or_an
from weightport.sources.base import Region, Source, TensorInfo

__all__ = ["MappingSource", "to_array"]


def to_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a NumPy array (a view where possible), or a SourceError that says why not."""
    if type(value) is np.ndarray and value.dtype.kind in "fiucb":
        return value  # the common case, nothing to check
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        return _tensor_to_array(name, value)
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise SourceError(
            f"'{name}': cannot be made into an array ({e}); ragged nested lists are not tensors. "
            "Fix: pass a NumPy array of one shape."
        ) from None
    if not is_numeric(array.dtype):
        what, fix = non_numeric(array.dtype)
        raise SourceError(f"'{name}': holds {what}. Fix: {fix}.")
    return array


def _tensor_to_array(name: str, value: Any) -> np.ndarray:
    """A torch tensor's values as NumPy holds them: bfloat16 (and other ``ml_dtypes`` types) bit for bit."""
    import torch

    from weightport.tensors import numpy_of

    if value.is_meta:
        raise SourceError(
            f"'{name}': a tensor on the meta device, which has no values. "
            "Fix: pass a tensor with data (load or initialize it first)."
        )
    if value.layout != torch.strided:
        raise SourceError(f"'{name}': a {value.layout} tensor, not a dense one. Fix: pass tensor.to_dense().")
    tensor = value.detach().cpu().resolve_conj().resolve_neg()  # lazy conj/neg views: their real values
    try:
        return numpy_of(tensor)  # bfloat16, float8: through ml_dtypes, bit for bit
    except TypeError:
        raise SourceError(
            f"'{name}': a {str(tensor.dtype).removeprefix('torch.')} tensor, a dtype NumPy cannot hold. "
            "Fix: convert it first (tensor.float())."
        ) from None


@dataclass
class MappingSource(Source):
    """Arrays in memory by name; reading never fails and never copies."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], description: str = "the given mapping"
    ) -> MappingSource:
        arrays: dict[str, np.ndarray] = {}
        ignored: list[str] = []
        _flatten(mapping, "", arrays, ignored)
        infos = {n: TensorInfo(n, a.shape, a.dtype) for n, a in arrays.items()}
        return cls(description=description, infos=infos, ignored=ignored, in_memory=True, arrays=arrays)

    def read(self, name: str) -> np.ndarray:
        array = self.arrays[name]
        self.bytes_read += array.nbytes
        return array

    def read_region(self, name: str, region: Region, out: np.ndarray | None = None) -> np.ndarray:
        part = self.arrays[name][region]  # a view: nothing is copied
        self.bytes_read += part.nbytes
        if out is None:
            return part
        np.copyto(out, part, casting="no")
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        np.copyto(out, self.arrays[name], casting="no")
        self.bytes_read += out.nbytes


def _flatten(mapping: Mapping[str, Any], prefix: str, out: dict[str, np.ndarray], ignored: list[str]) -> None:
    """Nested mappings flattened to ``/``-joined names; ``None`` values (a pytree's empty slot, like
    Flax 0.10's bias of a layer without one) hold no tensor and are listed in ``ignored``."""
    for key, value in mapping.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # list positions in pytrees (nnx to_pure_dict)
        if not isinstance(key, str):
            raise SourceError(f"key {key!r} is {a_or_an(type(key).__name__)}; tensor names must be strings")
        name = prefix + key
        if isinstance(value, Mapping):
            _flatten(value, name + "/", out, ignored)
        elif value is None:
            ignored.append(f"{name} (None, not an array)")
        else:
            out[name] = to_array(name, value)
