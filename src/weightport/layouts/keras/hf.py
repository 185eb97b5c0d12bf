"""transformers' TF checkpoints (``tf_model.h5``) into transformers' PyTorch classes, by transformers' names.

``TFBertModel(config).save_pretrained(folder)`` writes a legacy Keras ``.h5`` of the model's top-level
layers (``bert``; ``transformer`` for GPT-2; ``vit``; a head such as ``classifier`` beside it), each
listing its weights as ``<model scope>/<layer>/<inner layers>/<variable>:0``
(``tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0``). The PyTorch twin built from
the same config names each of them by transformers' own conventions (its converter,
``transformers.modeling_tf_pytorch_utils``, follows them too), so the pairing is by name, with the
same general rules for every model and no table per model (but a few layers the PyTorch twin names
otherwise: DeBERTa-v2's ``pos_proj``/``pos_q_proj`` are ``pos_key_proj``/``pos_query_proj``):

- the model scope goes; ``_._`` separates a list index (``layer_._0`` is ``layer.0``); a component
  ``a___b`` is ``b``; ``/`` is ``.``;
- the variable: ``kernel``, ``embeddings`` and ``gamma`` are ``weight``, ``beta`` is ``bias``,
  ``moving_mean``/``moving_variance`` are ``running_mean``/``running_var`` (a BatchNorm's
  ``num_batches_tracked`` is 0: Keras counts no batches), ``pointwise_kernel``/``depthwise_kernel`` are
  ``pointwise.weight``/``depthwise.weight``; other names (``weight``, ``bias``, ``cls_token``) stay;
- a ``kernel`` is transposed: (in, out) -> (out, in), Conv2D's (kh, kw, in, out) -> (out, in, kh, kw),
  Conv1D's (k, in, out) -> (out, in, k); every other variable keeps its layout. transformers' TF
  ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) stores ``weight`` as (in, out), as its PyTorch
  ``Conv1D`` does, and its bias as (1, n): axes of size 1 are dropped or added to meet the module's
  shape, never a real reshape;
- the top-level layer's name stays where the module has a submodule of that name
  (``BertForSequenceClassification.bert``) and goes where the module is that layer (``BertModel``), as
  transformers' ``base_model_prefix`` does; ``mapping={"bert": "encoder"}`` puts it elsewhere, and a model
  wrapped as ``self.m`` loads inside ``m``;
- a composite's part (``EncoderDecoderModel.encoder``, a ``BertModel``) holds its tensors at its top,
  while TF files them under the part's main layer (``encoder/bert/...``): where the module lacks that
  name and the part's ``base_model_prefix`` is it, it goes, as transformers' own loading drops it.

TF lists a weight under every top-level layer that uses it, and the file holds it again there (BERT's
word embeddings under ``mlm___cls``; T5's ``shared``, built outside the model's scope as
``shared/shared/embeddings:0``, under ``encoder`` and ``decoder``): the copy named after another layer
is that layer's weight, read once from its own layer and the others ignored.

Two TF variables that fill one tied PyTorch tensor must hold the same values, but for one case: TF ALBERT's
MLM head builds ``bias`` and ``decoder/bias`` (both starting at zero) and adds only ``decoder/bias``; a
variable no forward reads keeps its zeros through training, so an all-zero copy beside a trained one is
set aside (reported as ignored). Copies that differ otherwise are refused.

What the module has and the file lacks: buffers registered with ``persistent=False`` (position ids,
GPT-2's causal masks) stay as the module built them, as transformers' converter leaves them; any other
tensor is a problem saying so (a persistent buffer's says that the converter leaves it as built, and
``strict=False`` does the same). Unlike that converter, which reads parameters only, BatchNorm's
statistics load. Tensors the module has no place for (a head the module lacks) are problems too
(``strict=False`` skips them, as the converter skips them with a warning). A file of another
architecture, most of whose names name nothing in the module, is refused once, saying so.

>>> torch_path("tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0")
['bert', 'encoder', 'layer', '0', 'attention', 'self', 'query', 'weight']
>>> torch_path("tf_bert_for_pre_training/mlm___cls/predictions/transform/LayerNorm/gamma:0")
['cls', 'predictions', 'transform', 'LayerNorm', 'weight']
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from weightport.errors import LayoutError
from weightport.layouts.base import LayoutPlan, Pairing, Rule, base_model_prefix
from weightport.layouts.keras.layers import Layer, inner_layers
from weightport.layouts.slots import TRANSFORMERS_CONV1D, slot_kind
from weightport.layouts.torch import weight_norm_name
from weightport.sources.base import Source
from weightport.transforms import Chain, Identity, Op, Reshape, Transpose, Zeros

__all__ = ["claims", "plan", "torch_path"]

# transformers' TF variable names -> the PyTorch tensor's last components
_RENAMED = {
    "kernel": ["weight"],
    "embeddings": ["weight"],
    "gamma": ["weight"],
    "beta": ["bias"],
    "moving_mean": ["running_mean"],
    "moving_variance": ["running_var"],
    "pointwise_kernel": ["pointwise", "weight"],
    "depthwise_kernel": ["depthwise", "weight"],
}
# TF layers transformers' PyTorch twin names otherwise (DeBERTa-v2's relative-position projections, built
# where share_att_key=False): renamed where the module has the PyTorch name and not the TF one (DeBERTa's own
# PyTorch class keeps pos_proj / pos_q_proj)
_LAYERS_RENAMED = {"pos_proj": "pos_key_proj", "pos_q_proj": "pos_query_proj"}
_KERNELS = ("kernel", "pointwise_kernel", "depthwise_kernel")
# TransfoXL's projection lists hold (in, out) matrices without the name 'kernel'
_PROJECTION_LISTS = ("emb_projs", "out_projs")
_DUPLICATED = re.compile(r"/[^/]*___([^/]*)/")  # '/a___b/' is '/b/': one TF layer under two names


def _weight_name(layer: Layer, tensor: str) -> str:
    """The weight's own name in the file (``tf_bert_model/bert/...:0``), without its layer's group."""
    return tensor[len(layer.path) + 1 :] if tensor.startswith(layer.path + "/") else tensor


def _components(weight_name: str) -> list[str]:
    name = weight_name.replace(":0", "")
    if "___" in name:
        if len(name) > 2048 or name.count("___") > 10:
            raise LayoutError(f"TF weight name '{weight_name[:200]}' is too long to convert")
        name = _DUPLICATED.sub(r"/\1/", name)
    return re.sub(r"//+", "/", name.replace("_._", "/")).split("/")


def torch_path(weight_name: str) -> list[str]:
    """The PyTorch state-dict name's components of a transformers TF weight, top-level layer first."""
    parts = _components(weight_name)
    if len(parts) > 1:
        parts = parts[1:]  # the model's scope
    parts[-1:] = _RENAMED.get(parts[-1], [parts[-1]])
    return parts


def _copies(layers: list[Layer], source: Source) -> dict[str, str] | None:
    """Tensors that are a second copy of another top-level layer's weight -> that layer's own tensor;
    ``None`` where a weight's name follows no convention of transformers' TF checkpoints.

    Each weight is named ``<scope>/<its layer>/...`` (the scope is the model's, or the layer's own for
    a layer built outside the model, as T5's ``shared``; BART's ``model.shared`` inside ``model`` is a
    part of it), or is one variable named as its layer (BART's ``final_logits_bias:0``); TF also lists
    a weight under every other layer that uses it (BERT's word embeddings under ``mlm___cls``,
    ``shared`` under T5's ``encoder``), and the file holds it again there.
    """
    copies: dict[str, str] = {}
    for layer in layers:
        for tensor in layer.tensors:
            name = _weight_name(layer, tensor)
            raw = name.split("/")
            if len(raw) == 1 and (name.replace(":0", "") == layer.path or name.startswith(layer.path + ".")):
                continue  # a variable named as its layer, or by its PyTorch path (TF CvT's 'cvt.encoder...')
            if len(raw) < 3:
                return None
            if raw[1] == layer.path or raw[1].startswith(layer.path + "."):
                continue
            own = f"{raw[1]}/{name}"
            if own not in source.infos:
                return None
            copies[tensor] = own
    return copies


def _check_copies(copies: Mapping[str, str], source: Source) -> None:
    """A copy is set aside as the same weight again only where it holds the same values: a model that
    builds a weight twice (TF ESM's decoder embeddings) stores two, and taking one would be wrong."""
    for copy, own in copies.items():
        if not np.array_equal(np.asarray(source.read(copy)), np.asarray(source.read(own)), equal_nan=True):
            raise LayoutError(
                f"{source.description}: '{copy}' is filed as a copy of '{own}' (TF lists a weight again under "
                "each layer that uses it), but the two hold different values: the TF model built two weights "
                "of that name, and which one a PyTorch tensor takes is not proven (one tied tensor cannot hold "
                "both). Fix: read the arrays with weightport.open_source and load each, converted, under the "
                "name of the module tensor it is, into a model built untied (tie_word_embeddings=False)."
            )


_TOP = "top_level_model_weights/"  # tf.keras files a model's own weights (not its layers') under this group


def _own_weights(
    leftover: list[str],
    names: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    source: Source,
    lead: str,
    rules: list[Rule],
) -> list[str]:
    """Rules for the TF model's own weights (Wav2Vec2's ``layer_weights``, filed as
    ``top_level_model_weights/<model scope>/layer_weights:0``) into the module tensor of that name and
    shape; the leftover tensors without one."""
    rest = []
    for tensor in leftover:
        target = ".".join(torch_path(tensor[len(_TOP) :])) if tensor.startswith(_TOP) else ""
        have, want = tuple(source.infos[tensor].shape), shapes.get(target)
        if target and names.get(target) == "parameter" and want is not None and _sized_alike(have, want):
            op = Identity() if have == want else Reshape(have, want)  # axes of size 1 only: (1,) into ()
            rules.append(Rule(lead + target, (tensor,), op, f"{source.description} {tensor}"))
        else:
            rest.append(tensor)
    return rest


def _sized_alike(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether two shapes differ in axes of size 1 alone (a TF scalar weight stored as (1,))."""
    return [d for d in have if d != 1] == [d for d in want if d != 1]


def claims(layers: list[Layer], source: Source) -> bool:
    """Whether ``source`` is a transformers TF checkpoint: a legacy ``.h5`` whose layers' weights are
    all named ``<scope>/<their layer>/...``, one of them a layer that holds a whole model."""
    if source.metadata.get("keras_file") != "legacy-h5":
        return False
    weighted = [layer for layer in layers if layer.tensors]
    if not weighted or any(layer.legacy is None for layer in weighted):
        return False
    copies = _copies(weighted, source)
    return copies is not None and any(len(inner_layers(layer)) > 2 for layer in weighted)


@dataclass(frozen=True)
class _Variable:
    tensor: str  # the source's name
    layer: str  # its top-level layer
    path: tuple[str, ...]  # the PyTorch name's components, the top-level layer first
    var: str  # the TF variable's own name ('kernel')
    shape: tuple[int, ...]
    inner: str  # the TF layer holding it, named without the model scope (for the report)


def _variables(layers: list[Layer], source: Source, copies: Mapping[str, str]) -> list[_Variable]:
    found = []
    for layer in layers:
        for tensor in layer.tensors:
            if tensor in copies:
                continue
            name = _weight_name(layer, tensor)
            parts = _components(name)
            raw = name.replace(":0", "").split("/")
            inner = "/".join(raw[1:-1] if len(raw) > 2 else raw[:-1]) or layer.path
            shape = source.infos[tensor].shape
            found.append(_Variable(tensor, layer.path, tuple(torch_path(name)), parts[-1], shape, inner))
    return found


def _names(module: nn.Module) -> dict[str, str]:
    """Every tensor the module could take (its state dict and non-persistent buffers) -> its kind."""
    names = {n: "parameter" for n, _ in module.named_parameters(remove_duplicate=False)}
    for path, owner in module.named_modules(remove_duplicate=False):
        for local, buffer in owner._buffers.items():
            if buffer is not None:
                full = f"{path}.{local}" if path else local
                names.setdefault(
                    full, "buffer" if local not in owner._non_persistent_buffers_set else "optional"
                )
    return names


def _whole_model_layers(layers: list[Layer]) -> set[str]:
    return {layer.path for layer in layers if len(inner_layers(layer)) > 2}


def _targets(
    module: nn.Module, variables: list[_Variable], main: set[str], mapping: Mapping[str, str]
) -> dict[str, str]:
    """Source tensor -> the module's name for it (see the module doc for where the layer's name goes)."""
    children = {name for name, _ in module.named_children()}
    names = _names(module)
    out = {}
    for v in variables:
        name = ".".join(v.path)
        inside = name.startswith(v.layer + ".")
        if v.layer in mapping and inside:
            name = ".".join(p for p in (mapping[v.layer], name[len(v.layer) + 1 :]) if p)
        elif v.layer in main and inside and v.layer not in children:
            name = name[len(v.layer) + 1 :]  # the module is that layer (BertModel for 'bert')
        out[v.tensor] = _renamed_layer(_parametrized(_inner_main_layer(module, name, names), names), names)
    return out


def _renamed_layer(name: str, names: Mapping[str, str]) -> str:
    """``name`` with a TF layer's name the PyTorch twin spells otherwise (``_LAYERS_RENAMED``) in its place,
    where the module has that and not ``name``.

    >>> _renamed_layer("encoder.layer.0.attention.self.pos_proj.weight",
    ...                {"encoder.layer.0.attention.self.pos_key_proj.weight": "parameter"})
    'encoder.layer.0.attention.self.pos_key_proj.weight'
    """
    if name in names:
        return name
    parts = name.split(".")
    new = ".".join(_LAYERS_RENAMED.get(p, p) for p in parts[:-1]) + "." + parts[-1]
    return new if new in names else name


def _inner_main_layer(module: nn.Module, name: str, names: Mapping[str, str]) -> str:
    """``name`` without an inner model's main-layer name, where the module lacks it: a composite's part
    (``EncoderDecoderModel.encoder``, a ``BertModel``) holds its tensors at its top, while TF files them
    under the part's main layer (``encoder/bert/...``), which transformers' ``base_model_prefix`` names."""
    if name in names:
        return name
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        try:
            part = module.get_submodule(".".join(parts[:i]))
        except AttributeError:
            return name
        if base_model_prefix(part) == parts[i]:
            shorter = ".".join(parts[:i] + parts[i + 1 :])
            if shorter in names:
                return shorter
    return name


def _parametrized(name: str, names: Mapping[str, str]) -> str:
    """An old weight-norm name (``conv.weight_g``/``weight_v``) as the module's parametrization names it
    (``conv.parametrizations.weight.original0``/``original1``), where the module has that instead.

    >>> _parametrized("conv.weight_v", {"conv.parametrizations.weight.original1": "parameter"})
    'conv.parametrizations.weight.original1'
    """
    new = weight_norm_name(name)
    return new if name not in names and new is not None and new in names else name


def _hits(module: nn.Module, variables: list[_Variable], main: set[str], mapping: Mapping[str, str]) -> int:
    names = _names(module)
    return sum(t in names for t in _targets(module, variables, main, mapping).values())


def _scope(module: nn.Module, variables: list[_Variable], main: set[str], where: str) -> str:
    """The one submodule inside which every tensor of the whole-model layers has a place (a model
    wrapped as ``self.m``), or ``""``."""
    inside = [v for v in variables if v.layer in main]
    found = [
        path for path, sub in module.named_modules() if path and _hits(sub, inside, main, {}) == len(inside)
    ]
    outermost = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    if len(outermost) > 1:
        shown = ", ".join(f"'{p}'" for p in outermost[:8])
        raise LayoutError(
            f"every tensor of {where} has a place inside each of the submodules {shown}: they have the same "
            f"structure, so the checkpoint could fill any of them. Fix: pass prefix='{outermost[0]}.' (or another "
            "of them) to say which."
        )
    return outermost[0] if outermost else ""


def _op(v: _Variable, owner: nn.Module | None, want: tuple[int, ...] | None) -> Op:
    """Transpose a kernel (not into transformers' Conv1D, which keeps TF's (in, out)); then meet the
    module's shape by dropping or adding axes of size 1, if that is all that differs."""
    ops: list[Op] = []
    shape = v.shape
    conv1d = owner is not None and slot_kind(owner) == TRANSFORMERS_CONV1D
    axes: tuple[int, ...] | None = None
    if v.var == "kernel" and len(shape) == 4:
        axes = (3, 2, 0, 1)
    elif v.var == "kernel" and len(shape) == 3:
        axes = (2, 1, 0)
    elif (v.var in _KERNELS or any(p in _PROJECTION_LISTS for p in v.path)) and len(shape) > 1 and not conv1d:
        axes = tuple(reversed(range(len(shape))))
    if axes is not None:
        ops.append(Transpose(axes))
        shape = tuple(shape[a] for a in axes)
    if want is not None and shape != want and _sized_alike(shape, want):
        ops.append(Reshape(shape, want))
    if not ops:
        return Identity()
    return ops[0] if len(ops) == 1 else Chain(*ops)


def _how(v: _Variable, stripped: bool) -> str:
    return f"by name (the module is '{v.layer}')" if stripped else "by name"


def plan(
    module: nn.Module,
    source: Source,
    layers: list[Layer],
    leftover: list[str],
    mapping: Mapping[str, str] | None = None,
) -> LayoutPlan:
    """Rules that put a transformers TF checkpoint's weights into ``module`` by transformers' names."""
    where = source.description
    mapping = dict(mapping or {})
    paths = [layer.path for layer in layers if layer.tensors]
    unknown = sorted(set(mapping) - set(paths))
    if unknown:
        raise LayoutError(
            f"mapping names {', '.join(repr(u) for u in unknown)}, which is not a top-level layer of {where} "
            f"(a transformers TF checkpoint): {', '.join(paths)}. Fix: key mapping= by one of those, with the "
            "module path that is that layer ('' for the module itself), or pass prefix= instead."
        )
    copies = _copies(layers, source) or {}
    _check_copies(copies, source)
    variables = _variables(layers, source, copies)
    main = _whole_model_layers(layers)
    scope = ""
    if not mapping and variables and _hits(module, variables, main, {}) == 0:
        scope = _scope(module, variables, main, where)
    inside = [v for v in variables if v.layer in main] or variables
    hits = _hits(module.get_submodule(scope) if scope else module, inside, main, mapping)
    if 2 * hits < len(inside):  # most of the model's own tensors have no place: another architecture
        _refuse_other_model(module, inside, main, where, hits)
    target_module = module.get_submodule(scope) if scope else module
    targets = _targets(target_module, variables, main, mapping)
    names = _names(target_module)
    shapes = {n: tuple(t.shape) for n, t in target_module.state_dict(keep_vars=True).items()}
    owners = dict(target_module.named_modules(remove_duplicate=False))
    lead = f"{scope}." if scope else ""
    rules: list[Rule] = []
    pairings: dict[tuple[str, str], Pairing] = {}
    batchnorms: list[str] = []
    for v in variables:
        target = targets[v.tensor]
        module_path = target.split(".parametrizations.")[0] if ".parametrizations." in target else target
        module_path = module_path.rpartition(".")[0]
        owner = owners.get(module_path)
        op = _op(v, owner, shapes.get(target))
        named = ".".join(v.path).startswith(v.layer + ".")
        stripped = (
            v.layer in main and v.layer not in mapping and named and not target.startswith(v.layer + ".")
        )
        rules.append(Rule(lead + target, (v.tensor,), op, f"{where} {v.tensor}"))
        if target in names and owner is not None:
            key = (v.inner, module_path)
            if key not in pairings:
                vars_ = ", ".join(u.var for u in variables if u.inner == v.inner)
                pairings[key] = Pairing(
                    v.inner, vars_, lead + module_path or "(root)", type(owner).__name__, _how(v, stripped)
                )
            if v.var == "moving_mean" and getattr(owner, "track_running_stats", False):
                batchnorms.append(module_path)
    for path in batchnorms:
        name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
        if name in names:
            rules.append(Rule(lead + name, (), Zeros(()), f"{where}: Keras counts no batches; 0"))
    leftover = _own_weights(leftover, names, shapes, source, lead, rules)
    rules, unused = _unused_tie_copies(rules, module, source)
    filled = {r.target for r in rules}
    hints = {}
    for name, kind in names.items():
        if kind == "buffer" and lead + name not in filled:
            hints[name.rpartition(".")[0]] = (
                "a transformers TF checkpoint holds the TF model's weights only, and this buffer has none there; "
                "transformers' converter leaves it as the module built it: pass strict=False to do the same"
            )
    for name, kind in names.items():
        if kind == "parameter" and lead + name not in filled:
            hints.pop(name.rpartition(".")[0], None)  # a parameter is missing too: no such hint
    return LayoutPlan(
        name="keras",
        rules=rules,
        pairings=list(pairings.values()),
        unmatched=list(leftover),
        config_unchecked=[
            f"{where} records no settings (LayerNorm epsilon, activations, attention heads): transformers keeps "
            "them in config.json; build the PyTorch model from the same config"
        ],
        scope=scope,
        missing_hints=hints,
        not_weights=list(copies) + unused,  # the same weight again, under a layer that uses it; unused twins
    )


def _unused_tie_copies(rules: list[Rule], module: nn.Module, source: Source) -> tuple[list[Rule], list[str]]:
    """Where two TF variables fill one tied PyTorch tensor with different values and one of them is all
    zeros, the rules without that one, and why it is set aside. TF ALBERT's MLM head builds ``bias`` and
    ``decoder/bias``, both starting at zero, and adds only ``decoder/bias``; the PyTorch head ties the two. A
    variable no forward reads gets no gradient and keeps its zeros, so of a zero copy and a trained one the
    trained one is the model's (copies that differ otherwise are refused as a tie conflict)."""
    state = module.state_dict(keep_vars=True)
    groups: dict[int, list[Rule]] = {}
    for rule in rules:
        tensor = state.get(rule.target)
        if tensor is not None and len(rule.sources) == 1:
            groups.setdefault(id(tensor), []).append(rule)
    dropped: dict[int, str] = {}
    for group in groups.values():
        if len({r.sources[0] for r in group}) != 2 or len(group) != 2:
            continue
        values = [np.asarray(r.op(np.asarray(source.read(r.sources[0])))) for r in group]
        zero = [not np.any(v) for v in values]
        if zero.count(True) == 1 and values[0].shape == values[1].shape:
            unused, used = (group[0], group[1]) if zero[0] else (group[1], group[0])
            dropped[id(unused)] = (
                f"{unused.sources[0]} (all zeros where '{used.sources[0]}', which fills the same tied tensor "
                f"'{used.target}', is trained: a variable the TF model never reads keeps its zero start)"
            )
    return [r for r in rules if id(r) not in dropped], list(dropped.values())


def _refuse_other_model(
    module: nn.Module, variables: list[_Variable], main: set[str], where: str, hits: int
) -> None:
    """Most tensors of the file's model name no tensor of the module: another architecture's checkpoint."""
    layers = ", ".join(f"'{layer}'" for layer in dict.fromkeys(v.layer for v in variables))
    names = _names(module)
    targets = _targets(module, variables, main, {})
    example = next((v for v in variables if targets[v.tensor] not in names), variables[0])
    theirs = list(module.state_dict())[:3]
    raise LayoutError(
        f"{where} is a transformers TF checkpoint (top-level layer {layers}), and {hits or 'none'} of its model's "
        f"{len(variables)} tensors name a tensor of {type(module).__name__} under transformers' naming (its "
        f"'{example.tensor}' would be '{targets[example.tensor]}'; the module has "
        f"{', '.join(repr(t) for t in theirs) or 'nothing'}, ...): it holds another architecture's weights. "
        "Nothing was written. Fix: build the PyTorch class of the checkpoint's architecture from the same config "
        "(config.json's 'architectures' names the TF class: TFBertModel is BertModel), or pass prefix= to load "
        "into the submodule that is that model."
    )
