"""Fixes from a second probe of the core load path: two readings of a folder, legacy weight-norm names,
wrapper prefixes, export of odd tensors, failures while writing, and messages."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport import LoadError, SourceError
from weightport.export import write_safetensors


def _random_state(module: nn.Module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in module.state_dict().items()}


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_a_folder_with_shards_and_an_unlisted_file_of_the_same_names_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """model.safetensors beside an index and its shards holds the same names with other values: each is a
    reading of the model, so the folder is refused and both files listed; each listed file loads its own."""
    sharded, single = _random_state(_net(), 1), _random_state(_net(), 2)
    parts = {"model-00001-of-00002.safetensors": ["0.weight", "0.bias"]}
    parts["model-00002-of-00002.safetensors"] = ["2.weight", "2.bias"]
    for file_name, keys in parts.items():
        write_safetensors({k: sharded[k] for k in keys}, tmp_path / file_name)
    weight_map = {k: f for f, keys in parts.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_safetensors(single, tmp_path / "model.safetensors")
    model = _net()
    before = snapshot(model)
    with pytest.raises(
        SourceError, match=r"2 weights files \(model.safetensors.index.json, model.safetensors\)"
    ):
        weightport.load(model, tmp_path)
    assert snapshot(model) == before
    x = torch.randn(3, 4)
    for given, state in (("model.safetensors.index.json", sharded), ("model.safetensors", single)):
        weightport.load(model, tmp_path / given)  # the fix, followed
        reference = _net()
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


class _ScaleTimesDirection(nn.Module):
    """weight = g * v: two originals, like weight norm's, but not weight norm."""

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g * v

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(w.shape[0], 1), w


def _legacy_weight_norm_state() -> tuple[nn.Module, dict[str, np.ndarray]]:
    torch.manual_seed(4)
    with pytest.warns(FutureWarning):  # torch.nn.utils.weight_norm is deprecated: the old names' source
        old = nn.utils.weight_norm(nn.Linear(4, 3))
    with torch.no_grad():
        old.weight_g.uniform_(0.5, 2.0)
        old.bias.uniform_(-1.0, 1.0)
    return old, {k: v.detach().numpy().copy() for k, v in old.state_dict().items()}


def test_legacy_weight_norm_names_go_only_into_torchs_weight_norm() -> None:
    old, state = _legacy_weight_norm_state()
    x = torch.randn(5, 4)
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    weightport.load(normed, state)
    torch.testing.assert_close(normed(x), old(x), rtol=0, atol=0)
    for extra in (False, True):
        other = nn.Linear(4, 3)
        if extra:  # weight norm with another parametrization after it: the names no longer mean the same
            nn.utils.parametrizations.weight_norm(other)
            nn.utils.parametrize.register_parametrization(other, "weight", nn.Identity())
        else:
            nn.utils.parametrize.register_parametrization(other, "weight", _ScaleTimesDirection())
        before = snapshot(other)
        with pytest.raises(LoadError, match="'weight_g': expected a name the module has"):
            weightport.load(other, state)
        assert snapshot(other) == before


class _WithModule(nn.Module):
    """A model with a submodule called ``module`` beside tensors of its own: a DataParallel checkpoint of it
    holds names the model has both with and without the prefix."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.randn(4)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x) @ self.weight
        return out if self.bias is None else out + self.bias


def test_a_wrapper_prefix_is_dropped_by_the_reading_that_places_every_name() -> None:
    torch.manual_seed(5)
    trained = _WithModule()
    state = {k: v.detach().numpy().copy() for k, v in nn.DataParallel(trained).state_dict().items()}
    x = torch.randn(3, 4)
    for strict in (True, False):
        model = _WithModule()
        report = weightport.load(model, state, strict=strict)
        assert not report.missing and not report.ignored
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def test_two_partial_readings_of_a_wrapper_prefix_are_refused_and_the_fix_works() -> None:
    torch.manual_seed(6)
    trained = _WithModule()
    state = {k: v.detach().numpy().copy() for k, v in nn.DataParallel(trained).state_dict().items()}
    del state[
        "module.module.bias"
    ]  # as they are: 'module.weight', 'module.bias' fit; without: all but 'bias'
    for strict in (True, False):
        model = _WithModule(bias=False)
        before = snapshot(model)
        with pytest.raises(weightport.LayoutError, match="read 2 ways") as caught:
            weightport.load(model, state, strict=strict)
        assert snapshot(model) == before
        assert "as they are, 2 of 3" in str(caught.value) and "without 'module.', 2 of 3" in str(caught.value)
    names = list(weightport.open_source(state).infos)
    model = _WithModule(bias=False)
    expected = copy.deepcopy(model)
    report = weightport.load(
        model, state, mapping={n: n.removeprefix("module.") for n in names}, strict=False
    )
    assert report.ignored == ["module.bias"] and report.missing == [
        "module.bias"
    ]  # the source's name; the model's
    stripped = {k.removeprefix("module."): torch.from_numpy(v) for k, v in state.items()}
    expected.load_state_dict(
        {k: v for k, v in stripped.items() if k != "bias"}, strict=False
    )  # torch's own load
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def test_a_lazy_modules_uninitialized_parameters_are_refused_with_a_fix_that_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lazy = nn.LazyLinear(3)
    for export in (
        lambda: weightport.to_numpy(lazy),
        lambda: weightport.save(lazy, tmp_path / "a.safetensors"),
    ):
        with pytest.raises(SourceError, match="'weight': an uninitialized parameter of a lazy module"):
            export()
    assert not (tmp_path / "a.safetensors").exists()
    x = torch.randn(2, 5)
    lazy(x)  # the fix: one forward pass
    weightport.save(lazy, tmp_path / "a.safetensors")
    plain = nn.Linear(5, 3)
    weightport.load(plain, tmp_path / "a.safetensors")
    torch.testing.assert_close(plain(x), lazy(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_dict_of_torch_tensors_saves_bit_for_bit(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(7)
    tensors = {
        "brain": torch.randn(3, 4).to(torch.bfloat16),
        "grad": torch.randn(5, requires_grad=True),
        "float8": torch.randn(6).to(torch.float8_e4m3fn),
    }
    path = weightport.save(tensors, tmp_path / f"t{suffix}")

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, t in tensors.items():
                self.register_buffer(name, torch.zeros(t.shape, dtype=t.dtype))

    holder = Holder()
    weightport.load(holder, path)
    for name, t in tensors.items():
        got = getattr(holder, name)
        assert got.dtype == t.dtype
        assert torch.equal(got.view(torch.uint8), t.detach().view(torch.uint8))


def _fail_nth_compressed_read(monkeypatch, n: int, error: BaseException) -> None:  # type: ignore[no-untyped-def]
    from weightport.sources import npz as reader

    calls = {"n": 0}
    original = reader.NpzSource._read_compressed

    def flaky(self, name, member, out):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(self, name, member, out)

    monkeypatch.setattr(reader.NpzSource, "_read_compressed", flaky)


def test_an_interrupt_raised_while_writing_puts_back_what_was_written(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not a SIGINT (held until writing ends) but a KeyboardInterrupt raised inside the writing loop: the
    tensors written before it had undo copies, and are put back."""
    model = _net()
    state = _random_state(model, 8)
    np.savez_compressed(tmp_path / "w.npz", **state)
    _fail_nth_compressed_read(monkeypatch, len(state) + 3, KeyboardInterrupt())  # the 3rd read of the writes
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        weightport.load(model, tmp_path / "w.npz")
    assert snapshot(model) == before


def test_a_failure_that_is_no_read_of_the_source_is_not_blamed_on_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from weightport import apply

    model = _net()
    state = _random_state(model, 9)
    calls = {"n": 0}
    original = apply.copy_into

    def short_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("no room")
        return original(*args, **kwargs)

    monkeypatch.setattr(apply, "copy_into", short_of_memory)
    with pytest.raises(MemoryError, match="no room") as caught:
        weightport.load(model, state)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "changed while it was being read" not in notes
    assert (
        "writing '2.weight' from the given mapping" in notes
        and "2 tensors written in full and '2.weight' in part" in notes
    )
    # the two written before it hold the source's values: what the note says is so
    assert np.array_equal(model[0].weight.detach().numpy(), state["0.weight"])


def test_a_progress_bar_whose_stderr_fails_does_not_fail_the_load(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tqdm")
    import io
    import sys

    class BrokenPipe(io.TextIOBase):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", BrokenPipe())
    model = _net()
    state = _random_state(model, 10)
    weightport.load(model, state, progress=True)
    for name, value in weightport.to_numpy(model).items():
        np.testing.assert_array_equal(value, state[name])


def test_a_structured_npy_is_called_what_it_is_and_its_fix_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    records = np.zeros(3, [("weight", "<f4", (4,)), ("bias", "<f4")])
    records["weight"], records["bias"] = rng.standard_normal((3, 4)), rng.standard_normal(3)
    np.save(tmp_path / "records.npy", records)
    with pytest.raises(SourceError, match=r"structured records \(fields 'weight', 'bias'\)") as caught:
        weightport.load(nn.Linear(4, 3), tmp_path / "records.npy")
    assert "bfloat16" not in str(caught.value)
    linear = nn.Linear(4, 3)
    weightport.load(linear, {name: records[name] for name in records.dtype.names})  # the fix it names
    assert np.array_equal(linear.weight.detach().numpy(), records["weight"])
    assert np.array_equal(linear.bias.detach().numpy(), records["bias"])


def test_an_ml_dtypes_int4_array_is_called_int4_and_its_fix_works() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(12).integers(-8, 8, size=6).astype(ml_dtypes.int4)
    holder = nn.Module()
    holder.register_buffer("codes", torch.zeros(6, dtype=torch.int8))
    with pytest.raises(SourceError, match=r"'codes': holds int4 values.*astype\(np.int8\)") as caught:
        weightport.load(holder, {"codes": values})
    assert "raw records" not in str(caught.value)
    weightport.load(holder, {"codes": values.astype(np.int8)})
    assert holder.codes.tolist() == [int(v) for v in values]


def test_an_overflow_message_shows_the_value_past_the_limit() -> None:
    limit = float(torch.finfo(torch.float32).max)
    value = float(np.nextafter(limit, np.inf) * (1 + 2**-24))  # past float32's max by more than half an ulp
    assert torch.isinf(torch.tensor(value, dtype=torch.float64).float())  # torch's own cast overflows
    with pytest.raises(LoadError, match="outside float32's range") as caught:
        weightport.load(nn.Linear(1, 1), {"weight": np.array([[value]]), "bias": np.zeros(1)})
    import re

    shown, bound = re.search(r"value (\S+) outside float32's range \(±(\S+)\)", str(caught.value)).groups()  # type: ignore[union-attr]
    assert float(shown) > float(bound)


def test_a_tie_given_two_values_names_where_they_first_differ() -> None:
    tied = nn.Module()
    tied.emb, tied.head = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
    tied.head.weight = tied.emb.weight
    rng = np.random.default_rng(13)
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = a.copy()
    b[2, 1] += 1.0
    b[3, 0] -= 1.0
    with pytest.raises(LoadError) as caught:
        weightport.load(tied, {"emb.weight": a, "head.weight": b})
    assert f"2 elements differ, the first at index (2, 1): {float(b[2, 1])!r} and {float(a[2, 1])!r}" in str(
        caught.value
    )


def test_a_load_without_value_checks_says_its_values_were_not_checked() -> None:
    holder = nn.Module()
    holder.register_buffer("counts", torch.zeros(2, dtype=torch.int32))
    source = {"counts": np.array([2**40 + 3, 7])}  # int32 cannot hold 2**40 + 3: the cast wraps it
    report = weightport.load(holder, source, check_values=False)
    assert (
        holder.counts.tolist()
        == torch.from_numpy(source["counts"]).to(torch.int32).tolist()
        != [2**40 + 3, 7]
    )
    for text in (report.summary(), str(report), report.table()):
        assert "Values not checked (check_values=False)" in text
    with pytest.raises(LoadError, match="int32 cannot hold exactly"):
        weightport.load(holder, source)
    checked = weightport.load(holder, {"counts": np.array([3, 7])})
    assert "Values not checked" not in checked.summary() and "Values not checked" not in str(checked)
