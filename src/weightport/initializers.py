"""NumPy-RNG initializers: PyTorch's and Keras's default schemes, drawn from a NumPy generator.

:func:`init` fills every parameter of a module from an ``np.random.Generator`` or
``np.random.RandomState`` and writes the values with :func:`weightport.load`, so the
usual checks and all-or-nothing apply. :func:`init_arrays` returns the arrays
without writing them.

Order. Tensors are drawn one after another in ``module.state_dict()`` order (a tied
tensor once, under its first name), each by the rule of the module that owns it
(``named_modules()``, own tensors only), so adding a module at the end never changes
the values drawn for the ones before it. An override takes its tensor's place in
that order (an array draws nothing, a callable draws what it draws). A parent's
rule wins over its children's where PyTorch's constructor does the same:
``nn.MultiheadAttention`` zeroes
``out_proj.bias``; ``nn.Transformer`` redraws every tensor of two or more
dimensions with Xavier-uniform. (PyTorch's ``TransformerEncoder`` starts all its
layers as copies of one; here each layer is drawn on its own.)

Buffers. The running statistics of BatchNorm / InstanceNorm / SyncBatchNorm go
back to their defaults (mean 0, variance 1, ``num_batches_tracked`` 0), as a new
module has them; every other buffer is left as it is (give it in ``overrides`` to
set it).

Reproducibility. Values are drawn in float64 with ``rng.uniform`` and
``rng.normal`` (methods that ``Generator`` and ``RandomState`` share) and rounded
to each tensor's dtype when written. The same seed and NumPy version therefore give
bit-identical weights on every machine (``RandomState`` streams are frozen by
NumPy's compatibility policy; ``Generator`` streams may change in a NumPy feature
release). One exception: Keras's orthogonal recurrent kernels come from LAPACK's QR,
whose last bits depend on the BLAS build, so they agree across machines to about
1e-6 rather than bit for bit.

>>> import numpy as np, torch
>>> arrays = init_arrays(torch.nn.Linear(2, 1), np.random.RandomState(313))
>>> {name: a.round(6).tolist() for name, a in arrays.items()}
{'weight': [[-0.472998, 0.070858]], 'bias': [0.51035]}
>>> lstm = torch.nn.LSTM(3, 4)
>>> report = init(lstm, np.random.default_rng(0), "keras")
>>> lstm.bias_ih_l0.tolist()[4:8], lstm.bias_hh_l0.abs().sum().item()  # Keras's forget-gate bias 1
([1.0, 1.0, 1.0, 1.0], 0.0)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from weightport.errors import LayoutError, LoadError
from weightport.init_schemes import SCHEMES, Draw, ModuleInit, NoRule, Rng, own_tensors, rules_for
from weightport.loading import load
from weightport.report import LoadReport
from weightport.tensors import unwrap

__all__ = ["SCHEMES", "init", "init_arrays"]

_MAX_LISTED = 12


def init(
    module: nn.Module,
    rng: Rng,
    scheme: str = "torch",
    *,
    overrides: Mapping[str | type[nn.Module], Any] | None = None,
) -> LoadReport:
    """Fill every parameter of ``module`` from a NumPy generator, in place, all or nothing.

    Args:
        module: any ``nn.Module`` (on any device, or ``meta``: it is materialized).
        rng: ``np.random.Generator`` or ``np.random.RandomState``; it is advanced.
        scheme: ``"torch"``: the distributions of each PyTorch module's own
            ``reset_parameters`` (RNNs uniform(±1/sqrt(hidden)), Linear and Conv
            Kaiming-uniform(a=sqrt(5)) with bias uniform(±1/sqrt(fan_in)), Embedding
            normal(0, 1) with the padding row zeroed, norms ones and zeros,
            MultiheadAttention Xavier, PReLU its ``init``). ``"keras"``: what Keras 3
            does for the equivalent layer (kernels Glorot-uniform in Keras's kernel
            shape, recurrent kernels orthogonal as a whole ``(H, gates*H)`` matrix,
            biases zero but the LSTM forget gate's 1 in ``bias_ih``, Embedding
            uniform(±0.05) (its padding row zeroed, as PyTorch's contract has it),
            PReLU 0; no rule for Bilinear, EmbeddingBag, LSTM ``proj_size``), drawn in Keras's layout and gate order and then
            moved to PyTorch's, so exporting with the Keras layout gives the drawn arrays.
        overrides: ``{"state.dict.name": array or (shape, rng) -> array}`` for single
            tensors, and ``{ModuleType: (module, rng) -> {own tensor name: array}}`` for
            every module of a type (custom modules); these win over the scheme.

    Returns:
        The :class:`LoadReport` of the load that wrote the values.

    Raises:
        LayoutError: a parameter has no rule in ``scheme`` and no override (the
            message names it, its module and the fix), or an override names nothing.
        LoadError: an override has the wrong shape or bad values; nothing was written.

    >>> import numpy as np, torch
    >>> rnn = torch.nn.RNN(3, 4)
    >>> report = init(rnn, np.random.RandomState(313), overrides={"bias_hh_l0": np.zeros(4)})
    >>> rnn.bias_hh_l0.abs().sum().item(), bool(rnn.weight_ih_l0.abs().max() <= 0.5)
    (0.0, True)
    """
    arrays = init_arrays(module, rng, scheme, overrides=overrides)
    complete = all(name in arrays for name in unwrap(module).state_dict(keep_vars=True))
    try:
        return load(module, arrays, strict=complete)
    except LoadError as error:  # said in init's terms: the "source" is the drawn arrays
        raise LoadError(
            [
                replace(
                    p,
                    found="no rule of the scheme draws it",
                    fix=f"give it with overrides={{'{p.name}': ...}}, or build the module off meta",
                )
                if p.found.startswith("nothing in")
                else p
                for p in error.problems
            ],
            target=type(unwrap(module)).__name__,
        ) from None


def init_arrays(
    module: nn.Module,
    rng: Rng,
    scheme: str = "torch",
    *,
    overrides: Mapping[str | type[nn.Module], Any] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays :func:`init` writes, by state-dict name, without writing them.

    Drawn values are float64 (``num_batches_tracked`` int64); they are rounded to
    each tensor's dtype when loaded. Buffers without a rule are left out.

    >>> import numpy as np, torch
    >>> arrays = init_arrays(torch.nn.BatchNorm1d(2), np.random.default_rng(0))
    >>> arrays["weight"], arrays["running_var"], arrays["num_batches_tracked"]
    (array([1., 1.]), array([1., 1.]), array(0))
    """
    if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
        raise TypeError(
            f"rng must be a np.random.Generator or np.random.RandomState (for example "
            f"np.random.default_rng(0) or np.random.RandomState(313)), got {type(rng).__name__}"
        )
    if scheme not in SCHEMES:
        raise LayoutError(
            f"unknown initializer scheme {scheme!r}: use one of {', '.join(map(repr, SCHEMES))}"
        )
    module = unwrap(module)  # torch.compile and DataParallel wrappers: their names are the inner module's
    tensors = module.state_dict(keep_vars=True)
    owners = _owners(module)
    _refuse_lazy(tensors, owners)
    by_name, by_type = _split_overrides(module, tensors, overrides or {})
    rules, refusals = _scheme_rules(module, scheme)

    plan: dict[int, tuple[str, Any]] = {}
    uncovered: dict[int, list[str]] = {}  # id(module) -> its parameters without a rule
    for name, tensor in tensors.items():
        key = id(tensor)
        if key in plan:
            continue
        path, owner, leaf, is_param = owners[key]
        named = [n for n, t in tensors.items() if t is tensor and n in by_name]
        if named:
            plan[key] = ("name", by_name[named[0]])
        elif (module_init := _type_override(owner, by_type)) is not None:
            plan[key] = ("type", module_init)
        elif key in rules:
            plan[key] = ("rule", rules[key])
        elif is_param:
            uncovered.setdefault(id(owner), []).append(name)
    if uncovered:
        raise LayoutError(_uncovered_message(scheme, uncovered, owners, tensors, refusals))

    values: dict[int, Any] = {}
    module_values: dict[int, Mapping[str, Any]] = {}
    for name, tensor in tensors.items():
        key = id(tensor)
        if key in values or key not in plan:
            continue
        how, what = plan[key]
        shape = tuple(tensor.shape)
        if how == "rule":
            values[key] = what(shape, rng)
        elif how == "name":
            values[key] = _as_array(what(shape, rng) if callable(what) else what)
        else:
            path, owner, leaf, _ = owners[key]
            if id(owner) not in module_values:
                module_values[id(owner)] = _call_module_init(what, path, owner, rng)
            produced = module_values[id(owner)]
            if leaf not in produced:
                raise LayoutError(
                    f"the override for {type(owner).__name__} returned no '{leaf}' for "
                    f"{_where(path, owner)}: return every own parameter ({', '.join(own_tensors(owner))}) "
                    f"or give '{name}' in overrides"
                )
            values[key] = _as_array(produced[leaf])
    return {name: values[id(t)] for name, t in tensors.items() if id(t) in values}


def _as_array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _where(path: str, module: nn.Module) -> str:
    return f"'{path}' ({type(module).__name__})" if path else f"the root module ({type(module).__name__})"


def _owners(module: nn.Module) -> dict[int, tuple[str, nn.Module, str, bool]]:
    """id(tensor) -> (module path, owning module, name in it, is a parameter); first owner wins."""
    owners: dict[int, tuple[str, nn.Module, str, bool]] = {}
    for path, sub in module.named_modules():
        for leaf, param in sub.named_parameters(recurse=False):
            owners.setdefault(id(param), (path, sub, leaf, True))
        for leaf, buffer in sub.named_buffers(recurse=False):
            owners.setdefault(id(buffer), (path, sub, leaf, False))
    return owners


def _tensor_at(module: nn.Module, name: str) -> torch.Tensor | None:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    own = dict(owner.named_parameters(recurse=False)) | dict(owner.named_buffers(recurse=False))
    return own.get(leaf)


def _scheme_rules(module: nn.Module, scheme: str) -> tuple[dict[int, Draw], dict[str, str]]:
    """id(tensor) -> Draw from the scheme's rules, and module path -> why a rule refused.

    Modules are visited children first, so a parent's rule for a child's tensor wins.
    """
    rules: dict[int, Draw] = {}
    refusals: dict[str, str] = {}
    for path, sub in reversed(list(module.named_modules())):
        try:
            found = rules_for(sub, scheme)
        except NoRule as e:
            refusals[path] = str(e)
            continue
        if found is None:
            continue
        for name, draw in found.items():
            tensor = _tensor_at(sub, name)
            if tensor is not None:
                rules[id(tensor)] = draw
    return rules, refusals


def _split_overrides(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], overrides: Mapping[Any, Any]
) -> tuple[dict[str, Any], dict[type, ModuleInit]]:
    by_name: dict[str, Any] = {}
    by_type: dict[type, ModuleInit] = {}
    unknown: list[str] = []
    for key, value in overrides.items():
        if isinstance(key, str):
            if key in tensors:
                by_name[key] = value
            else:
                unknown.append(key)
        elif isinstance(key, type) and issubclass(key, nn.Module):
            if not callable(value):
                raise LayoutError(
                    f"overrides[{key.__name__}] must be a callable (module, rng) -> "
                    f"{{own tensor name: array}}, got {type(value).__name__}"
                )
            if not any(isinstance(m, key) for m in module.modules()):
                raise LayoutError(
                    f"overrides[{key.__name__}]: {type(module).__name__} has no {key.__name__} module; "
                    "remove it, or check the type"
                )
            by_type[key] = value
        else:
            raise LayoutError(
                f"overrides key {key!r}: expected a state-dict name (str) or an nn.Module subclass"
            )
    if unknown:
        hints = []
        for name in unknown[:_MAX_LISTED]:
            close = difflib.get_close_matches(name, list(tensors), n=1, cutoff=0.6)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise LayoutError(
            f"overrides name {', '.join(hints)} is not a tensor of {type(module).__name__}: use its "
            f"state-dict names (module.state_dict().keys()), such as "
            f"{', '.join(map(repr, list(tensors)[:3]))}"
        )
    return by_name, by_type


def _type_override(module: nn.Module, by_type: Mapping[type, ModuleInit]) -> ModuleInit | None:
    """The override for the most specific of ``module``'s classes, if any."""
    return next((by_type[cls] for cls in type(module).__mro__ if cls in by_type), None)


def _call_module_init(module_init: ModuleInit, path: str, module: nn.Module, rng: Rng) -> Mapping[str, Any]:
    produced = module_init(module, rng)
    if not isinstance(produced, Mapping):
        raise LayoutError(
            f"the override for {type(module).__name__} returned {type(produced).__name__} for "
            f"{_where(path, module)}: return a dict of its own tensor names to arrays"
        )
    own = set(own_tensors(module)) | {n for n, _ in module.named_buffers(recurse=False)}
    extra = sorted(set(produced) - own)
    if extra:
        raise LayoutError(
            f"the override for {type(module).__name__} returned {', '.join(map(repr, extra))} for "
            f"{_where(path, module)}, which has only {', '.join(map(repr, sorted(own)))}: use its own "
            "tensor names (no dots)"
        )
    return produced


def _refuse_lazy(
    tensors: Mapping[str, torch.Tensor], owners: Mapping[int, tuple[str, nn.Module, str, bool]]
) -> None:
    for name, tensor in tensors.items():
        if is_lazy(tensor):
            path, owner, _, _ = owners[id(tensor)]
            raise LayoutError(
                f"'{name}' of {_where(path, owner)} is not materialized yet (a lazy module): run one forward "
                "pass first, then weightport.init"
            )


def _uncovered_message(
    scheme: str,
    uncovered: Mapping[int, list[str]],
    owners: Mapping[int, tuple[str, nn.Module, str, bool]],
    tensors: Mapping[str, torch.Tensor],
    refusals: Mapping[str, str],
) -> str:
    count = sum(len(names) for names in uncovered.values())
    lines = [
        f"weightport.init(scheme={scheme!r}) has no rule for {count} parameter{'s' * (count != 1)}; "
        "nothing was drawn or written:"
    ]
    for names in list(uncovered.values())[:_MAX_LISTED]:
        path, owner, _, _ = owners[id(tensors[names[0]])]
        why = refusals.get(path, f"the {scheme!r} scheme has no rule for {type(owner).__name__}")
        lines.append(f"  - {', '.join(map(repr, names))} of {_where(path, owner)}: {why}")
    if len(uncovered) > _MAX_LISTED:
        lines.append(f"  ... and those of {len(uncovered) - _MAX_LISTED} more modules")
    first = next(iter(uncovered.values()))[0]
    _, owner, leaf, _ = owners[id(tensors[first])]
    kind = type(owner).__name__
    lines.append(
        f"Fix: pass overrides={{'{first}': array_or_callable, ...}} (a callable gets (shape, rng) and "
        f"returns an array), or overrides={{{kind}: fn}} where fn(module, rng) returns "
        f"{{'{leaf}': array, ...}} for every {kind}."
    )
    return "\n".join(lines)
