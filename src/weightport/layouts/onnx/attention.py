"""``nn.MultiheadAttention`` as torch.onnx.export writes it, and parameters of modules of no known kind.

Both exporters write an ``nn.MultiheadAttention`` (``kdim == vdim == embed_dim``) as one ``MatMul`` by the
packed input projection, stored transposed ``(d, 3d)`` under a name of the exporter's own (``val_12``,
``onnx::MatMul_379``), followed by the ``Add`` of ``<path>.in_proj_bias``; the heads are split, scaled and
multiplied; then a ``Gemm`` by ``<path>.out_proj.weight`` (and ``.bias``). The two Linear layers found are
one attention layer where the stored names prove it: an in_proj bias (or weight) named
``<path>.in_proj_bias`` and an out_proj weight named ``<path>.out_proj.weight``, with ``3d`` and ``d``
outputs. It fills the one slot of the module at ``<path>`` (its ``out_proj`` included). Without those names
(``bias=False``, so nothing names the in_proj) nothing proves which MatMul is which attention's, and the two
stay Linear layers that pair with no module: the missing module's hint says so.

A module of no known kind (``VisionTransformer``'s ``class_token``, its encoder's ``pos_embedding``) takes
an initializer named exactly as its parameter, of its shape: the exporters keep a parameter's name for the
tensor itself. An initializer computed from it gets another name (the dynamo exporter with a fixed batch
size folds ``Expand(class_token)`` into one named ``expand``): the missing parameter's hint says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from weightport.errors import LayoutError
from weightport.layouts.base import Pairing, Rule
from weightport.layouts.onnx.cross_attention import (
    InProj,
    dataflow_in_proj,
    in_proj_roles,
    linear_shape,
    split_in_proj,
)
from weightport.layouts.onnx.graph import Graph, Layer, all_zero
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.onnx.norm_eps import check_norm_eps
from weightport.layouts.pairing import Paired, Slot, module_slots
from weightport.sources.base import Source
from weightport.transforms import Identity, Zeros

__all__ = [
    "ATTENTION",
    "attention_layers",
    "attention_rules",
    "explain_unnamed_attention",
    "named_parameter_rules",
]

ATTENTION = "MultiheadAttention"
_IN = (".in_proj_bias", ".in_proj_weight")
_OUT = ".out_proj.weight"


def _owner(layer: Layer, suffixes: tuple[str, ...]) -> str | None:
    for name in layer.tensors.values():
        for suffix in suffixes:
            if name == suffix[1:]:
                return ""  # the model is the attention module itself
            if name.endswith(suffix) and ":" not in name:
                return name[: -len(suffix)]
    return None


def attention_layers(layers: list[Layer], source: Source, graph: Graph) -> list[Layer]:
    """``layers`` with each in_proj/out_proj pair of Linear layers that the stored names tie to one
    ``nn.MultiheadAttention`` made one layer of kind ``MultiheadAttention`` (where the in_proj was);
    then each out_proj left whose in_proj the graph splits (:mod:`.cross_attention`)."""
    out_at = {}
    for i, layer in enumerate(layers):
        owner = _owner(layer, (_OUT,)) if layer.kind == "Linear" else None
        if owner is not None and layer.tensors["weight"] == (f"{owner}{_OUT}" if owner else _OUT[1:]):
            out_at[owner] = i
    merged: dict[int, Layer] = {}
    dropped: set[int] = set()
    for i, layer in enumerate(layers):
        owner = _owner(layer, _IN) if layer.kind == "Linear" else None
        if owner is None or owner not in out_at or out_at[owner] in dropped:
            continue
        out = layers[out_at[owner]]
        d = _outputs(out, source)
        if d is None or _outputs(layer, source) != 3 * d:
            continue
        tensors = {f"in_proj_{k}": v for k, v in layer.tensors.items()}
        tensors |= {f"out_proj.{k}": v for k, v in out.tensors.items()}
        ops = {f"in_proj_{k}": v for k, v in layer.ops.items()} | {
            f"out_proj.{k}": v for k, v in out.ops.items()
        }
        merged[i] = Layer(
            layer.node,
            ATTENTION,
            tensors,
            ops,
            detail=f"{layer.detail} (in_proj) and {out.detail} '{out.node.label}' (out_proj)",
            owner=owner,
        )
        dropped.add(out_at[owner])
    found = [merged.get(i, layer) for i, layer in enumerate(layers) if i not in dropped]
    return _cross_attention(
        found, {owner: layers[i] for owner, i in out_at.items() if i not in dropped}, graph
    )


def _cross_attention(layers: list[Layer], outs: dict[str, Layer], graph: Graph) -> list[Layer]:
    """Each out_proj in ``outs`` (owner -> layer) made one attention layer with its split in_proj, where
    the graph proves it; a projection two attentions would claim (or an out_proj) is left to neither."""
    found: dict[int, tuple[str, Layer, InProj]] = {}
    claims: dict[int, int] = {id(out): 1 for out in outs.values()}
    for owner, out in outs.items():
        width = _outputs(out, graph.source)
        in_proj = None if width is None else split_in_proj(owner, width, graph)
        if width is not None and in_proj is None:
            in_proj = dataflow_in_proj(out, width, layers, graph)
        if in_proj is not None:
            found[id(out)] = (owner, out, in_proj)
            for part in in_proj.parts:
                claims[id(part)] = claims.get(id(part), 0) + 1
    proven = {key: entry for key, entry in found.items() if all(claims[id(p)] == 1 for p in entry[2].parts)}
    taken = {id(part) for _, _, in_proj in proven.values() for part in in_proj.parts}
    result = []
    for layer in layers:
        if id(layer) in taken:
            continue  # an attention's query or key-value projection
        if id(layer) not in proven:
            result.append(layer)
            continue
        owner, out, in_proj = proven[id(layer)]
        result.append(
            Layer(
                out.node,
                ATTENTION,
                in_proj.tensors | {f"out_proj.{k}": v for k, v in out.tensors.items()},
                in_proj.ops | {f"out_proj.{k}": v for k, v in out.ops.items()},
                detail=f"{in_proj.detail} and {out.detail} '{out.node.label}' (out_proj)",
                owner=owner,
            )
        )
    return result


def _outputs(layer: Layer, source: Source) -> int | None:
    """A Linear layer's output size, from its weight after its op."""
    matrix = linear_shape(layer, source)
    return None if matrix is None else matrix[0]


def attention_rules(
    layer: Layer, pair: Paired, source: Source, issues: Issues, validated: set[str], unchecked: list[str]
) -> list[Rule]:
    slot, node = pair.slot, layer.node
    module: Any = slot.module
    if not module._qkv_same_embed_dim or module.bias_k is not None:
        issues.add(
            node,
            f"'{slot.label}' has separate q/k/v projections (kdim/vdim other than embed_dim) or add_bias_kv=True, "
            "while the graph has one packed in_proj and no extra key/value bias. Fix: build it with kdim=vdim="
            "embed_dim and add_bias_kv=False.",
        )
        return []
    rules = []
    stored = in_proj_roles(layer) | {
        role: ((layer.tensors[role],), layer.ops.get(role, Identity()))
        for role in ("out_proj.weight", "out_proj.bias")
        if role in layer.tensors
    }
    for role in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        names, op = stored.get(role, ((), Identity()))
        target = module.get_parameter(role) if _has(module, role) else None
        shown = " and ".join(f"'{n}'" for n in names)
        origin = f"{source.description} node '{node.label}' {role.replace('_', ' ', 1)} {shown}"
        if names and target is None:
            if all(all_zero(source, n) for n in names):
                validated.update(names)
            else:
                issues.add(
                    node,
                    f"has {role} {shown} but '{slot.label}' was built with bias=False. Fix: build it with bias=True.",
                )
        elif names:
            rules.append(Rule(slot.name(role), names, op, origin))
        elif target is not None:
            rules.append(
                Rule(
                    slot.name(role),
                    (),
                    Zeros(tuple(target.shape)),
                    f"{source.description} node '{node.label}' has no {role}: zeros",
                )
            )
    note = "num_heads and batch_first of nn.MultiheadAttention: the graph's Reshape sizes and Transposes carry them, not its weights"
    if note not in unchecked:
        unchecked.append(note)
    return rules


def _has(module: nn.Module, param: str) -> bool:
    try:
        return module.get_parameter(param) is not None
    except AttributeError:
        return False


def named_parameter_rules(
    module: nn.Module,
    source: Source,
    used: set[str],
    filled: set[str],
    unchecked: list[str],
    reads: Callable[[str], bool] | None = None,
    graph: Graph | None = None,
    issues: Issues | None = None,
) -> tuple[list[Rule], list[Pairing], dict[str, str]]:
    """Rules for the parameters of modules of no known kind, and for any buffer no rule fills (one registered
    with ``persistent=False`` too, which the exporter stores where the forward reads it), from initializers of
    their exact names and shapes; the pairings to report; and, for parameters with none, why (module path ->
    hint).

    A module of a known kind that no node filled (``filled``: the targets of the rules so far) takes its
    parameters the same way where the graph holds every one of them under its name and shape, unread by
    any rule: torch.onnx.export keeps a parameter's name only where it stores it as it is, and computes
    the module from nodes no layer rule reads (a LayerNorm below opset 17, a ConvTranspose). Its settings
    are then not checked against the graph, which ``unchecked`` says.

    With ``graph`` and ``issues``, a norm's weight filled so (a LayerNorm below opset 17, an RMSNorm, one of
    no known kind as transformers' ``T5LayerNorm``) has the eps the graph adds to its variance checked against
    the module's (:mod:`.norm_eps`): a mismatch is an issue, and a LayerNorm or RMSNorm whose eps matches is
    not reported unchecked."""
    check = _eps_check(graph, issues)
    rules: list[Rule] = []
    pairings: list[Pairing] = []
    hints: dict[str, str] = {}
    folded: list[tuple[str, list[tuple[str, tuple[int, ...]]], str]] = []  # said once every rule is made
    for slot in module_slots(module):
        if not slot.kind.startswith("other:"):
            if slot.layer is None:
                _known_by_name(slot, source, used, filled, rules, pairings, unchecked, check)
                own = [(slot.name(p), tuple(t.shape)) for p, t in slot.module.named_parameters(recurse=False)]
                # no rule here targets a name the file lacks: only the layer rules before can fill these
                if own and not any(name in filled or name in source.infos for name, _ in own):
                    folded.append((slot.path, own, "no node applies it and "))
            continue
        lacking: list[tuple[str, tuple[int, ...]]] = []
        took: list[str] = []
        for param, tensor in slot.module.named_parameters(recurse=False):
            full = slot.name(param)
            stored = _stored_as(full, source, graph)
            info = source.infos.get(stored) if stored is not None else None
            if stored and info is not None and tuple(info.shape) == tuple(tensor.shape) and full not in used:
                took.append(full)
                rules.append(_by_name(full, stored, source))
                pairings.append(_pairing(full, stored, type(slot.module).__name__, "parameter"))
                continue
            lacking.append((full, tuple(tensor.shape)))
        note = check(slot, took)
        if note is not None and note not in ("equal", "refused"):
            unchecked.append(note)
        if lacking:
            folded.append((slot.path, lacking, ""))
    taken = filled | {rule.target for rule in rules}
    for full, buffer in module.named_buffers():
        stored = _stored_as(full, source, graph)
        info = source.infos.get(stored) if stored is not None else None
        if (
            stored
            and info is not None
            and tuple(info.shape) == tuple(buffer.shape)
            and full not in used | taken
        ):
            rules.append(_by_name(full, stored, source))
            owner = module.get_submodule(full.rpartition(".")[0]) if "." in full else module
            pairings.append(_pairing(full, stored, type(owner).__name__, "buffer"))
    placed = used | {s for rule in rules for s in rule.sources}  # no candidate another rule here takes
    for path, lacking, what in folded:
        hints[path] = _folded_hint(lacking, source, placed, reads, what)
    return rules, pairings, hints


def _stored_as(name: str, source: Source, graph: Graph | None) -> str | None:
    """The stored tensor that holds the model's tensor ``name``: the initializer of that name, or the one an
    ``Identity`` named so reads (the legacy exporter stores equal values once, and writes each other tensor
    holding them as such an Identity: Swin's equal ``relative_position_index`` buffers)."""
    if name in source.infos:
        return name
    producer = graph.producers.get(name) if graph is not None else None
    if producer is None or producer.op_type != "Identity":
        return None
    return graph.stored(name) if graph is not None else None


def _by_name(full: str, stored: str, source: Source) -> Rule:
    """The rule filling the model's tensor ``full`` from ``stored``, the initializer :func:`_stored_as` found."""
    said = f"initializer '{stored}'" + (f" (read as '{full}' through an Identity)" if stored != full else "")
    return Rule(full, (stored,), Identity(), f"{source.description} {said}")


def _pairing(full: str, stored: str, kind: str, what: str) -> Pairing:
    """How the model's tensor ``full`` (a parameter or a buffer, ``what``) was paired with ``stored``."""
    how = f"by name (the initializer is the {what})"
    if stored != full:
        how = f"by name (an Identity named as the {what} reads these equal values, stored once)"
    return Pairing(stored if stored != full else full, "ONNX initializer", full, kind, how)


def _folded_hint(
    lacking: list[tuple[str, tuple[int, ...]]],
    source: Source,
    used: set[str],
    reads: Callable[[str], bool] | None,
    what: str = "",
) -> str:
    """Why parameters have no initializer of their names: the exporter folded what the forward made of them,
    or (``reads``, the pass on ``example_inputs=``, shows it) the forward never reads them."""
    if reads is not None and not any(reads(full) for full, _ in lacking):
        named = " or ".join(f"'{full}'" for full, _ in lacking)
        return (
            f"the forward pass on example_inputs= never reads {named} (a mask token used only in training, as "
            "DINOv2's), so no export stores it: pass strict=False to keep the module's own value"
        )
    shapes = {shape for _, shape in lacking}
    alike = [n for n, i in source.infos.items() if tuple(i.shape) in shapes and n not in used]
    named = " or ".join(f"'{full}' {shape}" for full, shape in lacking)
    seen = (
        f"unread initializers of its shape: {', '.join(repr(n) for n in alike[:4])}, and nothing proves which is it"
        if alike
        else "no unread initializer has its shape"
    )
    return (
        f"{what}the graph has no initializer named {named}: the exporter computed the parameter into another "
        "constant (constant folding stores what the forward made of it: Expand(class_token) under "
        "torch.onnx.export(dynamo=True) with a fixed batch size, the rows of a position or token-type table "
        "that fixed inputs gather, a view or reshape of it, "
        f"gamma.reshape(1, -1, 1, 1) of a layer scale); {seen}. Fix: export "
        "so that the parameter stays under its name (torch.onnx.export(dynamo=True, optimize=False), or "
        "with a dynamic batch axis where the forward expands it to the batch; or dynamo=False with "
        "do_constant_folding=False), or load the PyTorch weights themselves. Where the forward never reads "
        "the parameter (a mask token used only in training, as DINOv2's), no export stores it: pass "
        "strict=False to keep the module's own"
    )


def _known_by_name(
    slot: Slot,
    source: Source,
    used: set[str],
    filled: set[str],
    rules: list[Rule],
    pairings: list[Pairing],
    unchecked: list[str],
    check: Callable[[Slot, list[str]], str | None],
) -> None:
    own = [(slot.name(p), tuple(t.shape)) for p, t in slot.module.named_parameters(recurse=False)]
    if not own or any(name in filled or name in used for name, _ in own):
        return
    if any(name not in source.infos or tuple(source.infos[name].shape) != shape for name, shape in own):
        return
    kind = type(slot.module).__name__
    for name, _ in own:
        rules.append(Rule(name, (name,), Identity(), f"{source.description} initializer '{name}'"))
        pairings.append(
            Pairing(name, "ONNX initializer", name, kind, "by name (the initializer is the parameter)")
        )
    eps = check(slot, [name for name, _ in own])
    if eps == "refused" or (eps == "equal" and isinstance(slot.module, _NORMS)):
        return  # eps (and a group norm's groups, checked with it) is what a norm's weights do not show
    if eps not in (None, "equal"):
        unchecked.append(eps)  # what the check could not read
        return
    unchecked.append(
        f"'{slot.label}' ({kind}) took its parameters by name: the graph computes it from nodes weightport "
        "does not read as one layer, so its settings are not checked against the module"
    )


_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _eps_check(graph: Graph | None, issues: Issues | None) -> Callable[[Slot, list[str]], str | None]:
    """:func:`.norm_eps.check_norm_eps` on ``graph`` into ``issues`` for a slot's parameters filled by name
    (none: nothing checked)."""
    if graph is None or issues is None:
        return lambda slot, params: None
    return lambda slot, params: check_norm_eps(slot, params, graph, issues) if params else None


def explain_unnamed_attention(
    module: nn.Module, layers: list[Layer], source: Source, error: LayoutError
) -> None:
    """When pairing failed, the model has an ``nn.MultiheadAttention`` that no attention layer was found for,
    and the graph has a Linear layer of its packed in_proj's size: say why they were not tied."""
    found = {layer.owner for layer in layers if layer.kind == ATTENTION}
    for slot in module_slots(module):
        attention: Any = slot.module
        if slot.kind != ATTENTION or slot.path in found:
            continue
        label = f"'{slot.path}'" if slot.path else "the model itself"
        width = int(attention.embed_dim)
        packed = [
            layer.node.label
            for layer in layers
            if layer.kind == "Linear" and _outputs(layer, source) == 3 * width
        ]
        split = [
            layer.node.label
            for layer in layers
            if layer.kind == "Linear" and _outputs(layer, source) == 2 * width
        ]
        if not packed:  # a query other than key and value: the in_proj went out in unnamed parts
            out = slot.name("out_proj.weight")
            if split:
                seen = (
                    f"has MatMuls of 2 x embed_dim outputs ({', '.join(repr(p) for p in split[:4])}), the key and "
                    f"value part of nn.MultiheadAttention {label}'s in_proj"
                )
            elif any(out in layer.tensors.values() for layer in layers):
                seen = f"holds nn.MultiheadAttention {label}'s out_proj ('{out}') but no MatMul of its packed in_proj"
            else:
                continue
            raise LayoutError(
                f"{source.description} {seen}: the exporter writes the input projections of an attention called "
                "with a query other than its key and value (cross-attention, as in nn.TransformerDecoderLayer) as "
                "unnamed nodes. They are tied to the attention only where the dataflow into its named out_proj "
                "starts at exactly one query (d, d) and one key-value (d, 2d) projection (the key is the value); "
                "here it does not (a key other than the value gives three projections, which is which unproven; "
                "an unnamed out_proj names no attention). Fix: load the PyTorch weights themselves "
                "(weightport.save of the model, or its state_dict as .safetensors), or export with dynamo=True, "
                "which keeps the in_proj under its name. "
                f"(Pairing said: {error})"
            ) from error
        raise LayoutError(
            f"{source.description} has a MatMul of nn.MultiheadAttention's packed in_proj size "
            f"({', '.join(repr(p) for p in packed[:4])}), but nothing ties it to {label}: the exporter names the "
            f"in_proj only through its bias '{slot.name('in_proj_bias')}', and "
            f"{'the module has no bias (bias=False)' if attention.in_proj_bias is None else 'the file stores no tensor of that name (its names were changed, or another exporter wrote it)'}, "
            "so which MatMul and Gemm are this attention's projections is not proven. Fix: load the PyTorch "
            "weights themselves (weightport.save / layout='torch'), or "
            f"{'export a model built with bias=True' if attention.in_proj_bias is None else 'load the file torch.onnx.export wrote, its names as they were'}. "
            f"(Pairing said: {error})"
        ) from error
