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

__all__ = ["dense_reading"]

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
