"""weightport.reference.forward against PyTorch's own forward, for every kind and option."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from weightport.errors import LayoutError, WeightportError
from weightport.reference import SUPPORTED, forward

# torch's float32 LSTM with proj_size says it falls back from oneDNN: a note about speed, not results.
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
INPUT, HIDDEN, PROJ, SEQ, BATCH = 3, 5, 2, 5, 2

SEQUENCE_KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
CELL_KINDS = ["rnn_cell_tanh", "rnn_cell_relu", "lstm_cell", "gru_cell"]


def make(
    kind: str,
    *,
    dtype: torch.dtype = torch.float64,
    input_size: int = INPUT,
    hidden_size: int = HIDDEN,
    proj_size: int = PROJ,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """A module of ``kind`` with PyTorch's default init (seeded) and non-zero biases, in eval mode."""
    torch.manual_seed(seed)
    sizes = {"input_size": input_size, "hidden_size": hidden_size, "dtype": dtype}
    builders = {
        "rnn_tanh": lambda: nn.RNN(nonlinearity="tanh", **sizes, **options),
        "rnn_relu": lambda: nn.RNN(nonlinearity="relu", **sizes, **options),
        "lstm": lambda: nn.LSTM(**sizes, **options),
        "lstm_proj": lambda: nn.LSTM(proj_size=proj_size, **sizes, **options),
        "gru": lambda: nn.GRU(**sizes, **options),
        "rnn_cell_tanh": lambda: nn.RNNCell(nonlinearity="tanh", **sizes, **options),
        "rnn_cell_relu": lambda: nn.RNNCell(nonlinearity="relu", **sizes, **options),
        "lstm_cell": lambda: nn.LSTMCell(**sizes, **options),
        "gru_cell": lambda: nn.GRUCell(**sizes, **options),
    }
    module = builders[kind]().eval()
    for name, param in module.named_parameters():
        if name.startswith("bias"):
            assert bool((param != 0).all()), name
    return module


def random_inputs(
    module: nn.Module, *, batch: int = BATCH, seq: int = SEQ, unbatched: bool = False, with_hx: bool = False
) -> tuple[np.ndarray, Any]:
    """A random input for ``module`` and, if asked, random initial states, in its dtype."""
    rng = np.random.default_rng(1)
    dtype = next(module.parameters()).detach().numpy().dtype
    cell = isinstance(module, nn.RNNCellBase)
    if cell:
        lead: tuple[int, ...] = () if unbatched else (batch,)
    elif unbatched:
        lead = (seq,)
    else:
        lead = (batch, seq) if module.batch_first else (seq, batch)
    x = rng.standard_normal((*lead, module.input_size)).astype(dtype)
    if not with_hx:
        return x, None
    if cell:
        shape: tuple[int, ...] = (module.hidden_size,) if unbatched else (batch, module.hidden_size)
        h_shape = c_shape = shape
    else:
        count = module.num_layers * (2 if module.bidirectional else 1)
        mid = () if unbatched else (batch,)
        h_shape = (count, *mid, module.proj_size or module.hidden_size)
        c_shape = (count, *mid, module.hidden_size)
    h = rng.standard_normal(h_shape).astype(dtype)
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return x, (h, rng.standard_normal(c_shape).astype(dtype))
    return x, h


def _to_torch(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_to_torch(v) for v in value)
    return torch.from_numpy(value)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in _flatten(v)]
    return [value]


def _structure(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_structure(v) for v in value)
    return "leaf"


def check(module: nn.Module, x: np.ndarray, hx: Any = None) -> float:
    """Assert the reference matches ``module``'s own forward; return the max abs error."""
    with torch.no_grad():
        expected = module(_to_torch(x), _to_torch(hx))
    ours = forward(module, x, hx)
    assert _structure(ours) == _structure(expected)
    dtype = next(module.parameters()).dtype
    error = 0.0
    for mine, theirs in zip(_flatten(ours), _flatten(expected), strict=True):
        assert isinstance(mine, np.ndarray)
        assert mine.shape == tuple(theirs.shape)
        assert mine.dtype == theirs.numpy().dtype
        if mine.size:
            error = max(error, float(np.abs(mine - theirs.numpy()).max()))
    assert error < TOLERANCE[dtype], error
    return error


# ---------------------------------------------------------------- sequences


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_layers_and_directions(kind: str, num_layers: int, bidirectional: bool, dtype: torch.dtype) -> None:
    module = make(kind, dtype=dtype, num_layers=num_layers, bidirectional=bidirectional)
    check(module, *random_inputs(module, with_hx=True))


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_options(kind: str, batch_first: bool, unbatched: bool, bias: bool, with_hx: bool) -> None:
    module = make(kind, num_layers=2, bidirectional=True, batch_first=batch_first, bias=bias)
    check(module, *random_inputs(module, unbatched=unbatched, with_hx=with_hx))


def test_lstm_projection_shapes() -> None:
    module = make("lstm_proj", num_layers=2, bidirectional=True, batch_first=True)
    x, hx = random_inputs(module, with_hx=True)
    out, (h_n, c_n) = forward(module, x, hx)
    assert out.shape == (BATCH, SEQ, 2 * PROJ)
    assert h_n.shape == (4, BATCH, PROJ)
    assert c_n.shape == (4, BATCH, HIDDEN)


def test_zero_initial_state_is_the_default() -> None:
    module = make("lstm", num_layers=2)
    x, _ = random_inputs(module)
    zeros = (np.zeros((2, BATCH, HIDDEN)), np.zeros((2, BATCH, HIDDEN)))
    default, given_zeros = forward(module, x), forward(module, x, zeros)
    for a, b in zip(_flatten(default), _flatten(given_zeros), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reverse_direction_runs_backwards() -> None:
    # The reverse half of a bidirectional layer equals a forward layer run on the flipped sequence.
    module = make("gru", bidirectional=True)
    x, _ = random_inputs(module)
    out, h_n = forward(module, x)
    backward = make("gru", seed=1)
    with torch.no_grad():
        backward.weight_ih_l0.copy_(module.weight_ih_l0_reverse)
        backward.weight_hh_l0.copy_(module.weight_hh_l0_reverse)
        backward.bias_ih_l0.copy_(module.bias_ih_l0_reverse)
        backward.bias_hh_l0.copy_(module.bias_hh_l0_reverse)
    flipped_out, flipped_h = forward(backward, x[::-1])
    np.testing.assert_allclose(out[:, :, HIDDEN:], flipped_out[::-1], atol=1e-12)
    np.testing.assert_allclose(h_n[1], flipped_h[0], atol=1e-12)


def test_dropout_is_ignored_as_in_eval_mode() -> None:
    module = make("lstm", num_layers=3, dropout=0.5)
    check(module, *random_inputs(module))


# ---------------------------------------------------------------- cells


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cells(kind: str, unbatched: bool, bias: bool, with_hx: bool, dtype: torch.dtype) -> None:
    module = make(kind, dtype=dtype, bias=bias)
    check(module, *random_inputs(module, unbatched=unbatched, with_hx=with_hx))


# ---------------------------------------------------------------- inputs and outputs


def test_accepts_torch_tensors_and_returns_numpy() -> None:
    module = make("lstm", dtype=torch.float32)
    x, (h0, c0) = random_inputs(module, with_hx=True)
    out, (h_n, c_n) = forward(module, torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    expected, _ = forward(module, x, (h0, c0))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in (out, h_n, c_n))
    np.testing.assert_array_equal(out, expected)


def test_input_of_another_dtype_is_cast_to_the_parameters_dtype() -> None:
    module = make("gru", dtype=torch.float32)
    x, _ = random_inputs(module)
    out, h_n = forward(module, x.astype(np.float64))
    assert out.dtype == h_n.dtype == np.float32
    np.testing.assert_array_equal(out, forward(module, x)[0])


def test_reads_current_parameters_and_leaves_the_module_alone() -> None:
    module = make("rnn_tanh")
    before = copy.deepcopy(module.state_dict())
    x, _ = random_inputs(module)
    first, _ = forward(module, x)
    with torch.no_grad():
        module.weight_hh_l0.mul_(2)
    second, _ = forward(module, x)
    assert not np.allclose(first, second)
    check(module, x)
    with torch.no_grad():
        module.weight_hh_l0.div_(2)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_outputs_are_contiguous_copies() -> None:
    module = make("lstm", batch_first=True, bidirectional=True)
    out, (h_n, c_n) = forward(module, *random_inputs(module))
    assert all(a.flags.c_contiguous and a.flags.owndata for a in (out, h_n, c_n))


# ---------------------------------------------------------------- property test

KINDS = SEQUENCE_KINDS + CELL_KINDS


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(KINDS))
    hidden = draw(st.integers(2, 5))
    config: dict[str, Any] = {
        "kind": kind,
        "input_size": draw(st.integers(1, 4)),
        "hidden_size": hidden,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**16)),
        "bias": draw(st.booleans()),
    }
    if kind == "lstm_proj":
        config["proj_size"] = draw(st.integers(1, hidden - 1))
    if kind in SEQUENCE_KINDS:
        config["num_layers"] = draw(st.integers(1, 3))
        config["bidirectional"] = draw(st.booleans())
        config["batch_first"] = draw(st.booleans())
    return config


@settings(max_examples=25, deadline=None)
@given(
    config=configurations(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    unbatched=st.booleans(),
    with_hx=st.booleans(),
)
def test_matches_torch_for_random_configurations(
    config: dict[str, Any], batch: int, seq: int, unbatched: bool, with_hx: bool
) -> None:
    module = make(**config)
    check(module, *random_inputs(module, batch=batch, seq=seq, unbatched=unbatched, with_hx=with_hx))


# ---------------------------------------------------------------- errors


def test_unsupported_module_is_refused_with_the_supported_list() -> None:
    with pytest.raises(
        LayoutError,
        match=r"cannot run Linear: expected one of RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell "
        r"\(or a subclass\)",
    ):
        forward(nn.Linear(3, 4), np.zeros((2, 3)))
    assert SUPPORTED == ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="cannot run Conv1d") as info:
        forward(nn.Conv1d(1, 1, 1), np.zeros((1, 1, 1)))
    assert isinstance(info.value, WeightportError)


def test_wrong_input_size() -> None:
    module = make("lstm")
    with pytest.raises(
        LayoutError,
        match=r"expects input of shape \(seq, batch, 3\) or unbatched \(seq, 3\), found \(5, 2, 7\)\. "
        r"Check input_size",
    ):
        forward(module, np.zeros((5, 2, 7)))


def test_wrong_input_rank_mentions_batch_first() -> None:
    module = make("gru", batch_first=True)
    with pytest.raises(LayoutError, match=r"expects input of shape \(batch, seq, 3\) .* found \(3,\)"):
        forward(module, np.zeros(3))


def test_wrong_cell_input_size() -> None:
    with pytest.raises(
        LayoutError,
        match=r"GRUCell\(3, 5\) expects input of shape \(batch, 3\) or unbatched \(3,\), found \(2, 4\)",
    ):
        forward(make("gru_cell"), np.zeros((2, 4)))


def test_wrong_initial_state_shape() -> None:
    module = make("rnn_tanh", num_layers=2)
    with pytest.raises(LayoutError, match=r"expects h0 of shape \(2, 2, 5\) .* found \(1, 2, 5\)"):
        forward(module, np.zeros((SEQ, BATCH, INPUT)), np.zeros((1, BATCH, HIDDEN)))


def test_batched_state_for_unbatched_input_is_refused() -> None:
    module = make("lstm")
    state = (np.zeros((1, 1, HIDDEN)), np.zeros((1, 1, HIDDEN)))
    with pytest.raises(LayoutError, match=r"expects h0 of shape \(1, 5\) for this unbatched input"):
        forward(module, np.zeros((SEQ, INPUT)), state)


def test_projected_lstm_wants_c0_of_hidden_size() -> None:
    module = make("lstm_proj")
    state = (np.zeros((1, BATCH, PROJ)), np.zeros((1, BATCH, PROJ)))
    with pytest.raises(LayoutError, match=r"expects c0 of shape \(1, 2, 5\) .* found \(1, 2, 2\)"):
        forward(module, np.zeros((SEQ, BATCH, INPUT)), state)


def test_lstm_state_must_be_a_pair() -> None:
    with pytest.raises(LayoutError, match=r"expects hx as a pair \(h0, c0\), found ndarray"):
        forward(make("lstm"), np.zeros((SEQ, BATCH, INPUT)), np.zeros((1, BATCH, HIDDEN)))
    with pytest.raises(LayoutError, match=r"expects hx as one array h0, found a tuple"):
        forward(make("gru"), np.zeros((SEQ, BATCH, INPUT)), (np.zeros((1, BATCH, HIDDEN)),) * 2)


def test_wrong_cell_state_shape() -> None:
    with pytest.raises(LayoutError, match=r"expects initial c of shape \(2, 5\), found \(2, 4\)"):
        forward(make("lstm_cell"), np.zeros((2, INPUT)), (np.zeros((2, HIDDEN)), np.zeros((2, 4))))


def test_empty_sequence_is_refused_like_torch() -> None:
    with pytest.raises(LayoutError, match=r"needs a sequence of at least one step, found input \(0, 2, 3\)"):
        forward(make("gru"), np.zeros((0, BATCH, INPUT)))


def test_half_precision_module_is_refused() -> None:
    with pytest.raises(LayoutError, match=r"runs float32 or float64 parameters, found torch.float16"):
        forward(make("gru", dtype=torch.float16), np.zeros((SEQ, BATCH, INPUT)))


def test_meta_module_is_refused() -> None:
    with torch.device("meta"):
        module = nn.LSTM(INPUT, HIDDEN)
    with pytest.raises(LayoutError, match=r"parameters on the meta device, which hold no values"):
        forward(module, np.zeros((SEQ, BATCH, INPUT)))


def test_packed_sequence_is_refused() -> None:
    packed = nn.utils.rnn.pack_padded_sequence(torch.zeros(SEQ, BATCH, INPUT), [SEQ, 3])
    with pytest.raises(LayoutError, match=r"found a PackedSequence\. Pass the padded tensor"):
        forward(make("lstm"), packed)


def test_non_numeric_input_is_refused() -> None:
    with pytest.raises(
        LayoutError, match=r"input must be a NumPy array or torch tensor of numbers, found str"
    ):
        forward(make("rnn_tanh"), "not an array")


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_wrapped_modules_are_read_through(wrap: str) -> None:
    gru = make("gru", num_layers=2, bidirectional=True)
    wrapped = torch.compile(gru, backend="eager") if wrap == "compile" else nn.DataParallel(gru)
    x = np.random.default_rng(0).standard_normal((SEQ, BATCH, INPUT))
    out, h_n = forward(wrapped, x)
    expected, expected_h = forward(gru, x)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(h_n, expected_h)
