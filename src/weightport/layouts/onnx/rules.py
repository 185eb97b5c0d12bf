"""Rules for a paired layer: which stored tensors fill which of the module's, through which op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from weightport.layouts.base import Rule
from weightport.layouts.onnx.attention import ATTENTION, attention_rules
from weightport.layouts.onnx.checks import check_conv, check_norm, check_recurrent_module
from weightport.layouts.onnx.folding import FOLDS_INTO
from weightport.layouts.onnx.graph import Layer, all_zero
from weightport.layouts.onnx.issues import Issues
from weightport.layouts.onnx.layers import ran_in_module
from weightport.layouts.onnx.ops import CONV_KINDS, CONV_TRANSPOSE_KINDS, GATE_ORDER, NORMS
from weightport.layouts.onnx.stacking import check_stacking
from weightport.layouts.onnx.transposed import check_conv_transpose
from weightport.layouts.pairing import Paired
from weightport.layouts.slots import TRANSFORMERS_CONV1D
from weightport.sources.base import Source
from weightport.torch_facts import RNN_GATE_COUNT, RNN_KINDS
from weightport.transforms import Chain, Identity, Op, ReorderBlocks, Select, SliceBlocks, Zeros

__all__ = ["layer_rules"]

_WEIGHT_INPUT = {
    "Linear": "B",
    TRANSFORMERS_CONV1D: "B",
    "Embedding": "data",
}  # the ONNX input a plain layer's weight comes from
# The module setting that leaves it without a tensor the file holds (nn.LayerNorm(bias=False) keeps its weight).
_NORM_SETTING = {
    ("BatchNorm", "weight"): "affine",
    ("BatchNorm", "bias"): "affine",
    ("BatchNorm", "running_mean"): "track_running_stats",
    ("BatchNorm", "running_var"): "track_running_stats",
    ("LayerNorm", "weight"): "elementwise_affine",
    ("LayerNorm", "bias"): "bias",
}


def layer_rules(
    layer: Layer,
    pair: Paired,
    source: Source,
    issues: Issues,
    validated: set[str],
    unchecked: list[str],
    *,
    folds: bool = False,
    named: frozenset[str] = frozenset(),
    uses: Callable[[str], bool | None] | None = None,
    padded: Callable[[str], tuple[int, ...] | None] | None = None,
) -> list[Rule]:
    """The rules of ``layer`` in its slot; ``folds``: a BatchNorm the exporter folded into this Conv or Linear
    follows it in the model, and takes the bias where the module has none (see :mod:`.folding`); ``named``:
    the model's tensor names (a tensor added after a layer without bias that bears one of them is the
    model's own, placed by that name); ``uses(path)``: whether the model's forward changes module ``path``'s
    own tensors before use (None: not known, without ``example_inputs=``; no ``uses``: not asked, as when
    trying which slots a layer fits); ``padded(path)``: the zero padding the forward puts on module ``path``'s
    input (``F.pad``'s amounts; None: none seen, or no ``example_inputs=``)."""
    if layer.kind in RNN_KINDS:
        # without ``uses`` only the fit is tried: the stack's wiring is checked once the layers are paired
        return _recurrent_rules(
            layer, pair, source, issues, validated, unchecked if uses is not None else None
        )
    if layer.node.op_type in NORMS:
        return _norm_rules(layer, pair, source, issues, validated)
    if layer.kind == ATTENTION:
        return attention_rules(layer, pair, source, issues, validated, unchecked)
    return _plain_rules(layer, pair, source, issues, validated, unchecked, folds, named, uses, padded)


def _origin(source: Source, layer: Layer, role: str, name: str) -> str:
    return f"{source.description} node '{layer.node.label}' input {role} '{name}'"


def _recurrent_rules(
    layer: Layer,
    pair: Paired,
    source: Source,
    issues: Issues,
    validated: set[str],
    unchecked: list[str] | None,
) -> list[Rule]:
    node, slot = layer.node, pair.slot
    module: Any = slot.module  # nn.RNNBase or nn.RNNCellBase
    blocks, order = RNN_GATE_COUNT[layer.kind], GATE_ORDER[layer.kind]
    hidden = int(module.hidden_size)
    bidirectional = bool(getattr(module, "bidirectional", False))
    if node.synthetic:
        w_shape = source.infos[layer.tensors["W"]].shape
        direction = "bidirectional" if w_shape and w_shape[0] == 2 else "forward"
    else:
        direction = node.attr("direction", "forward")
        check_recurrent_module(node, slot, pair.how, direction, issues)
        check_stacking(layer, slot, pair.how, issues, unchecked)
    directions = 2 if direction == "bidirectional" else 1
    if direction != "reverse" and (directions == 2) != bidirectional:
        issues.add(
            node,
            f"direction={direction}, but it is paired with {slot.describe()}. Fix: build the "
            f"module with bidirectional={directions == 2}.",
        )
    if getattr(module, "proj_size", 0):
        issues.add(
            node,
            f"'{slot.label}' has proj_size={module.proj_size}; ONNX's LSTM has no projection. "
            "Fix: build the LSTM with proj_size=0.",
            unsupported=True,
        )
    bias = layer.tensors.get("B")
    if bias is not None and not module.bias:
        if not all_zero(source, bias):
            issues.add(
                node,
                f"input B '{bias}' holds biases but '{slot.label}' was built with bias=False. "
                "Fix: build it with bias=True.",
            )
            return []
        validated.add(bias)
        bias = None
    reorder: tuple[Op, ...] = (ReorderBlocks(0, order),) if blocks > 1 else ()
    rules = []
    for d in range(directions):
        select = Select(d, directions)
        reverse = d == 1

        def rule(param: str, role: str, name: str, *ops: Op, reverse: bool = reverse) -> Rule:
            return Rule(
                slot.name(param, reverse=reverse), (name,), Chain(*ops), _origin(source, layer, role, name)
            )

        rules.append(rule("weight_ih", "W", layer.tensors["W"], select, *reorder))
        rules.append(rule("weight_hh", "R", layer.tensors["R"], select, *reorder))
        if not module.bias:
            continue
        if bias is None:
            for param in ("bias_ih", "bias_hh"):
                rules.append(
                    Rule(
                        slot.name(param, reverse=reverse),
                        (),
                        Zeros((blocks * hidden,)),
                        f"{source.description} node '{node.label}' has no B: zeros",
                    )
                )
        else:
            rules.append(rule("bias_ih", "B", bias, select, SliceBlocks(0, 0, 2), *reorder))
            rules.append(rule("bias_hh", "B", bias, select, SliceBlocks(0, 1, 2), *reorder))
    return rules


# an exporter folds a BatchNorm into the Conv/Linear before it, leaving such a bias: which BatchNorm follows
# which layer the registration order tells only where the model registers each right after its layer
_FOLDED_BIAS_FIX = (
    "; or, where a BatchNorm follows it in the model's forward (the exporter folded it in, leaving this "
    "bias), pass example_inputs= (an input for one forward pass), which shows which BatchNorm follows "
    "it where the model does not register each BatchNorm right after its layer."
)


def _plain_rules(
    layer: Layer,
    pair: Paired,
    source: Source,
    issues: Issues,
    validated: set[str],
    unchecked: list[str],
    folds: bool = False,
    named: frozenset[str] = frozenset(),
    uses: Callable[[str], bool | None] | None = None,
    padded: Callable[[str], tuple[int, ...] | None] | None = None,
) -> list[Rule]:
    slot, node = pair.slot, layer.node
    module: Any = slot.module
    if layer.kind in CONV_KINDS.values() and not node.synthetic:
        forward_pad = padded(slot.path) if padded is not None else None
        check_conv(node, layer, slot, source, issues, unchecked, forward_pad)
    if layer.kind in CONV_TRANSPOSE_KINDS.values() and not node.synthetic:
        check_conv_transpose(node, layer, slot, source, issues)
    weight, op = layer.tensors["weight"], layer.ops.get("weight", Identity())
    if weight == slot.name("weight") and not isinstance(op, Identity):
        # the exporters keep a parameter's name for the parameter as it is: a node that reads it in another
        # form (Gemm transB=0, a MatMul without Transpose) is a forward that uses it so (F.linear(x, w.t()))
        issues.add(
            node,
            f"reads '{weight}', which bears the name of the module's own tensor, as {op.describe()}: by its "
            f"name it is '{slot.label}'s weight as stored (the model's forward then uses it in that form, as "
            f"F.linear(x, weight.t()) does); by the node it is the {layer.kind}'s weight after {op.describe()}. "
            "Either reading loads, and they differ. Fix: if the model is the one exported, load the stored "
            "tensors by name: weightport.load(model, weightport.open_source(path), layout='torch'); "
            "otherwise rename the tensor in the file, or pass mapping= with a model that computes the node.",
        )
        return []
    changed = uses(slot.path) if uses is not None and _applied_elsewhere(layer, pair, source) else False
    if changed is not False:
        name = slot.path.rpartition(".")[2]
        if changed:
            why = (
                "example_inputs= showed that forward changes it before use. Fix: re-export with dynamo=True, "
                "optimize=False, which keeps the parameter under its own name"
            )
        else:
            why = (
                "the file does not say which. Fix: pass example_inputs= (inputs for one forward pass, run on "
                "meta tensors: it shows whether the forward uses the weight as it is), or re-export with "
                "dynamo=True, optimize=False, which keeps the parameter under its own name"
            )
        issues.add(
            node,
            f"ran in {_ran_in(layer)}, not in '{slot.label}' (the exporter records it): that forward applies "
            f"'{slot.label}'s weight itself (F.linear(x, self.{name}.weight, ...)), and the exporter stored the "
            f"matrix it multiplies by as '{weight}', a tensor it computed, without the parameter's name. "
            f"Square {source.infos[weight].shape}, it reads two ways that both load and differ: the weight as "
            f"it is, or its transpose (F.linear(x, self.{name}.weight.t())); {why}.",
        )
        return []
    rules = [
        Rule(
            slot.name("weight"),
            (layer.tensors["weight"],),
            layer.ops.get("weight", Identity()),
            _origin(source, layer, _WEIGHT_INPUT.get(layer.kind, "W"), layer.tensors["weight"]),
        )
    ]
    bias = layer.tensors.get("bias")
    has_bias = getattr(module, "bias", None) is not None
    if bias is not None and not has_bias and bias in named:
        pass  # the model's own tensor by that name (BART's final_logits_bias), added by its forward
    elif bias is not None and not has_bias:
        if folds:
            pass  # the BatchNorm after it adds the bias (folding.fold_rules)
        elif all_zero(source, bias):
            validated.add(bias)
        elif _ran_in_parent(layer, pair, named=True):
            issues.add(
                node,
                f"adds a bias '{bias}' that '{slot.label}' (built with bias=False) does not hold: the node ran in "
                f"{_ran_in(layer)} (the exporter records it), whose forward applies '{slot.label}'s weight with a bias "
                "of its own making (timm's EVA joins q_bias, zeros and v_bias), stored here only as the computed "
                f"'{bias}'. Fix: re-export with dynamo=True, optimize=False, which keeps the tensors it is made "
                "from under their names.",
            )
        else:
            issues.add(
                node,
                f"has a bias '{bias}' but '{slot.label}' was built with bias=False. Fix: build it with bias=True"
                + (_FOLDED_BIAS_FIX if layer.kind in FOLDS_INTO else "."),
            )
    elif bias is not None:
        rules.append(
            Rule(
                slot.name("bias"),
                (bias,),
                layer.ops.get("bias", Identity()),
                _origin(source, layer, "bias", bias),
            )
        )
    elif has_bias:
        rules.append(
            Rule(
                slot.name("bias"),
                (),
                Zeros(tuple(module.bias.shape)),
                f"{source.description} node '{node.label}' has no bias: zeros",
            )
        )
    return rules


def _ran_in_parent(layer: Layer, pair: Paired, named: bool = False) -> bool:
    """Whether the dynamo exporter records the node running in a module that holds the paired one (or, with
    ``named``, the legacy exporter's node name says so): that module's forward applied the paired one's
    tensors itself."""
    ran_in, path = layer.node.module, pair.slot.path
    if ran_in is None and named:
        ran_in = layer.node.name_scope
    return ran_in is not None and ran_in != path and (ran_in == "" or path.startswith(ran_in + "."))


def _ran_in(layer: Layer) -> str:
    """The module a node ran in, as messages name it."""
    ran_in = ran_in_module(layer)
    return f"'{ran_in}'" if ran_in else "the model's own forward"


def _applied_elsewhere(layer: Layer, pair: Paired, source: Source) -> bool:
    """Whether a Linear's square weight is a tensor the dynamo exporter computed for a node that ran outside
    the module (a parent's ``F.linear(x, self.fc.weight.t())`` and ``F.linear(x, self.fc.weight)`` store it
    alike, unnamed: the one layout cannot be told from its transpose)."""
    slot, weight = pair.slot, layer.tensors["weight"]
    if layer.kind != "Linear" or not _ran_in_parent(layer, pair):
        return False  # the module's own forward, another's (a BatchNorm folded in), or no record
    if layer.aliases.get("weight", weight) == slot.name("weight"):
        return False  # read by the parameter's own name: the parameter as it is
    shape = source.infos[weight].shape
    return len(shape) == 2 and shape[0] == shape[1]


def _norm_rules(
    layer: Layer, pair: Paired, source: Source, issues: Issues, validated: set[str]
) -> list[Rule]:
    """BatchNormalization -> nn.BatchNorm*d, LayerNormalization -> nn.LayerNorm, values as they are."""
    node, slot = layer.node, pair.slot
    module: Any = slot.module
    if not node.synthetic:
        check_norm(node, layer, slot, source, issues)
    inputs = dict(NORMS[node.op_type])
    rules: list[Rule] = []
    for role, name in layer.tensors.items():
        if getattr(module, role, None) is not None:
            rules.append(
                Rule(slot.name(role), (name,), Identity(), _origin(source, layer, inputs[role], name))
            )
            continue
        neutral = {"weight": 1.0, "bias": 0.0}.get(role)
        if neutral is not None and bool(np.all(source.read(name) == neutral)):
            validated.add(name)  # ones / zeros: what a module without that parameter computes
            continue
        setting = _NORM_SETTING[layer.kind, role]
        issues.add(
            node,
            f"input {inputs[role]} '{name}' holds values but '{slot.label}' was built with {setting}=False. "
            f"Fix: build it with {setting}=True.",
        )
    bias = getattr(module, "bias", None)
    if "bias" not in layer.tensors and bias is not None:
        rules.append(
            Rule(
                slot.name("bias"),
                (),
                Zeros(tuple(bias.shape)),
                f"{source.description} node '{node.label}' has no B: zeros",
            )
        )
    if layer.kind == "BatchNorm" and getattr(module, "num_batches_tracked", None) is not None:
        rules.append(
            Rule(
                slot.name("num_batches_tracked"),
                (),
                Zeros(()),
                f"{source.description} node '{node.label}': ONNX counts no batches; 0",
            )
        )
    return rules
