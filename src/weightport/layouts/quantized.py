"""Quantized checkpoints: integer or float8 codes stored beside the tensors that give them meaning.

A quantizer stores a weight as codes (int8, float8, 4-bit values packed into uint8 or int32) and keeps
what turns them back into values beside them, under names its convention fixes. Loaded into a
floating-point tensor as they are, the codes are numbers off by their scale, and weightport moves values
and never dequantizes: a plan refuses such a pair, naming both. Integers read from a checkpoint into a
floating-point parameter are refused too, scale or not: a file keeps a float weight as integers only as
codes or as another dtype's bits (bfloat16 saved as uint16 through ``.view``). Integers the caller
passes as arrays load when exact, as any cast does.

>>> import numpy as np
>>> dtypes = {"fc.weight": np.dtype("int8"), "fc.weight_scale": np.dtype("float32"), "fc.bias": np.dtype("float32")}
>>> quantized_groups(dtypes)
{'fc.weight': ('fc.weight_scale',)}
>>> quantized_groups({"fc.qweight": np.dtype("int32"), "fc.scales": np.dtype("float16")})
{'fc.qweight': ('fc.scales',)}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from weightport.dtypes import describe_dtype, is_float
from weightport.errors import Problem
from weightport.layouts.base import LayoutPlan, Rule
from weightport.sources.base import Source, TensorInfo
from weightport.sources.mapping import MappingSource

__all__ = ["Quantized", "quantized_groups", "is_code", "given_arrays"]

# Where a quantizer keeps what dequantizes a weight, by the conventions that write them.
# Joined to the codes' own name with "_": torchao / fbgemm FP8 and compressed-tensors 'weight_scale',
# DeepSeek-V3's blockwise 'weight_scale_inv', compressed-tensors 'weight_zero_point' and 'weight_g_idx',
# NVFP4's 'weight_global_scale', ModelOpt's 'weight_scale_2', bitsandbytes' 'weight_format', Keras'
# 'kernel_scale'.
_JOINED = ("scale", "scale_inv", "scale_2", "zero_point", "global_scale", "g_idx", "format")
# Attributes of the codes' own name (bitsandbytes 4-bit: 'weight.absmax', 'weight.quant_state.*').
_ATTRIBUTES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QUANT_STATE = ".quant_state."
# Beside the codes in their layer: bitsandbytes LLM.int8 'SCB', GPTQ / AWQ 'scales', 'qzeros', 'g_idx',
# torch.ao's 'scale' and 'zero_point', optimum-quanto's 'weight._data' with 'weight._scale'.
_IN_LAYER = ("SCB", "scales", "qzeros", "g_idx", "scale", "zero_point", "_scale")


def is_code(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is one a quantizer stores codes in: an integer, or a float of one byte or less."""
    return dtype.kind in "iu" or (is_float(dtype) and dtype.itemsize == 1)


def _parent(name: str) -> str:
    """``name``'s layer with its separator (``'fc.'`` of ``'fc.weight'``, ``'fc/'`` of ``'fc/kernel'``)."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[: cut + 1]


def quantized_groups(dtypes: Mapping[str, np.dtype]) -> dict[str, tuple[str, ...]]:
    """Each tensor held as codes (:func:`is_code`) that has a dequantizing tensor beside it, by the
    conventions' names, with those tensors: ``{codes: (scale, ...)}``.

    >>> quantized_groups({"l.weight": np.dtype("int8"), "l.SCB": np.dtype("float32"), "l.weight_format": np.dtype("uint8")})
    {'l.weight': ('l.weight_format', 'l.SCB')}
    """
    states: dict[str, list[str]] = defaultdict(list)
    for name in dtypes:
        head, mark, _ = name.partition(_QUANT_STATE)
        if mark:
            states[head].append(name)
    groups: dict[str, tuple[str, ...]] = {}
    for name, dtype in dtypes.items():
        if not is_code(dtype):
            continue
        parent = _parent(name)
        candidates = [
            *(f"{name}_{s}" for s in _JOINED),
            *(f"{name}.{s}" for s in _ATTRIBUTES),
            *(parent + s for s in _IN_LAYER),
        ]
        found = [c for c in dict.fromkeys(candidates) if c in dtypes and c != name] + sorted(states[name])
        if found:
            groups[name] = tuple(found)
    # a tensor that dequantizes another is no codes of its own (bitsandbytes' uint8 'weight_format',
    # GPTQ's int32 'qzeros' and 'g_idx')
    helpers = {s for siblings in groups.values() for s in siblings}
    return {codes: siblings for codes, siblings in groups.items() if codes not in helpers}


def given_arrays(source: Source) -> bool:
    """Whether ``source`` is arrays the caller passed (a mapping), not a checkpoint (a file, or a
    framework's variables): there an integer dtype is the caller's own choice."""
    return type(source) is MappingSource and "layout" not in source.metadata


def _listed(names: Collection[str], infos: Mapping[str, TensorInfo]) -> str:
    shown = [f"'{n}' ({describe_dtype(infos[n].dtype)}, shape {infos[n].shape})" for n in list(names)[:3]]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _formula(codes: str, siblings: Collection[str]) -> str:
    """How the convention the names show turns the codes back into values."""
    leaves = {s[len(_parent(s)) :] for s in siblings}
    if any(_QUANT_STATE in s for s in siblings) or leaves & {"absmax", "quant_map"}:
        return (
            "bitsandbytes 4-bit: bitsandbytes.functional.dequantize_4bit with its quant_state, or load the "
            "checkpoint with transformers and call model.dequantize() before saving"
        )
    if "qzeros" in leaves or codes.endswith("qweight"):
        return "GPTQ / AWQ packed integers: unpack and dequantize them with the library that wrote them"
    if "SCB" in leaves:
        return "bitsandbytes LLM.int8: codes.astype(np.float32) * SCB[:, None] / 127"
    if any(s.endswith("_scale_inv") for s in siblings):
        return (
            "DeepSeek-V3 FP8: codes.astype(np.float32) * scale_inv, each scale covering one block of "
            "quantization_config's weight_block_size: scale_inv.repeat(128, 0).repeat(128, 1)[:rows, :cols] "
            "for 128x128 blocks"
        )
    if any(s.endswith("zero_point") for s in siblings):
        return "(codes.astype(np.float32) - zero_point) * scale, each broadcast over the codes"
    if codes.endswith("kernel") and any(s.endswith("kernel_scale") for s in siblings):
        return "Keras: codes.astype(np.float32) / kernel_scale, as Keras' quantize() defines it"
    return (
        "codes.astype(np.float32) * scale, the scale broadcast over the codes (one per tensor, per output "
        "channel as shape (rows, 1), or per block), as the quantizer that wrote them defines it"
    )


_READ = "read the arrays (with weightport.open_source(path) as s: arrays = {n: s.read(n) for n in s})"


def _load_call(layout: str) -> str:
    return "weightport.load(model, arrays" + ("" if layout == "torch" else f", layout='{layout}'") + ")"


def pair_problem(
    full: str,
    target: torch.dtype,
    codes: str,
    siblings: Collection[str],
    origin: str,
    source: Source,
    layout: str,
) -> Problem:
    """The refusal of quantized codes bound for a floating-point tensor while their scale goes nowhere."""
    info = source.infos[codes]
    listed = ", ".join(f"'{s}'" for s in siblings)
    return Problem(
        full,
        f"{describe_dtype(target)} values (the weights themselves)",
        f"{describe_dtype(info.dtype)} quantized codes from {origin}: {source.description} holds what "
        f"dequantizes '{codes}' beside it, {_listed(siblings, source.infos)}",
        f"dequantize it first ({_formula(codes, siblings)}): {_READ}, put the float weight in place of "
        f"'{codes}' and {listed}, and {_load_call(layout)}; weightport moves values and never dequantizes. "
        "Or load the checkpoint into a quantized model of the library that wrote it",
    )


def _views(itemsize: int) -> str:
    return {2: "ml_dtypes.bfloat16) or .view(np.float16", 4: "np.float32", 8: "np.float64"}[itemsize]


def integer_problem(
    full: str, target: torch.dtype, name: str, origin: str, source: Source, layout: str
) -> Problem:
    """The refusal of integers read from a checkpoint into a floating-point parameter."""
    dtype = source.infos[name].dtype
    given = f"arrays['{name}']"
    bits = (
        f"{given}.view({_views(dtype.itemsize)}) where it holds a float's bits, "
        if dtype.itemsize > 1
        else ""
    )
    return Problem(
        full,
        f"{describe_dtype(target)} values (a floating-point parameter)",
        f"{describe_dtype(dtype)} values from {origin}: a checkpoint keeps a float weight as integers only as "
        "quantized codes or as another float's bits (bfloat16 saved as uint16 through .view), and nothing in "
        "it says which",
        f"{_READ} and make {given} float: {bits}the codes times their scale where it is quantized, "
        f"{given}.astype(np.float32) where the integers are the weights' own values (integers given as "
        f"arrays load when exact); then {_load_call(layout)}. Or save the checkpoint with float arrays",
    )


@dataclass
class Quantized:
    """The quantized tensors of one load: which codes a plan refuses, and the hints for their names."""

    source: Source
    layout: str  # the layout's name, for the load call a fix gives
    groups: dict[str, tuple[str, ...]]
    refused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # codes -> scales that go nowhere
    owners: dict[str, str] = field(default_factory=dict)  # each name of a group -> its codes

    @classmethod
    def of(cls, source: Source, layout: LayoutPlan, tensors: Mapping[str, torch.Tensor]) -> Quantized:
        """The groups of ``source``; a pair is refused where its codes go into a floating-point tensor of
        the module and a tensor that dequantizes them goes nowhere (a module that holds its scales too
        is quantized itself, and takes both)."""
        found = cls(source, layout.name, quantized_groups({n: i.dtype for n, i in source.infos.items()}))
        if not found.groups:
            return found
        placed = [r for r in layout.rules if r.target in tensors]
        consumed = {s for r in placed for s in r.sources}
        for rule in placed:
            if tensors[rule.target].is_floating_point():
                for name in rule.sources:
                    loose = tuple(s for s in found.groups.get(name, ()) if s not in consumed)
                    if loose:
                        found.refused[name] = loose
        for codes, siblings in found.groups.items():
            found.owners.update(dict.fromkeys(siblings, codes))
        for codes in found.groups:
            found.owners[codes] = codes
        return found

    def covers(self, names: Collection[str]) -> bool:
        """Whether ``names`` are all tensors that dequantize codes a refusal names already."""
        return bool(names) and all(
            self.owners.get(n) in self.refused and n not in self.refused for n in names
        )

    def problem(self, full: str, tensor: torch.Tensor, rule: Rule, origin: str) -> Problem | None:
        """The refusal of what ``rule`` puts into ``tensor``: quantized codes without their scale, or
        integers read from a checkpoint into a floating-point parameter; None where neither."""
        if not tensor.is_floating_point():
            return None
        for name in rule.sources:
            if name in self.refused:
                return pair_problem(
                    full, tensor.dtype, name, self.refused[name], origin, self.source, self.layout
                )
        if isinstance(tensor, torch.nn.Parameter) and not given_arrays(self.source):
            for name in rule.sources:
                info = self.source.infos.get(name)
                if info is not None and info.dtype.kind in "iu":
                    return integer_problem(full, tensor.dtype, name, origin, self.source, self.layout)
        return None

    def hint(self, name: str) -> str | None:
        """The fix for a source name the module lacks that belongs to a quantized tensor, or None."""
        codes = self.owners.get(name)
        if codes is None:
            return None
        return (
            f"'{codes}' is stored quantized ({_formula(codes, self.groups[codes])}): dequantize it and load "
            "the float weight under the module's name in place of the codes and what dequantizes them; "
            "weightport never dequantizes"
        )
