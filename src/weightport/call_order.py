"""The order in which a model calls its submodules, and which feed which, from one forward pass that
computes nothing.

Pairing uses it to match a source's recorded layer order with the model's own
(``weightport.load(..., example_inputs=x)``): only for modules that run one after another, each
reading what the one before it made (:meth:`CallOrder.feeds`); modules in parallel branches (a
residual block's shortcut conv beside its main branch) run in either order in an equivalent model,
so no order can tell them apart. The pass runs on the ``meta``
device: the model's parameters and buffers are swapped for meta tensors of the
same shapes for the duration of the call (``torch.func.functional_call``), so
no arithmetic is done, no memory is taken, and the model is left as it was
(BatchNorm statistics, RNN flat weights and all). A model whose forward needs
real values (data-dependent control flow) is run once for real, on copies of its
parameters and buffers.

>>> import torch
>>> class HeadFirst(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.head, self.body = torch.nn.Linear(4, 2), torch.nn.Linear(3, 4)
...     def forward(self, x):
...         return self.head(self.body(x))
>>> call_order(HeadFirst(), torch.zeros(1, 3))
{'body': 0, 'head': 1}
>>> CallOrder(HeadFirst(), torch.zeros(1, 3)).feeds("body", "head")
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from weightport.errors import LayoutError

__all__ = ["call_order", "trace_calls", "Calls", "CallOrder", "ExampleInputs"]

ExampleInputs = Any  # a tensor or array, a tuple of them (positional), or a dict (keyword arguments)


def call_order(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, int]:
    """Each submodule's path (``""`` excluded) -> the position of its first call in ``model(*inputs)``."""
    return trace_calls(model, example_inputs).order


@dataclass
class Calls:
    """What one forward pass showed: ``order``, each submodule's path -> the position of its first call;
    ``fed_by``, each called submodule's path -> the paths of the modules whose outputs reach its inputs
    (through any operations in between)."""

    order: dict[str, int] = field(default_factory=dict)
    fed_by: dict[str, set[str]] = field(default_factory=dict)
    # modules whose own tensors went into an operation other than a layer's (a weight standardized,
    # scaled or transposed before use): an exporter folds that into a constant no layer rule can undo
    changed: set[str] = field(default_factory=set)
    # the model's own tensors (state-dict names) that some operation of the pass read
    read: set[str] = field(default_factory=set)
    # each called submodule's path -> how its input was flattened from a feature map, where it was: whether
    # the map was permuted channels-last first, and the map's shape without the batch axis
    flat_input: dict[str, tuple[bool, tuple[int, ...]]] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each one's first input's


# the operations that use a layer's tensors as they are (nn.Linear, the convs, norms, embeddings, RNNs,
# attention, transformers' Conv1D through addmm)
_AS_THEY_ARE = frozenset(
    {
        "linear", "bilinear", "addmm", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "embedding", "embedding_bag", "batch_norm", "layer_norm", "group_norm",
        "instance_norm", "rms_norm", "prelu", "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell",
        "rnn_tanh_cell", "rnn_relu_cell", "multi_head_attention_forward", "_native_multi_head_attention",
    }
)  # fmt: skip


class _Dataflow(TorchFunctionMode):
    """Tags every tensor an operation makes with the modules whose outputs went into it, and notes the
    modules whose own tensors an operation other than a layer's reads."""

    def __init__(self) -> None:
        super().__init__()
        self.made_by: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.names: dict[int, str] = {}  # id of a module's (stand-in) tensor -> its state-dict name
        self.changed: set[str] = set()
        self.read: set[str] = set()
        self.channels_last: WeakIdKeyDictionary = WeakIdKeyDictionary()  # maps permuted to (N, ..., C)
        self.flattened: WeakIdKeyDictionary = WeakIdKeyDictionary()  # (N, features) from a map: how

    def own(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take ``{state-dict name: tensor}`` as the modules' own tensors (replacing any before)."""
        self.names = {id(t): name for name, t in tensors.items()}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        own = [self.names[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.names]
        self.read.update(own)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if own and name not in _AS_THEY_ARE and next(_tensors(out), None) is not None:
            # a tensor made from a module's own (a property read, a size or a dtype changes nothing)
            self.changed.update(n.rpartition(".")[0] for n in own)
        self.tag(out, self.sources(args, kwargs))
        if isinstance(out, torch.Tensor):
            self._follow_layout(name, args, kwargs, out)
        return out

    def _follow_layout(self, name: str, args: Any, kwargs: Any, out: torch.Tensor) -> None:
        """Note a map permuted channels-last, a map flattened into (batch, features), and carry the latter
        through operations that keep the shape (dropout, activations)."""
        first = next(_tensors(args), None)
        if first is None:
            return
        if name == "permute" and _to_channels_last(first.dim(), args[1:], kwargs.get("dims")):
            self.channels_last[out] = True
        elif name in ("transpose", "swapaxes", "movedim", "moveaxis") and _moved_last(
            name, first.dim(), args[1:]
        ):
            self.channels_last[out] = True  # a (N, C, L) map's x.transpose(1, 2), x.movedim(1, -1)
        elif first in self.channels_last and out.shape == first.shape:
            self.channels_last[out] = True  # through contiguous(), an activation, dropout
        elif (
            name in ("flatten", "reshape", "view")
            and first.dim() >= 3
            and out.dim() == 2
            and out.shape[0] == first.shape[0]
        ):
            self.flattened[out] = (first in self.channels_last, tuple(first.shape[1:]))
        elif first in self.flattened and out.shape == first.shape:
            self.flattened[out] = self.flattened[first]

    def sources(self, *values: Any) -> set[str]:
        """The modules whose outputs went into the tensors among ``values`` (nested in lists and dicts)."""
        found: set[str] = set()
        for tensor in _tensors(values):
            found |= self.made_by.get(tensor, set())
        return found

    def tag(self, out: Any, modules: set[str]) -> None:
        if modules:
            for tensor in _tensors(out):
                self.made_by[tensor] = self.made_by.get(tensor, set()) | modules


def _moved_last(name: str, rank: int, axes: Any) -> bool:
    """Whether ``x.movedim(1, -1)`` (any rank) or a swap of a ``(N, C, L)`` map's axes 1 and 2
    (``x.transpose(1, 2)``) moves the channel axis 1 last, the others in order."""
    try:
        a, b = (int(axis) % rank for axis in axes[:2])
    except (TypeError, ValueError):
        return False
    if name in ("movedim", "moveaxis"):
        return rank >= 3 and (a, b) == (1, rank - 1)
    return rank == 3 and {a, b} == {1, 2}


def _to_channels_last(rank: int, dims: Any, named: Any) -> bool:
    """Whether permute's dims (``x.permute(0, 2, 3, 1)``, ``torch.permute(x, (0, 2, 3, 1))``) move a map's
    channel axis 1 last."""
    dims = named if named is not None else dims[0] if len(dims) == 1 else dims
    try:
        order = tuple(int(d) % rank for d in dims)
    except (TypeError, ValueError):
        return False
    return rank >= 3 and order == (0, *range(2, rank), 1)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)


def trace_calls(model: nn.Module, example_inputs: ExampleInputs) -> Calls:
    """The order ``model(*inputs)`` first calls each submodule in, and which modules feed which."""
    args, kwargs = _arguments(example_inputs)
    calls = Calls()
    flow = _Dataflow()
    names = {id(m): name for name, m in model.named_modules() if name}

    def before(
        module: nn.Module, args: Any, kwargs: Any
    ) -> None:  # a pre-hook returning a value replaces the inputs
        path = names[id(module)]
        calls.order.setdefault(path, len(calls.order))
        calls.fed_by.setdefault(path, set()).update(flow.sources(args, kwargs))
        first = next(_tensors(args), None)
        if first is not None:
            calls.input_shapes.setdefault(path, tuple(first.shape))
            if first in flow.flattened:
                calls.flat_input.setdefault(path, flow.flattened[first])

    def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        flow.tag(output, flow.sources(args, kwargs) | {names[id(module)]})

    modules = [module for name, module in model.named_modules() if name]
    handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(after, with_kwargs=True) for m in modules]
    flat = {id(m): list(m._flat_weights) for m in model.modules() if isinstance(m, nn.RNNBase)}
    # functional_call swaps a tensor in under each of its names: a module reachable under two paths (timm's
    # CoaT keeps its cpe in two places) is swapped twice and restored with the stand-in; so every module's
    # own tensors are put back as they were, whatever the pass did
    kept = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        with flow:
            _trace(model, args, kwargs, flow)
        calls.changed, calls.read = flow.changed, flow.read
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
        for module, parameters, buffers in kept:
            module._parameters.update(parameters)
            module._buffers.update(buffers)
        for module in model.modules():  # functional_call leaves an RNN's flat weight list pointing at
            if id(module) in flat:  # the swapped-in tensors: put the model's own back
                module._flat_weights = flat[id(module)]  # type: ignore[assignment]
    return calls


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
        self._whole: list[Calls] = []  # shared by every within(): one forward pass at most

    def within(self, prefix: str) -> CallOrder:
        view = CallOrder(self._model, self._inputs, prefix)
        view._whole = self._whole
        return view

    @property
    def _calls(self) -> Calls:
        if not self._whole:
            self._whole.append(trace_calls(self._model, self._inputs))
        return self._whole[0]

    @property
    def _order(self) -> dict[str, int]:
        p = self._prefix
        return {
            path[len(p) :]: n for path, n in self._calls.order.items() if path.startswith(p) and path != p
        }

    def changes(self, path: str) -> bool:
        """Whether the pass read module ``path``'s own tensors through an operation other than a layer's
        (its forward, or its parent's, standardizes, scales or transposes its weight before use)."""
        return self._prefix + path in self._calls.changed

    def flattened(self, path: str) -> tuple[bool, tuple[int, ...]] | None:
        """How the pass flattened a feature map into module ``path``'s input, where it did: whether the map
        was permuted channels-last first (``x.permute(0, 2, 3, 1).flatten(1)``), and the map's shape
        without the batch axis (``(512, 7, 7)`` for ``torch.flatten(x, 1)`` of an NCHW map)."""
        return self._calls.flat_input.get(self._prefix + path)

    def input_shape(self, path: str) -> tuple[int, ...] | None:
        """The shape of the first tensor module ``path`` took in the pass (at its first call)."""
        return self._calls.input_shapes.get(self._prefix + path)

    def reads(self, name: str) -> bool:
        """Whether the pass read the model's tensor ``name`` (a state-dict name) at all."""
        return self._prefix + name in self._calls.read

    def feeds(self, earlier: str, later: str) -> bool:
        """Whether what module ``earlier`` outputs reaches the inputs of module ``later`` in the pass
        (so any equivalent model runs the two in this order)."""
        return self._prefix + earlier in self._calls.fed_by.get(self._prefix + later, set())

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


def _trace(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], flow: _Dataflow) -> None:
    # every tensor, non-persistent buffers (left out of state_dict) included: a forward that updates one
    # updates the stand-in
    # one name per tensor: functional_call ties the other names of a tied one itself (tie_weights=True)
    # and refuses values given for both
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    flow.own(meta)
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
    # copies of every tensor: a forward may update any (a BatchNorm's statistics in training mode, an
    # Embedding's rows with max_norm), and the module must come out as it went in
    own = {name: t.detach().clone() for name, t in tensors.items()}
    flow.own(own)
    flow.changed.clear()
    flow.read.clear()
    with torch.no_grad():
        torch.func.functional_call(model, own, args, kwargs, tie_weights=True, strict=False)
