"""A module's own arrays: Flax ``self.param("cls_token", ...)`` is PyTorch's ``nn.Parameter`` of that name.

A model's own variables (ViT's ``embeddings/cls_token`` and ``position_embeddings``) sit beside its
submodules, in no layer. Each fills the tensor its path names, as is, where that tensor belongs to a
module of no kind weightport pairs layers with (``ViTEmbeddings``; never an ``nn.Linear``'s weight,
which a layer rule fills): both sides store such a variable as the model's code made it, so its name
is the proof. Shapes are checked as every rule's are.

>>> import numpy as np, torch
>>> from weightport.sources import open_source
>>> class Embeddings(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
>>> model = torch.nn.Sequential()
>>> model.add_module("embeddings", Embeddings())
>>> src = open_source({"params": {"embeddings": {"cls_token": np.ones((1, 1, 4), np.float32)}}})
>>> rules, pairs = loose_rules(model, src, set())
>>> [r.describe() for r in rules], [p.how for p in pairs]
(['params/embeddings/cls_token -> embeddings.cls_token (as is)'], ['by name'])
"""

from __future__ import annotations

from collections.abc import Set

from torch import nn

from weightport.layouts.base import Pairing, Rule
from weightport.layouts.flax.facts import FRAMEWORK
from weightport.layouts.flax.tree import leaves_of, model_tree, name_paths, separator, tree_of
from weightport.layouts.slots import module_slots
from weightport.layouts.torch import weight_norm_name, weight_normed
from weightport.sources.base import Source
from weightport.transforms import Identity

__all__ = ["loose_rules"]


def _targets(path: str, module: nn.Module) -> list[str]:
    """State-dict names a Flax leaf path may name: ``/`` as ``.``, and linen's ``layers_0`` as ``layers.0``;
    a ``weight_g``/``weight_v`` also as the weight-norm parametrization's ``original0``/``original1``, where
    that parametrization is torch's weight norm (another one of two tensors means something else by them)."""
    parent, _, leaf = path.rpartition("/")
    parents = [parent.replace("/", "."), *(p for p in name_paths(parent) if "[" not in p)] if parent else [""]
    names = [f"{p}.{leaf}" if p else leaf for p in parents]
    if leaf in ("weight_g", "weight_v"):
        # a weight-normed layer's own params (transformers' FlaxConvWithWeightNorm: weight_v in PyTorch's
        # layout, weight_g its norms) -> where torch.nn.utils.parametrizations.weight_norm keeps them
        names += [weight_norm_name(n) or n for n in names if weight_normed(module, n)]
    return list(dict.fromkeys(names))


def loose_rules(
    module: nn.Module, source: Source, used: Set[str], inside: str = ""
) -> tuple[list[Rule], list[Pairing]]:
    """Rules for the source's arrays no layer holds that name a module's own tensor (see the module doc);
    with ``inside``, only those under that top-level name, named without it (a base model's part)."""
    state = module.state_dict(keep_vars=True)
    layered = {slot.path for slot in module_slots(module) if not slot.kind.startswith("other:")}
    names = list(source.infos)
    leaves = leaves_of(model_tree(tree_of(names, separator(names))))
    # a node holding weight_g and weight_v is a weight-normed layer no layer rule reads: its bias too
    normed = {p.rpartition("/")[0] for p in leaves if p.endswith("/weight_g")}
    normed &= {p.rpartition("/")[0] for p in leaves if p.endswith("/weight_v")}
    rules: list[Rule] = []
    pairings: list[Pairing] = []
    for path, name in leaves.items():
        if name in used or (inside and not path.startswith(inside + "/")):
            continue
        for target in _targets(path.removeprefix(inside + "/") if inside else path, module):
            owner = target.rpartition(".")[0]
            if target in state and (owner not in layered or path.rpartition("/")[0] in normed):
                owner_class = type(module.get_submodule(owner)).__name__
                rules.append(
                    Rule(target, (name,), Identity(), f"{FRAMEWORK} '{path}' (the model's own param)")
                )
                pairings.append(Pairing(path, "param", target, owner_class, "by name"))
                break
    return rules, pairings
