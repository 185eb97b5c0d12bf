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

__all__ = [
    "call_order",
    "trace_calls",
    "Calls",
    "CallOrder",
    "ExampleInputs",
    "FlatRead",
    "Axes",
    "regroup",
    "arguments_of",
    "tensors_to",
]

ExampleInputs = Any  # a tensor or array, a tuple of them (positional), or a dict (keyword arguments)
# What each axis of a tensor is: the roles it holds in turn (several where a reshape merged them), each with
# its size. Roles: "c" a map's channels, "s0", "s1" ... its spatial axes in order, "i0", "i1" ... the axes of
# a model input after its batch axis, BATCH the batch axis, UNKNOWN a piece of a split axis
Axes = tuple[tuple[tuple[str, int], ...], ...]
FlatRead = tuple[tuple[str, ...], tuple[int, ...]]  # the roles flattened into one axis, in order, and sizes
BATCH, UNKNOWN = "n", "?"


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
    # each called submodule's path -> how the last axis of its input was flattened from several, where it was
    flat_input: dict[str, FlatRead] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each one's first input's
    # each called submodule's path -> the amounts (F.pad's, last axis first) of the zero padding that made its
    # first input, where one did (F.pad, nn.ZeroPad2d, timm's pad_same before a conv)
    padded_input: dict[str, tuple[int, ...]] = field(default_factory=dict)


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


_FORWARD_CONVS = frozenset(f"conv{k}d" for k in (1, 2, 3))
_CONVS = _FORWARD_CONVS | frozenset(f"conv_transpose{k}d" for k in (1, 2, 3))
_PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})
_RESHAPES = frozenset(
    {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
# operations that keep which axis is which while they change sizes
_SAME_AXES = frozenset(
    {
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "lp_pool1d",
        "lp_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "interpolate", "upsample", "pad", "__getitem__", "narrow", "cat", "concat", "concatenate",
        "pixel_shuffle", "add", "__add__", "mul", "__mul__", "sub", "__sub__", "contiguous",
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
        self.axes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> what its axes are (Axes)
        # tensor -> F.pad's amounts that made it, and the tensor it padded
        self.zero_padded: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.entered: dict[
            str, torch.Tensor
        ] = {}  # each called module's path -> its first input (first call)
        # conv module path -> F.pad's amounts its own forward put on its input before its convolution
        self.padded_inside: dict[str, tuple[int, ...]] = {}

    def inputs(self, values: Any) -> None:
        """Take the tensors among ``values`` as the model's inputs: each axis its own (``i0``, ``i1`` ...)."""
        for tensor in _tensors(values):
            roles = [BATCH, *(f"i{k}" for k in range(tensor.dim() - 1))][: tensor.dim()]
            self.axes[tensor] = tuple(((role, int(n)),) for role, n in zip(roles, tensor.shape))

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
            if name == "pad":
                self._note_zero_pad(args, kwargs, out)
            elif name in _FORWARD_CONVS:
                self._note_padded_conv(args, kwargs)
        return out

    def _note_zero_pad(self, args: Any, kwargs: Any, out: torch.Tensor) -> None:
        """Note the amounts of ``F.pad(x, pad, mode, value)`` where it pads with zeros."""
        given = [*args, *(None,) * 4]
        pad = kwargs.get("pad", given[1])
        mode = kwargs.get("mode", given[2] or "constant")
        value = kwargs.get("value", given[3])
        padded = kwargs.get("input", args[0] if args else None)
        if mode == "constant" and not value and isinstance(pad, (list, tuple)):
            self.zero_padded[out] = (tuple(int(p) for p in pad), padded)

    def _note_padded_conv(self, args: Any, kwargs: Any) -> None:
        """Note a convolution by a module's own weight on that module's input zero-padded inside its forward
        (timm's ``Conv2dSame``: ``F.pad`` then ``F.conv2d``): the padding is that conv's, as one before it is."""
        given = [*args, None, None]
        x, weight = kwargs.get("input", given[0]), kwargs.get("weight", given[1])
        owner = self.names.get(id(weight), "").rpartition(".")[0]
        if not isinstance(x, torch.Tensor) or not owner or x not in self.zero_padded:
            return
        amounts, padded = self.zero_padded[x]
        if padded is not None and self.entered.get(owner) is padded:
            self.padded_inside.setdefault(owner, amounts)

    def _follow_layout(self, name: str, args: Any, kwargs: Any, out: torch.Tensor) -> None:
        """Note which axes of the input ``out``'s axes are (:data:`Axes`): a convolution's map starts them,
        permutes and transposes reorder them, reshapes merge them, and operations that keep the axes carry
        them on."""
        first = next(_tensors(args), None)
        if first is None:
            return
        made: Axes | None = None
        if name in _CONVS:
            made = _conv_axes(out.dim(), int(name[-2]))
        elif name in _PERMUTES:
            order = _permutation(name, first.dim(), args[1:], kwargs)
            made = None if order is None else tuple(self.axes_of(first)[a] for a in order)
        elif name in _RESHAPES:
            made = regroup(self.axes_of(first), tuple(first.shape), tuple(out.shape))
        elif name in ("linear", "bilinear") and out.dim() == first.dim():
            made = (*self.axes_of(first)[:-1], (("c", int(out.shape[-1])),))
        elif name == "embedding" and out.dim() == first.dim() + 1:  # the indices' axes, then the features
            made = (*self.axes_of(first), (("c", int(out.shape[-1])),))
        elif first in self.axes and (
            out.shape == first.shape or (out.dim() == first.dim() and name in _SAME_AXES)
        ):
            made = self.axes[first]  # an activation, dropout, a pooling, padding, a residual sum
        if made is not None:
            self.axes[out] = made

    def axes_of(self, tensor: torch.Tensor) -> Axes:
        """What ``tensor``'s axes are: as followed from the model's inputs (each its own axes: the array the user
        feeds) and its convolutions, else a map's ``(batch, channels, *spatial)``, PyTorch's layout."""
        kept = self.axes.get(tensor)
        if kept is None:
            kept = _conv_axes(tensor.dim(), max(tensor.dim() - 2, 0))
        # a lone axis's size is the tensor's own (a pooling or a padding changes it)
        return tuple(
            axis if len(axis) > 1 else ((axis[0][0], int(n)),) for axis, n in zip(kept, tensor.shape)
        )

    def flat_read(self, tensor: torch.Tensor) -> FlatRead | None:
        """How ``tensor``'s last axis was flattened from several, where it was: their roles and sizes."""
        axes = self.axes_of(tensor) if tensor.dim() >= 1 else ()
        if not axes or len(axes[-1]) < 2:
            return None
        return tuple(r for r, _ in axes[-1]), tuple(n for _, n in axes[-1])

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


def _conv_axes(rank: int, spatial: int) -> Axes:
    """A convolution's output: ``(batch, channels, *spatial)``, or ``(channels, *spatial)`` unbatched."""
    roles = ["c", *(f"s{k}" for k in range(spatial))]
    roles = [BATCH, *roles] if rank == spatial + 2 else roles
    return tuple(((role, 0),) for role in roles)


def _permutation(name: str, rank: int, given: Any, kwargs: Any) -> tuple[int, ...] | None:
    """The source axis of each output axis of ``x.permute(...)``, ``x.transpose(a, b)``, ``x.movedim(a, b)``
    and their aliases; None where the arguments are not plain axes."""
    try:
        if name == "permute":
            dims = kwargs.get("dims", given[0] if len(given) == 1 else given)
            order = tuple(int(d) % rank for d in dims)
            return order if sorted(order) == list(range(rank)) else None
        a, b = (kwargs.get(k, v) for k, v in zip(("dim0", "dim1"), given[:2]))
        if name in ("movedim", "moveaxis"):
            sources = [int(s) % rank for s in (a if isinstance(a, (list, tuple)) else [a])]
            targets = [int(t) % rank for t in (b if isinstance(b, (list, tuple)) else [b])]
            rest = iter(d for d in range(rank) if d not in sources)
            placed = dict(zip(targets, sources))
            return tuple(placed[d] if d in placed else next(rest) for d in range(rank))
        order_list = list(range(rank))
        i, j = int(a) % rank, int(b) % rank
        order_list[i], order_list[j] = order_list[j], order_list[i]
        return tuple(order_list)
    except (TypeError, ValueError, IndexError, StopIteration):
        return None


def regroup(axes: Axes, before: tuple[int, ...], after: tuple[int, ...]) -> Axes | None:
    """The axes of a reshape from ``before`` to ``after``: each output axis that merges consecutive input
    axes holds their roles in turn; one input axis split into several gives each piece an unknown role
    (``?``). None where axes are merged and split at once, or a size is 0.

    >>> regroup(((("n", 2),), (("c", 4),), (("s0", 3),), (("s1", 5),)), (2, 4, 3, 5), (2, 60))
    ((('n', 2),), (('c', 4), ('s0', 3), ('s1', 5)))
    """
    if 0 in before or 0 in after:
        return None
    out: list[tuple[tuple[str, int], ...]] = []
    i = j = 0
    while j < len(after):
        if i >= len(before):
            out.append((("", 1),))  # a new axis of size 1
            j += 1
            continue
        gi, gj, pi, pj = [i], [j], before[i], after[j]
        while pi != pj:
            if pi < pj and gi[-1] + 1 < len(before):
                gi.append(gi[-1] + 1)
                pi *= before[gi[-1]]
            elif pj < pi and gj[-1] + 1 < len(after):
                gj.append(gj[-1] + 1)
                pj *= after[gj[-1]]
            else:
                return None
        if len(gj) == 1:
            out.append(tuple(pair for k in gi for pair in axes[k]))
        elif len(gi) == 1:
            out += [((UNKNOWN, after[k]),) for k in gj]
        else:
            return None
        i, j = gi[-1] + 1, gj[-1] + 1
    if out and i < len(before):  # size-1 axes left over join the last
        out[-1] = (*out[-1], *(pair for k in range(i, len(before)) for pair in axes[k]))
    return tuple(out)


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
    args, kwargs = arguments_of(example_inputs)
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
            flow.entered.setdefault(path, first)
            if first in flow.zero_padded:
                calls.padded_input.setdefault(path, flow.zero_padded[first][0])
            flat = flow.flat_read(first)
            if flat is not None:
                calls.flat_input.setdefault(path, flat)

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
        _add_pads(calls.padded_input, flow.padded_inside)
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


def _add_pads(padded: dict[str, tuple[int, ...]], inside: dict[str, tuple[int, ...]]) -> None:
    """Add the zero padding each conv's forward puts on its input to any that made that input: both pad it.

    >>> padded = {"a": (1, 1)}
    >>> _add_pads(padded, {"a": (0, 1, 0, 0), "b": (0, 1)})
    >>> padded
    {'a': (1, 2, 0, 0), 'b': (0, 1)}
    """
    for path, amounts in inside.items():
        before = padded.get(path, ())
        width = max(len(before), len(amounts))
        padded[path] = tuple(
            (before[k] if k < len(before) else 0) + (amounts[k] if k < len(amounts) else 0)
            for k in range(width)
        )


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

    def flat_read(self, path: str) -> FlatRead | None:
        """How the pass flattened several axes into the last axis of module ``path``'s input, where it did:
        their roles in the order flattened and their sizes (``(("c", "s0", "s1"), (512, 7, 7))`` for
        ``torch.flatten(x, 1)`` of an NCHW map; see :data:`Axes`)."""
        return self._calls.flat_input.get(self._prefix + path)

    def flattened(self, path: str) -> tuple[bool, tuple[int, ...]] | None:
        """How the pass flattened a convolution's feature map into module ``path``'s input, where it did in
        one of PyTorch's two ways: whether the map was permuted channels-last first
        (``x.permute(0, 2, 3, 1).flatten(1)``), and the map's shape without the batch axis in the order
        flattened (``(512, 7, 7)`` for ``torch.flatten(x, 1)`` of an NCHW map)."""
        seen = self.flat_read(path)
        if seen is None:
            return None
        roles, sizes = seen
        spatial = tuple(f"s{k}" for k in range(len(roles) - 1))
        if roles == ("c", *spatial):
            return False, sizes
        return (True, sizes) if roles == (*spatial, "c") else None

    def input_shape(self, path: str) -> tuple[int, ...] | None:
        """The shape of the first tensor module ``path`` took in the pass (at its first call)."""
        return self._calls.input_shapes.get(self._prefix + path)

    def padded_input(self, path: str) -> tuple[int, ...] | None:
        """The amounts of the zero padding (``F.pad``'s order: the last axis's before and after first) that
        made module ``path``'s first input in the pass, where a zero pad made it."""
        return self._calls.padded_input.get(self._prefix + path)

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


def arguments_of(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as positional and keyword arguments (a dict is keywords, a tuple positionals)."""
    if isinstance(example_inputs, Mapping):
        return (), {str(k): v for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def tensors_to(value: Any, convert: Any) -> Any:
    """``value`` with every tensor (and NumPy array) in it, however nested, passed through ``convert``."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_to(v, convert) for v in value)
    if isinstance(value, Mapping):
        return {k: tensors_to(v, convert) for k, v in value.items()}
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
        meta_args, meta_kwargs = (
            tensors_to(args, lambda t: t.to("meta")),
            tensors_to(kwargs, lambda t: t.to("meta")),
        )
        flow.inputs((meta_args, meta_kwargs))
        with torch.no_grad():
            torch.func.functional_call(model, meta, meta_args, meta_kwargs, tie_weights=True, strict=False)
        return
    except Exception:  # a forward that needs values (data-dependent control flow): run it for real
        pass
    # copies of every tensor: a forward may update any (a BatchNorm's statistics in training mode, an
    # Embedding's rows with max_norm), and the module must come out as it went in
    own = {name: t.detach().clone() for name, t in tensors.items()}
    flow.own(own)
    flow.changed.clear()
    flow.read.clear()
    flow.entered.clear()
    flow.padded_inside.clear()
    flow.inputs((args, kwargs))
    with torch.no_grad():
        torch.func.functional_call(model, own, args, kwargs, tie_weights=True, strict=False)
