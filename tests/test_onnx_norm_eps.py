"""The eps of a norm the exporter writes as basic ops, checked against the module's.

nn.LayerNorm below opset 17 (the legacy exporter decomposes it: ReduceMean, Sub, Pow, Add(eps), Sqrt, Div, Mul,
Add), nn.RMSNorm (the dynamo exporter: Pow, ReduceMean, Add(eps), Sqrt, Reciprocal, Mul) and an RMSNorm written
as transformers' T5LayerNorm (x * rsqrt(mean(x^2) + eps) * weight) fill their weights by name; the eps the graph
adds to the variance must be the module's: equal, the load is exact (onnxruntime's output on the file) and warns
of nothing; different, it is refused naming both values, and the module is left as it was.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import refused

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

D = 8


class T5Norm(nn.Module):
    """An RMSNorm as transformers' T5LayerNorm writes it (a module of no kind weightport knows)."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.variance_epsilon))


class OwnNorm(T5Norm):
    """The same norm, its eps under a name weightport does not know."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__(n, eps)
        del self.variance_epsilon
        self.tiny = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.tiny))


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def randomized(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return module.eval()


def exported(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path, **options: Any) -> np.ndarray:
    """Export ``model`` to ``path``; onnxruntime's output on the file for ``inputs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=inputs, **options)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: v.numpy() for i, v in zip(session.get_inputs(), inputs.values(), strict=True)}
    return np.asarray(session.run(None, feed)[0])


def loads_exactly(
    model: nn.Module, path: Path, inputs: dict[str, torch.Tensor], expected: np.ndarray
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(model, str(path))
    unchecked = [str(w.message) for w in caught if issubclass(w.category, weightport.UncheckedConfigWarning)]
    noted = (
        "the eps of",
        "groups of",
        "took its parameters by name",
    )  # each norm's settings checked, not noted
    assert not [m for m in unchecked if any(n in m for n in noted)], unchecked
    with torch.no_grad():
        out = model(**inputs)
    out = out if torch.is_tensor(out) else out[0]
    scale = float(np.abs(expected).max())
    assert float(np.abs(out.numpy() - expected).max()) <= 1e-5 * scale


LEGACY = {"dynamo": False, "opset_version": 14}
DYNAMO = {"dynamo": True, "optimize": False}
DYNAMO_OPT = {"dynamo": True}

CASES: list[
    tuple[str, Callable[[float | None], nn.Module], dict[str, Any], float | None, float | None, str]
] = [
    ("layernorm-opset14", lambda e: nn.LayerNorm(D, eps=e), LEGACY, 1e-5, 0.1, r"eps=1e-05.*eps=0\.1"),
    ("t5norm-legacy", lambda e: T5Norm(D, e), LEGACY, 1e-6, 1e-3, r"eps=1e-06.*variance_epsilon=0\.001"),
    ("t5norm-dynamo", lambda e: T5Norm(D, e), DYNAMO, 1e-6, 1e-3, r"eps=1e-06.*variance_epsilon=0\.001"),
    ("rmsnorm-dynamo", lambda e: nn.RMSNorm(D, eps=e), DYNAMO_OPT, 1e-6, 0.1, r"eps=1e-06.*eps=0\.1"),
    ("rmsnorm-none", lambda e: nn.RMSNorm(D, eps=e), DYNAMO, None, 1e-5, r"eps=1\.19209e-07.*eps=1e-05"),
]


@pytest.mark.parametrize(
    ("make", "options", "eps", "other", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_norm_eps(
    tmp_path: Path,
    make: Callable[[float | None], nn.Module],
    options: dict[str, Any],
    eps: float | None,
    other: float,
    match: str,
) -> None:
    torch.manual_seed(0)
    source = randomized(Net(make(eps)), 1)
    inputs = {"x": torch.randn(4, D)}
    path = tmp_path / "m.onnx"
    expected = exported(source, inputs, path, **options)
    loads_exactly(randomized(Net(make(eps)), 2), path, inputs, expected)
    error = refused(randomized(Net(make(other)), 3), str(path), match)
    assert "norm" in str(error) and "Fix: build it with" in str(error)


def test_eps_under_an_unknown_name_is_reported_unchecked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inputs = {"x": torch.randn(4, D)}
    path = tmp_path / "m.onnx"
    expected = exported(randomized(Net(OwnNorm(D, 1e-6)), 1), inputs, path, **LEGACY)
    model = randomized(Net(OwnNorm(D, 1e-6)), 2)
    with pytest.warns(weightport.UncheckedConfigWarning, match=r"'norm' \(OwnNorm\).*eps=1e-06"):
        weightport.load(model, str(path))
    with torch.no_grad():
        assert float(np.abs(model(**inputs).numpy() - expected).max()) <= 1e-5 * float(np.abs(expected).max())


def _t5(eps: float) -> nn.Module:
    sys.path.insert(0, str(Path(__file__).parent))
    import _vision

    _vision.allow_torchvision_import()
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=50,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        use_cache=False,
        layer_norm_epsilon=eps,
    )
    return transformers.T5EncoderModel(config)


def test_t5_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = randomized(_t5(1e-6), 1)
    with torch.no_grad():
        for p in source.parameters():
            if p.ndim == 2:
                p.mul_(0.2)  # keep the random model's activations moderate
    inputs = {"input_ids": torch.randint(0, 50, (2, 5))}
    path = tmp_path / "t5.onnx"
    expected = exported(source, inputs, path, **LEGACY)
    loads_exactly(randomized(_t5(1e-6), 2), path, inputs, expected)
    refused(
        randomized(_t5(1e-3), 3),
        str(path),
        r"eps=1e-06.*'encoder\.block\.0\.layer\.0\.layer_norm'.*variance_epsilon=0\.001",
    )


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


INSTANCE_CASES: list[tuple[str, Callable[[], nn.Module], list[tuple[Callable[[], nn.Module], str]]]] = [
    (
        "instancenorm",
        lambda: nn.InstanceNorm2d(4, affine=True, eps=0.1),
        [
            (lambda: nn.InstanceNorm2d(4, affine=True), r"epsilon=0\.1.*built with eps=1e-05"),
            (
                lambda: nn.GroupNorm(2, 4, eps=0.1),
                r"over 4 groups.*\(GroupNorm\) normalizes with num_groups=2",
            ),
            (
                lambda: nn.InstanceNorm2d(4, affine=True, eps=0.1, track_running_stats=True),
                r"track_running_stats=True",
            ),
        ],
    ),
    (
        "groupnorm",
        lambda: nn.GroupNorm(2, 4, eps=0.1),
        [
            (lambda: nn.GroupNorm(2, 4), r"epsilon=0\.1.*built with eps=1e-05"),
            (lambda: nn.GroupNorm(4, 4, eps=0.1), r"over 2 groups.*num_groups=4"),
            (lambda: nn.InstanceNorm2d(4, affine=True, eps=0.1), r"over 2 groups.*one group per channel"),
        ],
    ),
]


@pytest.mark.parametrize(
    "options", [{**LEGACY, "do_constant_folding": False}, DYNAMO], ids=["legacy", "dynamo"]
)
@pytest.mark.parametrize(
    ("make", "wrong"), [c[1:] for c in INSTANCE_CASES], ids=[c[0] for c in INSTANCE_CASES]
)
def test_instance_normalization_eps_and_groups(
    tmp_path: Path,
    options: dict[str, Any],
    make: Callable[[], nn.Module],
    wrong: list[tuple[Callable[[], nn.Module], str]],
) -> None:
    """An InstanceNormalization node (nn.InstanceNorm2d's, or nn.GroupNorm's over a (N, groups, -1) reshape):
    its epsilon and its groups against the module's, each wrong twin shown to differ (it loaded silently)."""
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 3, 9, 9)}
    path = tmp_path / "m.onnx"
    expected = exported(randomized(ConvNorm(make()), 1), inputs, path, **options)
    model = randomized(ConvNorm(make()), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # GroupNorm: not one node
        weightport.load(model, str(path))
    with torch.no_grad():
        assert float(np.abs(model(**inputs).numpy() - expected).max()) <= 1e-5 * float(np.abs(expected).max())
    for build, match in wrong:
        twin = randomized(ConvNorm(build()), 3)
        if options is DYNAMO and isinstance(make(), nn.GroupNorm) and "groups" in match:
            # the dynamo exporter computes the group count (Expand of a constant): not read, and said so; the
            # run of the graph shows the outputs differ
            with pytest.warns(weightport.UncheckedConfigWarning, match=r"groups of 'norm'.*not checked"):
                weightport.load(twin, str(path), check_outputs=False)
            twin = randomized(ConvNorm(build()), 3)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
                refused(twin, str(path), r"computes something else between its layers")
            continue
        refused(twin, str(path), match)
