"""weightport.rnn: per-layer, per-direction and per-gate set/get for every RNN kind and option."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from conftest import snapshot
from weightport import LoadError
from weightport.rnn import gates_of, get_layer, param_name, set_layer

KINDS = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}
CELLS = {"RNN": nn.RNNCell, "LSTM": nn.LSTMCell, "GRU": nn.GRUCell}


def build(
    kind: str, layers: int = 2, bidirectional: bool = True, bias: bool = True, proj: int = 0
) -> nn.Module:
    extra = {"proj_size": proj} if proj else {}
    return KINDS[kind](3, 4, num_layers=layers, bidirectional=bidirectional, bias=bias, **extra)


OPTIONS = [
    (kind, layers, bidi, bias, proj)
    for kind, layers, bidi, bias in itertools.product(KINDS, (1, 2), (False, True), (True, False))
    for proj in ((0, 2) if kind == "LSTM" else (0,))
]


@pytest.mark.parametrize(("kind", "layers", "bidi", "bias", "proj"), OPTIONS)
def test_set_then_get_every_layer_direction_and_gate(
    kind: str, layers: int, bidi: bool, bias: bool, proj: int
) -> None:
    module = build(kind, layers, bidi, bias, proj)
    rng = np.random.default_rng(0)
    for layer, reverse in itertools.product(range(layers), (False, True) if bidi else (False,)):
        current = get_layer(module, layer, reverse=reverse)
        new = {role: rng.standard_normal(value.shape).astype(np.float32) for role, value in current.items()}
        set_layer(module, layer, reverse=reverse, **new)
        back = get_layer(module, layer, reverse=reverse)
        assert set(back) == set(new)
        for role in new:
            np.testing.assert_array_equal(back[role], new[role])
            name = param_name(module, role, layer, reverse=reverse)
            np.testing.assert_array_equal(getattr(module, name).detach().numpy(), new[role])
        gates = get_layer(module, layer, reverse=reverse, gates=True)
        letters = gates_of(module)
        for role, value in gates.items():
            if role == "weight_hr" or letters == ("",):
                np.testing.assert_array_equal(value, new[role])
            else:
                np.testing.assert_array_equal(np.concatenate([value[g] for g in letters]), new[role])


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_by_gate(kind: str) -> None:
    cell = CELLS[kind](3, 4)
    letters = gates_of(cell)
    if letters == ("",):
        set_layer(cell, weight_ih=np.ones((4, 3)))
        assert get_layer(cell)["weight_ih"].sum() == 12
        return
    blocks = {g: np.full((4, 3), i, np.float32) for i, g in enumerate(letters)}
    set_layer(cell, weight_ih=blocks, bias_hh={letters[-1]: np.full(4, 7.0)})
    back = get_layer(cell, gates=True)
    for g in letters:
        np.testing.assert_array_equal(back["weight_ih"][g], blocks[g])
    np.testing.assert_array_equal(back["bias_hh"][letters[-1]], np.full(4, 7.0, np.float32))


def test_partial_gates_keep_the_others() -> None:
    lstm = nn.LSTM(3, 4)
    before = get_layer(lstm, 0, gates=True)
    set_layer(lstm, 0, bias_ih={"f": np.ones(4)})
    after = get_layer(lstm, 0, gates=True)
    np.testing.assert_array_equal(after["bias_ih"]["f"], np.ones(4, np.float32))
    for g in "igo":
        np.testing.assert_array_equal(after["bias_ih"][g], before["bias_ih"][g])


def test_shape_error_in_module_terms_and_nothing_written() -> None:
    lstm = nn.LSTM(3, 4)
    before = snapshot(lstm)
    with pytest.raises(LoadError) as info:
        set_layer(lstm, 0, weight_hh=np.zeros((16, 4)), weight_ih=np.zeros((16, 4)))
    message = str(info.value)
    assert (
        "'weight_ih_l0': expected shape (16, 3) = (4*hidden_size, input_size) of LSTM(input_size=3, hidden_size=4)"
        in message
    )
    assert "found shape (16, 4)" in message
    assert snapshot(lstm) == before


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (nn.LSTM(3, 4), {"layer": 1, "weight_ih": np.zeros((16, 3))}, "layer 1 does not exist"),
        (nn.LSTM(3, 4), {"reverse": True, "weight_ih": np.zeros((16, 3))}, "needs a bidirectional module"),
        (nn.GRU(3, 4, bias=False), {"bias_ih": np.zeros(12)}, "bias=False"),
        (nn.LSTM(3, 4), {"weight_hr": np.zeros((2, 4))}, "proj_size=0"),
        (nn.GRU(3, 4), {"weight_ih": {"i": np.zeros((4, 3))}}, "gate letters r, z, n"),
        (nn.LSTM(3, 4), {"weight_ih": {"f": np.zeros((4, 4))}}, r"'weight_ih_l0\[gate f\]'"),
        (nn.RNN(3, 4), {"weight_ih": {"r": np.zeros((4, 3))}}, "it has no gates"),
    ],
)
def test_structure_errors(module: nn.Module, kwargs: dict, message: str) -> None:
    before = snapshot(module)
    with pytest.raises(LoadError, match=message):
        set_layer(module, **kwargs)
    assert snapshot(module) == before


def test_gate_shape_error_names_the_dims() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    with pytest.raises(LoadError) as info:
        set_layer(lstm, 0, weight_ih={"f": np.zeros((4, 4))})
    assert str(info.value).splitlines()[1] == (
        "  - 'weight_ih_l0[gate f]': expected shape (4, 3) = (hidden_size, input_size) of "
        "LSTM(input_size=3, hidden_size=4, proj_size=2, bidirectional=True), found shape (4, 4). "
        "Fix: pass one gate's block of shape (4, 3)."
    )
    cases = [
        (1, "weight_ih", (4, 4), "(hidden_size, 2*proj_size)"),
        (1, "weight_hh", (4, 2), "(hidden_size, proj_size)"),
        (0, "bias_hh", (4,), "(hidden_size,)"),
    ]
    for layer, role, shape, dims in cases:
        wanted = f"gate o]': expected shape {shape} = {dims} of LSTM("
        with pytest.raises(LoadError, match=re.escape(wanted)):
            set_layer(lstm, layer, **{role: {"o": np.zeros((1, 1))}})


def test_meta_module_with_every_gate_given() -> None:
    with torch.device("meta"):
        lstm = nn.LSTM(3, 4)
    bias_hh = {"i": np.zeros(4), "f": np.ones(4), "g": np.full(4, 2.0), "o": np.full(4, 3.0)}
    report = set_layer(
        lstm, 0, weight_ih=np.ones((16, 3)), weight_hh=np.ones((16, 4)), bias_ih=np.zeros(16), bias_hh=bias_hh
    )
    assert report.written == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert not any(p.is_meta for p in lstm.parameters())
    np.testing.assert_array_equal(
        lstm.bias_hh_l0.detach().numpy(), np.repeat(np.arange(4.0, dtype=np.float32), 4)
    )


def test_meta_module_with_gates_missing_is_refused() -> None:
    with torch.device("meta"):
        gru = nn.GRU(3, 4)
    with pytest.raises(LoadError) as info:
        set_layer(gru, 0, bias_ih={"z": np.ones(4)}, weight_ih=np.ones((12, 3)))
    assert [p.name for p in info.value.problems] == ["bias_ih_l0"]
    assert str(info.value.problems[0]) == (
        "'bias_ih_l0': expected every gate r, z, n (it is on the meta device: the gates not given have no "
        "values), found only z; missing r, n. Fix: give every gate, or build the module off meta."
    )
    assert all(p.is_meta for p in gru.parameters())


def test_allow_nonfinite_is_passed_to_the_load() -> None:
    lstm = nn.LSTM(3, 4)
    with pytest.raises(LoadError, match="allow_nonfinite=True"):
        set_layer(lstm, 0, bias_ih={"f": np.full(4, np.nan)})
    set_layer(lstm, 0, bias_ih={"f": np.full(4, np.nan)}, allow_nonfinite={"bias_ih_l0"})
    assert np.isnan(get_layer(lstm, 0, gates=True)["bias_ih"]["f"]).all()
    with pytest.raises(TypeError):
        set_layer(lstm, 0, None, None, None, np.zeros(16), None, None, True)  # type: ignore[misc]


def test_report_lists_only_what_was_set() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    report = set_layer(lstm, 1, reverse=True, bias_ih={"f": np.ones(4)})
    assert report.written == ["bias_ih_l1_reverse"]
    assert report.missing == []
    assert "Missing" not in str(report)


WRAPPERS = {
    "compile": lambda m: torch.compile(m, backend="eager"),
    "DataParallel": nn.DataParallel,
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_wrapped_modules(wrap: str) -> None:
    lstm = nn.LSTM(3, 4, num_layers=2)
    wrapped = WRAPPERS[wrap](lstm)
    assert gates_of(wrapped) == ("i", "f", "g", "o")
    assert param_name(wrapped, "bias_ih", 1) == "bias_ih_l1"
    report = set_layer(wrapped, 1, bias_ih={"f": np.ones(4)})
    assert report.written == ["bias_ih_l1"] and report.module == "LSTM"
    np.testing.assert_array_equal(lstm.bias_ih_l1.detach().numpy()[4:8], np.ones(4, np.float32))
    np.testing.assert_array_equal(get_layer(wrapped, 1)["bias_ih"], lstm.bias_ih_l1.detach().numpy())


def test_non_rnn_is_refused() -> None:
    with pytest.raises(TypeError, match="use weightport.load"):
        get_layer(nn.Linear(2, 2))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(list(KINDS)),
    input_size=st.integers(1, 5),
    hidden=st.integers(1, 5),
    layers=st.integers(1, 3),
    bidi=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_load_then_read_back_equals_input(
    kind, input_size, hidden, layers, bidi, bias, seed
) -> None:  # type: ignore[no-untyped-def]
    module = KINDS[kind](input_size, hidden, num_layers=layers, bidirectional=bidi, bias=bias)
    rng = np.random.default_rng(seed)
    arrays = {n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in module.named_parameters()}
    weightport.load(module, arrays)
    back = weightport.to_numpy(module)
    assert set(back) == set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
    x = torch.from_numpy(rng.standard_normal((4, 2, input_size)).astype(np.float32))
    assert weightport.verify(module, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "gate", [np.full(4, 2**24 + 1, np.int64), np.full(4, 1 + 5j), np.full(4, 1e300), np.array(["a"] * 4)]
)
def test_a_gate_given_alone_is_checked_as_a_whole_tensor_would_be(gate: np.ndarray) -> None:
    """The gates were put together in float64 first: an int rounded, a complex lost its imaginary part."""
    lstm = torch.nn.LSTM(3, 4)
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    with pytest.raises(weightport.WeightportError):
        set_layer(lstm, 0, bias_ih=np.concatenate([gate] * 4))
    with pytest.raises(weightport.WeightportError):
        set_layer(lstm, 0, bias_ih={"f": gate})
    assert all(torch.equal(before[k], v) for k, v in lstm.state_dict().items())


def test_gates_keep_a_bfloat16_modules_dtype() -> None:
    lstm = torch.nn.LSTM(3, 4).to(torch.bfloat16)
    set_layer(lstm, 0, bias_ih={"f": np.full(4, 0.5, np.float32)})
    assert lstm.bias_ih_l0.dtype == torch.bfloat16 and lstm.bias_ih_l0[4:8].float().tolist() == [0.5] * 4
