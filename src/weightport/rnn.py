"""``nn.RNN``/``nn.LSTM``/``nn.GRU`` (and their cells) by layer, direction and gate.

Gates are named by letter in PyTorch's own order: LSTM ``i, f, g, o``; GRU
``r, z, n``; a plain RNN has one block. Values are arrays, or dicts by gate letter
(gates not given keep their current values). Every write goes through
:func:`weightport.load`, so it is checked first and all or nothing.

>>> import numpy as np, torch
>>> lstm = torch.nn.LSTM(3, 4)
>>> _ = set_layer(lstm, 0, bias_ih={"f": np.ones(4)})
>>> get_layer(lstm, 0, gates=True)["bias_ih"]["f"].tolist()
[1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from weightport.dtypes import describe_dtype
from weightport.errors import LoadError, Problem
from weightport.loading import load
from weightport.plan import NonFinite
from weightport.report import LoadReport
from weightport.sources.mapping import to_array
from weightport.tensors import numpy_of, to_numpy_dtype, unwrap
from weightport.torch_facts import RNN_GATES, RNN_ROLES, describe_module, rnn_kind, rnn_param
from weightport.values import cast_kind, find_bad_values

__all__ = ["GATES", "gates_of", "param_name", "set_layer", "get_layer"]

GATES = RNN_GATES  # gate letters by kind, in PyTorch's order
ROLES = RNN_ROLES


def _kind(module: nn.Module) -> str:
    kind = rnn_kind(module)
    if kind is not None:
        return kind
    raise TypeError(
        f"{type(module).__name__} is not an nn.RNN, nn.LSTM, nn.GRU or one of their cells; "
        "use weightport.load with state-dict names for other modules"
    )


def gates_of(module: nn.Module) -> tuple[str, ...]:
    """The gate letters of ``module`` in PyTorch's order (``('',)`` for a plain RNN)."""
    return GATES[_kind(unwrap(module))]


def param_name(module: nn.Module, role: str, layer: int = 0, *, reverse: bool = False) -> str:
    """The state-dict name of ``role`` in ``layer`` and direction, checked against the module.

    >>> param_name(nn.GRU(2, 3, num_layers=2, bidirectional=True), "bias_hh", 1, reverse=True)
    'bias_hh_l1_reverse'
    """
    module = unwrap(module)
    _kind(module)
    desc = describe_module(module)
    if role not in ROLES:
        raise ValueError(f"unknown parameter role '{role}'; use one of {', '.join(ROLES)}")
    if isinstance(module, nn.RNNCellBase):
        if layer != 0 or reverse:
            raise ValueError(f"{desc} is a single cell: use layer=0 and reverse=False")
        name = role
    else:
        if not 0 <= layer < module.num_layers:  # type: ignore[operator]
            raise ValueError(f"layer {layer} does not exist: {desc} has num_layers={module.num_layers}")
        if reverse and not module.bidirectional:
            raise ValueError(f"reverse=True needs a bidirectional module; {desc} is not")
        name = rnn_param(role, layer, reverse=reverse)
    if role.startswith("bias") and not getattr(module, "bias", True):
        raise ValueError(f"{desc} was built with bias=False: it has no '{name}'")
    if role == "weight_hr" and not getattr(module, "proj_size", 0):
        raise ValueError(f"{desc} has no projection (proj_size=0): it has no '{name}'")
    return name


def _gate_dims(module: nn.Module, role: str, layer: int) -> str:
    """One gate's block shape in the module's terms: ``(hidden_size, input_size)``."""
    if role.startswith("bias"):
        return "(hidden_size,)"
    hidden_in = "proj_size" if getattr(module, "proj_size", 0) else "hidden_size"
    if role == "weight_hh":
        return f"(hidden_size, {hidden_in})"
    if layer == 0:
        return "(hidden_size, input_size)"
    return f"(hidden_size, {'2*' if getattr(module, 'bidirectional', False) else ''}{hidden_in})"


def _assemble(
    module: nn.Module, name: str, role: str, layer: int, value: Any, problems: list[Problem]
) -> Any:
    """``value``, or the whole tensor with the gates of a dict put in place (None on a problem)."""
    if not isinstance(value, Mapping):
        return value
    gates = gates_of(module)
    if role == "weight_hr" or gates == ("",):
        problems.append(
            Problem(name, "one array (it has no gates)", "a dict by gate", "pass the whole array")
        )
        return None
    unknown = sorted(set(value) - set(gates), key=str)
    if unknown:
        problems.append(
            Problem(
                name,
                f"gate letters {', '.join(gates)}",
                f"{', '.join(map(repr, unknown))}",
                f"name gates as PyTorch does for {type(module).__name__}: {', '.join(gates)}",
            )
        )
        return None
    tensor = getattr(module, name)
    shape = tuple(tensor.shape)
    block = shape[0] // len(gates)
    expected = (block, *shape[1:])
    missing = [g for g in gates if g not in value]
    current: np.ndarray | None = None
    own = to_numpy_dtype(tensor.dtype)  # the gates are put together in the tensor's dtype, each checked first
    if not missing:  # every gate given: the current values are never read (they may be on meta)
        current = np.empty(shape, own)
    elif tensor.is_meta:
        problems.append(
            Problem(
                name,
                f"every gate {', '.join(gates)} (it is on the meta device: the gates not given have no values)",
                f"only {', '.join(g for g in gates if g in value)}; missing {', '.join(missing)}",
                "give every gate, or build the module off meta",
            )
        )
    else:
        current = numpy_of(tensor, copy=True)
    ok = current is not None
    for letter, part in value.items():
        array = to_array(f"{name}[gate {letter}]", part)
        bad = _cast_problem(array, tensor.dtype)
        if bad:
            problems.append(
                Problem(
                    f"{name}[gate {letter}]",
                    f"values that fit {describe_dtype(tensor.dtype)}",
                    bad[0],
                    bad[1],
                )
            )
            ok = False
            continue
        if array.shape != expected:
            problems.append(
                Problem(
                    f"{name}[gate {letter}]",
                    f"shape {expected} = {_gate_dims(module, role, layer)} of {describe_module(module)}",
                    f"shape {array.shape}",
                    f"pass one gate's block of shape {expected}",
                )
            )
            ok = False
            continue
        if current is not None:
            index = gates.index(letter)
            current[index * block : (index + 1) * block] = array
    return current if ok else None


def _cast_problem(array: np.ndarray, target: Any) -> tuple[str, str] | None:
    """What of a gate's values the cast into ``target`` would change, and the fix, as a whole tensor's
    would be checked (NaN and Inf are left to the load, which knows ``allow_nonfinite``)."""
    check, refusal = cast_kind(array.dtype, target)
    if refusal:
        return f"{array.dtype}", refusal
    bad = find_bad_values(array, target, check, True)
    return (
        (bad, "round or convert the values first, or build the module in a dtype that holds them")
        if bad
        else None
    )


def set_layer(
    module: nn.Module,
    layer: int = 0,
    *,
    reverse: bool = False,
    weight_ih: Any = None,
    weight_hh: Any = None,
    bias_ih: Any = None,
    bias_hh: Any = None,
    weight_hr: Any = None,
    allow_nonfinite: NonFinite = False,
) -> LoadReport:
    """Set one layer and direction's tensors (arrays, or dicts by gate letter), all or nothing.

    Args:
        module: an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` or cell, also under ``torch.compile``
            or ``nn.DataParallel``. On the meta device, give every gate of a dict.
        layer: the layer index (0 for a cell).
        reverse: the reverse direction of a bidirectional module.
        weight_ih, weight_hh, bias_ih, bias_hh, weight_hr: the whole tensor, or a dict
            by gate letter (gates not given keep their current values); None leaves it.
        allow_nonfinite: accept NaN/Inf, as in :func:`weightport.load` (True, or a set
            of state-dict names such as ``{"bias_hh_l0"}``).

    Returns:
        The :class:`LoadReport` of the tensors set; the module's other tensors, left
        as they were, are not listed as missing.

    Raises:
        LoadError: with every problem; nothing was written.
    """
    module = unwrap(module)
    given = {
        "weight_ih": weight_ih,
        "weight_hh": weight_hh,
        "bias_ih": bias_ih,
        "bias_hh": bias_hh,
        "weight_hr": weight_hr,
    }
    arrays: dict[str, Any] = {}
    problems: list[Problem] = []
    for role, value in given.items():
        if value is None:
            continue
        try:
            name = param_name(module, role, layer, reverse=reverse)
        except ValueError as e:
            problems.append(
                Problem(role, "a tensor the module has", str(e), "check layer, reverse and the module")
            )
            continue
        assembled = _assemble(module, name, role, layer, value, problems)
        if assembled is not None:
            arrays[name] = assembled
    if problems:
        raise LoadError(problems, target=describe_module(module))
    report = load(module, arrays, strict=False, allow_nonfinite=allow_nonfinite)
    report.missing = []  # the other layers' tensors are meant to stay as they were
    return report


def get_layer(
    module: nn.Module, layer: int = 0, *, reverse: bool = False, gates: bool = False
) -> dict[str, Any]:
    """Copies of one layer and direction's tensors by role, split by gate letter if ``gates``."""
    module = unwrap(module)
    out: dict[str, Any] = {}
    letters = gates_of(module)
    for role in ROLES:
        try:
            name = param_name(module, role, layer, reverse=reverse)
        except ValueError:
            if role.startswith("bias") or role == "weight_hr":
                continue
            raise
        array = numpy_of(getattr(module, name), copy=True)
        if gates and role != "weight_hr" and letters != ("",):
            block = array.shape[0] // len(letters)
            out[role] = {g: array[i * block : (i + 1) * block].copy() for i, g in enumerate(letters)}
        else:
            out[role] = array
    return out
