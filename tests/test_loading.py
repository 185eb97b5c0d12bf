"""weightport.load: the seed scenario, the bad-input matrix, all-or-nothing, options."""

from __future__ import annotations

import os
import signal
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import random_state, snapshot
from weightport import LoadError, SourceError
from weightport.export import write_safetensors
from weightport.sources.files import open_no_follow


def rnn_and_arrays(seed: int = 313) -> tuple[nn.RNN, dict[str, np.ndarray]]:
    rnn = nn.RNN(3, 4, 2)
    rng = np.random.RandomState(seed)
    return rnn, {n: rng.uniform(-0.5, 0.5, tuple(p.shape)) for n, p in rnn.named_parameters()}


def test_seed_scenario_loads_checks_and_verifies() -> None:
    rnn, arrays = rnn_and_arrays()
    params_before = {n: p for n, p in rnn.named_parameters()}
    report = weightport.load(rnn, arrays)
    assert report.written == list(arrays)
    for name, p in rnn.named_parameters():
        assert p is params_before[name] and p.dtype == torch.float32 and p.requires_grad
        np.testing.assert_array_equal(p.detach().numpy(), arrays[name].astype(np.float32))
    assert report.cast == [f"{n}: float64 -> float32" for n in arrays]
    x = np.random.RandomState(1).standard_normal((5, 2, 3)).astype(np.float32)
    assert weightport.verify(rnn, x)


def test_seed_mistake_is_refused_with_the_shape_explained() -> None:
    rnn, arrays = rnn_and_arrays()
    before = snapshot(rnn)
    arrays["weight_ih_l0"] = np.zeros((4, 4))
    with pytest.raises(LoadError) as info:
        weightport.load(rnn, arrays)
    assert snapshot(rnn) == before
    (problem,) = info.value.problems
    assert problem.name == "weight_ih_l0"
    assert "(4, 3) = (hidden_size, input_size) of RNN(input_size=3, hidden_size=4)" in str(info.value)
    assert "found shape (4, 4)" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, weightport.WeightportError)


def test_no_aliasing_of_numpy_memory() -> None:
    lin = nn.Linear(2, 2)
    w = np.ones((2, 2), np.float32)
    weightport.load(lin, {"weight": w, "bias": np.zeros(2, np.float32)})
    w[:] = 5
    assert lin.weight.detach().numpy().max() == 1.0


def test_rnn_flat_weights_stay_valid() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    flat_before = [id(w) for w in lstm._flat_weights]
    weightport.load(lstm, random_state(lstm, np.random.default_rng(0)))
    assert [id(w) for w in lstm._flat_weights] == flat_before
    lstm(torch.zeros(5, 1, 3))  # no warning (warnings are errors)


# --- the bad-input matrix: each refused with a message naming the tensor and the fix, module unchanged ---


def _lin_arrays() -> dict[str, np.ndarray]:
    return {"weight": np.ones((2, 3)), "bias": np.zeros(2)}


BAD_INPUTS = {
    "unknown name": (
        {"weight": np.ones((2, 3)), "bias": np.zeros(2), "bais": np.zeros(2)},
        "'bais'",
        "remove it (it looks like 'bias', which the source gives already), or pass strict=False",
    ),
    "missing name": ({"weight": np.ones((2, 3))}, "'bias'", "add it to the source"),
    "misspelt name": ({"weight": np.ones((2, 3)), "bia": np.zeros(2)}, "'bias'", "rename it to 'bias'"),
    "transposed": ({"weight": np.ones((3, 2)), "bias": np.zeros(2)}, "'weight'", "looks transposed"),
    "wrong size": ({"weight": np.ones((2, 4)), "bias": np.zeros(2)}, "'weight'", "shape (2, 3)"),
    "wrong rank": ({"weight": np.ones((2, 3, 1)), "bias": np.zeros(2)}, "'weight'", "reshape it"),
    "scalar": ({"weight": np.ones((2, 3)), "bias": np.float64(1.0)}, "'bias'", "shape (2,)"),
    "float64 overflow": (
        {"weight": np.full((2, 3), 1e39), "bias": np.zeros(2)},
        "'weight'",
        "float32's range",
    ),
    "nan": (
        {"weight": np.array([[1, np.nan, 0], [0, 0, 0]]), "bias": np.zeros(2)},
        "'weight'",
        "allow_nonfinite",
    ),
    "inf": ({"weight": np.ones((2, 3)), "bias": np.array([np.inf, 0])}, "'bias'", "NaN/Inf"),
    "int not exact": (
        {"weight": np.full((2, 3), 2**24 + 1, np.int64), "bias": np.zeros(2)},
        "'weight'",
        "exactly",
    ),
    "complex": ({"weight": np.ones((2, 3), np.complex64), "bias": np.zeros(2)}, "'weight'", "pass .real"),
    "float16 overflow": (
        {"weight": np.ones((2, 3)), "bias": np.array([7e4, 0], np.float32)},
        "'bias'",
        "float16's range",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_written(case: str) -> None:
    arrays, names, fix = BAD_INPUTS[case]
    lin = nn.Linear(3, 2)
    if case == "float16 overflow":
        lin = lin.half()
    before = snapshot(lin)
    with pytest.raises(LoadError) as info:
        weightport.load(lin, arrays)
    message = str(info.value)
    assert names in message and fix in message, message
    assert "nothing was written" in message
    assert snapshot(lin) == before


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (np.array(["a", "b"]), "strings"),
        (np.array([object(), object()], dtype=object), "objects"),
        ([[1.0, 2.0], [3.0]], "ragged"),
    ],
)
def test_non_numeric_values_are_refused(value: object, error: str) -> None:
    lin = nn.Linear(3, 2)
    before = snapshot(lin)
    with pytest.raises(SourceError, match=error) as info:
        weightport.load(lin, {"weight": np.ones((2, 3)), "bias": value})
    assert "'bias'" in str(info.value)
    assert snapshot(lin) == before


def test_all_problems_are_collected_sorted_grouped_and_capped() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    arrays = {f"{i}.weight": np.ones((3, 3)) for i in range(30)} | {
        f"{i}.bias": np.zeros(2) for i in range(30)
    }
    with pytest.raises(LoadError) as info:
        weightport.load(model, arrays)
    assert len(info.value.problems) == 30
    assert info.value.problems == sorted(info.value.problems)
    # one cause, one line: the 30 tensors said at once, each one's source under its own name
    (line,) = info.value.lines()
    assert line.startswith("'{0..29}.weight' (30 tensors): expected shape (2, 2)")
    assert "found shape (3, 3) from the given mapping '{0..29}.weight'" in line
    # 30 different causes: listed up to the cap, then counted
    arrays = {f"{i}.weight": np.ones((3 + i, 2)) for i in range(30)} | {
        f"{i}.bias": np.zeros(2) for i in range(30)
    }
    with pytest.raises(LoadError) as info:
        weightport.load(model, arrays)
    assert len(info.value.lines()) == 30
    assert "... and 5 more (see the error's .problems)" in str(info.value)
    assert "... and 20 more (--problems all)" in info.value.format(10, more="--problems all")
    assert len(info.value.format(None).splitlines()) == 31


# --- dtypes that are accepted, and copied correctly ---


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.astype(">f4"), id="big-endian"),
        pytest.param(lambda a: a[::-1, ::-1].copy()[::-1, ::-1], id="negative-strides"),
        pytest.param(lambda a: np.asfortranarray(a), id="fortran-order"),
        pytest.param(lambda a: np.repeat(a, 2, axis=1)[:, ::2], id="non-contiguous"),
        pytest.param(lambda a: a.astype(np.float16), id="float16"),
        pytest.param(lambda a: a.astype(ml_dtypes.bfloat16), id="bfloat16"),
        pytest.param(lambda a: torch.from_numpy(a.copy()), id="torch-tensor"),
        pytest.param(lambda a: a.tolist(), id="nested-list"),
    ],
)
def test_unusual_arrays_are_accepted_and_copied_exactly(make) -> None:  # type: ignore[no-untyped-def]
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4  # exact in every float dtype
    given = make(values)
    if isinstance(given, np.ndarray) and given.dtype.kind == "f" and given.dtype.itemsize == 4:
        given.flags.writeable = False  # read-only too: no torch warning, still copied
    lin = nn.Linear(3, 2)
    weightport.load(lin, {"weight": given, "bias": np.zeros(2)})
    np.testing.assert_array_equal(lin.weight.detach().numpy(), values)


def test_float16_and_bfloat16_in_and_out() -> None:
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    w = (np.arange(6).reshape(2, 3) / 3).astype(np.float32)  # rounds in bfloat16: allowed
    weightport.load(lin, {"weight": w, "bias": np.zeros(2, ml_dtypes.bfloat16)})
    assert lin.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(weightport.to_numpy(lin)["weight"], w.astype(ml_dtypes.bfloat16))
    half = nn.Linear(3, 2).half()
    weightport.load(half, {"weight": w.astype(np.float16), "bias": np.zeros(2, np.float16)})
    np.testing.assert_array_equal(half.weight.detach().numpy(), w.astype(np.float16))


def test_ints_and_bools_go_in_only_when_exact() -> None:
    lin = nn.Linear(3, 2)
    weightport.load(
        lin, {"weight": np.arange(6, dtype=np.int64).reshape(2, 3), "bias": np.array([True, False])}
    )
    assert lin.weight.detach().numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert lin.bias.detach().numpy().tolist() == [1.0, 0.0]
    bn = nn.BatchNorm1d(2)
    state = random_state(bn, np.random.default_rng(0))
    state["num_batches_tracked"] = np.float64(7.0)  # integral: fine
    weightport.load(bn, state)
    assert int(bn.num_batches_tracked) == 7
    state["num_batches_tracked"] = np.float64(7.5)
    with pytest.raises(LoadError, match="num_batches_tracked.*cannot hold exactly"):
        weightport.load(bn, state)


def test_allow_nonfinite_everywhere_or_by_name() -> None:
    model = nn.Module()
    model.register_buffer("mask", torch.zeros(2, 2))
    model.lin = nn.Linear(2, 2)
    arrays = {
        "mask": np.array([[0, -np.inf], [0, 0]]),
        "lin.weight": np.ones((2, 2)),
        "lin.bias": np.zeros(2),
    }
    with pytest.raises(LoadError, match="'mask'"):
        weightport.load(model, arrays)
    weightport.load(model, arrays, allow_nonfinite={"mask"})
    assert model.mask[0, 1] == -np.inf
    arrays["lin.bias"] = np.array([np.nan, 0])
    with pytest.raises(LoadError, match="'lin.bias'"):
        weightport.load(model, arrays, allow_nonfinite={"mask"})
    weightport.load(model, arrays, allow_nonfinite=True)
    assert torch.isnan(model.lin.bias[0])


def test_nonfinite_allowed_but_finite_values_still_range_checked() -> None:
    lin = nn.Linear(1, 2)
    with pytest.raises(LoadError, match="range"):
        weightport.load(
            lin, {"weight": np.array([[np.inf], [1e40]]), "bias": np.zeros(2)}, allow_nonfinite=True
        )


def test_check_values_off_skips_scans() -> None:
    lin = nn.Linear(1, 2)
    weightport.load(lin, {"weight": np.array([[np.nan], [1.0]]), "bias": np.zeros(2)}, check_values=False)
    assert torch.isnan(lin.weight[0, 0])


# --- tied weights, buffers, parametrizations, lazy and meta modules ---


def tied_model() -> nn.Module:
    model = nn.Module()
    model.embed = nn.Embedding(5, 3)
    model.head = nn.Linear(3, 5, bias=False)
    model.head.weight = model.embed.weight
    return model


def test_tied_weights_need_one_value_or_equal_values() -> None:
    model = tied_model()
    w = np.random.default_rng(0).standard_normal((5, 3))
    report = weightport.load(model, {"embed.weight": w})
    assert report.rows[0].aliases == ()
    weightport.load(model, {"embed.weight": w, "head.weight": w})
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), w.astype(np.float32))
    before = snapshot(model)
    with pytest.raises(LoadError, match="tied tensor"):
        weightport.load(model, {"embed.weight": w, "head.weight": w + 1})
    assert snapshot(model) == before
    # the tie takes one value, whichever checks are off: two different ones are refused still
    with pytest.raises(LoadError, match="tied tensor"):
        weightport.load(model, {"embed.weight": w, "head.weight": w + 1}, check_values=False)
    assert snapshot(model) == before
    weightport.load(model, {"embed.weight": w + 2, "head.weight": w + 2}, check_values=False)
    np.testing.assert_array_equal(model.embed.weight.detach().numpy(), (w + 2).astype(np.float32))


def test_buffers_that_share_their_memory_are_one_tied_tensor() -> None:
    """transformers' SAM gives its prompt encoder the image embedding's buffer as another tensor object
    over the same memory: a value for one name fills both, and two different values are refused."""
    shared = torch.zeros(2, 3)
    model = nn.Module()
    model.image, model.prompt = nn.Module(), nn.Module()
    model.image.register_buffer("pe", shared)
    model.prompt.register_buffer("pe", shared.view(2, 3))  # another object, the same view of the memory
    assert model.image.pe is not model.prompt.pe
    w = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    weightport.load(model, {"image.pe": w})  # no value for 'prompt.pe' is missing: it is the same tensor
    np.testing.assert_array_equal(model.prompt.pe.numpy(), w)
    before = snapshot(model)
    with pytest.raises(LoadError, match=r"'prompt.pe'.*one tied tensor"):
        weightport.load(model, {"image.pe": w, "prompt.pe": w + 1})
    assert snapshot(model) == before


def test_buffers_load_with_parameters() -> None:
    bn = nn.BatchNorm1d(3)
    state = {
        "weight": np.ones(3),
        "bias": np.zeros(3),
        "running_mean": np.array([1.0, 2.0, 3.0]),
        "running_var": np.array([4.0, 5.0, 6.0]),
        "num_batches_tracked": np.int64(9),
    }
    weightport.load(bn, state)
    assert bn.running_var.tolist() == [4.0, 5.0, 6.0] and bn.num_batches_tracked.item() == 9


def test_parametrized_module_loads_originals_and_hints_at_them() -> None:
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    names = set(lin.state_dict())
    assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= names
    with pytest.raises(LoadError, match="computed by a parametrization"):
        weightport.load(lin, {"weight": np.ones((2, 3)), "bias": np.zeros(2)})
    weightport.load(
        lin,
        {
            "parametrizations.weight.original0": np.full((2, 1), 2.0),
            "parametrizations.weight.original1": np.ones((2, 3)),
            "bias": np.zeros(2),
        },
    )
    np.testing.assert_allclose(lin.weight.detach().numpy(), np.full((2, 3), 2 / np.sqrt(3)), rtol=1e-6)


def test_lazy_module_is_refused_with_a_reason() -> None:
    lazy = nn.LazyLinear(2)
    with pytest.raises(LoadError, match="run one forward pass"):
        weightport.load(lazy, {"weight": np.ones((2, 3)), "bias": np.zeros(2)})


def test_meta_module_is_materialized_in_place() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.LSTM(3, 4, num_layers=2), nn.Linear(4, 2))
    reference = nn.Sequential(nn.LSTM(3, 4, num_layers=2), nn.Linear(4, 2))
    arrays = weightport.to_numpy(reference)
    weightport.load(model, arrays)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(5, 1, 3)
    out, _ = model[0](x)
    np.testing.assert_array_equal(out.detach().numpy(), reference[0](x)[0].detach().numpy())


def test_meta_module_with_tensors_missing_is_refused_even_lenient() -> None:
    with torch.device("meta"):
        lin = nn.Linear(3, 2)
    with pytest.raises(LoadError, match="meta device"):
        weightport.load(lin, {"weight": np.ones((2, 3))}, strict=False)
    assert lin.weight.is_meta


def test_meta_tied_weights_stay_tied() -> None:
    with torch.device("meta"):
        model = tied_model()
    weightport.load(model, {"embed.weight": np.ones((5, 3))})
    assert model.embed.weight is model.head.weight and not model.head.weight.is_meta


# --- options ---


def test_strict_false_reports_ignored_and_missing_but_refuses_bad_shapes() -> None:
    lin = nn.Linear(3, 2)
    report = weightport.load(lin, {"weight": np.ones((2, 3)), "extra": np.ones(1)}, strict=False)
    assert report.ignored == ["extra"] and report.missing == ["bias"]
    with pytest.raises(LoadError, match="'weight'"):
        weightport.load(lin, {"weight": np.ones((3, 2))}, strict=False)


def test_prefix_loads_into_a_submodule() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.GRU(3, 4))
    model.add_module("head", nn.Linear(4, 1))
    arrays = random_state(model.encoder, np.random.default_rng(0))
    head_before = snapshot(model.head)
    report = weightport.load(model, arrays, prefix="encoder.")
    assert report.written[0] == "encoder.weight_ih_l0"
    assert snapshot(model.head) == head_before
    with pytest.raises(LoadError, match="submodule"):
        weightport.load(model, arrays, prefix="decoder.")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_recognised(prefix: str) -> None:
    lin = nn.Linear(3, 2)
    arrays = {prefix + k: v for k, v in _lin_arrays().items()}
    assert weightport.load(lin, arrays).written == ["weight", "bias"]


def test_wrapped_modules_are_unwrapped() -> None:
    wrapped = nn.DataParallel(nn.Linear(3, 2))
    assert weightport.load(wrapped, _lin_arrays()).written == ["weight", "bias"]


def test_dry_run_writes_nothing() -> None:
    lin = nn.Linear(3, 2)
    before = snapshot(lin)
    report = weightport.load(lin, _lin_arrays(), dry_run=True)
    assert report.dry_run and report.written == [] and len(report.rows) == 2
    assert "Would load 2 tensors" in str(report)
    assert snapshot(lin) == before


# --- files: truncated, corrupt, pickled, stray, read errors, interrupts ---


def _lstm_and_state() -> tuple[nn.LSTM, dict[str, np.ndarray]]:
    lstm = nn.LSTM(3, 4, num_layers=2)
    return lstm, {k: v.astype(np.float32) for k, v in random_state(lstm, np.random.default_rng(1)).items()}


@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "safetensors", "npy-folder"])
def test_every_file_format_loads_exactly(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    path = _write(tmp_path, kind, state)
    report = weightport.load(lstm, path)
    assert len(report.written) == len(state)
    for name, value in weightport.to_numpy(lstm).items():
        np.testing.assert_array_equal(value, state[name])


def _write(tmp_path, kind: str, state: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    if kind == "npz":
        np.savez(tmp_path / "w.npz", **state)
        return tmp_path / "w.npz"
    if kind == "npz-compressed":
        np.savez_compressed(tmp_path / "w.npz", **state)
        return tmp_path / "w.npz"
    if kind == "safetensors":
        return write_safetensors(state, tmp_path / "w.safetensors")
    folder = tmp_path / "weights"
    folder.mkdir()
    for name, value in state.items():
        np.save(folder / f"{name}.npy", value)
    return folder


@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "safetensors"])
def test_truncated_files_fail_before_any_write(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    path = _write(tmp_path, kind, state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="truncated|corrupt"):
        weightport.load(lstm, path)
    assert snapshot(lstm) == before


def test_truncated_npy_in_folder_fails_before_any_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    folder = _write(tmp_path, "npy-folder", state)
    victim = folder / "weight_hh_l1.npy"
    victim.write_bytes(victim.read_bytes()[:-8])
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="weight_hh_l1.*truncated"):
        weightport.load(lstm, folder)
    assert snapshot(lstm) == before


def test_corrupt_compressed_npz_member_fails_before_any_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    path = _write(tmp_path, "npz-compressed", state)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("weight_hh_l1.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 40
    data[start : start + 20] = bytes(20)
    path.write_bytes(bytes(data))
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="weight_hh_l1.*corrupt"):
        weightport.load(lstm, path)
    assert snapshot(lstm) == before


def test_safetensors_header_lies_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lin = nn.Linear(3, 2)
    path = write_safetensors(
        {k: v.astype(np.float32) for k, v in _lin_arrays().items()}, tmp_path / "w.safetensors"
    )
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="header claims"):
        weightport.load(lin, path)


def test_pickled_npy_is_never_unpickled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "w"
    folder.mkdir()
    np.save(folder / "weight.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(folder / "bias.npy", np.zeros(2))
    with pytest.raises(SourceError, match="never unpickles"):
        weightport.load(nn.Linear(3, 2), folder)


def test_folder_with_stray_files_and_links(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lin = nn.Linear(3, 2)
    folder = tmp_path / "w"
    folder.mkdir()
    for k, v in _lin_arrays().items():
        np.save(folder / f"{k}.npy", v)
    (folder / "README.txt").write_text("notes")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones(2))
    os.symlink(outside, folder / "extra.npy")
    report = weightport.load(lin, folder)
    assert report.ignored == ["README.txt (not a .npy file)", "extra.npy (a link: not followed)"]
    assert "Ignored: README.txt" in str(report)


def test_missing_path_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceError, match="no such file"):
        weightport.load(nn.Linear(3, 2), tmp_path / "nope.npz")


def _fail_third_compressed_write(monkeypatch, tensors: int) -> None:  # type: ignore[no-untyped-def]
    """Make the 3rd streamed read of the writing pass (after one read per tensor for the value
    checks) raise, as a failing disk would."""
    from weightport.sources import npz as reader

    calls = {"n": 0}
    original = reader.NpzSource._read_compressed

    def flaky(self, name, member, out):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == tensors + 3:
            raise OSError(5, "Input/output error")
        return original(self, name, member, out)

    monkeypatch.setattr(reader.NpzSource, "_read_compressed", flaky)


def test_read_error_while_writing_puts_everything_back(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    path = _write(tmp_path, "npz-compressed", state)
    _fail_third_compressed_write(monkeypatch, len(state))
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="put back"):
        weightport.load(lstm, path)
    assert snapshot(lstm) == before


def test_memory_mapped_sources_need_no_undo_copies(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from weightport import apply

    lstm, state = _lstm_and_state()
    kept: list[str] = []
    monkeypatch.setattr(apply.UndoLog, "keep", lambda self, tensor: kept.append("kept"))
    for kind in ("safetensors", "npz", "npy-folder"):
        weightport.load(
            lstm, _write(tmp_path / kind, kind, state) if (tmp_path / kind).mkdir() is None else None
        )
    assert kept == []
    weightport.load(lstm, _write(tmp_path, "npz-compressed", state))  # streamed: copies are kept
    assert len(kept) == len(state)


def test_keyboard_interrupt_while_writing_is_deferred(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    lstm, state = _lstm_and_state()
    from weightport import apply

    original = apply._write
    count = {"n": 0}

    def interrupted(entry, source, *rest):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        original(entry, source, *rest)

    monkeypatch.setattr(apply, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weightport.load(lstm, state)
    for name, value in weightport.to_numpy(lstm).items():  # fully written before the interrupt surfaced
        np.testing.assert_array_equal(value, state[name])


def test_links_inside_folders_are_not_opened(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "real.npy"
    np.save(target, np.zeros(1))
    os.symlink(target, tmp_path / "link.npy")
    with pytest.raises(SourceError, match="not followed"):
        open_no_follow(tmp_path / "link.npy")


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    lin = nn.Linear(3, 2)
    big = np.full((2, 3), 3e38, np.float32)  # every value finite; their float32 sum is not
    weightport.load(lin, {"weight": big, "bias": np.zeros(2, np.float32)})
    assert lin.weight.max().item() == np.float32(3e38)
    with pytest.raises(LoadError, match="float16's range"):
        weightport.load(lin.half(), {"weight": big, "bias": np.zeros(2, np.float32)})


def test_torch_compile_wrapper_is_unwrapped() -> None:
    lin = nn.Linear(3, 2)
    with warnings.catch_warnings():  # importing torch._dynamo warns about torch.jit internals
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(lin)  # compiles lazily, on the first call; never called here
    assert weightport.load(compiled, _lin_arrays()).written == ["weight", "bias"]
    assert lin.weight.sum().item() == 6.0


def test_meta_values_are_checked_as_they_fill_and_nothing_is_swapped_in(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        lstm = nn.LSTM(3, 4)
    state = {
        k: v.astype(np.float32) for k, v in random_state(nn.LSTM(3, 4), np.random.default_rng(0)).items()
    }
    state["weight_hh_l0"][2, 1] = np.nan
    path = write_safetensors(state, tmp_path / "m.safetensors")
    with pytest.raises(LoadError, match=r"'weight_hh_l0'.*NaN/Inf value \(first at index \(2, 1\)"):
        weightport.load(lstm, path)
    assert all(p.is_meta for p in lstm.parameters())
    with pytest.raises(LoadError, match="weight_hh_l0"):
        weightport.load(lstm, path, dry_run=True)  # a dry run checks too, without filling anything


@pytest.mark.parametrize("bad", [None, (0, 0), (511, 1023)])
def test_big_meta_tensors_are_scanned_as_they_are_copied(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    """Tensors of a MiB and more from a mapped file go through the fused copy-and-scan: a NaN at
    either end is found, nothing is swapped in, and without one the values land bit for bit."""
    with torch.device("meta"):
        lin = nn.Linear(1024, 512)
    rng = np.random.default_rng(1)
    state = {"weight": rng.standard_normal((512, 1024)).astype(np.float32), "bias": np.zeros(512, np.float32)}
    if bad is not None:
        state["weight"][bad] = np.inf
    path = write_safetensors(state, tmp_path / "m.safetensors")
    if bad is not None:
        with pytest.raises(
            LoadError, match=rf"'weight'.*NaN/Inf value \(first at index \({bad[0]}, {bad[1]}\)"
        ):
            weightport.load(lin, path)
        assert lin.weight.is_meta and lin.bias.is_meta
        return
    weightport.load(lin, path)
    assert np.array_equal(lin.weight.detach().numpy(), state["weight"]) and not lin.bias.is_meta


@pytest.mark.parametrize("check_values", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, ">f4"])
def test_big_meta_tensors_the_fused_kernel_cannot_take_are_copied_and_checked(
    tmp_path, dtype, check_values
) -> None:  # type: ignore[no-untyped-def]
    """A mapped tensor of another dtype or byte order than the meta tensor's (a float64 file, a
    big-endian .npy) is cast in by ``copy_`` instead: values exact, a NaN still refused with nothing
    swapped in (unless the checks are off)."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((512, 1024)).astype(dtype)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "bias.npy", np.zeros(512, dtype))
    np.save(folder / "weight.npy", weight)
    with torch.device("meta"):
        lin = nn.Linear(1024, 512)
    weightport.load(lin, folder, check_values=check_values)
    assert torch.equal(lin.weight.detach(), torch.from_numpy(weight.astype(np.float32)))
    weight[3, 5] = np.nan
    np.save(folder / "weight.npy", weight)
    with torch.device("meta"):
        fresh = nn.Linear(1024, 512)
    if not check_values:
        weightport.load(fresh, folder, check_values=False)
        assert bool(fresh.weight.isnan()[3, 5]) and int(fresh.weight.isnan().sum()) == 1
        return
    with pytest.raises(LoadError, match=r"'weight'.*NaN/Inf value \(first at index \(3, 5\)"):
        weightport.load(fresh, folder)
    assert fresh.weight.is_meta and fresh.bias.is_meta


def test_undo_log_spills_beyond_its_memory_budget(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from weightport import apply

    monkeypatch.setattr(apply, "UNDO_MEMORY_BYTES", 100)  # everything but the smallest spills to disk
    lstm, state = _lstm_and_state()
    path = _write(tmp_path, "npz-compressed", state)
    _fail_third_compressed_write(monkeypatch, len(state))
    spilled = []
    original_keep = apply.UndoLog.keep

    def keep(self, tensor):  # type: ignore[no-untyped-def]
        original_keep(self, tensor)
        spilled.append(isinstance(self.saved[-1][1], int))

    monkeypatch.setattr(apply.UndoLog, "keep", keep)
    before = snapshot(lstm)
    with pytest.raises(SourceError, match="put back"):
        weightport.load(lstm, path)
    assert snapshot(lstm) == before
    assert any(spilled), "nothing went to the spill file"


def test_strict_false_that_matches_nothing_is_refused() -> None:
    """The usual sign of a forgotten prefix: nothing would be written, so nothing is, and it says why."""
    linear = nn.Linear(3, 2)
    before = snapshot(linear)
    with pytest.raises(
        LoadError, match=r"the source's names start with 'encoder\.'.*load the source's 'encoder\.' part"
    ):
        weightport.load(linear, {"encoder.weight": np.ones((2, 3), np.float32)}, strict=False)
    assert snapshot(linear) == before
    with pytest.raises(LoadError, match=r"the source's one name does not match \('w'\).*prefix="):
        weightport.load(linear, {"w": np.ones((2, 3), np.float32)}, strict=False)  # no name tells which
    assert weightport.load(linear, {}, strict=False).written == []  # an empty source asks for nothing


def test_a_module_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(LoadError, match="expected a torch.nn.Module, found an object of type dict"):
        weightport.load({"weight": np.ones(2)}, nn.Linear(2, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "target"),
    [
        (np.array([1, 2**64 - 1], np.uint64), torch.int64),
        (np.array([3, 2**32 - 1], np.uint32), torch.int32),
        (np.array([0, 200], np.uint8), torch.int8),
        (np.array([5, -1], np.int8), torch.uint8),
        (np.array([7, -1], np.int16), torch.int32 if not hasattr(torch, "uint32") else torch.uint32),
    ],
)
def test_integers_that_would_wrap_around_are_refused(values: np.ndarray, target: torch.dtype) -> None:
    """A cast there and back gives the same bits after two's-complement wraparound: range matters too."""
    module = nn.Module()
    module.register_buffer("counts", torch.zeros(2, dtype=target))
    before = module.counts.clone()
    if target == torch.int32 and values.dtype == np.int16:
        pytest.skip("this torch has no uint32")
    with pytest.raises(
        LoadError, match=r"'counts'.*1 value that \w+ cannot hold exactly \(first at index \(1,\)"
    ):
        weightport.load(module, {"counts": values})
    assert torch.equal(module.counts, before)
    weightport.load(module, {"counts": values[:1].repeat(2)})  # in range: loads exactly
    assert module.counts.tolist() == [int(values[0])] * 2


class _Rope(nn.Module):
    """A layer with a buffer that checkpoints leave out (persistent=False), as rotary embeddings have."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)


def test_non_persistent_buffers_are_optional_filled_when_given_and_never_left_on_meta() -> None:
    arrays = {k: np.full(tuple(v.shape), 0.5, np.float32) for k, v in _Rope().state_dict().items()}
    assert "inv_freq" not in arrays
    rope = _Rope()
    weightport.load(rope, arrays)  # not required
    assert rope.inv_freq.tolist() == [0.0, 1.0, 2.0, 3.0]
    weightport.load(rope, dict(arrays, inv_freq=np.ones(4, np.float32)))  # a source that holds it fills it
    assert rope.inv_freq.tolist() == [1.0] * 4
    with torch.device("meta"):
        meta = _Rope()
    for strict in (True, False):
        with pytest.raises(
            LoadError, match=r"'inv_freq': expected values for it \(a buffer registered with persistent=False"
        ):
            weightport.load(meta, arrays, strict=strict)
        assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    weightport.load(meta, dict(arrays, inv_freq=np.ones(4, np.float32)))
    assert not any(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert meta.inv_freq.tolist() == [1.0] * 4


def test_when_nothing_matches_the_layout_hint_comes_first() -> None:
    """A Flax pytree given without layout='flax', or a framework file read with the wrong layout=."""
    linear = nn.Linear(3, 2)
    pytree = {"params": {"Dense_0": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}}
    with pytest.raises(LoadError) as info:
        weightport.load(linear, pytree)
    first = info.value.problems[0]
    assert first.name == "(layout)" and "pass layout='flax'" in first.fix
    weightport.load(linear, pytree, layout="flax")
    assert linear.weight.detach().numpy().tolist() == [[1.0] * 3] * 2
    pytest.importorskip("h5py")
    golden = Path(__file__).parent / "golden" / "keras" / "model.keras"
    gru = nn.GRU(4, 2, batch_first=True)
    with pytest.raises(LoadError) as info:
        weightport.load(gru, golden, layout="torch")
    first = info.value.problems[0]
    assert first.name == "(layout)" and "but the file is in the 'keras' layout" in first.found


def test_allow_nonfinite_names_must_be_tensors_being_loaded() -> None:
    model = nn.Sequential()
    model.add_module("enc", nn.Linear(2, 2))
    arrays = {"enc.weight": np.ones((2, 2), np.float32), "enc.bias": np.array([np.inf, 0.0], np.float32)}
    before = snapshot(model)
    with pytest.raises(LoadError) as info:
        weightport.load(model, arrays, allow_nonfinite={"bias"})
    assert [(p.name, p.fix) for p in info.value.problems if p.name == "bias"] == [
        ("bias", "write 'enc.bias'")
    ]
    assert snapshot(model) == before
    weightport.load(model, arrays, allow_nonfinite={"enc.bias"})
    assert model.enc.bias[0].item() == float("inf")


def test_when_nothing_matches_a_name_prefix_on_one_side_is_named() -> None:
    """A head model's checkpoint (``bert.*``) into the bare model, and the bare one into the head model."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = nn.Linear(2, 2)
            self.cls = nn.Linear(2, 1)

    head, bare = Head(), nn.Linear(2, 2)
    head_arrays = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    with pytest.raises(LoadError) as info:
        weightport.load(bare, head_arrays)
    first = info.value.problems[0]
    assert first.name == "(prefix)" and "source's names start with 'bert.'" in first.found
    bare_arrays = {k: v.detach().numpy() for k, v in bare.state_dict().items()}
    with pytest.raises(LoadError) as info:
        weightport.load(head, bare_arrays)
    assert info.value.problems[0].fix == "pass prefix='bert.' to load into that submodule"
    weightport.load(head, bare_arrays, prefix="bert.")


def test_old_weight_norm_names_fill_the_parametrization() -> None:
    """Checkpoints from torch.nn.utils.weight_norm (weight_g, weight_v) load into its successor, as
    PyTorch's own load_state_dict hook allows; the module's output is the old module's."""
    import torch.nn.utils as nn_utils

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
        old = nn_utils.weight_norm(nn.Conv1d(2, 3, 3))
    arrays = {k: v.detach().numpy() for k, v in old.state_dict().items()}
    assert {"weight_g", "weight_v"} <= set(arrays)
    new = nn_utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 3))
    report = weightport.load(new, arrays)
    assert "parametrizations.weight.original0" in report.written
    x = torch.randn(1, 2, 5)
    assert torch.allclose(new(x), old(x), atol=1e-6)


def test_arrays_sharing_memory_with_the_module_load_their_values_from_before_the_load() -> None:
    """A module's own tensors as the source (swapped, transposed): written one after another, a later
    read saw an earlier write (both GRU directions came out equal; a square weight half transposed)."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 3, bidirectional=True)
    own = gru.state_dict()
    expected = {k: v.clone() for k, v in own.items()}
    swapped = {
        k: own[k.removesuffix("_reverse") if k.endswith("_reverse") else k + "_reverse"] for k in own
    }  # views of the module's memory, the directions swapped
    weightport.load(gru, swapped)
    for k, v in gru.state_dict().items():
        other = k.removesuffix("_reverse") if k.endswith("_reverse") else k + "_reverse"
        assert torch.equal(v, expected[other]), k
    linear = torch.nn.Linear(3, 3, bias=False)
    w = linear.weight.detach().clone()
    weightport.load(linear, {"weight": linear.weight.detach().numpy().T})
    assert torch.equal(linear.weight, w.T)


@pytest.mark.parametrize("value", [np.array([1e300 + 2j, 1]), np.array([1e300, 1.0])])
def test_values_beyond_complex64s_range_are_refused(value: np.ndarray) -> None:
    """A complex target's parts are floats: 1e300 into complex64 became inf without a word."""

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("z", torch.zeros(2, dtype=torch.complex64))

    module = Holder()
    with pytest.raises(
        weightport.LoadError, match=r"outside complex64's range.*module.to\(torch.complex128\)"
    ):
        weightport.load(module, {"z": value})
    assert not module.z.any()
    weightport.load(module, {"z": np.array([3e38 + 1j, 1])})  # within range: loads
    assert module.z[0].real.item() == np.float32(3e38)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_an_integer_zero_is_refused_by_a_float_without_zero(dtype: type) -> None:
    """float8_e8m0fnu holds powers of two only: torch makes 0 into 2**-127, which cast back is 0 again."""

    class Scales(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(4, dtype=torch.float8_e8m0fnu))

    module = Scales()
    with pytest.raises(weightport.LoadError, match=r"cannot hold exactly \(first at index \(0,\)"):
        weightport.load(module, {"scale": np.array([0, 1, 2, 4], dtype)})
    weightport.load(module, {"scale": np.array([8, 1, 2, 4], dtype)})
    assert module.scale.float().tolist() == [8.0, 1.0, 2.0, 4.0]


def test_allow_nonfinite_takes_one_name_as_a_name_and_refuses_what_is_not_a_choice() -> None:
    source = {"weight": np.full((2, 2), np.nan, np.float32), "bias": np.zeros(2, np.float32)}
    linear = torch.nn.Linear(2, 2)
    weightport.load(linear, source, allow_nonfinite="weight")  # was read letter by letter
    assert torch.isnan(linear.weight).all()
    with pytest.raises(weightport.LoadError, match=r"'allow_nonfinite': expected True, False, or a set"):
        weightport.load(linear, source, allow_nonfinite=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mapping", [{"shared": ["l1", "l2"]}, [("shared", "l1")], {"shared": None}], ids=["list", "pairs", "none"]
)
def test_a_mapping_that_is_not_names_to_paths_is_refused_as_such(mapping: object) -> None:
    linear = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    source = {"weight": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
    with pytest.raises(weightport.LoadError, match=r"'mapping': expected a dict of one source layer"):
        weightport.load(linear, source, mapping=mapping)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_a_name_like_a_non_persistent_buffer_is_not_said_to_be_given() -> None:
    """An old checkpoint holding a buffer the module now computes (``rotary_emb.inv_freq``, persistent=False)
    under another path: the fix names the buffer as one checkpoints leave out, not as one the source gives."""
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(2, 2)
    model.rotary = torch.nn.Module()
    model.rotary.register_buffer("inv_freq", torch.ones(2), persistent=False)
    source = {"proj.weight": np.ones((2, 2)), "proj.bias": np.ones(2), "layer.rotary.inv_freq": np.ones(2)}
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(model, source)
    fix = caught.value.problems[0].fix
    assert "'rotary.inv_freq', a buffer the module computes itself" in fix and "gives already" not in fix, fix


def test_old_norm_names_gamma_and_beta_fill_a_norms_weight_and_bias() -> None:
    """Old TensorFlow-born checkpoints (BERT's ``LayerNorm.gamma``) load as transformers loads them; a module
    of another kind keeps its own names (its ``gamma`` is not a norm's weight)."""
    rng = np.random.default_rng(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    true = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in model.state_dict().items()}
    true["2.running_var"] = np.abs(true["2.running_var"])
    true["2.num_batches_tracked"] = np.array(0)
    old = {k.replace(".weight", ".gamma") if k[0] in "12" else k: v for k, v in true.items()}
    old = {k.replace(".bias", ".beta") if k[0] in "12" else k: v for k, v in old.items()}
    assert "1.gamma" in old and "2.beta" in old
    report = weightport.load(model, old)
    for name, value in true.items():
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), value)
    assert {r.target: r.origin for r in report.rows}["1.weight"].endswith("'1.gamma'")

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    with pytest.raises(weightport.LoadError, match="'gamma'"):
        weightport.load(Scaled(), {"gamma": np.ones(4, np.float32)})


def test_long_doubles_are_refused_before_anything_is_written() -> None:
    linear = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    source = {"weight": np.ones((2, 2), np.longdouble), "bias": np.zeros(2, np.longdouble)}
    for check in (True, False):
        with pytest.raises(weightport.LoadError, match="long double"):
            weightport.load(linear, source, check_values=check)
        assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_quantized_modules_are_refused_for_what_they_are() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized tensors
        quantized = torch.ao.nn.quantized.Linear(3, 2)
    with pytest.raises(weightport.LoadError, match="the state of a quantized module"):
        weightport.load(quantized, {"scale": np.array(1.0)}, strict=False)
    with pytest.raises(weightport.WeightportError, match="the state of a quantized module"):
        weightport.to_numpy(quantized)
    holder = torch.nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is experimental
        holder.register_buffer("z", torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(weightport.WeightportError, match="complex32 tensor, a dtype NumPy cannot hold"):
        weightport.to_numpy(holder)


def test_an_npy_of_bfloat16_says_what_numpy_wrote(tmp_path: Path) -> None:
    """np.save writes an ml_dtypes array as raw void records: no pickle, and no type either."""
    np.save(tmp_path / "weight.npy", np.ones((2, 2), ml_dtypes.bfloat16))
    with pytest.raises(weightport.SourceError, match=r"raw 2-byte records.*save it as float32"):
        weightport.load(torch.nn.Linear(2, 2, bias=False), tmp_path)


def test_a_missing_tensor_whose_file_is_a_link_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    np.save(folder / "weight.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "elsewhere.npy", np.zeros(2, np.float32))
    os.symlink(tmp_path / "elsewhere.npy", folder / "bias.npy")
    with pytest.raises(weightport.LoadError, match=r"'bias'.*set aside bias.npy \(a link: not followed\)"):
        weightport.load(torch.nn.Linear(3, 2), folder)


def test_a_mapping_key_the_source_lacks_is_refused() -> None:
    """It was silently ignored: the user's renaming did nothing."""
    source = {"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    with pytest.raises(
        weightport.WeightportError, match=r"mapping names 'wieght' \(did you mean 'weight'\?\)"
    ):
        weightport.load(torch.nn.Linear(2, 2), source, mapping={"wieght": "weight"})


@pytest.mark.parametrize("from_file", [False, True])
def test_a_channels_last_module_built_on_meta_keeps_its_memory_format(
    tmp_path: Path, from_file: bool
) -> None:
    rng = np.random.default_rng(0)
    arrays = {"weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "bias": np.zeros(4, np.float32)}
    source: object = arrays
    if from_file:
        source = weightport.save(arrays, tmp_path / "conv.safetensors")
    with torch.device("meta"):
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    weightport.load(conv, source)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(conv.weight.detach().numpy(), arrays["weight"])
    arrays["weight"][1, 2, 0, 1] = np.nan
    if from_file:
        source = weightport.save(arrays, tmp_path / "conv.safetensors")
    with torch.device("meta"):
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with pytest.raises(weightport.LoadError, match=r"NaN/Inf value \(first at index \(1, 2, 0, 1\)"):
        weightport.load(conv, source)
    assert conv.weight.is_meta


def test_one_source_name_is_never_offered_as_the_rename_of_two_tensors() -> None:
    """Two tensors lacking a value, one unknown name close to both: only its closest takes the rename."""
    model = nn.Module()
    model.pos_key_proj = nn.Linear(2, 2)
    model.pos_query_proj = nn.Linear(2, 2)
    arrays = {f"pos_key_proj.{k}": v.numpy() for k, v in model.pos_key_proj.state_dict().items()}
    arrays |= {f"pos_q_proj.{k}": v.numpy() for k, v in model.pos_query_proj.state_dict().items()}
    with pytest.raises(LoadError) as info:
        weightport.load(model, {k: v for k, v in arrays.items() if not k.startswith("pos_key_proj")})
    fixes = {p.name: p.fix for p in info.value.problems}
    assert (
        fixes["pos_query_proj.weight"]
        == "the source has 'pos_q_proj.weight': rename it to 'pos_query_proj.weight'"
    )
    assert "pos_q_proj" not in fixes["pos_key_proj.weight"]


def test_a_load_pauses_the_cyclic_gc_and_restores_it_as_it_was() -> None:
    """A full collection set off inside a load walks every object of the process; the load pauses it and
    leaves it as it found it, enabled or not, after success and after a refusal."""
    import gc

    seen: list[bool] = []
    lin = torch.nn.Linear(2, 2)
    good = {"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    original = weightport.loading.LocalWrite.read

    def read(self: object) -> None:
        seen.append(gc.isenabled())
        original(self)  # type: ignore[arg-type]

    weightport.loading.LocalWrite.read = read  # type: ignore[method-assign]
    try:
        assert gc.isenabled()
        weightport.load(lin, good)
        assert gc.isenabled() and seen == [False]
        with pytest.raises(weightport.WeightportError):
            weightport.load(lin, {"weight": np.ones((3, 3), np.float32)})
        assert gc.isenabled()
        gc.disable()
        weightport.load(lin, good)
        assert not gc.isenabled()
    finally:
        gc.enable()
        weightport.loading.LocalWrite.read = original  # type: ignore[method-assign]
