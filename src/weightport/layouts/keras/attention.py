"""Keras ``MultiHeadAttention`` into ``nn.MultiheadAttention``: the rules, and what must agree.

Keras keeps four EinsumDense sublayers: ``query_dense``/``key_dense``/``value_dense`` with kernels
``(dim, heads, key_dim)`` (value: ``value_dim``) and biases ``(heads, key_dim)``, and ``output_dense`` with
kernel ``(heads, value_dim, dim)`` and bias ``(dim,)``. PyTorch's projections are ``(heads * head_dim, dim)``
matrices whose row ``h * head_dim + j`` is head ``h``'s ``j``-th feature, the order a C-order reshape of
``(heads, head_dim)`` gives; packed ``in_proj_weight`` stacks q, k and v rows, separate
``q/k/v_proj_weight`` are used when ``kdim``/``vdim`` differ from ``embed_dim``. Both scale scores by
``1 / sqrt(head_dim)``, Keras by ``1 / sqrt(key_dim)``, the same where ``heads * key_dim == embed_dim``.

>>> _flat((4, 2, 3)).out_shape([(4, 2, 3)])
(6, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from weightport.errors import Problem, UnsupportedConfigError
from weightport.layouts.base import Rule
from weightport.layouts.keras.layers import Part
from weightport.layouts.pairing import Slot
from weightport.transforms import Chain, Concat, Identity, Op, Reshape, Transpose

__all__ = ["attention_rules", "attention_problems", "attention_notes", "attention_export"]

_T = Transpose((1, 0))
_ROLES = ("query", "key", "value")


def _flat(shape: tuple[int, ...]) -> Op:
    """An input projection kernel ``(dim, heads, size)`` as PyTorch's ``(heads * size, dim)``."""
    d, h, n = shape
    return Chain(Reshape(shape, (d, h * n)), _T)


def _shapes(part: Part) -> dict[str, tuple[int, ...]] | None:
    kernels = {r: part.shapes.get(f"{r}_kernel", ()) for r in (*_ROLES, "output")}
    return kernels if all(len(s) == 3 for s in kernels.values()) else None


def attention_rules(part: Part, slot: Slot, origin: str) -> list[Rule]:
    kernels = _shapes(part)
    if kernels is None:
        return []
    m: Any = slot.module
    v = part.vars
    rules = []
    q, k, val = (kernels[r] for r in _ROLES)
    if m._qkv_same_embed_dim and q == k == val:
        d, h, n = q
        packed = Chain(Concat(1, 3), Reshape((d, 3 * h, n), (d, 3 * h * n)), _T)
        sources = tuple(v[f"{r}_kernel"] for r in _ROLES)
        rules.append(Rule(slot.name("in_proj_weight"), sources, packed, f"{origin} query/key/value kernels"))
    elif not m._qkv_same_embed_dim:
        for r in _ROLES:
            rules.append(
                Rule(
                    slot.name(f"{r[0]}_proj_weight"),
                    (v[f"{r}_kernel"],),
                    _flat(kernels[r]),
                    f"{origin} {r} kernel",
                )
            )
    if (
        all(f"{r}_bias" in v for r in _ROLES)
        and part.shapes[f"{_ROLES[0]}_bias"] == part.shapes["value_bias"]
    ):
        h, n = part.shapes["query_bias"]
        packed = Chain(Concat(0, 3), Reshape((3 * h, n), (3 * h * n,)))
        sources = tuple(v[f"{r}_bias"] for r in _ROLES)
        rules.append(Rule(slot.name("in_proj_bias"), sources, packed, f"{origin} query/key/value biases"))
    h, n, out = kernels["output"]
    rules.append(
        Rule(
            slot.name("out_proj.weight"),
            (v["output_kernel"],),
            Chain(Reshape((h, n, out), (h * n, out)), _T),
            f"{origin} output kernel",
        )
    )
    if "output_bias" in v:
        rules.append(
            Rule(slot.name("out_proj.bias"), (v["output_bias"],), Identity(), f"{origin} output bias")
        )
    return rules


def attention_problems(part: Part, slot: Slot, label: str, rank: int | None) -> list[Problem]:
    """What ``nn.MultiheadAttention`` cannot compute, or is built otherwise than the Keras layer."""
    kernels = _shapes(part)
    m: Any = slot.module
    if kernels is None:
        return []
    d, heads, key_dim = kernels["query"]
    value_dim, out = kernels["value"][2], kernels["output"][2]
    problems = []
    if heads * key_dim != d or heads * value_dim != d or out != d:
        problems.append(
            Problem(
                label,
                "num_heads * key_dim == num_heads * value_dim == the query's size == the output's size "
                "(nn.MultiheadAttention gives each of its heads embed_dim / num_heads of q, k and v, and "
                "projects back to embed_dim)",
                f"Keras num_heads={heads}, key_dim={key_dim}, value_dim={value_dim}, query size {d}, "
                f"output size {out} ({heads} * {key_dim} = {heads * key_dim})",
                f"no nn.MultiheadAttention computes this: rebuild the Keras layer with key_dim=value_dim={d // heads} "
                "(and no output_shape) and retrain, or write an attention module of your own",
            )
        )
        return problems
    wanted = [
        ("embed_dim", d, m.embed_dim),
        ("num_heads", heads, m.num_heads),
        ("kdim", kernels["key"][0], m.kdim),
        ("vdim", kernels["value"][0], m.vdim),
    ]
    for name, keras, torch_ in wanted:
        if keras != torch_:
            problems.append(
                Problem(
                    label,
                    f"{name}={keras} (the Keras layer's)",
                    f"{name}={torch_}",
                    f"build nn.MultiheadAttention with {name}={keras}",
                )
            )
    has_bias = "query_bias" in part.vars
    if has_bias != (m.in_proj_bias is not None):
        problems.append(
            Problem(
                label,
                f"bias={has_bias} (Keras use_bias={has_bias})",
                f"bias={m.in_proj_bias is not None}",
                f"build nn.MultiheadAttention with bias={has_bias}",
            )
        )
    if m.bias_k is not None:
        problems.append(
            Problem(
                label,
                "add_bias_kv=False (Keras has no such biases)",
                "add_bias_kv=True",
                "build nn.MultiheadAttention with add_bias_kv=False",
            )
        )
    _, problem = axes_verdict(part.config, rank)
    if problem is not None:
        problems.append(Problem(label, *problem))
    return problems


def attention_notes(part: Part, slot: Slot, rank: int | None) -> list[str]:
    """What ``forward`` must do around the module: the order of its arguments, the batch axis, and how the
    query's axes become one sequence (:func:`axes_verdict`); ``rank``: the query's, where known."""
    m: Any = slot.module
    notes = ["Keras is called (query, value, key=value) and PyTorch (query, key, value)"]
    if not m.batch_first:
        notes.append("Keras takes (batch, time, features): build it with batch_first=True, or transpose")
    folded, _ = axes_verdict(part.config, rank)
    return notes + ([folded] if folded else [])


def _axes(value: Any) -> tuple[int, ...] | None:
    """A recorded ``attention_axes`` as a tuple (None: Keras's default)."""
    if value is None:
        return None
    return (int(value),) if isinstance(value, int) else tuple(int(a) for a in value)


def axes_verdict(
    cfg: Mapping[str, Any] | None, rank: int | None
) -> tuple[str | None, tuple[str, str, str] | None]:
    """How ``nn.MultiheadAttention``, which attends over dim 1 of a ``(batch, sequence, features)`` input,
    computes a Keras MultiHeadAttention over its ``attention_axes`` of a query of ``rank`` axes: as it is
    (one sequence axis), once ``forward`` folds the other axes into the batch and flattens the attended ones
    into one sequence (a note saying how), or not knowably (a problem).

    Keras attends over the given axes jointly (one softmax over all their positions), separately for each
    index of the other axes between the batch and the features; ``None`` means all of them, and a negative
    axis counts from the features (``-2``: the last before them).

    >>> axes_verdict({"attention_axes": None}, 3), axes_verdict({"attention_axes": [1]}, 3)
    ((None, None), (None, None))
    >>> axes_verdict({"attention_axes": [-2]}, 4)[0]
    'Keras attends over axis 2 of its 4-D query (attention_axes=[-2]) separately for each index of axis 1: fold that into the batch before the module, q.flatten(0, 1) (key and value likewise), and unfold its output, out.unflatten(0, q.shape[:2])'
    """
    raw = _axes((cfg or {}).get("attention_axes"))
    said = f"attention_axes={list(raw) if raw is not None else None}"
    if rank is None:
        if raw is None or raw == (-2,):
            return None, None  # one sequence axis for a (batch, time, features) query, the usual case
        return None, (
            "a query rank to judge attention_axes against (nn.MultiheadAttention attends over one sequence "
            "axis, and whether this is that one, or how the others must fold, depends on the query's axes)",
            f"Keras {said}, and the source records no shape the layer was built for",
            "load the .keras file (model.save('model.keras')), which records the query's shape",
        )
    between = tuple(range(1, rank - 1))
    axes = between if raw is None else tuple(sorted({a if a >= 0 else rank + a for a in raw}))
    if not axes or not set(axes) <= set(between):
        return None, (
            f"attention axes between the batch axis and the features (1 to {rank - 2} of a {rank}-D query)",
            f"Keras {said}",
            "rebuild the Keras layer with attention_axes=None and retrain",
        )
    return _fold_note(axes, tuple(a for a in between if a not in axes), rank, said), None


def _fold_note(axes: tuple[int, ...], others: tuple[int, ...], rank: int, said: str) -> str | None:
    """What ``forward`` must do so that dim 1 of the module's input is the attended axes, flattened into
    one sequence, and its batch the batch and every other axis (None: it is so already)."""
    if len(axes) == 1 and not others:
        return None
    what = f"Keras attends over {_named(axes)} of its {rank}-D query ({said})"
    if not others:
        return (
            f"{what} jointly: flatten them into one sequence before the module, q.flatten(1, {rank - 2}) (key and "
            f"value likewise), and unflatten its output, out.unflatten(1, q.shape[1:{rank - 1}])"
        )
    each = f"separately for each index of {_named(others)}"
    if axes == (rank - 2,):
        return (
            f"{what} {each}: fold {'that' if len(others) == 1 else 'those'} into the batch before the module, "
            f"q.flatten(0, {rank - 3}) (key and value likewise), and unfold its output, "
            f"out.unflatten(0, q.shape[:{rank - 2}])"
        )
    order = (0, *others, *axes, rank - 1)
    return (
        f"{what}{' jointly' if len(axes) > 1 else ''}, {each}: before the module, move the other axes next to "
        "the batch and fold them into it, and the attended ones next to the features, flattened into one "
        f"sequence, q.permute{order}.reshape(-1, n, q.shape[-1]) with n the product of the attended axes' sizes "
        f"(key and value likewise); undo both on its output, out.reshape(q.permute{order}.shape).permute"
        f"{tuple(order.index(i) for i in range(rank))}"
    )


def _named(axes: tuple[int, ...]) -> str:
    return f"axis {axes[0]}" if len(axes) == 1 else f"axes {', '.join(map(str, axes))}"


def attention_export(slot: Slot, state: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
    """The reverse: an ``nn.MultiheadAttention``'s weights as a Keras ``MultiHeadAttention``'s four
    sublayers (``{path}/query_dense/vars/0`` ...), with ``key_dim = value_dim = embed_dim / num_heads``."""
    from weightport.tensors import numpy_of

    m: Any = slot.module
    if m.bias_k is not None:
        raise UnsupportedConfigError(
            f"'{slot.label}' has add_bias_kv=True; Keras MultiHeadAttention has no such biases."
        )
    dim, heads = m.embed_dim, m.num_heads
    size = dim // heads

    def get(param: str) -> np.ndarray:
        return numpy_of(state[slot.name(param)], copy=True)

    if m._qkv_same_embed_dim:
        weights = np.split(get("in_proj_weight"), 3, axis=0)
    else:
        weights = [get(f"{r[0]}_proj_weight") for r in _ROLES]
    bias = get("in_proj_bias") if m.in_proj_bias is not None else None
    out: dict[str, np.ndarray] = {}
    for i, role in enumerate(_ROLES):
        out[f"{path}/{role}_dense/vars/0"] = np.ascontiguousarray(
            weights[i].T.reshape(weights[i].shape[1], heads, size)
        )
        if bias is not None:
            out[f"{path}/{role}_dense/vars/1"] = np.ascontiguousarray(
                bias[i * dim : (i + 1) * dim].reshape(heads, size)
            )
    out[f"{path}/output_dense/vars/0"] = np.ascontiguousarray(
        get("out_proj.weight").T.reshape(heads, size, dim)
    )
    if m.out_proj.bias is not None:
        out[f"{path}/output_dense/vars/1"] = get("out_proj.bias")
    return out
