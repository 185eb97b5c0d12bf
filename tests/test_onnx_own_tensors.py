"""ONNX files whose initializers are a model's own tensors outside any layer, or no weights at all:
a relative-position table a Gather reads (under its parameter's name) and BlurPool's fixed filter a Conv
reads (a buffer) fill those tensors by name, not a module of the node's kind; Resize's stored scales are
graph code. A parameter the forward reshapes, which the default dynamo export folds away, is refused naming
each such parameter and the export that keeps it (optimize=False), which then loads. Every load is compared
with onnxruntime on the same file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import weightport

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class RelPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", ((torch.arange(16) * 5) % 9).reshape(4, 4), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table[self.index.reshape(-1)].reshape(4, 4, 2).permute(2, 0, 1)


class WithTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.rel = nn.Linear(4, 4), RelPos()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.rel()


class Blur(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer(
            "filt", ((k[:, None] * k[None, :]) / 16)[None, None].repeat(c, 1, 1, 1), persistent=False
        )
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.c)


class WithBlur(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.aa, self.head = nn.Conv2d(3, 8, 3, padding=1), Blur(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.aa(torch.relu(self.conv(x))))


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(3, 8, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) + self.up(self.a(x))


class Affine(nn.Module):  # timm GlobalResponseNorm's affine part: parameters viewed before use
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), x)


class WithAffine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.s = nn.Conv2d(3, 8, 3), Affine(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s(self.conv(x))


def export(model: nn.Module, x: torch.Tensor, path: Path, **options: Any) -> np.ndarray:
    """Exports ``model`` (random parameters) and returns onnxruntime's output on ``x``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, **options)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


CASES = {
    "gather table, do_constant_folding=False": (
        WithTable,
        (1, 2, 4, 4),
        {"dynamo": False, "do_constant_folding": False},
    ),
    "gather table, dynamo optimize=False": (WithTable, (1, 2, 4, 4), {"dynamo": True, "optimize": False}),
    "blur buffer, dynamo": (WithBlur, (1, 3, 16, 16), {"dynamo": True}),
    "resize scales, dynamo": (Upsampled, (1, 3, 8, 8), {"dynamo": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_own_tensors_and_graph_code_load_as_onnxruntime_computes(case: str, tmp_path: Path) -> None:
    make, shape, options = CASES[case]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    expected = export(make(), x, tmp_path / "m.onnx", **options)
    torch.manual_seed(1)
    module = make().eval()
    weightport.load(module, tmp_path / "m.onnx", example_inputs=(x,))
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_parameter_the_forward_reshapes_is_refused_with_the_export_that_keeps_it(tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32))
    export(WithAffine(), x, tmp_path / "folded.onnx", dynamo=True)
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(WithAffine(), tmp_path / "folded.onnx", example_inputs=(x,))
    fixes = {p.name: p.fix for p in caught.value.problems}
    assert "no initializer named 's.weight' (8,) or 's.bias' (8,)" in fixes["s.bias"], fixes
    assert "dynamo=True, optimize=False" in fixes["s.weight"]
    expected = export(WithAffine(), x, tmp_path / "kept.onnx", dynamo=True, optimize=False)
    module = WithAffine().eval()
    weightport.load(module, tmp_path / "kept.onnx", example_inputs=(x,))
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-5)


class QkvBias(nn.Module):
    """timm EVA's attention: a bias-free qkv Linear applied with a bias joined from q_bias, a zero k_bias
    buffer and v_bias; and a buffer no checkpoint keeps (registered with persistent=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24, bias=False), nn.Linear(8, 8)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)
        self.register_buffer("offset", torch.randn(8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x + self.offset, self.qkv.weight, bias).chunk(3, dim=-1)
        return self.proj(q * k + v)


@pytest.mark.parametrize("dynamo", [True, False])
def test_a_bias_the_forward_joins_loads_from_the_export_that_keeps_its_parts(
    tmp_path: Path, dynamo: bool
) -> None:
    """The default exports store only the joined bias: refused, naming the module whose forward made it and
    the export that keeps its parts, which loads (the buffers by their names) as onnxruntime computes."""
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32))
    export(QkvBias(), x, tmp_path / "joined.onnx", dynamo=dynamo)
    with pytest.raises(
        weightport.LayoutError, match=r"adds a bias '[\w:]+' that 'qkv' \(built with bias=False\)"
    ):
        weightport.load(QkvBias(), tmp_path / "joined.onnx", example_inputs=(x,))
    expected = export(QkvBias(), x, tmp_path / "kept.onnx", dynamo=True, optimize=False)
    torch.manual_seed(1)
    module = QkvBias().eval()  # another random offset: the file's is the one the graph computes with
    weightport.load(module, tmp_path / "kept.onnx", example_inputs=(x,))
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-5)


class WithMaskToken(nn.Module):
    """DINOv2's mask token: a parameter only a masked (training) call reads."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.mask_token = nn.Linear(4, 4), nn.Parameter(torch.randn(1, 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token, x)
        return self.proj(x)


def test_a_parameter_the_forward_never_reads_is_named_as_such(tmp_path: Path) -> None:
    """No export stores it; example_inputs= shows the forward never reads it, and strict=False (the fix)
    keeps the module's own and loads the rest as onnxruntime computes."""
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32))
    expected = export(WithMaskToken(), x, tmp_path / "m.onnx", dynamo=True, optimize=False)
    module = WithMaskToken().eval()
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(module, tmp_path / "m.onnx", example_inputs=(x,))
    (problem,) = caught.value.problems
    assert problem.name == "mask_token" and "never reads 'mask_token'" in problem.fix, problem.fix
    weightport.load(module, tmp_path / "m.onnx", example_inputs=(x,), strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-5)


class _LayerScale(nn.Module):
    def __init__(self, channels: int, reshaped: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)
        self.reshaped = reshaped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reshaped: constant folding stores gamma.reshape(1, -1, 1, 1), no longer under its name
        return x * (self.gamma.reshape(1, -1, 1, 1) if self.reshaped else self.gamma)


class _TwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.folded = _LayerScale(4, reshaped=True)
        self.kept = _LayerScale(4, reshaped=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.folded(self.conv(x))
        return self.kept(y.permute(0, 2, 3, 1))


def test_a_folded_parameters_candidates_leave_out_what_its_name_fills(tmp_path: Path) -> None:
    """The folded layer scale's refusal listed, as an unread initializer of its shape, the other layer scale,
    which its name fills in the same pass: only truly unread ones are candidates (here none)."""
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoScales().eval(), (torch.randn(1, 3, 6, 6),), str(path), dynamo=False)
    with pytest.raises(weightport.WeightportError) as caught:
        weightport.load(_TwoScales(), path)
    message = str(caught.value)
    assert "'folded.gamma'" in message and "no unread initializer has its shape" in message
    assert "'kept.gamma'" not in message.split("'folded.gamma'", 1)[1].split("\n")[0]
