"""transformers' GPT-2 keeps its attention and MLP weights as ``Conv1D``, stored ``(in, out)``. Into a model
written with ``nn.Linear`` (nanoGPT's, with GPT-2's names), a snapshot folder (``config.json`` names the
model_type) is transposed for every such weight, the square ``c_proj`` too, and gives transformers' own logits;
a bare ``model.safetensors`` says nothing of its layout: refused, the square weights named beside the ones
whose shapes show the transposition (transposing only those would load silently wrong).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import weightport
from _vision import allow_torchvision_import

allow_torchvision_import()
transformers = pytest.importorskip("transformers")

N, HEADS, LAYERS, VOCAB, POSITIONS = 32, 4, 2, 99, 16


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(N, 3 * N), nn.Linear(N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, HEADS, N // HEADS).transpose(1, 2) for y in self.c_attn(x).split(N, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, N))


class Block(nn.Module):
    def __init__(self, inner: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(N), Attention(), nn.LayerNorm(N)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(N, inner), "c_proj": nn.Linear(inner, N)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        hidden = F.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate="tanh")
        return x + self.mlp["c_proj"](hidden)


class NanoGPT(nn.Module):
    """GPT-2 with ``nn.Linear`` (weights ``(out, in)``) under transformers' GPT-2 names."""

    def __init__(self, inner: int) -> None:
        super().__init__()
        blocks = nn.ModuleList([Block(inner) for _ in range(LAYERS)])
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, N),
                "wpe": nn.Embedding(POSITIONS, N),
                "h": blocks,
                "ln_f": nn.LayerNorm(N),
            }
        )
        self.lm_head = nn.Linear(N, VOCAB, bias=False)
        self.lm_head.weight = self.transformer["wte"].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer["wte"](ids) + self.transformer["wpe"](torch.arange(ids.shape[1]))
        for block in self.transformer["h"]:
            x = block(x)
        return self.lm_head(self.transformer["ln_f"](x))


def gpt2(inner: int, tmp_path: Path) -> tuple[nn.Module, Path]:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=N, n_layer=LAYERS, n_head=HEADS, n_inner=inner
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases, norms that are not ones, values well apart
            p.copy_(torch.from_numpy(rng.normal(0, 1 / math.sqrt(N), tuple(p.shape)).astype(np.float32)))
    model.save_pretrained(tmp_path / "gpt2")
    return model, tmp_path / "gpt2"


@pytest.mark.parametrize("inner", [4 * N, N], ids=["mlp 4n", "mlp n (all square)"])
def test_a_gpt2_snapshot_into_linear_modules_gives_transformers_logits(inner: int, tmp_path: Path) -> None:
    reference, folder = gpt2(inner, tmp_path)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, (2, 9)))
    with torch.no_grad():
        expected = reference(ids).logits
    module = NanoGPT(inner).eval()
    # a module of the user's own keeps no configuration: the snapshot's is reported unchecked, never dropped
    with pytest.warns(weightport.UncheckedConfigWarning, match="activation_function='gelu_new'"):
        report = weightport.load(module, folder)
    assert any("activation_function" in note for note in report.unchecked)
    with torch.no_grad():
        torch.testing.assert_close(module(ids), expected, rtol=1e-5, atol=1e-5)
    transposed = {row.target for row in report.rows if "Conv1D" in row.origin}
    assert "transformer.h.0.attn.c_proj.weight" in transposed and len(transposed) == 4 * LAYERS, transposed
    # into transformers' own GPT-2 (Conv1D modules) the same folder goes as it is
    again = transformers.GPT2LMHeadModel(reference.config).eval()
    weightport.load(again, folder)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)


def test_a_bare_gpt2_file_names_its_square_weights_beside_the_transposed(tmp_path: Path) -> None:
    _, folder = gpt2(4 * N, tmp_path)
    module = NanoGPT(4 * N)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(module, folder / "model.safetensors")
    named = {p.name: p for p in caught.value.problems}
    square = named["transformer.h.0.attn.c_proj.weight"]
    assert "square shape, which reads either way" in square.found and "transpose it too" in square.fix
    assert "looks transposed" in named["transformer.h.0.attn.c_attn.weight"].fix
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_part_of_a_gpt2_snapshot_through_the_command_line_is_transposed(tmp_path: Path) -> None:
    """``--source-prefix`` keeps what the snapshot says of its model: block 0's square MLP (n_inner == n_embd)
    into a factory's Linear MLP gives transformers' block outputs (as it is, it would load silently wrong)."""
    import subprocess
    import sys

    reference, folder = gpt2(N, tmp_path)
    (tmp_path / "mlps.py").write_text(
        "import torch\n\n"
        "def make():\n"
        f"    return torch.nn.ModuleDict({{'c_fc': torch.nn.Linear({N}, {N}), 'c_proj': torch.nn.Linear({N}, {N})}})\n"
    )
    out = tmp_path / "mlp.safetensors"
    args = ["load", "mlps:make", str(folder), "--source-prefix", "transformer.h.0.mlp.", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "weightport", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Conv1D" in result.stdout
    mlp = nn.ModuleDict({"c_fc": nn.Linear(N, N), "c_proj": nn.Linear(N, N)})
    weightport.load(mlp, out)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, N)).astype(np.float32))
    with torch.no_grad():
        got = mlp["c_proj"](F.gelu(mlp["c_fc"](x), approximate="tanh"))
        torch.testing.assert_close(got, reference.transformer.h[0].mlp(x), rtol=1e-5, atol=1e-5)


def test_gpt2_from_onnx_fills_its_conv1d_by_name(tmp_path: Path) -> None:
    """An ONNX export keeps GPT-2's Conv1D weights under their names, read as (in, out) by the node: they fill
    the Conv1D as they are (c_proj is square: only the name tells it from a transposed Linear), and the
    logits are onnxruntime's."""
    ort = pytest.importorskip("onnxruntime")
    import warnings

    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=50, use_cache=False, return_dict=False
    )
    torch.manual_seed(0)
    source = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randint(0, 50, (1, 7))
    path = tmp_path / "gpt2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (x,), str(path), dynamo=True, optimize=False, verbose=False)
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.warns(weightport.UncheckedConfigWarning, match="records none of the transformers model's"):
        report = weightport.load(model, path)  # an ONNX file records no head count nor activation
    assert any(r.target == "transformer.h.0.attn.c_proj.weight" for r in report.rows)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(
            model(x)[0].numpy(), expected, atol=1e-5 * max(1.0, float(np.abs(expected).max()))
        )
