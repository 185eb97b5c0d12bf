"""Quantized checkpoints and integer codes loaded into floating-point modules: refused, never written raw.

Oracles: torch's own quantization arithmetic (``round(w / s).to(int8)``, ``.to(torch.float8_e4m3fn)``,
``q.float() * s``) for the codes and their dequantized values, ``safetensors.torch`` for the files, and
the module's forward against ``torch.nn.functional.linear`` with the dequantized weight.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import weightport
from conftest import refused

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))


def _float_linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 8)


def _per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / scale).to(torch.int8), scale


def _checkpoint(convention: str, source: nn.Linear) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tensors as the convention stores ``source``, and the float weight its dequantization gives."""
    w, bias = source.weight.detach(), source.bias.detach().clone()
    if convention == "fp8 weight_scale_inv (DeepSeek-V3)":
        scale = (w.abs().max() / 448).reshape(1, 1)
        codes = (w / scale).to(torch.float8_e4m3fn)
        return {"weight": codes, "weight_scale_inv": scale, "bias": bias}, codes.float() * scale
    if convention == "fp8 weight_scale (torchao)":
        scale = w.abs().amax(1, keepdim=True) / 448
        codes = (w / scale).to(torch.float8_e4m3fn)
        return {"weight": codes, "weight_scale": scale, "bias": bias}, codes.float() * scale
    codes, scale = _per_channel_int8(w)
    dequantized = codes.float() * scale
    if convention == "int8 weight_scale":
        return {"weight": codes, "weight_scale": scale, "bias": bias}, dequantized
    if convention == "int8 zero_point (compressed-tensors)":
        zero = torch.zeros_like(scale, dtype=torch.int8)
        return {"weight": codes, "weight_scale": scale, "weight_zero_point": zero, "bias": bias}, dequantized
    if convention == "int8 SCB (bitsandbytes)":
        scb = (scale * 127).reshape(-1)
        return {
            "weight": codes,
            "SCB": scb,
            "weight_format": torch.tensor(0, dtype=torch.uint8),
            "bias": bias,
        }, codes.float() * scb[:, None] / 127
    assert convention == "int8 scales (per layer)"
    return {"weight": codes, "scales": scale.reshape(-1), "bias": bias}, dequantized


CONVENTIONS = [
    "int8 weight_scale",
    "int8 zero_point (compressed-tensors)",
    "int8 SCB (bitsandbytes)",
    "int8 scales (per layer)",
    "fp8 weight_scale (torchao)",
    "fp8 weight_scale_inv (DeepSeek-V3)",
]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_quantized_codes_beside_their_scale_are_refused_strict_or_not(
    tmp_path: Path, convention: str, suffix: str
) -> None:
    if suffix == ".npz" and "fp8" in convention:
        pytest.skip("np.savez loses float8's type (its own refusal, tested in test_float8)")
    source = _float_linear(1)
    tensors, dequantized = _checkpoint(convention, source)
    path = tmp_path / f"q{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(tensors, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    scales = [k for k in tensors if k not in ("weight", "bias")]
    for strict in (True, False):
        error = refused(_float_linear(2), path, r"quantized codes", weightport.LoadError, strict=strict)
        (problem,) = error.problems  # type: ignore[attr-defined]
        assert problem.name == "weight" and all(f"'{s}'" in problem.found for s in scales)
        assert "dequantize" in problem.fix and "remove it" not in str(error)

    # the fix, followed: read the arrays, dequantize as the convention does, load the float weight
    with weightport.open_source(path) as s:
        arrays = {n: s.read(n) for n in s}
    codes = arrays.pop("weight").astype(np.float32)
    if "SCB" in arrays:
        weight = codes * arrays["SCB"][:, None] / 127
    elif "scales" in arrays:
        weight = codes * arrays["scales"][:, None]
    else:
        scale = arrays.get("weight_scale", arrays.get("weight_scale_inv"))
        weight = (codes - arrays.get("weight_zero_point", 0)) * scale
    module = _float_linear(2)
    weightport.load(module, {"weight": weight, "bias": arrays["bias"]})
    assert torch.equal(module.weight.detach(), dequantized)
    with torch.no_grad():
        assert torch.equal(module(X), nn.functional.linear(X, dequantized, source.bias))


def test_packed_4bit_codes_are_refused_as_quantized_before_their_shape(tmp_path: Path) -> None:
    """bitsandbytes 4-bit: two codes a byte, flattened to (n, 1), with absmax and quant_state beside them."""
    packed = torch.randint(0, 256, (32, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "nf4.safetensors"
    safetensors.torch.save_file(
        {
            "weight": packed,
            "weight.absmax": torch.rand(1),
            "weight.quant_map": torch.linspace(-1, 1, 16),
            "weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8),
            "bias": torch.zeros(8),
        },
        path,
    )
    error = refused(_float_linear(4), path, r"'weight'.*quantized codes.*'weight.absmax'", strict=False)
    assert "dequantize_4bit" in str(error) and "remove it" not in str(error)


def test_gptq_names_say_quantized_not_remove(tmp_path: Path) -> None:
    """GPTQ/AWQ's qweight goes under no module name: each of its group's names says it is quantized."""
    rng = np.random.default_rng(5)
    path = tmp_path / "gptq.npz"
    np.savez(
        path,
        qweight=rng.integers(-(2**31), 2**31, (1, 8), dtype=np.int32),
        qzeros=rng.integers(0, 2**31, (1, 1), dtype=np.int32),
        scales=rng.random((1, 8), dtype=np.float32),
        g_idx=np.zeros(8, np.int32),
        bias=rng.random(8, dtype=np.float32),
    )
    error = refused(_float_linear(5), path, r"'qweight' is stored quantized \(GPTQ / AWQ")
    text = str(error)
    assert "'scales'" in text and "'qzeros'" in text and "remove it" not in text


def test_a_quantized_module_takes_its_codes_and_scales(tmp_path: Path) -> None:
    """A module that holds the scale too is quantized itself: codes and scale go in bit for bit."""

    class Fp8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.float8_e4m3fn), requires_grad=False)
            self.register_buffer("weight_scale_inv", torch.ones(1, 1))

    tensors, _ = _checkpoint("fp8 weight_scale_inv (DeepSeek-V3)", _float_linear(6))
    del tensors["bias"]
    path = tmp_path / "fp8.safetensors"
    safetensors.torch.save_file(tensors, path)
    module = Fp8Linear()
    weightport.load(module, path)
    assert torch.equal(module.weight.view(torch.uint8), tensors["weight"].view(torch.uint8))
    assert torch.equal(module.weight_scale_inv, tensors["weight_scale_inv"])


def test_integers_from_a_file_into_float_parameters_are_refused(tmp_path: Path) -> None:
    """bfloat16 saved as uint16 bits (np.savez has no bfloat16): loaded as numbers they were 1e5 off."""
    source = _float_linear(8).to(torch.bfloat16)
    bits = {k: v.detach().view(torch.uint16).numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "bits.npz"
    np.savez(path, **bits)
    error = refused(_float_linear(9), path, r"'weight': expected float32 values.*found uint16 values")
    assert r"arrays['weight'].view(ml_dtypes.bfloat16)" in str(error)

    # the fix, followed: the bits viewed back as bfloat16 load exactly
    with weightport.open_source(path) as s:
        arrays = {n: s.read(n).view(ml_dtypes.bfloat16) for n in s}
    module = _float_linear(9)
    weightport.load(module, arrays)
    with torch.no_grad():
        assert torch.equal(module(X), source.float()(X))

    # integers the caller passes as arrays are the caller's own values: they load when exact
    given = _float_linear(9)
    weightport.load(
        given, {"weight": np.arange(64, dtype=np.int8).reshape(8, 8), "bias": np.zeros(8, np.int16)}
    )
    assert torch.equal(given.weight.detach(), torch.arange(64.0).reshape(8, 8))


def test_integers_from_a_file_into_a_float_buffer_load_exactly(tmp_path: Path) -> None:
    """The rule is for parameters: a buffer (a mask, counts) holds integers a file may keep as such."""
    holder = nn.Module()
    holder.register_buffer("mask", torch.zeros(2, 3))
    path = tmp_path / "mask.safetensors"
    safetensors.torch.save_file({"mask": torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.uint8)}, path)
    weightport.load(holder, path)
    assert holder.mask.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


def test_a_flax_int8_kernel_without_its_scale_is_refused(tmp_path: Path) -> None:
    """Flax layout: the int8 kernel, transposed, went in as numbers."""
    rng = np.random.default_rng(10)
    path = tmp_path / "flax.npz"
    kernel = rng.integers(-127, 128, (8, 8), dtype=np.int8)
    np.savez(path, **{"fc/kernel": kernel, "fc/bias": rng.random(8, dtype=np.float32)})
    model = nn.Sequential()
    model.add_module("fc", _float_linear(11))
    error = refused(
        model, path, r"'fc.weight': expected float32 values.*int8 values from Flax 'fc'", layout="flax"
    )
    assert "layout='flax'" in str(error)
    with weightport.open_source(path) as s:
        arrays = {n: s.read(n) for n in s}
    arrays["fc/kernel"] = arrays["fc/kernel"].astype(np.float32)
    weightport.load(model, arrays, layout="flax")
    assert torch.equal(model.fc.weight.detach(), torch.from_numpy(kernel.T.astype(np.float32)))
