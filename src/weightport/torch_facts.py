"""PyTorch-side facts: the RNN family's names and gates, and shapes explained in a module's terms.

Every layout, the RNN tools and the reference forward read these tables from here: one home.

>>> rnn_param("bias_hh", 1, reverse=True)
'bias_hh_l1_reverse'
>>> RNN_GATES["GRU"], RNN_GATE_COUNT["LSTM"]
(('r', 'z', 'n'), 4)

>>> import torch
>>> explain_shape(torch.nn.LSTM(3, 4), "weight_ih_l0")
'(16, 3) = (4*hidden_size, input_size) of LSTM(input_size=3, hidden_size=4)'
>>> explain_shape(torch.nn.Linear(3, 2), "weight")
'(2, 3) = (out_features, in_features) of Linear(in_features=3, out_features=2)'
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

__all__ = [
    "RNN_KINDS",
    "RNN_GATES",
    "RNN_GATE_COUNT",
    "RNN_ROLES",
    "rnn_param",
    "rnn_kind",
    "explain_shape",
    "describe_module",
    "RECURRENT_PARAM",
    "GATES_OF",
    "recurrent_sizes",
    "rnn_constructor",
    "non_persistent_buffers",
    "transformers_computed",
    "broken_tie",
    "RESCALED_IN_PLACE",
    "rescaled_in_place",
    "rescaled_by_owner",
    "parametrized_fix",
]

RNN_KINDS = ("RNN", "LSTM", "GRU")  # the recurrent kinds PyTorch has: nn.RNN/LSTM/GRU and their cells
# Gate letters in PyTorch's order of the stacked blocks (a plain RNN has one block, no letter)
RNN_GATES: dict[str, tuple[str, ...]] = {"RNN": ("",), "LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}
RNN_GATE_COUNT = {kind: len(gates) for kind, gates in RNN_GATES.items()}
RNN_ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
# the recurrent kind each count of gate blocks is (an RNN has one, a GRU three, an LSTM four)
GATES_OF = {count: kind for kind, count in RNN_GATE_COUNT.items()}
RECURRENT_PARAM = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)(?:_l(\d+))?(?:_reverse)?$")
_RNN_PARAM = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(\d+))?(_reverse)?$")


def rnn_param(role: str, layer: int | None = None, *, reverse: bool = False) -> str:
    """The state-dict name of ``role`` in ``layer`` (None: a cell's) and direction."""
    return role if layer is None else f"{role}_l{layer}{'_reverse' if reverse else ''}"


def rnn_kind(module: nn.Module) -> str | None:
    """``"RNN"``, ``"LSTM"`` or ``"GRU"`` for PyTorch's recurrent modules and cells, else None."""
    if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return None
    for kind in ("LSTM", "GRU", "RNN"):
        if type(module).__name__.startswith(kind):
            return kind
    return "RNN"


def describe_module(module: nn.Module) -> str:
    """``LSTM(input_size=3, hidden_size=4, proj_size=2)``: the settings that decide shapes."""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        parts = [f"input_size={module.input_size}", f"hidden_size={module.hidden_size}"]
        if getattr(module, "proj_size", 0):
            parts.append(f"proj_size={module.proj_size}")
        if getattr(module, "bidirectional", False):
            parts.append("bidirectional=True")
        return f"{type(module).__name__}({', '.join(parts)})"
    if isinstance(module, nn.Linear):
        return f"Linear(in_features={module.in_features}, out_features={module.out_features})"
    if isinstance(module, nn.Embedding):
        return f"Embedding({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return (
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={module.kernel_size}, groups={module.groups})"
        )
    return type(module).__name__


def explain_shape(module: nn.Module, local_name: str) -> str | None:
    """Why ``module``'s tensor ``local_name`` has its shape, or None when not known."""
    tensor = dict(module.named_parameters(recurse=False)).get(local_name)
    if tensor is None:
        return None
    shape = tuple(tensor.shape)
    formula = _formula(module, local_name)
    if formula is None:
        return None
    return f"{shape} = {formula} of {describe_module(module)}"


def _formula(module: nn.Module, local_name: str) -> str | None:
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        match = _RNN_PARAM.match(local_name)
        if not match:
            return None
        role, layer = match[1], int(match[2] or 0)
        gates = RNN_GATE_COUNT[rnn_kind(module) or "RNN"]
        rows = f"{gates}*hidden_size" if gates > 1 else "hidden_size"
        proj = getattr(module, "proj_size", 0)
        hidden_in = "proj_size" if proj else "hidden_size"
        if role == "weight_ih":
            if layer == 0:
                return f"({rows}, input_size)"
            factor = "2*" if getattr(module, "bidirectional", False) else ""
            return f"({rows}, {factor}{hidden_in})"
        if role == "weight_hh":
            return f"({rows}, {hidden_in})"
        if role == "weight_hr":
            return "(proj_size, hidden_size)"
        return f"({rows},)"
    if isinstance(module, nn.Linear):
        return "(out_features, in_features)" if local_name == "weight" else "(out_features,)"
    if isinstance(module, nn.modules.conv._ConvNd):
        if local_name == "bias":
            return "(out_channels,)"
        if module.transposed:
            return "(in_channels, out_channels/groups, *kernel_size)"
        return "(out_channels, in_channels/groups, *kernel_size)"
    if isinstance(module, nn.Embedding):
        return "(num_embeddings, embedding_dim)"
    return None


def recurrent_sizes(owner: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int] | None:
    """(gate blocks, hidden_size, input_size) that give every shape in ``shapes`` (local name -> shape), where
    they differ from ``owner``'s; None where no such sizes explain them all.

    >>> gru = {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4), "bias_ih_l0": (12,), "bias_hh_l0": (12,)}
    >>> recurrent_sizes(nn.LSTM(3, 4), gru)  # a GRU's three gate blocks
    (3, 4, 3)
    >>> recurrent_sizes(nn.LSTM(3, 4), {"weight_hh_l0": (32, 8), "bias_ih_l0": (32,)})  # hidden_size 8
    (4, 8, 3)
    """
    module: Any = owner
    kind = rnn_kind(owner) or "RNN"
    hidden_given = [s[1] for n, s in shapes.items() if n.startswith("weight_hh") and len(s) == 2]
    hidden = hidden_given[0] if hidden_given else module.hidden_size
    rows = {s[0] for s in shapes.values() if s}
    if len(rows) != 1 or hidden < 1 or next(iter(rows)) % hidden:
        return None
    gates = next(iter(rows)) // hidden
    first_layer = [s[1] for n, s in shapes.items() if n in ("weight_ih", "weight_ih_l0") and len(s) == 2]
    inputs = first_layer[0] if first_layer else module.input_size
    ours = (RNN_GATE_COUNT[kind], module.hidden_size, module.input_size)
    if gates not in GATES_OF or (gates, hidden, inputs) == ours:
        return None
    directions = 2 if getattr(module, "bidirectional", False) else 1
    for name, shape in shapes.items():
        match = RECURRENT_PARAM.match(name)
        if match is None:
            return None
        role, layer = match.groups()
        if role.startswith("bias"):
            wanted: tuple[int, ...] = (gates * hidden,)
        elif role == "weight_hh":
            wanted = (gates * hidden, hidden)
        else:
            wanted = (gates * hidden, inputs if not layer or layer == "0" else directions * hidden)
        if shape != wanted:
            return None
    return gates, hidden, inputs


def rnn_constructor(owner: nn.Module, cls: str, inputs: int, hidden: int) -> str:
    """``owner``'s settings as ``nn.<cls>(...)`` with these sizes.

    >>> rnn_constructor(nn.LSTM(3, 4, num_layers=2, bidirectional=True), "GRU", 3, 8)
    'nn.GRU(3, 8, num_layers=2, bidirectional=True)'
    """
    module: Any = owner
    extra = []
    if getattr(module, "num_layers", 1) > 1:
        extra.append(f"num_layers={module.num_layers}")
    if not module.bias:
        extra.append("bias=False")
    if getattr(module, "batch_first", False):
        extra.append("batch_first=True")
    if getattr(module, "bidirectional", False):
        extra.append("bidirectional=True")
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    if cls.startswith("RNN") and nonlinearity != "tanh":
        extra.append(f"nonlinearity='{nonlinearity}'")
    return f"nn.{cls}({', '.join([str(inputs), str(hidden), *extra])})"


def non_persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Buffers registered with ``persistent=False`` (rotary frequencies, position ids): no checkpoint is
    required to hold them, but a source that does fills them, and on the meta device they need values.

    >>> import torch
    >>> m = torch.nn.Module(); m.register_buffer("ids", torch.arange(3), persistent=False)
    >>> list(non_persistent_buffers(m))
    ['ids']
    """
    found: dict[str, Tensor] = {}
    for path, owner in module.named_modules(remove_duplicate=False):
        for local in owner._non_persistent_buffers_set:
            buffer = owner._buffers.get(local)
            if buffer is not None:
                found.setdefault(f"{path}.{local}" if path else local, buffer)
    return found


def transformers_computed(module: nn.Module) -> tuple[set[str], set[str]]:
    """``(skipped, unloaded)`` for the transformers models in ``module``: the tensors ``save_pretrained``
    leaves out (a class's ``_keys_to_ignore_on_save``: Marian's sinusoidal position tables, which the model
    computes as it is built), and the buffers registered with ``persistent=False``, which ``from_pretrained``
    never loads (position ids, rotary frequencies: the model computes them; older checkpoints hold them).

    >>> import torch
    >>> transformers_computed(torch.nn.Linear(2, 2))
    (set(), set())
    """
    skipped: set[str] = set()
    unloaded: set[str] = set()
    for path, sub in module.named_modules():
        if not (hasattr(sub, "base_model_prefix") and hasattr(sub, "config")):
            continue  # no transformers model
        at = f"{path}." if path else ""
        skipped |= {at + key for key in getattr(sub, "_keys_to_ignore_on_save", None) or ()}
        unloaded |= {at + name for name in non_persistent_buffers(sub)}
    return skipped, unloaded


def broken_tie(module: nn.Module, name: str) -> str | None:
    """The fix where ``name`` is a transformers model's output embedding that its configuration ties to the
    input embedding (``tie_word_embeddings``) but that is a tensor of its own here (accelerate's
    ``init_empty_weights`` re-registers each parameter, which undoes ties): a tied checkpoint leaves it out.

    >>> broken_tie(nn.Linear(2, 2), "weight") is None
    True
    """
    for path, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if not (getattr(config, "tie_word_embeddings", False) and hasattr(sub, "get_output_embeddings")):
            continue
        try:
            output, inputs = sub.get_output_embeddings(), sub.get_input_embeddings()
        except NotImplementedError:  # transformers' vision models: no token embeddings to tie
            continue
        weight = getattr(output, "weight", None)
        if weight is None or weight is getattr(inputs, "weight", None):
            continue
        at = f"{path}." if path else ""
        own = next((f"{at}{n}.weight" for n, m in sub.named_modules() if m is output), None)
        tied = next((f"{at}{n}.weight" for n, m in sub.named_modules() if m is inputs), None)
        if own == name and tied is not None:
            return (
                f"the model's configuration ties it to '{tied}' (tie_word_embeddings=True), but here it is a "
                "tensor of its own (accelerate's init_empty_weights re-registers parameters, which undoes ties), "
                "and a tied checkpoint leaves it out: call model.tie_weights() before loading"
            )
    return None


# Modules whose eval forward rescales some of their own weights in place, once, and set a flag saying so (the
# next training forward scales them back): the flag -> the weights, under the module, that it rescales.
# transformers' RWKV divides each block's attention.output and feed_forward.value weights by
# 2 ** (block // config.rescale_every) (no rescaling where rescale_every is 0).
RESCALED_IN_PLACE = {
    "layers_are_rescaled": re.compile(r"^blocks\.\d+\.(attention\.output|feed_forward\.value)\.weight$")
}


# where the owners' classes are defined: a load into a part of one (an RWKV block) looks for its owner
_RESCALING_FAMILIES = ("transformers.models.rwkv.",)


def rescaled_in_place(module: nn.Module) -> dict[str, str]:
    """Each tensor of ``module`` that its owner's forward has rescaled in place (``RESCALED_IN_PLACE``; the flag
    set, RWKV's ``rescale_every`` not 0) -> the flag, named from ``module``: a checkpoint holds it unscaled,
    so written into the module it is wrong until the flag is cleared.

    >>> rescaled_in_place(nn.Linear(2, 2))
    {}
    """
    found: dict[str, str] = {}
    for path, sub in module.named_modules():
        at = f"{path}." if path else ""
        found.update({at + name: at + flag for name, flag in _rescaled(sub).items()})
    return found


def rescaled_by_owner(module: nn.Module) -> dict[str, str]:
    """Each tensor of ``module`` that a module holding it (an ``RwkvModel`` over the ``RwkvBlock`` loaded
    alone, or under ``prefix=``) has rescaled in place -> that holder's class and flag: the load sees only
    ``module``, the flag is the holder's, and a checkpoint's unscaled tensor written there stays unscaled.
    Holders are found among the live modules (only for modules of a family that rescales, see
    ``_RESCALING_FAMILIES``).

    >>> rescaled_by_owner(nn.Linear(2, 2))
    {}
    """
    if not any(type(sub).__module__.startswith(_RESCALING_FAMILIES) for sub in module.modules()):
        return {}
    own = {id(tensor): name for name, tensor in module.named_parameters()}
    found: dict[str, str] = {}
    for holder in _holders(module):
        for name, flag in _rescaled(holder).items():
            tensor = holder.get_parameter(name)
            if id(tensor) in own:
                found.setdefault(own[id(tensor)], f"{type(holder).__name__}.{flag}")
    return found


def _rescaled(module: nn.Module) -> dict[str, str]:
    """The tensors ``module`` itself has rescaled in place (its flag set) -> the flag."""
    found: dict[str, str] = {}
    for flag, tensors in RESCALED_IN_PLACE.items():
        if (
            getattr(module, flag, False) is not True
            or getattr(getattr(module, "config", None), "rescale_every", 1) == 0
        ):
            continue
        found.update({name: flag for name, _ in module.named_parameters() if tensors.match(name)})
    return found


def _holders(module: nn.Module) -> list[nn.Module]:
    """The live modules that hold ``module`` as a submodule, at any depth (PyTorch keeps no parent links: the
    garbage collector's objects are searched, once)."""
    import gc

    parents: dict[int, list[nn.Module]] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), nn.Module):  # not isinstance: it reads __class__, which proxies warn on
            for child in obj._modules.values():
                if child is not None:
                    parents.setdefault(id(child), []).append(obj)
    found: list[nn.Module] = []
    seen = {id(module)}
    todo = [module]
    while todo:
        for parent in parents.get(id(todo.pop()), []):
            if id(parent) not in seen:
                seen.add(id(parent))
                found.append(parent)
                todo.append(parent)
    return found


def parametrized_fix(name: str, originals: list[str]) -> str:
    """What works where a source holds ``name`` as the one tensor a parametrization computes (weight norm's,
    folded by an export) and not the ``originals`` the module keeps it as.

    >>> parametrized_fix("conv.weight", ["conv.parametrizations.weight.original0"])[43:]
    "torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule('conv'), 'weight') leaves \
'conv.weight' a plain parameter, which takes the source's tensor, and the forward computes the same; or load \
a source that holds 'conv.parametrizations.weight.original0' by name (torch.onnx.export(..., dynamo=False, \
do_constant_folding=False) keeps them)"
    """
    path, _, leaf = name.rpartition(".")
    listed = " and ".join(f"'{n}'" for n in originals)
    module = f"model.get_submodule('{path}')" if path else "model"
    return (
        f"remove the parametrization before loading: torch.nn.utils.parametrize.remove_parametrizations({module}, "
        f"'{leaf}') leaves '{name}' a plain parameter, which takes the source's tensor, and the forward computes "
        f"the same; or load a source that holds {listed} by name (torch.onnx.export(..., dynamo=False, "
        "do_constant_folding=False) keeps them)"
    )
