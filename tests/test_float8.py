"""float8 end to end: safetensors codes, loading into float8 and wider tensors, narrowing checks, export.

Oracles: the ``safetensors`` package (``safetensors.torch``) for the format's codes and bytes, and
torch's own casts (``t.to(dtype)``) for values; bits compared through ``.view(torch.uint8)``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport import LoadError, SourceError
from weightport.values import cast_kind

# safetensors code -> torch dtype, as safetensors.torch writes them
CODES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
FLOAT8 = list(CODES.values())
ids = [str(d).removeprefix("torch.") for d in FLOAT8]


class Holder(nn.Module):
    """One parameter and one buffer of a given dtype and shape."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...] = (16, 16)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape).to(dtype), requires_grad=False)
        self.register_buffer("scale", torch.ones(shape[-1]).to(dtype))


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 256 bit patterns of a float8 dtype as a (16, 16) tensor: NaN, ±0, ±Inf where it has them."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)


def finite_patterns(dtype: torch.dtype) -> torch.Tensor:
    """The bit patterns of ``every_pattern`` with each NaN/Inf replaced by 1.0."""
    t = every_pattern(dtype)
    wide = t.float()
    return torch.where(torch.isfinite(wide), wide, 1.0).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8) if t.element_size() == 1 else t.detach().contiguous()


def header(path: Path) -> dict[str, dict[str, object]]:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # type: ignore[no-any-return]


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (for dtypes wider than a byte, where bit patterns of NaN may differ)."""
    return (
        a.dtype == b.dtype
        and bool(torch.equal(a.isnan(), b.isnan()))
        and torch.equal(torch.nan_to_num(a.float(), nan=0.0), torch.nan_to_num(b.float(), nan=0.0))
    )


# --- the format's codes, against the safetensors package ---------------------------------------------


@pytest.mark.parametrize("code", list(CODES))
def test_codes_and_bytes_match_the_safetensors_package(tmp_path: Path, code: str) -> None:
    dtype = CODES[code]
    theirs, ours = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
    safetensors.torch.save_file({"weight": every_pattern(dtype)}, theirs)
    assert header(theirs)["weight"]["dtype"] == code
    weightport.save({"weight": weightport.to_numpy(Holder(dtype))["weight"]}, ours)
    assert header(ours)["weight"]["dtype"] == code
    # their file read by weightport, and ours read by the package, bit for bit
    module = Holder(dtype)
    weightport.load(module, theirs, strict=False, allow_nonfinite=True)
    assert torch.equal(bits(module.weight), bits(every_pattern(dtype)))
    weightport.save(module, ours)
    back = safetensors.torch.load_file(ours)
    assert back["weight"].dtype == dtype
    assert torch.equal(bits(back["weight"]), bits(every_pattern(dtype)))
    assert torch.equal(bits(back["scale"]), bits(module.scale))


def test_every_supported_code_is_in_the_reader() -> None:
    from weightport.export import SAFETENSORS_DTYPES, SAFETENSORS_REFUSED

    for code, dtype in CODES.items():
        assert SAFETENSORS_DTYPES[code] == np.dtype(getattr(ml_dtypes, str(dtype).removeprefix("torch.")))
    assert set(SAFETENSORS_REFUSED) == {"F4", "F6_E2M3", "F6_E3M2"}
    assert SAFETENSORS_DTYPES["C64"] == np.dtype("<c8")


def raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], int]]) -> Path:
    """A .safetensors file with the given (dtype code, shape, nbytes) entries, zero-filled."""
    head: dict[str, object] = {}
    offset = 0
    for name, (code, shape, nbytes) in entries.items():
        head[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(offset))
    return path


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("F4", r"4-bit float e2m1, two values packed per byte"),
        ("F6_E2M3", r"6-bit float e2m3, packed; torch has no 6-bit float dtype"),
        ("F6_E3M2", r"6-bit float e3m2, packed; torch has no 6-bit float dtype"),
    ],
)
def test_sub_byte_codes_are_refused_with_the_tensor_the_code_and_the_fix(
    tmp_path: Path, code: str, why: str
) -> None:
    path = raw_safetensors(
        tmp_path / "m.safetensors", {"experts.w1": (code, [4, 8], 24 if "6" in code else 16)}
    )
    with pytest.raises(
        SourceError, match=rf"'m.safetensors': tensor 'experts.w1' has dtype {code} \({why}"
    ) as info:
        weightport.load(Holder(torch.float32), path)
    assert "Fix: dequantize it" in str(info.value)


def test_f4_file_written_by_the_safetensors_package_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f4.safetensors"
    packed = torch.arange(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(4, 4)
    safetensors.torch.save_file({"w": packed}, path)
    assert header(path)["w"]["dtype"] == "F4"
    with pytest.raises(SourceError, match=r"tensor 'w' has dtype F4 .*Fix: dequantize it"):
        weightport.load(Holder(torch.float32), path)


def test_unknown_code_is_refused_with_the_codes_it_reads(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "m.safetensors", {"w": ("F8_E3M4", [2], 2)})
    with pytest.raises(
        SourceError,
        match=r"tensor 'w' has dtype 'F8_E3M4', which weightport does not know; it reads F64, .*F8_E4M3",
    ):
        weightport.load(Holder(torch.float32), path)


def test_complex64_code_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    value = torch.complex(torch.arange(4.0), -torch.arange(4.0))
    safetensors.torch.save_file({"w": value}, path)
    module = nn.Module()
    module.register_buffer("w", torch.zeros(4, dtype=torch.complex64))
    weightport.load(module, path)
    assert torch.equal(module.w, value)


# --- loading float8 values ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_float8_file_into_float8_tensors_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "m.safetensors"
    weight, scale = every_pattern(dtype), every_pattern(dtype)[3].clone()
    safetensors.torch.save_file({"weight": weight, "scale": scale}, path)
    module = Holder(dtype)
    ids_before = {k: v[3] for k, v in snapshot(module).items()}
    weightport.load(module, path, allow_nonfinite=True)
    assert torch.equal(bits(module.weight), bits(weight))
    assert torch.equal(bits(module.scale), bits(scale))
    assert {k: v[3] for k, v in snapshot(module).items()} == ids_before  # the same tensors, written in place
    assert module.weight.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_float8_file_materializes_meta_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "m.safetensors"
    weight = finite_patterns(dtype)
    safetensors.torch.save_file({"weight": weight, "scale": weight[0].clone()}, path)
    with torch.device("meta"):
        module = Holder(dtype)
    weightport.load(module, path)
    assert not module.weight.is_meta
    assert torch.equal(bits(module.weight), bits(weight))


@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_float8_widens_exactly_into_wider_floats(
    tmp_path: Path, dtype: torch.dtype, target: torch.dtype
) -> None:
    if dtype == torch.float8_e8m0fnu and target == torch.float16:
        pytest.skip("2**-127 .. 2**127 is not within float16: a rounded cast, tested below")
    path = tmp_path / "m.safetensors"
    weight = every_pattern(dtype)
    safetensors.torch.save_file({"weight": weight, "scale": weight[5].clone()}, path)
    assert cast_kind(np.dtype(getattr(ml_dtypes, ids[FLOAT8.index(dtype)])), target) == ("finite", None)
    module = Holder(target)
    weightport.load(module, path, allow_nonfinite=True)
    assert same_floats(module.weight, weight.to(target))  # torch's own cast is the oracle
    # and the values are exact: back to float8 gives the same bits (NaN aside, whose pattern is one per sign)
    finite = torch.isfinite(weight.float())
    assert torch.equal(bits(module.weight.to(dtype))[finite], bits(weight)[finite])


def test_e8m0_into_float16_is_a_rounded_cast_checked_for_range(tmp_path: Path) -> None:
    e8m0 = np.dtype(ml_dtypes.float8_e8m0fnu)
    assert cast_kind(e8m0, torch.float16) == ("range", None)
    small = torch.tensor([2.0**-3, 2.0**10]).to(torch.float8_e8m0fnu)
    safetensors.torch.save_file({"weight": small, "scale": small.clone()}, tmp_path / "ok.safetensors")
    module = Holder(torch.float16, (2,))
    weightport.load(module, tmp_path / "ok.safetensors")
    assert module.weight.tolist() == [0.125, 1024.0]
    big = torch.tensor([1.0, 2.0**127]).to(torch.float8_e8m0fnu)
    safetensors.torch.save_file({"weight": big, "scale": small}, tmp_path / "big.safetensors")
    with pytest.raises(LoadError, match=r"value 1\.70141e\+38 outside float16's range"):
        weightport.load(module, tmp_path / "big.safetensors")


@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_nan_in_e4m3fn_is_seen_by_the_nan_check(tmp_path: Path, target: torch.dtype) -> None:
    path = tmp_path / "m.safetensors"
    weight = finite_patterns(torch.float8_e4m3fn)
    weight.view(torch.uint8)[2, 7] = 0xFF  # -NaN: e4m3fn has no Inf, only S.1111.111
    safetensors.torch.save_file({"weight": weight, "scale": weight[0].clone()}, path)
    module = Holder(target)
    before = snapshot(module)
    with pytest.raises(LoadError, match=r"'weight'.*1 NaN/Inf value \(first at index \(2, 7\): nan\)"):
        weightport.load(module, path)
    assert snapshot(module) == before  # nothing written
    weightport.load(module, path, allow_nonfinite={"weight"})
    assert bool(module.weight[2, 7].float().isnan())


def test_e5m2_infinity_is_seen_by_the_nan_check() -> None:
    value = np.array([1.0, -np.inf], ml_dtypes.float8_e5m2)
    with pytest.raises(LoadError, match=r"1 NaN/Inf value \(first at index \(1,\): -inf\)"):
        weightport.load(Holder(torch.float32, (2,)), {"weight": value, "scale": value[::-1].copy()})


# --- loading wider values into float8: each must fit exactly --------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_float32_values_that_float8_holds_load_bit_exact(dtype: torch.dtype) -> None:
    weight = finite_patterns(dtype)
    values = weight.float().numpy()  # each exactly a float8 value
    module = Holder(dtype)
    report = weightport.load(module, {"weight": values, "scale": values[1].astype(np.float64)})
    assert torch.equal(bits(module.weight), bits(torch.from_numpy(values).to(dtype)))  # torch's cast
    assert torch.equal(module.weight.float(), torch.from_numpy(values).to(dtype).float())
    assert "float8" in str(report)


@pytest.mark.parametrize(
    ("dtype", "value", "index", "shown"),
    [
        (torch.float8_e4m3fn, 0.1, 3, "np.float32(0.1)"),  # rounds
        (torch.float8_e4m3fn, 1000.0, 3, "np.float32(1000.0)"),  # torch saturates it to 448
        (torch.float8_e4m3fn, 1e-4, 3, "np.float32(1e-04)"),  # underflows to 0
        (torch.float8_e5m2, 1.25 + 2**-3, 3, "np.float32(1.375)"),
        (torch.float8_e4m3fnuz, 448.0, 3, "np.float32(448.0)"),  # beyond its 240: torch makes NaN
        (torch.float8_e5m2fnuz, 57344.0 * 2, 3, "np.float32(114688.0)"),
        (torch.float8_e8m0fnu, 0.0, 3, "np.float32(0.0)"),  # no zero: powers of two only
        (torch.float8_e8m0fnu, 3.0, 3, "np.float32(3.0)"),
        (torch.float8_e8m0fnu, -2.0, 3, "np.float32(-2.0)"),  # no sign
    ],
)
def test_float32_values_float8_cannot_hold_are_refused(
    dtype: torch.dtype, value: float, index: int, shown: str
) -> None:
    values = np.ones(8, np.float32)
    values[index] = value
    module = Holder(dtype, (8,))
    before = snapshot(module)
    name = str(dtype).removeprefix("torch.")
    pattern = rf"'weight'.*1 value that {name} cannot hold exactly \(first at index \({index},\): {re.escape(shown)}\)"
    with pytest.raises(LoadError, match=pattern):
        weightport.load(module, {"weight": values, "scale": np.ones(8, np.float32)})
    assert snapshot(module) == before


def test_narrowing_into_float8_is_checked_like_every_other_exact_cast() -> None:
    for source in ("float64", "float32", "float16"):
        assert cast_kind(np.dtype(source), torch.float8_e4m3fn) == ("exact", None)
    assert cast_kind(np.dtype(ml_dtypes.float8_e5m2), torch.float8_e4m3fn) == ("exact", None)
    assert cast_kind(np.dtype(ml_dtypes.float8_e4m3fn), torch.float8_e4m3fnuz) == ("exact", None)
    assert cast_kind(np.dtype("int8"), torch.float8_e4m3fn) == ("exact", None)
    assert cast_kind(np.dtype("bool"), torch.float8_e4m3fn) == ("none", None)
    assert cast_kind(np.dtype("bool"), torch.float8_e8m0fnu) == ("exact", None)  # False has no e8m0 value
    # unchanged: narrowing between the wider floats rounds, checked for range only
    assert cast_kind(np.dtype("float32"), torch.float16) == ("range", None)
    assert cast_kind(np.dtype("float16"), torch.float32) == ("finite", None)
    assert cast_kind(np.dtype(ml_dtypes.bfloat16), torch.float32) == ("finite", None)
    assert cast_kind(np.dtype(ml_dtypes.bfloat16), torch.float16) == ("range", None)


def test_one_float8_into_another() -> None:
    module = Holder(torch.float8_e4m3fn, (3,))
    e5m2 = np.array([2.0, -0.5, 0.0], ml_dtypes.float8_e5m2)
    weightport.load(module, {"weight": e5m2, "scale": e5m2})
    assert module.weight.float().tolist() == [2.0, -0.5, 0.0]
    with pytest.raises(
        LoadError, match=r"1 value that float8_e4m3fn cannot hold exactly \(first at index \(1,\)"
    ):
        weightport.load(
            module, {"weight": np.array([2.0, 2.0**-12, 0], ml_dtypes.float8_e5m2), "scale": e5m2}
        )


def test_integers_into_float8_must_be_exact() -> None:
    module = Holder(torch.float8_e4m3fn, (3,))
    weightport.load(module, {"weight": np.array([1, -2, 16]), "scale": np.array([True, False, True])})
    assert module.weight.float().tolist() == [1.0, -2.0, 16.0]
    assert module.scale.float().tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(
        LoadError,
        match=r"1 value that float8_e4m3fn cannot hold exactly \(first at index \(2,\): np.int64\(17\)\)",
    ):
        weightport.load(module, {"weight": np.array([1, 2, 17]), "scale": np.ones(3)})


@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_nonfinite_into_float8(dtype: torch.dtype) -> None:
    module = Holder(dtype, (2,))
    ones = np.ones(2, np.float32)
    with pytest.raises(LoadError, match=r"1 NaN/Inf value \(first at index \(1,\): nan\)"):
        weightport.load(module, {"weight": np.array([1.0, np.nan], np.float32), "scale": ones})
    weightport.load(
        module, {"weight": np.array([1.0, np.nan], np.float32), "scale": ones}, allow_nonfinite=True
    )
    assert bool(module.weight[1].float().isnan())
    inf = {"weight": np.array([1.0, np.inf], np.float32), "scale": ones}
    if dtype == torch.float8_e5m2:
        weightport.load(module, inf, allow_nonfinite=True)
        assert module.weight.float().tolist() == [1.0, math.inf]
    else:  # e4m3fn would saturate it to 448, the others make NaN
        name = str(dtype).removeprefix("torch.")
        with pytest.raises(
            LoadError, match=rf"1 Inf value \(first at index \(1,\): inf\) that {name} cannot hold"
        ):
            weightport.load(module, inf, allow_nonfinite=True)


# --- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_to_numpy_gives_ml_dtypes_copies_bit_for_bit(dtype: torch.dtype) -> None:
    module = Holder(dtype)
    with torch.no_grad():
        module.weight.copy_(every_pattern(dtype))
    arrays = weightport.to_numpy(module)
    assert arrays["weight"].dtype == np.dtype(getattr(ml_dtypes, str(dtype).removeprefix("torch.")))
    assert arrays["weight"].view(np.uint8).tobytes() == bits(module.weight).numpy().tobytes()
    arrays["weight"].view(np.uint8)[:] = 0
    assert torch.equal(bits(module.weight), bits(every_pattern(dtype)))  # a copy, never a view


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_save_then_load_restores_float8_bit_for_bit(tmp_path: Path, dtype: torch.dtype, suffix: str) -> None:
    module = Holder(dtype)
    with torch.no_grad():
        module.weight.copy_(every_pattern(dtype))
        module.scale.copy_(finite_patterns(dtype)[4])
    path = weightport.save(module, tmp_path / f"m{suffix}")
    fresh = Holder(dtype)
    weightport.load(fresh, path, allow_nonfinite=True)
    assert torch.equal(bits(fresh.scale), bits(module.scale))
    nan = fresh.weight.float().isnan()
    assert torch.equal(nan, module.weight.float().isnan())
    if suffix == ".safetensors" or dtype != torch.float8_e5m2:
        assert torch.equal(bits(fresh.weight), bits(module.weight))
    else:  # .npz goes through float16, and torch's cast back makes each of e5m2's NaN payloads one NaN
        assert torch.equal(bits(fresh.weight)[~nan], bits(module.weight)[~nan])
        assert torch.equal(bits(fresh.weight)[nan] >> 7, bits(module.weight)[nan] >> 7)  # the sign stays


def test_npz_holds_float8_as_exact_float16(tmp_path: Path) -> None:
    module = Holder(torch.float8_e4m3fn)
    with torch.no_grad():
        module.weight.copy_(finite_patterns(torch.float8_e4m3fn))
    e8m0 = Holder(torch.float8_e8m0fnu)
    with np.load(weightport.save(module, tmp_path / "a.npz")) as saved:
        assert saved["weight"].dtype == np.float16  # NumPy's format has no float8: it would write V1 bytes
        assert torch.equal(torch.from_numpy(saved["weight"]), module.weight.to(torch.float16))
    with np.load(weightport.save(e8m0, tmp_path / "b.npz")) as saved:
        assert saved["weight"].dtype == np.float32  # 2**-127 .. 2**127 needs float32


def test_in_memory_e5m2_arrays_load() -> None:
    module = Holder(torch.float8_e5m2, (4,))
    value = np.array([1.0, -2.0, 0.25, 57344.0], ml_dtypes.float8_e5m2)
    weightport.load(module, {"weight": value, "scale": value[::-1]})  # a negatively strided view too
    assert bits(module.weight).numpy().tobytes() == value.view(np.uint8).tobytes()
    assert module.scale.float().tolist() == [57344.0, 0.25, -2.0, 1.0]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["ml_dtypes", "torch"])
@pytest.mark.parametrize("dtype", FLOAT8, ids=ids)
def test_in_memory_float8_arrays_and_tensors_load(dtype: torch.dtype, as_tensor: bool) -> None:
    module = Holder(dtype, (4,))
    value = torch.tensor([1.0, 2.0, 0.25, 4.0]).to(dtype)
    numpy_dtype = np.dtype(getattr(ml_dtypes, str(dtype).removeprefix("torch.")))
    given = value if as_tensor else value.view(torch.uint8).numpy().view(numpy_dtype)
    weightport.load(module, {"weight": given, "scale": given})
    assert torch.equal(bits(module.weight), bits(value))
