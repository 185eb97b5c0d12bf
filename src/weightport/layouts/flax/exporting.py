"""PyTorch -> Flax: a module's weights as Flax params (linen or nnx), by ``/``-joined name.

>>> import torch
>>> out = export(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.LSTM(2, 3)), api="nnx")
>>> out["0/kernel"].shape, out["1/cell/ii/kernel"].shape  # channels-last Conv; one Dense per gate
((3, 3, 1, 4), (2, 3))
>>> print(out.notes[0])  # doctest: +ELLIPSIS
'1[0]' (LSTM): Flax's cell has one bias per gate, so it holds 1.bias_ih_l0 + 1.bias_hh_l0; ...
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import nn

from weightport.errors import LayoutError, UnsupportedConfigError
from weightport.layouts.base import ExportedArrays
from weightport.layouts.flax.cells import EXPORT_CELLS, with_article
from weightport.layouts.flax.convolutions import flip_and_permute
from weightport.layouts.flax.facts import APIS, T, conv_axes
from weightport.layouts.slots import Slot, module_slots
from weightport.torch_facts import RNN_KINDS
from weightport.transforms import Chain, Op, SliceBlocks, Sum, Transpose

__all__ = ["export", "ExportedArrays"]


def _sums(op: Op) -> bool:
    """Whether ``op`` adds its inputs together (alone, or first in a chain)."""
    return isinstance(op, Sum) or (isinstance(op, Chain) and any(isinstance(o, Sum) for o in op.ops))


def _layer_path(slot: Slot, names: Mapping[str, str]) -> str:
    if slot.label in names:
        return names[slot.label].strip("/")
    base = slot.path.replace(".", "/") or slot.kind
    if slot.layer is None:
        return base  # a cell or a plain layer: its params sit right here
    num_layers = getattr(slot.module, "num_layers", 1)
    layer = f"{base}/layers_{slot.layer}" if num_layers > 1 else base
    return layer if slot.bidirectional else f"{layer}/cell"


def _export_cell(
    slot: Slot, state: Mapping[str, np.ndarray], api: str, path: str, out: dict[str, np.ndarray]
) -> None:
    module = slot.module
    if getattr(module, "proj_size", 0):
        raise UnsupportedConfigError(
            f"cannot export '{slot.label}' ({slot.describe()}) to Flax: proj_size={module.proj_size} has no "
            "Flax equivalent. Fix: export a model built with proj_size=0."
        )
    spec = EXPORT_CELLS[api][slot.kind]
    params = "params/" if api == "linen" else ""
    directions = (
        [(False, f"{path}/forward_rnn/cell"), (True, f"{path}/backward_rnn/cell")]
        if slot.bidirectional
        else [(False, path)]
    )
    for reverse, cell_path in directions:
        env: dict[str, np.ndarray] = {}
        for param in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            name = slot.name(param, reverse=reverse)
            env[param] = (
                state[name] if name in state else np.zeros(len(env["weight_hh"]), env["weight_hh"].dtype)
            )
        for param, block in spec.zero_for_export:
            part = SliceBlocks(0, block, spec.blocks)(env[param])
            if np.any(part):
                raise UnsupportedConfigError(
                    f"cannot export '{slot.name(param, reverse=reverse)}' to {with_article(spec.flavor)}: its block "
                    f"{block + 1} of {spec.blocks} is non-zero, and that cell has no place for it (b_hn is "
                    "multiplied by the reset gate). Fix: export with api='linen', whose GRUCell has it."
                )
        summed = False
        for leaf, (params_in, op) in spec.export.items():
            out[f"{params}{cell_path}/{leaf}"] = np.ascontiguousarray(op(*(env[p] for p in params_in)))
            summed = summed or (_sums(op) and all(slot.name(p, reverse=reverse) in state for p in params_in))
        if summed and isinstance(out, ExportedArrays):
            ih, hh = (slot.name(p, reverse=reverse) for p in ("bias_ih", "bias_hh"))
            kept, zeroed = (hh, ih) if slot.kind == "LSTM" else (ih, hh)
            gates = " for the r and z gates" if slot.kind == "GRU" else ""
            who = f"'{slot.label}' ({slot.kind})" if slot.label else slot.kind
            out.notes.append(
                f"{who}: Flax's cell has one bias per gate, so it holds {ih} + {hh}{gates}; loading it back puts "
                f"the sum in {kept} and zeros in {zeroed}{' (its r and z blocks)' if gates else ''}: "
                "the same outputs (up to float rounding), not the same tensors"
            )


_PLAIN_EXPORT = {  # PyTorch param -> (Flax leaf, collection in linen)
    "weight": ("kernel", "params"),
    "bias": ("bias", "params"),
    "running_mean": ("mean", "batch_stats"),
    "running_var": ("var", "batch_stats"),
}


def _export_plain(
    slot: Slot, state: Mapping[str, np.ndarray], api: str, path: str, out: dict[str, np.ndarray]
) -> None:
    kind = slot.kind
    module = slot.module
    if kind == "LayerNorm" and len(getattr(module, "normalized_shape", ())) != 1:
        raise UnsupportedConfigError(
            f"cannot export '{slot.label}' ({slot.describe()}) to Flax: LayerNorm over "
            f"{module.normalized_shape} is not a Flax LayerNorm's (one feature axis) scale."
        )
    for param, (leaf, collection) in _PLAIN_EXPORT.items():
        name = slot.name(param)
        if name not in state:
            continue
        array = state[name]
        if param == "weight":
            if kind in ("Linear", "Conv1D"):  # Dense (in, out); transformers' FlaxConv1D (features, in)
                array = T(array)
            elif kind.startswith(
                "ConvTranspose"
            ):  # Flax's default transpose_kernel=False: (k..., in, out), unflipped
                if getattr(module, "groups", 1) != 1:
                    raise UnsupportedConfigError(
                        f"cannot export '{slot.label}' ({slot.describe()}) to Flax: groups={module.groups}; "
                        "Flax's ConvTranspose has no feature groups."
                    )
                array = flip_and_permute((*array.shape[2:], *array.shape[:2])).inverse()(array)
            elif kind.startswith("Conv"):
                array = Transpose(conv_axes(array.ndim)).inverse()(array)
            leaf = {
                "Embedding": "embedding",
                "LayerNorm": "scale",
                "BatchNorm": "scale",
                "GroupNorm": "scale",
            }.get(kind, leaf)
        prefix = f"{collection}/" if api == "linen" else ""
        out[f"{prefix}{path}/{leaf}"] = np.ascontiguousarray(array)


_PLAIN_KINDS = {
    "Linear",
    "Conv1D",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "LayerNorm",
    "BatchNorm",
    "GroupNorm",
}
_PLAIN_KINDS |= {"ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}


def _own(slot: Slot) -> bool:
    """A module of no kind weightport maps, not PyTorch's own (a model's ``ViTEmbeddings``): its own params
    keep their names in Flax (``self.param("cls_token", ...)``), as loading reads them."""
    return slot.kind.startswith("other:") and not type(slot.module).__module__.startswith("torch.")


def export(
    module: nn.Module, *, api: str = "linen", names: Mapping[str, str] | None = None
) -> ExportedArrays:
    """``module``'s weights as Flax params, by ``/``-joined name; loading them back is the identity.

    Args:
        module: layers of the kinds in the module doc (recurrent ones as cells).
        api: ``"linen"`` (names under ``params/`` and ``batch_stats/``, linen cell
            names) or ``"nnx"`` (no collections; nnx cells, ``LSTMCell`` for LSTMs).
        names: slot label -> Flax layer path (as ``plan`` names layers: the cell
            node, e.g. ``{"lstm[0]": "encoder/cell", "fc": "Dense_0"}``; for a
            bidirectional layer the node holding ``forward_rnn``/``backward_rnn``).
            By default paths follow the module's (``lstm/layers_1/cell``).

    Flax cells have one bias per gate: LSTM biases export as ``bias_ih + bias_hh``,
    linen GRU r/z biases likewise. Loading the result puts them in ``bias_hh``
    (LSTM) or ``bias_ih`` (GRU r/z), so ``export(load(x)) == x`` exactly and the
    module computes the same; the result's ``notes`` say so for each such cell.

    Raises:
        UnsupportedConfigError: a layer has no Flax equivalent (proj_size, an nnx
            GRU with a non-zero ``b_hn``, other module types).
    """
    from weightport.tensors import numpy_of

    if api not in APIS:
        raise LayoutError(f"unknown Flax api '{api}'; choose one of {', '.join(APIS)}")
    names = dict(names or {})
    slots = module_slots(module)
    unknown = sorted(set(names) - {s.label for s in slots})
    if unknown:
        raise LayoutError(
            f"names= has {', '.join(repr(u) for u in unknown)}, which {type(module).__name__} does not have. "
            f"Its layers: {', '.join(s.label for s in slots) or 'none'}."
        )
    refused = [
        s.describe() for s in slots if s.kind not in _PLAIN_KINDS and s.kind not in RNN_KINDS and not _own(s)
    ]
    if refused:
        raise UnsupportedConfigError(
            f"cannot export {type(module).__name__} to the Flax layout: {', '.join(refused)} have no Flax "
            "layer weightport maps (LSTM, GRU, RNN and their cells, Linear, transformers' Conv1D, Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d, Embedding, LayerNorm, BatchNorm, GroupNorm). Fix: export those layers with weightport.to_numpy instead."
        )
    state = {name: numpy_of(t, copy=True) for name, t in module.state_dict().items()}
    out = ExportedArrays()
    for slot in slots:
        path = _layer_path(slot, names)
        if _own(slot):  # a model's own params (ViT's cls_token): by name, as is
            prefix = ("params/" if api == "linen" else "") + (f"{path}/" if slot.path else "")
            for param, _ in slot.module.named_parameters(recurse=False):
                out[f"{prefix}{param}"] = state[slot.name(param)]
        elif slot.kind in RNN_KINDS:
            _export_cell(slot, state, api, path, out)
        else:
            _export_plain(slot, state, api, path, out)
    return out
