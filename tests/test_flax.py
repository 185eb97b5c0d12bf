"""The Flax reader and layout, against real Flax (JAX on the CPU) as the oracle.

Every layer kind is built in Flax, given random params with non-zero biases, run
on a random input, and saved three ways (``flax.serialization.to_bytes`` msgpack,
a flat ``.npz`` with ``/``-joined keys, the pytree itself); each is loaded into
the equivalent PyTorch module, whose outputs must match Flax's within 1e-5.
The golden test needs only msgpack and torch.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn as tnn

import weightport
from _flax import perturbed
from weightport.errors import LayoutError, SourceError, UncheckedConfigWarning, UnsupportedConfigError
from weightport.layouts import flax as flax_layout
from weightport.sources import flax as flax_source
from weightport.sources import open_source

msgpack = pytest.importorskip("msgpack")

try:
    import flax
    import flax.linen as nn
    import jax
    from flax import nnx, serialization
except ImportError:  # the golden and the pure-NumPy tests still run
    jax = None

needs_flax = pytest.mark.skipif(jax is None, reason="needs jax and flax: pip install 'weightport[test]'")

GOLDEN = Path(__file__).parent / "golden" / "flax"
TOL = 1e-5
B, T, F, H = 2, 5, 3, 4


# --- helpers -------------------------------------------------------------------------------------------


def _perturb(
    tree: Mapping[Any, Any], rng: np.random.Generator, positive: tuple[str, ...] = ()
) -> dict[Any, Any]:
    """Every leaf plus noise (biases become non-zero), in the tree's own key order; ``positive`` keys > 0."""
    return perturbed(tree, rng, 0.3, positive)


def _flat(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def _forms(tree: Mapping[Any, Any], tmp_path: Path) -> list[tuple[str, Any, str | None]]:
    """The same params as a msgpack file (layout inferred), a flat .npz, the pytree, a FrozenDict of JAX arrays."""
    msgpack_path = tmp_path / "params.msgpack"
    msgpack_path.write_bytes(serialization.to_bytes(tree))
    npz_path = tmp_path / "params.npz"
    np.savez(npz_path, **_flat(tree))
    frozen = flax.core.freeze(jax.tree_util.tree_map(jax.numpy.asarray, tree))
    return [
        ("msgpack", msgpack_path, None),
        ("npz", npz_path, "flax"),
        ("pytree", tree, "flax"),
        ("FrozenDict", frozen, "flax"),
    ]


def _load(
    module: tnn.Module, source: Any, layout: str | None = "flax", **kwargs: Any
) -> weightport.LoadReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, source, layout=layout, **kwargs)


def _close(found: Any, expected: Any, what: str = "") -> None:
    found = found.detach().numpy() if isinstance(found, torch.Tensor) else np.asarray(found)
    expected = np.asarray(expected)
    assert found.shape == expected.shape, what
    error = float(np.max(np.abs(found - expected))) if found.size else 0.0
    print(
        f"maxerr {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]} {what}: {error:.2e}"
    )  # pytest -s
    assert error <= TOL, f"{what}: max error {error}"


def _inputs(seed: int = 0, shape: tuple[int, ...] = (B, T, F)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _check_rnn(module: tnn.Module, x: np.ndarray, y: Any, carry: Any, is_lstm: bool, what: str) -> None:
    with torch.no_grad():
        out, state = module(torch.from_numpy(x))
    _close(out, y, f"{what}: outputs")
    if is_lstm:
        c, h = carry  # Flax's LSTM carry is (c, h); PyTorch returns (h_n, c_n)
        _close(state[0][-1], h, f"{what}: h")
        _close(state[1][-1], c, f"{what}: c")
    else:
        _close(state[-1], carry, f"{what}: h")


def _lstm() -> tnn.Module:
    return tnn.LSTM(F, H, batch_first=True)


def _gru() -> tnn.Module:
    return tnn.GRU(F, H, batch_first=True)


def _rnn(nonlinearity: str = "tanh") -> Callable[[], tnn.Module]:
    return lambda: tnn.RNN(F, H, nonlinearity=nonlinearity, batch_first=True)


# --- recurrent cells -----------------------------------------------------------------------------------

LINEN_CELLS = [
    ("LSTMCell", lambda: nn.LSTMCell(H), _lstm, True),
    ("OptimizedLSTMCell", lambda: nn.OptimizedLSTMCell(H), _lstm, True),
    ("GRUCell", lambda: nn.GRUCell(H), _gru, False),
    ("SimpleCell", lambda: nn.SimpleCell(H), _rnn(), False),
    ("SimpleCell-relu", lambda: nn.SimpleCell(H, activation_fn=nn.relu), _rnn("relu"), False),
]


@needs_flax
@pytest.mark.parametrize(
    ("name", "make_cell", "make_torch", "is_lstm"), LINEN_CELLS, ids=[c[0] for c in LINEN_CELLS]
)
def test_linen_cell_matches_flax(
    name: str, make_cell: Any, make_torch: Any, is_lstm: bool, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    x = _inputs()
    model = nn.RNN(make_cell(), return_carry=True)
    variables = _perturb(model.init(jax.random.PRNGKey(0), x), rng)
    carry, y = model.apply(variables, x)
    for form, source, layout in _forms(variables, tmp_path):
        module = make_torch()
        report = _load(module, source, layout)
        assert report.layout == "flax"
        assert [p.source_layer for p in report.pairings] == ["cell"]
        _check_rnn(module, x, y, carry, is_lstm, f"{name} from {form}")


@needs_flax
@pytest.mark.parametrize(("cell", "torch_cls"), [("LSTMCell", tnn.LSTMCell), ("GRUCell", tnn.GRUCell)])
def test_linen_cell_at_the_root_fills_a_torch_cell(cell: str, torch_cls: type[tnn.Module]) -> None:
    rng = np.random.default_rng(10)
    x = _inputs(11, (B, F))
    flax_cell = getattr(nn, cell)(H)
    carry = flax_cell.initialize_carry(jax.random.PRNGKey(1), x.shape)
    variables = _perturb(flax_cell.init(jax.random.PRNGKey(0), carry, x), rng)
    _, y = flax_cell.apply(variables, carry, x)
    module = torch_cls(F, H)
    report = _load(module, variables)
    assert [(p.source_layer, p.module_path) for p in report.pairings] == [(flax_layout.ROOT, "")]
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    _close(out[0] if isinstance(out, tuple) else out, y, f"root {cell}")


NNX_CELLS = [
    ("LSTMCell", lambda rngs: nnx.LSTMCell(F, H, rngs=rngs), _lstm, True),
    ("OptimizedLSTMCell", lambda rngs: nnx.OptimizedLSTMCell(F, H, rngs=rngs), _lstm, True),
    ("GRUCell", lambda rngs: nnx.GRUCell(F, H, rngs=rngs), _gru, False),
    ("SimpleCell", lambda rngs: nnx.SimpleCell(F, H, rngs=rngs), _rnn(), False),
]


def _perturb_nnx(model: Any, seed: int = 2) -> None:
    """Give every Param and BatchStat of an nnx model new values (variances positive)."""
    rng = np.random.default_rng(seed)
    for kind in (nnx.Param, nnx.BatchStat):
        state = nnx.state(model, kind)
        state.replace_by_pure_dict(_perturb(state.to_pure_dict(), rng, positive=("var",)))
        nnx.update(model, state)


def _by_key_paths(state: Any) -> dict[str, Any]:
    """A State nested by its ``jax.tree_util`` key paths, as pytree checkpointers store it: ``kernel/value``."""
    root: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        node = root
        for part in names[:-1]:
            node = node.setdefault(part, {})
        node[names[-1]] = np.asarray(leaf)
    return root


def _nnx_forms(model: Any, tmp_path: Path) -> list[tuple[str, Any, str | None]]:
    """An nnx model's weights as its State (read by the nnx reader), a flat .npz, and msgpack (pure and pytree)."""
    weights = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    pure = weights.to_pure_dict()
    npz_path = tmp_path / "nnx.npz"
    np.savez(npz_path, **_flat(pure))
    msgpack_path = tmp_path / "nnx.msgpack"
    msgpack_path.write_bytes(serialization.msgpack_serialize(pure))
    paths_path = tmp_path / "nnx_paths.msgpack"
    paths_path.write_bytes(serialization.msgpack_serialize(_by_key_paths(weights)))
    assert "value" in str(msgpack.unpackb(paths_path.read_bytes(), strict_map_key=False))
    return [
        ("State", flax_source.open_object(nnx.state(model)), None),
        ("npz", npz_path, "flax"),
        ("msgpack", msgpack_path, None),
        ("pytree-paths msgpack", paths_path, None),
    ]


@needs_flax
@pytest.mark.parametrize(
    ("name", "make_cell", "make_torch", "is_lstm"), NNX_CELLS, ids=[c[0] for c in NNX_CELLS]
)
def test_nnx_cell_matches_flax(
    name: str, make_cell: Any, make_torch: Any, is_lstm: bool, tmp_path: Path
) -> None:
    x = _inputs()
    model = nnx.RNN(make_cell(nnx.Rngs(0)), return_carry=True)
    _perturb_nnx(model)
    carry, y = model(x)
    for form, source, layout in _nnx_forms(model, tmp_path):
        module = make_torch()
        _load(module, source, layout)
        _check_rnn(module, x, y, carry, is_lstm, f"nnx {name} from {form}")


@needs_flax
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_linen_bidirectional_matches_flax(cell: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = _inputs()
    make = getattr(nn, cell)
    model = nn.Bidirectional(nn.RNN(make(H)), nn.RNN(make(H)))
    variables = _perturb(model.init(jax.random.PRNGKey(0), x), rng)
    y = model.apply(variables, x)
    torch_cls = tnn.LSTM if cell == "LSTMCell" else tnn.GRU
    for form, source, layout in _forms(variables, tmp_path):
        module = torch_cls(F, H, batch_first=True, bidirectional=True)
        report = _load(module, source, layout)
        assert report.pairings[0].source_kind == f"Bidirectional linen {cell}"
        with torch.no_grad():
            out = module(torch.from_numpy(x))[0]
        _close(out, y, f"bidirectional {cell} from {form}")


@needs_flax
def test_nnx_bidirectional_matches_flax(tmp_path: Path) -> None:
    x = _inputs()
    rngs = nnx.Rngs(0)
    model = nnx.Bidirectional(
        nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs)), nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs)), rngs=rngs
    )
    _perturb_nnx(model)
    y = model(x)
    for form, source, layout in _nnx_forms(model, tmp_path):
        module = tnn.LSTM(F, H, batch_first=True, bidirectional=True)
        _load(module, source, layout)
        with torch.no_grad():
            out = module(torch.from_numpy(x))[0]
        _close(out, y, f"nnx bidirectional from {form}")


class _TorchStacked(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = tnn.LSTM(F, H, num_layers=2, batch_first=True)
        self.fc = tnn.Linear(H, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


@needs_flax
def test_two_stacked_linen_lstms_fill_num_layers_2(tmp_path: Path) -> None:
    class Stacked(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.RNN(nn.LSTMCell(H))(x)
            x = nn.RNN(nn.LSTMCell(H))(x)
            return nn.Dense(2)(x)

    rng = np.random.default_rng(4)
    x = _inputs()
    variables = _perturb(Stacked().init(jax.random.PRNGKey(0), x), rng)
    y = Stacked().apply(variables, x)
    sorted_tree = jax.tree_util.tree_map(np.asarray, variables)  # JAX sorts keys: Dense_0 comes first
    assert list(sorted_tree["params"]) == ["Dense_0", "LSTMCell_0", "LSTMCell_1"]
    forms = [*_forms(variables, tmp_path), ("tree_map'd pytree", sorted_tree, "flax")]
    for form, source, layout in forms:
        module = _TorchStacked()
        report = _load(module, source, layout)
        pairs = [(p.source_layer, p.module_path) for p in report.pairings]
        assert sorted(pairs) == [("Dense_0", "fc"), ("LSTMCell_0", "lstm[0]"), ("LSTMCell_1", "lstm[1]")]
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        _close(out, y, f"stacked from {form}")


# --- plain layers --------------------------------------------------------------------------------------


def _channels_first(module: tnn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run a PyTorch conv on Flax's channels-last input and return channels-last output."""

    def run(x: torch.Tensor) -> torch.Tensor:
        dims = x.dim()
        to_first = (0, dims - 1, *range(1, dims - 1))
        to_last = (0, *range(2, dims), 1)
        return module(x.permute(to_first)).permute(to_last)

    return run


PLAIN = [
    ("Dense", lambda: nn.Dense(5), lambda: tnn.Linear(4, 5), (B, 4), False),
    (
        "Dense-no-bias",
        lambda: nn.Dense(5, use_bias=False),
        lambda: tnn.Linear(4, 5, bias=False),
        (B, 4),
        False,
    ),
    ("Conv1d", lambda: nn.Conv(5, (3,), padding="VALID"), lambda: tnn.Conv1d(4, 5, 3), (B, 7, 4), True),
    ("Conv2d-same", lambda: nn.Conv(5, (3, 3)), lambda: tnn.Conv2d(4, 5, 3, padding=1), (B, 6, 5, 4), True),
    (
        "Conv2d-no-bias",
        lambda: nn.Conv(5, (3, 2), padding="VALID", use_bias=False),
        lambda: tnn.Conv2d(4, 5, (3, 2), bias=False),
        (B, 6, 5, 4),
        True,
    ),
    ("Embed", lambda: nn.Embed(10, 4), lambda: tnn.Embedding(10, 4), (B, T), False),
    ("LayerNorm", lambda: nn.LayerNorm(), lambda: tnn.LayerNorm(6, eps=1e-6), (B, 6), False),
    (
        "BatchNorm",
        lambda: nn.BatchNorm(use_running_average=True),
        lambda: tnn.BatchNorm1d(6).eval(),
        (B, 6),
        False,
    ),
]


@needs_flax
@pytest.mark.parametrize(
    ("name", "make_flax", "make_torch", "shape", "conv"), PLAIN, ids=[p[0] for p in PLAIN]
)
def test_linen_layer_matches_flax(
    name: str, make_flax: Any, make_torch: Any, shape: tuple[int, ...], conv: bool, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 10, shape) if name == "Embed" else _inputs(6, shape)
    variables = _perturb(make_flax().init(jax.random.PRNGKey(0), x), rng, positive=("var",))
    y = make_flax().apply(variables, x)
    for form, source, layout in _forms(variables, tmp_path):
        module = make_torch()
        _load(module, source, layout)
        run = _channels_first(module) if conv else module
        with torch.no_grad():
            out = run(torch.from_numpy(x))
        _close(out, y, f"{name} from {form}")


class _TorchPlain(tnn.Module):
    """The PyTorch twin of the nnx model below, attributes in the sorted order of nnx's State."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = tnn.BatchNorm1d(4).eval()
        self.conv = tnn.Conv1d(3, 4, 2, padding=0)
        self.emb = tnn.Embedding(10, 4)
        self.layers = tnn.ModuleList([tnn.Linear(4, 4), tnn.Linear(4, 2)])
        self.ln = tnn.LayerNorm(4, eps=1e-6)


@needs_flax
def test_nnx_layers_match_flax(tmp_path: Path) -> None:
    class Plain(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
            self.ln = nnx.LayerNorm(4, rngs=rngs)
            self.emb = nnx.Embed(10, 4, rngs=rngs)
            self.conv = nnx.Conv(3, 4, (2,), padding="VALID", rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

    model = Plain(nnx.Rngs(0))
    _perturb_nnx(model)
    x = _inputs(7, (B, 4))
    ids = np.random.default_rng(8).integers(0, 10, (B, T))
    seq = _inputs(9, (B, T, 3))
    for form, source, layout in _nnx_forms(model, tmp_path):
        module = _TorchPlain()
        _load(module, source, layout)
        with torch.no_grad():
            _close(
                module.layers[1](module.layers[0](torch.from_numpy(x))),
                model.layers[1](model.layers[0](x)),
                form,
            )
            _close(module.ln(torch.from_numpy(x)), model.ln(x), f"LayerNorm from {form}")
            _close(module.bn(torch.from_numpy(x)), model.bn(x), f"BatchNorm from {form}")
            _close(module.emb(torch.from_numpy(ids)), model.emb(ids), f"Embed from {form}")
            _close(_channels_first(module.conv)(torch.from_numpy(seq)), model.conv(seq), f"Conv from {form}")


# --- export ---------------------------------------------------------------------------------------------


@needs_flax
@pytest.mark.parametrize(
    ("cell", "torch_cls"), [("LSTMCell", tnn.LSTM), ("GRUCell", tnn.GRU), ("SimpleCell", tnn.RNN)]
)
def test_export_runs_in_linen(cell: str, torch_cls: type[tnn.RNNBase]) -> None:
    torch.manual_seed(0)
    module = torch_cls(F, H, batch_first=True)
    arrays = flax_layout.export(module, names={"[0]": "cell"})
    variables = _nest(arrays)
    x = _inputs()
    y = nn.RNN(getattr(nn, cell)(H)).apply(variables, x)
    with torch.no_grad():
        _close(module(torch.from_numpy(x))[0], y, f"exported {cell}")


@needs_flax
@pytest.mark.parametrize(
    ("make_cell", "torch_cls"),
    [(lambda r: nnx.LSTMCell(F, H, rngs=r), tnn.LSTM), (lambda r: nnx.GRUCell(F, H, rngs=r), tnn.GRU)],
    ids=["LSTMCell", "GRUCell"],
)
def test_export_runs_in_nnx(make_cell: Any, torch_cls: type[tnn.RNNBase]) -> None:
    torch.manual_seed(0)
    module = torch_cls(F, H, batch_first=True)
    if torch_cls is tnn.GRU:
        with torch.no_grad():
            module.bias_hh_l0[2 * H :] = 0  # nnx's GRUCell has no b_hn
    arrays = flax_layout.export(module, api="nnx", names={"[0]": "cell"})
    model = nnx.RNN(make_cell(nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(_nest(arrays))
    nnx.update(model, state)
    x = _inputs()
    with torch.no_grad():
        _close(module(torch.from_numpy(x))[0], model(x), "exported nnx cell")


def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


class _Mixed(tnn.Module):
    def __init__(self, kind: str, input_size: int, hidden: int, num_layers: int, bidirectional: bool) -> None:
        super().__init__()
        cls = {"LSTM": tnn.LSTM, "GRU": tnn.GRU, "RNN": tnn.RNN}[kind]
        self.rnn = cls(
            input_size, hidden, num_layers=num_layers, bidirectional=bidirectional, batch_first=True
        )
        width = hidden * (2 if bidirectional else 1)
        self.cell = {"LSTM": tnn.LSTMCell, "GRU": tnn.GRUCell, "RNN": tnn.RNNCell}[kind](width, hidden)
        self.fc = tnn.Linear(hidden, 3)
        self.conv1 = tnn.Conv1d(input_size, 2, 2)
        self.conv2 = tnn.Conv2d(2, input_size, (2, 1), bias=False)
        self.emb = tnn.Embedding(5, hidden)
        self.ln = tnn.LayerNorm(hidden)
        self.bn = tnn.BatchNorm1d(hidden)


def _canonical(module: _Mixed, kind: str, api: str) -> None:
    """Move biases to where a Flax cell keeps them, so a round trip must give back every value."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            hidden_side = ".bias_hh" in f".{name.split('.')[-1]}"
            lstm_input_side = kind == "LSTM" and name.split(".")[-1].startswith("bias_ih")
            if lstm_input_side or (hidden_side and (kind == "RNN" or api == "nnx")):
                tensor.zero_()
            elif hidden_side and kind == "GRU":
                tensor[: 2 * (tensor.shape[0] // 3)] = 0


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["LSTM", "GRU", "RNN"]),
    api=st.sampled_from(flax_layout.APIS),
    bidirectional=st.booleans(),
    num_layers=st.integers(1, 2),
    input_size=st.integers(1, 4),
    hidden=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_export_then_load_is_the_identity(
    kind: str, api: str, bidirectional: bool, num_layers: int, input_size: int, hidden: int, seed: int
) -> None:
    torch.manual_seed(seed)
    original = _Mixed(kind, input_size, hidden, num_layers, bidirectional)
    _canonical(original, kind, api)
    with torch.no_grad():
        original.bn.running_var.uniform_(0.5, 2.0)
        original.bn.running_mean.normal_()
    arrays = flax_layout.export(original, api=api)
    loaded = _Mixed(kind, input_size, hidden, num_layers, bidirectional)
    _load(loaded, arrays)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    again = flax_layout.export(loaded, api=api)
    assert list(again) == list(arrays)
    for name, array in arrays.items():
        assert np.array_equal(again[name], array), name


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_round_trip_keeps_outputs_when_both_biases_are_set(kind: str) -> None:
    torch.manual_seed(1)
    original = _Mixed(kind, 3, 4, 2, True)
    arrays = flax_layout.export(original)
    loaded = _Mixed(kind, 3, 4, 2, True)
    _load(loaded, arrays)
    x = torch.from_numpy(_inputs())
    with torch.no_grad():
        _close(loaded.rnn(x)[0], original.rnn(x)[0], f"{kind} round trip")
    again = flax_layout.export(loaded)
    assert all(np.array_equal(again[k], v) for k, v in arrays.items())


def test_export_names_follow_the_module_and_the_api() -> None:
    module = tnn.Sequential(tnn.GRU(2, 3, num_layers=2, bidirectional=True, bias=False), tnn.BatchNorm1d(6))
    linen = flax_layout.export(module)
    assert "params/0/layers_1/backward_rnn/cell/hn/bias" in linen
    assert [k for k in linen if k.startswith("batch_stats")] == ["batch_stats/1/mean", "batch_stats/1/var"]
    assert not linen["params/0/layers_1/backward_rnn/cell/hn/bias"].any()  # bias=False exports zeros
    nnx_names = flax_layout.export(module, api="nnx")
    assert "0/layers_0/forward_rnn/cell/dense_i/bias" in nnx_names
    assert "1/mean" in nnx_names


# --- golden (no Flax needed) -----------------------------------------------------------------------------


def test_golden_linen_lstm_msgpack() -> None:
    io = np.load(GOLDEN / "lstm_io.npz")
    module = tnn.LSTM(3, 4, batch_first=True)
    report = _load(module, GOLDEN / "lstm.msgpack", layout=None)  # the layout comes from the file
    assert report.layout == "flax"
    assert [(p.source_layer, p.source_kind) for p in report.pairings] == [("cell", "linen LSTMCell")]
    with torch.no_grad():
        out, (h, c) = module(torch.from_numpy(io["x"]))
    _close(out, io["y"], "golden outputs")
    _close(h[0], io["h"], "golden h")
    _close(c[0], io["c"], "golden c")


def test_golden_source_lists_arrays_in_file_order() -> None:
    src = open_source(GOLDEN / "lstm.msgpack")
    assert src.metadata == {"layout": "flax", "format": "flax-msgpack"}
    assert src.description == "'lstm.msgpack'"
    assert list(src.infos)[:2] == ["params/cell/hf/bias", "params/cell/hf/kernel"]
    assert src.infos["params/cell/ii/kernel"].shape == (3, 4)


# --- the msgpack reader ---------------------------------------------------------------------------------


def _ext(array: np.ndarray, *, dtype: str | None = None, data: bytes | None = None, code: int = 1) -> Any:
    payload = (list(array.shape), dtype or array.dtype.name, array.tobytes() if data is None else data)
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def _write(tmp_path: Path, tree: Any, name: str = "w.msgpack") -> Path:
    path = tmp_path / name
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def test_reader_keeps_order_and_lists_non_arrays(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {
        "b": {"w": _ext(w)},
        "a": [_ext(np.ones(2, np.int8)), 3],
        "step": 7,
        "s": _ext(np.float64(2.5), code=3),
    }
    src = flax_source.open(_write(tmp_path, tree))
    assert list(src.infos) == ["b/w", "a/0", "s"]
    assert src.ignored == ["a/1 (int: not an array)", "step (int: not an array)"]
    assert np.array_equal(src.read("b/w"), w)
    assert src.read("s").shape == ()


def test_reader_joins_chunked_arrays(tmp_path: Path) -> None:
    whole = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunked = {
        flax_source.CHUNKED: True,
        "shape": {"0": 3, "1": 4},
        "chunks": {"0": _ext(whole.reshape(-1)[:5]), "1": _ext(whole.reshape(-1)[5:])},
    }
    src = flax_source.open(_write(tmp_path, {"emb": {"embedding": chunked}}))
    assert np.array_equal(src.read("emb/embedding"), whole)


@needs_flax
def test_reader_reads_what_flax_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 16)  # chunk anything over 16 bytes
    whole = np.arange(30, dtype=np.float32).reshape(5, 6)
    data = serialization.msgpack_serialize({"w": whole})
    assert flax_source.CHUNKED.encode() in data
    path = tmp_path / "chunked.msgpack"
    path.write_bytes(data)
    assert np.array_equal(flax_source.open(path).read("w"), whole)


def test_reader_refuses_chunks_that_do_not_fill_the_shape(tmp_path: Path) -> None:
    chunked = {
        flax_source.CHUNKED: True,
        "shape": {"0": 3, "1": 4},
        "chunks": {"0": _ext(np.zeros(5, np.float32))},
    }
    with pytest.raises(
        SourceError, match=r"chunked array 'w' declares shape \(3, 4\) \(12 values\) but its chunks hold 5"
    ):
        flax_source.open(_write(tmp_path, {"w": chunked}))


def test_reader_refuses_bytes_that_do_not_match_the_shape(tmp_path: Path) -> None:
    bad = _ext(np.zeros((2, 3), np.float32), data=b"\0" * 20)
    with pytest.raises(
        SourceError,
        match=r"'w.msgpack': array 'd/kernel' declares shape \(2, 3\) of float32 \(24 bytes\) but holds 20 bytes",
    ):
        flax_source.open(_write(tmp_path, {"d": {"kernel": bad}}))


@pytest.mark.parametrize("dtype", ["object", "<U3", "float32,int8", "nonsense"])
def test_reader_refuses_non_numeric_dtypes(tmp_path: Path, dtype: str) -> None:
    bad = _ext(np.zeros(3, np.float32), dtype=dtype)
    with pytest.raises(SourceError, match=rf"array 'k' has dtype '{dtype}'; weightport reads numeric arrays"):
        flax_source.open(_write(tmp_path, {"k": bad}))


def test_reader_reads_bfloat16(tmp_path: Path) -> None:
    from weightport.dtypes import BFLOAT16

    values = np.array([1.5, -2.0], BFLOAT16)
    src = flax_source.open(_write(tmp_path, {"k": _ext(values, dtype="bfloat16")}))
    assert src.read("k").dtype == BFLOAT16 and np.array_equal(src.read("k"), values)


def test_reader_refuses_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = _write(tmp_path, {"k": _ext(np.zeros(4, np.float32))})
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SourceError, match=r"'w.msgpack': not a valid msgpack file .*truncated, corrupt"):
        flax_source.open(path)
    with pytest.raises(SourceError, match=r"holds a list at the top, not a tree of named arrays"):
        flax_source.open(_write(tmp_path, [1, 2]))
    empty = tmp_path / "empty.msgpack"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match=r"'empty.msgpack': is empty"):
        flax_source.open(empty)


def test_reader_checks_the_size_cap_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"k": _ext(np.zeros(64, np.float32))})
    monkeypatch.setattr(flax_source, "MAX_BYTES", 100)
    with pytest.raises(
        SourceError, match=r"is \d+ bytes, over the 100 bytes .* raise weightport.sources.flax.MAX_BYTES"
    ):
        flax_source.open(path)


def test_open_source_claims_msgpack_by_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path, {"k": _ext(np.zeros(2, np.float32))}, name="ckpt.msgpack")
    assert flax_source.claims(path)
    assert not flax_source.claims(tmp_path / "ckpt.npz")
    assert open_source(path).metadata["layout"] == "flax"


@needs_flax
def test_nnx_reader_skips_rng_state() -> None:
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs))
    state = nnx.state(model)
    assert flax_source.claims_object(state)
    assert not flax_source.claims_object({"a": 1})
    src = flax_source.open_object(state)
    assert list(src.infos) == ["layers/0/bias", "layers/0/kernel"]
    assert src.ignored == [
        "layers/1/rngs/count (an nnx RngCount, not a Param or BatchStat)",
        "layers/1/rngs/key (an nnx RngKey, not a Param or BatchStat)",
    ]


# --- pairing, refusals and notes ------------------------------------------------------------------------


def _dense(fan_in: int, fan_out: int) -> dict[str, np.ndarray]:
    return {"kernel": np.ones((fan_in, fan_out), np.float32), "bias": np.zeros(fan_out, np.float32)}


def test_numbered_siblings_pair_in_numeric_order() -> None:
    tree = {f"Dense_{i}": _dense(i + 1, i + 2) for i in sorted(range(11), key=str)}  # as JAX sorts them
    assert list(tree)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    module = tnn.Sequential(*(tnn.Linear(i + 1, i + 2) for i in range(11)))
    report = _load(module, {"params": tree})
    assert [(p.source_layer, p.module_path) for p in report.pairings][-2:] == [
        ("Dense_9", "9"),
        ("Dense_10", "10"),
    ]


def test_named_layers_pair_by_name_and_mapping_overrides() -> None:
    tree = {"dec": _dense(4, 4), "enc": _dense(4, 4)}  # nnx and tree_map sort names: dec before enc
    tree["enc"]["bias"] = np.ones(4, np.float32)
    module = tnn.Sequential()
    module.add_module("enc", tnn.Linear(4, 4))
    module.add_module("dec", tnn.Linear(4, 4))
    report = _load(module, tree)
    assert module.enc.bias.sum().item() == 4.0 and module.dec.bias.sum().item() == 0.0  # not by order
    assert {(p.source_layer, p.module_path, p.how) for p in report.pairings} == {
        ("enc", "enc", "by name"),
        ("dec", "dec", "by name"),
    }
    _load(module, tree, mapping={"enc": "dec", "dec": "enc"})
    assert module.dec.bias.sum().item() == 4.0 and module.enc.bias.sum().item() == 0.0


def _linen_gru_tree(hidden: int = 2, features: int = 3) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for gate in ("ir", "iz", "in", "hr", "hz", "hn"):
        rows = features if gate[0] == "i" else hidden
        tree[gate] = {"kernel": np.ones((rows, hidden), np.float32)}
        if gate[0] == "i" or gate == "hn":
            tree[gate]["bias"] = np.zeros(hidden, np.float32)
    return {"params": {"rnn": {"cell": tree}}}


def test_linen_gru_bias_hh_holds_b_hn_only() -> None:
    tree = _linen_gru_tree()
    tree["params"]["rnn"]["cell"]["hn"]["bias"] = np.array([5.0, 6.0], np.float32)
    module = tnn.GRU(3, 2)
    _load(module, tree)
    assert module.bias_hh_l0.tolist() == [0.0, 0.0, 0.0, 0.0, 5.0, 6.0]


def test_a_cell_pytorch_cannot_run_is_refused() -> None:
    tree = _linen_gru_tree()
    del tree["params"]["rnn"]["cell"]["hn"]["bias"]
    with pytest.raises(
        UnsupportedConfigError,
        match=r"Flax layer 'rnn/cell' looks like a recurrent cell but matches none PyTorch can run; found "
        r"ir/kernel \(3, 2\), .*, hn/kernel \(2, 2\)\. Expected a linen GRUCell \(missing hn/bias\)\.",
    ):
        _load(tnn.GRU(3, 2), tree)


@needs_flax
def test_mgu_cell_is_refused() -> None:
    variables = nn.RNN(nn.MGUCell(H)).init(jax.random.PRNGKey(0), _inputs())
    with pytest.raises(
        UnsupportedConfigError, match=r"Flax layer 'cell' is a linen MGUCell \(a minimal gated unit"
    ):
        _load(tnn.GRU(F, H, batch_first=True), variables)


@needs_flax
@pytest.mark.parametrize(("first", "second", "hidden"), [("ih", "hh", 6), ("i", "h", 6), ("ih", "hh", 4)])
def test_dense_layers_named_like_a_cells_gates_are_dense_layers(first: str, second: str, hidden: int) -> None:
    """Two Dense named ``ih``/``hh`` or ``i``/``h`` are no cell where their shapes cannot be one (outputs of
    different sizes; 2-D kernels named as a ConvLSTMCell's convolutions): they load as the Dense they are."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(4, name=second)(nn.relu(nn.Dense(hidden, name=first)(x)))

    x = _inputs(shape=(B, 4))
    variables = _perturb(Block().init(jax.random.PRNGKey(0), x), np.random.default_rng(1))

    class Twin(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, first, tnn.Linear(4, hidden))
            setattr(self, second, tnn.Linear(hidden, 4))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return getattr(self, second)(torch.relu(getattr(self, first)(t)))

    twin = Twin()
    _load(twin, variables)
    with torch.no_grad():
        got = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(Block().apply(variables, x)), atol=TOL)


@needs_flax
def test_a_dense_stacked_by_scan_is_refused_as_stacked_layers() -> None:
    """nn.scan over params gives a kernel (layers, in, out) and bias (layers, out): named for what it is, not
    as a DenseGeneral nor as modules too alike to pair (with or without mapping=)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h: Any, _: Any) -> Any:
            return nn.tanh(nn.Dense(4)(h)), None

    class Stacked(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="stack")(x, None)[0]

    variables = Stacked().init(jax.random.PRNGKey(0), _inputs(shape=(B, 4)))
    model = tnn.Module()
    model.stack = tnn.ModuleList([tnn.Linear(4, 4) for _ in range(3)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"'stack/Dense_0' has kernel \(3, 4, 4\) and bias \(3, 4\): 3 layers stacked along axis 0 \(by nn.scan"
    for kwargs in ({}, {"mapping": {"stack/Dense_0": "stack.0"}}):
        with pytest.raises(UnsupportedConfigError, match=message):
            _load(model, variables, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@needs_flax
def test_compact_bidirectional_cells_fill_the_sides_mapping_names() -> None:
    """nn.Bidirectional written in @nn.compact stores its cells as siblings GRUCell_0/GRUCell_1: which runs
    backward is not recorded, so it is refused with the fix; mapping= 'gru[0]:forward'/'gru[0]:reverse'
    loads Flax's outputs exactly, and the other assignment (a real other model) does not."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(2)(nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H)))(x))

    x = _inputs()
    variables = _perturb(Model().init(jax.random.PRNGKey(0), x), np.random.default_rng(2))
    assert {"GRUCell_0", "GRUCell_1"} <= set(variables["params"])
    expected = np.asarray(Model().apply(variables, x))

    def twin() -> tnn.Module:
        model = tnn.Module()
        model.gru = tnn.GRU(F, H, batch_first=True, bidirectional=True)
        model.fc = tnn.Linear(2 * H, 2)
        return model

    def run(model: Any) -> np.ndarray:
        with torch.no_grad():
            return model.fc(model.gru(torch.from_numpy(x))[0]).numpy()

    model = twin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        LayoutError, match=r"mapping=\{'GRUCell_0': 'gru\[0\]:forward', 'GRUCell_1': 'gru\[0\]:reverse'\}"
    ):
        _load(model, variables)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = _load(model, variables, mapping={"GRUCell_0": "gru[0]:forward", "GRUCell_1": "gru[0]:reverse"})
    np.testing.assert_allclose(run(model), expected, atol=TOL)
    assert {p.how for p in report.pairings if p.module_path == "gru[0]"} == {
        "mapping= (forward direction)",
        "mapping= (reverse direction)",
    }
    swapped = twin()
    _load(swapped, variables, mapping={"GRUCell_0": "gru[0]:reverse", "GRUCell_1": "gru[0]:forward"})
    assert np.abs(run(swapped) - expected).max() > 100 * TOL
    for mapping, message in [
        (
            {"GRUCell_0": "gru[0]:forward", "GRUCell_1": "gru[0]:forward"},
            "sends both 'GRUCell_0' and 'GRUCell_1' to 'gru\\[0\\]:forward'",
        ),
        ({"GRUCell_0": "gru[0]:sideways"}, "'sideways' is no direction"),
        ({"GRUCell_0": "gru[0]:forward"}, "no free nn.GRU left"),
    ]:
        with pytest.raises(LayoutError, match=message):
            _load(twin(), variables, mapping=mapping)


def test_bidirectional_into_a_one_way_module_is_refused() -> None:
    cell = _linen_gru_tree()["params"]["rnn"]["cell"]
    tree = {"params": {"bi": {"forward_rnn": {"cell": cell}, "backward_rnn": {"cell": cell}}}}
    with pytest.raises(
        LayoutError,
        match=r"Flax layer 'bi' is bidirectional .* but '\[0\]' is \[0\] \(GRU\(input_size=3, hidden_size=2\)\)\. Fix: build it with bidirectional=True",
    ):
        _load(tnn.GRU(3, 2), tree)
    _load(tnn.GRU(3, 2, bidirectional=True), tree)


def test_lstm_with_projection_is_refused() -> None:
    module = tnn.LSTM(3, 4, proj_size=2)
    with pytest.raises(UnsupportedConfigError, match=r"proj_size=2 has no Flax equivalent"):
        flax_layout.export(module)


def test_nnx_gru_export_refuses_a_hidden_n_bias() -> None:
    module = tnn.GRU(3, 2)
    with pytest.raises(
        UnsupportedConfigError,
        match=r"cannot export 'bias_hh_l0' to an nnx GRUCell: its block 3 of 3 is non-zero",
    ):
        flax_layout.export(module, api="nnx")


def test_export_refuses_layers_flax_has_no_twin_of() -> None:
    with pytest.raises(
        UnsupportedConfigError, match=r"cannot export Sequential to the Flax layout: 0 \(MultiheadAttention\)"
    ):
        flax_layout.export(tnn.Sequential(tnn.MultiheadAttention(4, 2)))
    with pytest.raises(LayoutError, match=r"unknown Flax api 'haiku'; choose one of linen, nnx"):
        flax_layout.export(tnn.Linear(2, 2), api="haiku")


def test_a_train_states_optimizer_and_step_are_ignored_and_other_variables_unmatched() -> None:
    tree = {
        "step": np.array(3),
        "params": {"Dense_0": _dense(2, 2)},
        "opt_state": {"mu": {"Dense_0": _dense(2, 2)}},
    }
    report = _load(tnn.Linear(2, 2), tree)  # a TrainState's checkpoint loads as it is
    assert report.ignored == [
        "step (training state)",
        "opt_state/mu/Dense_0/kernel (training state)",
        "opt_state/mu/Dense_0/bias (training state)",
    ]
    tree["ema"] = {"Dense_0": _dense(2, 2)}
    with pytest.raises(
        weightport.LoadError, match=r"'ema/Dense_0/kernel': expected a tensor the layout can place"
    ):
        _load(tnn.Linear(2, 2), tree)
    report = _load(tnn.Linear(2, 2), tree, strict=False)
    assert report.ignored[-2:] == ["ema/Dense_0/kernel", "ema/Dense_0/bias"]


def test_unchecked_settings_are_reported() -> None:
    tree = {"LayerNorm_0": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}
    with pytest.warns(
        UncheckedConfigWarning, match=r"the module has eps=1e-05; Flax LayerNorm's epsilon is 1e-6 unless"
    ):
        weightport.load(tnn.LayerNorm(4), tree, layout="flax")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightport.load(tnn.Linear(2, 2), {"Dense_0": _dense(2, 2)}, layout="flax")  # nothing to note


def test_batchnorm_without_stats_by_name_pairs_with_batchnorm() -> None:
    tree = {"params": {"BatchNorm_0": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}}}
    report = _load(tnn.BatchNorm1d(3), tree, strict=False)
    assert report.pairings[0].module_kind == "BatchNorm1d"
    assert "running_mean" in report.missing


def test_fused_cell_of_unknown_width_is_refused() -> None:
    cell = {
        "dense_i": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
        "dense_h": {"kernel": np.ones((2, 4), np.float32)},
    }
    with pytest.raises(
        UnsupportedConfigError,
        match=r"Expected an nnx OptimizedLSTMCell \(missing dense_h/bias; unexpected dense_i/bias\); "
        r"an nnx GRUCell \(dense_h/kernel of shape \(H, 3\*H\), not \(2, 4\)\)",
    ):
        _load(tnn.GRU(3, 2), {"cell": cell})


def test_a_batchnorm_saved_without_its_batch_stats() -> None:
    """``state.params`` alone: the BatchNorm's scale and bias look like a LayerNorm's; the module decides."""
    tree = {
        "params": {
            "fc": _dense(3, 4),
            "bn": {"scale": np.full(4, 2.0, np.float32), "bias": np.ones(4, np.float32)},
        }
    }
    module = tnn.Sequential()
    module.add_module("fc", tnn.Linear(3, 4))
    module.add_module("bn", tnn.BatchNorm1d(4))
    with pytest.raises(
        weightport.LoadError,
        match=r"'bn.running_mean'.*batch_stats collection, nnx's BatchStat variables\), and this source lacks them",
    ):
        _load(module, tree)
    report = _load(module, tree, strict=False)
    assert module.bn.weight.tolist() == [2.0] * 4 and "bn.running_mean" in report.missing
