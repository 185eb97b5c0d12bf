"""The order in which a model calls its submodules, from one forward pass that computes nothing.

Pairing uses it to match a source's recorded layer order with the model's own
(``weightport.load(..., example_inputs=x)``). The pass runs on the ``meta``
device: the model's parameters and buffers are swapped for meta tensors of the
same shapes for the duration of the call (``torch.func.functional_call``), so
no arithmetic is done, no memory is taken, and the model is left as it was
(BatchNorm statistics, RNN flat weights and all). A model whose forward needs
real values (data-dependent control flow) is run once for real, on its own
parameters and copies of its buffers.

>>> import torch
>>> class HeadFirst(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.head, self.body = torch.nn.Linear(4, 2), torch.nn.Linear(3, 4)
...     def forward(self, x):
...         return self.head(self.body(x))
>>> call_order(HeadFirst(), torch.zeros(1, 3))
{'body': 0, 'head': 1}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from weightport.errors import LayoutError

__all__ = ["call_order", "CallOrder", "ExampleInputs"]

ExampleInputs = Any  # a tensor or array, a tuple of them (positional), or a dict (keyword arguments)


def call_order(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, int]:
    """Each submodule's path (``""`` excluded) -> the position of its first call in ``model(*inputs)``."""
    args, kwargs = _arguments(example_inputs)
    order: dict[str, int] = {}
    names = {id(m): name for name, m in model.named_modules() if name}

    def seen(module: nn.Module, _args: object) -> None:  # a pre-hook that returns a value replaces the inputs
        order.setdefault(names[id(module)], len(order))

    handles = [module.register_forward_pre_hook(seen) for name, module in model.named_modules() if name]
    flat = {id(m): list(m._flat_weights) for m in model.modules() if isinstance(m, nn.RNNBase)}
    try:
        _trace(model, args, kwargs)
    except Exception as error:  # any failure of the forward is the inputs' problem
        raise LayoutError(
            f"example_inputs: one forward pass of {type(model).__name__}, run to learn the order it calls "
            f"its modules in, failed: {type(error).__name__}: {error}. Fix: pass inputs its "
            "forward accepts (a tensor, a tuple of positional inputs, or a dict of keyword inputs), or drop "
            "example_inputs= and pass mapping= to pair the layers yourself."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():  # functional_call leaves an RNN's flat weight list pointing at
            if id(module) in flat:  # the swapped-in tensors: put the model's own back
                module._flat_weights = flat[id(module)]  # type: ignore[assignment]
    return order


class CallOrder(Mapping[str, int]):
    """:func:`call_order` of ``model``, run only when first read (pairing reads it only where layers
    could be swapped), with paths relative to the submodule at ``prefix``.

    >>> import torch
    >>> order = CallOrder(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.zeros(1, 2))
    >>> dict(order.within("0."))  # nothing under '0.' but the Linear itself
    {}
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, prefix: str = "") -> None:
        self._model, self._inputs, self._prefix = model, example_inputs, prefix
        self._whole: list[dict[str, int]] = []  # shared by every within(): one forward pass at most

    def within(self, prefix: str) -> CallOrder:
        view = CallOrder(self._model, self._inputs, prefix)
        view._whole = self._whole
        return view

    @property
    def _order(self) -> dict[str, int]:
        if not self._whole:
            self._whole.append(call_order(self._model, self._inputs))
        p = self._prefix
        return {path[len(p) :]: n for path, n in self._whole[0].items() if path.startswith(p) and path != p}

    def __getitem__(self, path: str) -> int:
        return self._order[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def _arguments(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), {str(k): v for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def _to(value: Any, convert: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, convert) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, convert) for k, v in value.items()}
    return value


def _trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    tensors = model.state_dict(keep_vars=True)
    buffers = {name for name, _ in model.named_buffers()}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    try:
        with torch.no_grad():
            torch.func.functional_call(
                model,
                meta,
                _to(args, lambda t: t.to("meta")),
                _to(kwargs, lambda t: t.to("meta")),
                tie_weights=True,
                strict=False,
            )
        return
    except Exception:  # a forward that needs values (data-dependent control flow): run it for real
        pass
    # its own parameters, and copies of its buffers (a BatchNorm in training mode updates them)
    own = {name: t.detach().clone() if name in buffers else t for name, t in tensors.items()}
    with torch.no_grad():
        torch.func.functional_call(model, own, args, kwargs, tie_weights=True, strict=False)
