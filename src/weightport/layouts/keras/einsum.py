"""A Keras ``EinsumDense`` that is a Dense in all but class: its equation contracts the input's last axis
with one kernel axis and puts the other last, as ``nn.Linear`` does; any other equation has no rule.

The kernel is ``(in, out)`` (``'ab,bc->ac'``: transposed, as a Dense's) or ``(out, in)`` (``'abc,dc->abd'``:
as it is); the bias, where there is one, runs along the output axis. Only a configuration (``.keras``, a
full-model ``.h5``, a live layer) records the equation: without it the kernel reads either way.

>>> dense_reading({"equation": "abc,dc->abd", "bias_axes": "d", "activation": "relu"})
{'units': None, 'use_bias': True, 'activation': 'relu', 'kernel_out_in': True}
>>> dense_reading({"equation": "ab,bc->ac", "bias_axes": None}) is not None, dense_reading({"equation": "abc,cde->abde"})
(True, None)
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["dense_reading", "why_not_a_dense"]

_EQUATION = re.compile(r"^(?P<x>[.a-z]+),(?P<k>[a-z]{2})->(?P<y>[.a-z]+)$")


def dense_reading(config: dict[str, Any]) -> dict[str, Any] | None:
    """A Dense's configuration for an ``EinsumDense`` whose equation is a Dense's (``kernel_out_in``: the
    kernel is stored ``(out, in)``), else None."""
    found = _EQUATION.match(str(config.get("equation", "")).replace(" ", ""))
    if found is None:
        return None
    x, kernel, y = found["x"], found["k"], found["y"]
    inner = x[-1]
    if inner not in kernel:
        return None
    outer = kernel.replace(inner, "", 1)
    if outer in x or inner in y or y != x[:-1] + outer:
        return None
    bias = config.get("bias_axes")
    if bias not in (None, "", outer):
        return None
    shape = config.get("output_shape")
    units = (
        shape[-1] if isinstance(shape, (list, tuple)) and shape else shape if isinstance(shape, int) else None
    )
    return {
        "units": units,
        "use_bias": bool(bias),
        "activation": config.get("activation"),
        "kernel_out_in": kernel[0] == outer,
    }


def why_not_a_dense(config: dict[str, Any]) -> str:
    """What an ``EinsumDense``'s equation (and ``bias_axes``) computes that no ``nn.Linear`` does, else ``""``.

    >>> why_not_a_dense({"equation": "abc,bcd->abd", "bias_axes": "d"})
    "its kernel axis 'b' is also an axis of the input and of the output: a separate kernel for each b"
    >>> why_not_a_dense({"equation": "abc,cd->abd", "bias_axes": "bd"})
    "its bias (bias_axes='bd') varies along 'b' as well, where nn.Linear's runs along the output axis 'd' alone"
    """
    if dense_reading(config) is not None:
        return ""
    equation = str(config.get("equation", "")).replace(" ", "")
    sides = equation.split("->")
    inputs = sides[0].split(",")
    if len(sides) != 2 or len(inputs) != 2:
        return f"its equation '{equation}' is not 'input,kernel->output'"
    x, kernel, y = inputs[0].replace(".", ""), inputs[1], sides[1].replace(".", "")
    why = []
    shared = [a for a in kernel if a in x and a in y]
    if shared:
        each = ", ".join(shared)
        why.append(
            f"its kernel axis {_axes(shared)} is also an axis of the input and of the output: a separate "
            f"kernel for each {each}"
        )
    contracted = [a for a in x if a in kernel and a not in y]
    if len(contracted) != 1 or (x and contracted[0] != x[-1]):
        where = "axes" if len(contracted) != 1 else "axis"
        why.append(
            f"it contracts the input's {where} {_axes(contracted)}, where nn.Linear contracts its last axis alone"
        )
    added = [a for a in kernel if a not in x]
    if len(added) != 1:
        why.append(f"its kernel adds the output axes {_axes(added)}, where nn.Linear adds one")
    kept = [a for a in x if a not in kernel]
    if not why and y != "".join(kept) + "".join(added):
        why.append(
            f"it orders the output's axes '{y}', where nn.Linear keeps the input's order and puts its output "
            "axis last"
        )
    bias = config.get("bias_axes") or ""
    if not why and bias and bias != "".join(added):
        others = [a for a in bias if a not in added]
        why.append(
            f"its bias (bias_axes='{bias}') varies along {_axes(others)} as well, where nn.Linear's runs along "
            f"the output axis {_axes(added)} alone"
        )
    return "; ".join(why) or f"its equation '{equation}' is not a Dense's"


def _axes(letters: list[str]) -> str:
    return f"'{''.join(letters)}'" if letters else "none"
