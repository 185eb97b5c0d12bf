"""weightport.initializers against PyTorch's and Keras's own initializers."""

from __future__ import annotations

import inspect
import math
import os
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from weightport.errors import LayoutError, LoadError
from weightport.initializers import init, init_arrays
from weightport.layouts import keras as keras_layout


class RecordingRandomState(np.random.RandomState):
    """A RandomState that logs each draw: ("uniform", low, high, size) / ("normal", mean, std, size)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.calls: list[tuple[str, float, float, int]] = []

    def uniform(self, low=0.0, high=1.0, size=None):  # type: ignore[override]
        self.calls.append(("uniform", float(low), float(high), math.prod(size)))
        return super().uniform(low, high, size)

    def normal(self, loc=0.0, scale=1.0, size=None):  # type: ignore[override]
        self.calls.append(("normal", float(loc), float(scale), math.prod(size)))
        return super().normal(loc, scale, size)


def _record_torch_draws(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], tuple]:
    """Patch torch's in-place initializers so each tensor's last draw is logged by (data_ptr, numel)."""
    calls: dict[tuple[int, int], tuple] = {}
    uniform_, normal_, fill_, zero_ = (
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    )

    def log(tensor: torch.Tensor, call: tuple) -> None:
        calls[(tensor.data_ptr(), tensor.numel())] = call

    def uniform(self, a=0.0, b=1.0, *, generator=None):
        log(self, ("uniform", float(a), float(b), self.numel()))
        return uniform_(self, a, b, generator=generator)

    def normal(self, mean=0.0, std=1.0, *, generator=None):
        log(self, ("normal", float(mean), float(std), self.numel()))
        return normal_(self, mean, std, generator=generator)

    def fill(self, value):
        log(self, ("constant",))
        return fill_(self, value)

    def zero(self):
        log(self, ("constant",))
        return zero_(self)

    get_clones = torch.nn.modules.transformer._get_clones

    def clones(module: nn.Module, count: int) -> nn.ModuleList:
        # Transformer stacks deep-copy one initialized layer: each copy inherits its draws
        copies = get_clones(module, count)
        original = list(module.state_dict(keep_vars=True).values())
        for copy in copies:
            for old, new in zip(original, copy.state_dict(keep_vars=True).values(), strict=True):
                if (old.data_ptr(), old.numel()) in calls:
                    calls[(new.data_ptr(), new.numel())] = calls[(old.data_ptr(), old.numel())]
        return copies

    for name, patched in [("uniform_", uniform), ("normal_", normal), ("fill_", fill), ("zero_", zero)]:
        monkeypatch.setattr(torch.Tensor, name, patched)
    monkeypatch.setattr(torch.nn.modules.transformer, "_get_clones", clones)
    return calls


def _lazy(module: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    module.eval()(*inputs)  # materializes; eval so running statistics stay at their defaults
    return module.train()


# One of every torch.nn module that owns parameters, built so that every branch of its
# reset_parameters runs (grouped and transposed convs, padding rows, kdim/vdim, bias_k...).
TORCH_MODULES = {
    "Linear": lambda: nn.Linear(7, 5),
    "Linear-nobias": lambda: nn.Linear(7, 5, bias=False),
    "LazyLinear": lambda: _lazy(nn.LazyLinear(4), torch.zeros(2, 6)),
    "Bilinear": lambda: nn.Bilinear(3, 4, 5),
    "Conv1d": lambda: nn.Conv1d(4, 6, 3, groups=2),
    "Conv2d": lambda: nn.Conv2d(3, 6, (2, 3)),
    "Conv3d": lambda: nn.Conv3d(2, 3, 2, bias=False),
    "ConvTranspose1d": lambda: nn.ConvTranspose1d(4, 6, 3, groups=2),
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(3, 5, (2, 3)),
    "ConvTranspose3d": lambda: nn.ConvTranspose3d(2, 4, 2, groups=2),
    "LazyConv1d": lambda: _lazy(nn.LazyConv1d(4, 3), torch.zeros(1, 3, 5)),
    "LazyConv2d": lambda: _lazy(nn.LazyConv2d(4, 3), torch.zeros(1, 3, 5, 5)),
    "LazyConv3d": lambda: _lazy(nn.LazyConv3d(2, 2), torch.zeros(1, 3, 3, 3, 3)),
    "LazyConvTranspose1d": lambda: _lazy(nn.LazyConvTranspose1d(4, 3), torch.zeros(1, 3, 5)),
    "LazyConvTranspose2d": lambda: _lazy(nn.LazyConvTranspose2d(4, 3), torch.zeros(1, 3, 5, 5)),
    "LazyConvTranspose3d": lambda: _lazy(nn.LazyConvTranspose3d(2, 2), torch.zeros(1, 3, 3, 3, 3)),
    "Embedding": lambda: nn.Embedding(10, 4, padding_idx=2),
    "EmbeddingBag": lambda: nn.EmbeddingBag(10, 4, padding_idx=0),
    "BatchNorm1d": lambda: nn.BatchNorm1d(4),
    "BatchNorm2d": lambda: nn.BatchNorm2d(4),
    "BatchNorm3d": lambda: nn.BatchNorm3d(4, affine=False),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(4),
    "LazyBatchNorm1d": lambda: _lazy(nn.LazyBatchNorm1d(), torch.randn(3, 4)),
    "LazyBatchNorm2d": lambda: _lazy(nn.LazyBatchNorm2d(), torch.randn(2, 4, 2, 2)),
    "LazyBatchNorm3d": lambda: _lazy(nn.LazyBatchNorm3d(), torch.randn(2, 4, 2, 2, 2)),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True),
    "InstanceNorm3d": lambda: nn.InstanceNorm3d(4, affine=True),
    "LazyInstanceNorm1d": lambda: _lazy(nn.LazyInstanceNorm1d(affine=True), torch.randn(2, 4, 3)),
    "LazyInstanceNorm2d": lambda: _lazy(nn.LazyInstanceNorm2d(affine=True), torch.randn(2, 4, 3, 3)),
    "LazyInstanceNorm3d": lambda: _lazy(nn.LazyInstanceNorm3d(affine=True), torch.randn(2, 4, 3, 3, 3)),
    "LayerNorm": lambda: nn.LayerNorm((3, 4)),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "RMSNorm": lambda: nn.RMSNorm(4),
    "PReLU": lambda: nn.PReLU(3, init=0.1),
    "RNN": lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
    "LSTM": lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2),
    "GRU": lambda: nn.GRU(3, 4, bias=False),
    "RNNCell": lambda: nn.RNNCell(3, 4),
    "LSTMCell": lambda: nn.LSTMCell(3, 4),
    "GRUCell": lambda: nn.GRUCell(3, 4),
    "MultiheadAttention": lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True),
    "MultiheadAttention-kdim": lambda: nn.MultiheadAttention(8, 2, kdim=3, vdim=5),
    "MultiheadAttention-nobias": lambda: nn.MultiheadAttention(8, 2, bias=False),
    "TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=12),
    "TransformerDecoder": lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 12), 2),
    "Transformer": lambda: nn.Transformer(8, 2, 1, 1, dim_feedforward=12),
    "AdaptiveLogSoftmaxWithLoss": lambda: nn.AdaptiveLogSoftmaxWithLoss(8, 20, [5, 10], div_value=2.0),
    "LinearCrossEntropyLoss": lambda: nn.LinearCrossEntropyLoss(4, 6, bias=True),
}


def _build(factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.Transformer's nested-tensor note, lazy modules' notice
        return factory()


@pytest.mark.parametrize("kind", list(TORCH_MODULES))
def test_torch_scheme_draws_what_torch_draws(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's draws are logged while the module is built; ours by the generator. Each random
    # tensor must get the same distribution with the same parameters, in state-dict order, and
    # every other tensor the same constant values torch gives it.
    calls = _record_torch_draws(monkeypatch)
    module = _build(TORCH_MODULES[kind])
    monkeypatch.undo()
    rng = RecordingRandomState(313)
    arrays = init_arrays(module, rng, "torch")

    expected = []
    seen = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        call = calls.get((tensor.data_ptr(), tensor.numel()))
        if call is not None and call[0] != "constant":
            expected.append((name, call))
            continue
        assert name in arrays, f"{kind}: no value for {name}"
        ours = torch.from_numpy(np.asarray(arrays[name])).to(tensor.dtype)
        assert torch.equal(ours, tensor.detach()), f"{kind}: {name} differs from torch's constant init"

    assert len(rng.calls) == len(expected), (kind, [n for n, _ in expected], rng.calls)
    for (name, theirs), ours in zip(expected, rng.calls, strict=True):
        assert ours[0] == theirs[0] and ours[3] == theirs[3], (kind, name, ours, theirs)
        np.testing.assert_allclose(ours[1:3], theirs[1:3], rtol=1e-12, atol=0, err_msg=f"{kind}: {name}")
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            pad = module.padding_idx
            assert not arrays[name][pad].any() and not module.weight[pad].any()


def _param_owning_classes() -> set[str]:
    """torch.nn classes whose own code (or a torch.nn base's) creates parameters."""
    found = set()
    for name in dir(nn):
        cls = getattr(nn, name)
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)) or cls in (nn.Module, nn.RNNBase):
            continue
        if name in ("ParameterList", "ParameterDict", "RNNCellBase", "Container"):
            continue  # containers of the user's parameters, or abstract bases
        for base in cls.__mro__:
            if base.__module__.startswith("torch.nn.modules") and base is not nn.Module:
                source = inspect.getsource(base)
                if "Parameter(" in source or "register_parameter" in source:
                    found.add(name)
    return found


def test_every_torch_nn_module_with_parameters_is_covered() -> None:
    tested = {type(m).__name__ for f in TORCH_MODULES.values() for m in _build(f).modules()}
    tested |= {k for k in TORCH_MODULES if k.startswith("Lazy")}  # lazy modules become their eager class
    missing = _param_owning_classes() - tested
    assert not missing, f"add these torch.nn modules to TORCH_MODULES: {sorted(missing)}"


# Statistics against torch's own initialization of big layers.


def _assert_same_uniform(ours: np.ndarray, theirs: np.ndarray, bound: float) -> None:
    """Both samples uniform(±bound): maxima near the bound, variances bound²/3, within what n allows."""
    n = min(ours.size, theirs.size)
    for sample in (ours, theirs):
        assert (1 - 8 / n) * bound <= np.abs(sample).max() <= bound * (1 + 1e-7)
    rtol = max(0.03, 5 * math.sqrt(0.8 / n))  # the relative spread of a uniform sample's variance
    np.testing.assert_allclose(ours.var(), theirs.var(), rtol=rtol)
    np.testing.assert_allclose(ours.var(), bound**2 / 3, rtol=rtol)


@pytest.mark.parametrize(
    ("factory", "name", "bound"),
    [
        (lambda: nn.Linear(512, 256), "weight", 1 / math.sqrt(512)),
        (lambda: nn.Linear(512, 256), "bias", 1 / math.sqrt(512)),
        (lambda: nn.LSTM(64, 128), "weight_ih_l0", 1 / math.sqrt(128)),
        (lambda: nn.LSTM(64, 128), "weight_hh_l0", 1 / math.sqrt(128)),
        (lambda: nn.Conv2d(32, 64, 3, groups=2), "weight", 1 / math.sqrt(16 * 9)),
        (lambda: nn.ConvTranspose2d(32, 64, 3, groups=4), "weight", 1 / math.sqrt(16 * 9)),
    ],
)
def test_torch_scheme_statistics_match_torch(factory, name: str, bound: float) -> None:
    torch.manual_seed(0)
    theirs = factory().state_dict()[name].numpy()
    module = factory()
    init(module, np.random.RandomState(313))
    _assert_same_uniform(module.state_dict()[name].numpy(), theirs, bound)


def test_torch_scheme_embedding_is_standard_normal_with_padding_row_zero() -> None:
    emb = nn.Embedding(5000, 16, padding_idx=3)
    init(emb, np.random.default_rng(1))
    weight = emb.weight.detach().numpy()
    assert not weight[3].any()
    rest = np.delete(weight, 3, axis=0)
    assert abs(rest.mean()) < 0.01 and abs(rest.std() - 1) < 0.01


# Against Keras's own initializers and layers.


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    return keras


def _glorot_limit(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6 / (fan_in + fan_out))


def _assert_orthonormal_rows(matrix: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(matrix.shape[0]), atol=atol)


def test_keras_dense_and_glorot_uniform(keras) -> None:
    theirs = np.asarray(keras.initializers.GlorotUniform(seed=0)((256, 128)))
    arrays = init_arrays(nn.Linear(256, 128), np.random.default_rng(0), "keras")
    _assert_same_uniform(arrays["weight"].T, theirs, _glorot_limit(256, 128))
    assert not arrays["bias"].any()


def test_keras_lstm_kernel_recurrent_kernel_and_forget_bias(keras) -> None:
    F, H = 16, 32
    layer = keras.layers.LSTM(H)
    layer.build((None, 5, F))
    kernel, recurrent, bias = (np.asarray(w) for w in layer.get_weights())
    lstm = nn.LSTM(F, H, num_layers=2)
    init(lstm, np.random.default_rng(0), "keras")
    ours = {k: v.numpy().astype(np.float64) for k, v in lstm.state_dict().items()}

    _assert_same_uniform(ours["weight_ih_l0"].T, kernel, _glorot_limit(F, 4 * H))
    # Keras's orthogonal is on the whole (H, 4H) matrix: its rows are orthonormal, one gate's block is not
    for rec in (recurrent, ours["weight_hh_l0"].T):
        assert rec.shape == (H, 4 * H)
        _assert_orthonormal_rows(rec, atol=2e-6)
        assert np.abs(rec[:, :H] @ rec[:, :H].T - np.eye(H)).max() > 0.3
    np.testing.assert_allclose(ours["weight_hh_l0"].var(), recurrent.var(), rtol=0.05)
    np.testing.assert_allclose(ours["weight_hh_l0"].var(), 1 / (4 * H), rtol=0.01)
    # unit_forget_bias: Keras's one bias is bias_ih + bias_hh; bias_hh is zero
    np.testing.assert_array_equal(ours["bias_ih_l0"] + ours["bias_hh_l0"], bias)
    np.testing.assert_array_equal(keras_layout.export(lstm)["layers/lstm/cell/vars/2"], bias)
    assert not ours["bias_hh_l0"].any() and bias[H : 2 * H].min() == 1

    second = keras.layers.LSTM(H)  # the second stacked layer sees H features
    second.build((None, 5, H))
    assert np.abs(ours["weight_ih_l1"]).max() <= _glorot_limit(H, 4 * H) + 1e-7
    assert np.abs(np.asarray(second.get_weights()[0])).max() <= _glorot_limit(H, 4 * H)


def test_keras_orthogonal_initializer_and_lstm_agree(keras) -> None:
    H = 24
    theirs = np.asarray(keras.initializers.Orthogonal(seed=0)((H, 4 * H)))
    ours = init_arrays(nn.LSTMCell(5, H), np.random.RandomState(313), "keras")["weight_hh"].T
    for matrix in (theirs, ours):
        _assert_orthonormal_rows(matrix, atol=1e-6)
    np.testing.assert_allclose(ours.var(), theirs.var(), rtol=0.05)


def test_keras_gru_is_drawn_in_keras_layout_and_gate_order(keras) -> None:
    F, H = 16, 32
    layer = keras.layers.GRU(H)
    layer.build((None, 5, F))
    kernel, recurrent, bias = (np.asarray(w) for w in layer.get_weights())
    gru = nn.GRU(F, H).double()
    init(gru, np.random.default_rng(7), "keras")
    # exported with the Keras layout (z,r,h gate order, Keras shapes), the values are the draws themselves
    ours = keras_layout.export(gru)
    ours_kernel, ours_recurrent, ours_bias = (ours[f"layers/gru/cell/vars/{i}"] for i in range(3))
    limit = _glorot_limit(F, 3 * H)
    np.testing.assert_array_equal(ours_kernel, np.random.default_rng(7).uniform(-limit, limit, (F, 3 * H)))
    _assert_same_uniform(ours_kernel, kernel, limit)
    for rec in (recurrent, ours_recurrent):
        assert rec.shape == (H, 3 * H)
        _assert_orthonormal_rows(rec, atol=2e-6)
    assert bias.shape == ours_bias.shape == (2, 3 * H) and not bias.any() and not ours_bias.any()


def test_keras_simple_rnn_recurrent_kernel_is_square_orthogonal(keras) -> None:
    layer = keras.layers.SimpleRNN(8)
    layer.build((None, 5, 3))
    theirs = np.asarray(layer.get_weights()[1])
    ours = init_arrays(nn.RNN(3, 8), np.random.default_rng(2), "keras")["weight_hh_l0"]
    for matrix in (theirs, ours, ours.T):
        _assert_orthonormal_rows(matrix, atol=1e-6)


def test_keras_convolutions(keras) -> None:
    conv = keras.layers.Conv2D(64, 3)
    conv.build((None, 8, 8, 32))
    ours = init_arrays(nn.Conv2d(32, 64, 3), np.random.default_rng(0), "keras")
    _assert_same_uniform(
        ours["weight"].transpose(2, 3, 1, 0), np.asarray(conv.kernel), _glorot_limit(288, 576)
    )
    assert not ours["bias"].any()

    convt = keras.layers.Conv2DTranspose(48, 3)
    convt.build((None, 8, 8, 32))
    ours = init_arrays(nn.ConvTranspose2d(32, 48, 3), np.random.default_rng(0), "keras")
    theirs = np.asarray(convt.kernel)
    assert theirs.shape == ours["weight"].transpose(2, 3, 1, 0).shape == (3, 3, 48, 32)
    _assert_same_uniform(ours["weight"], theirs, _glorot_limit(288, 432))
    drawn = np.random.default_rng(0).uniform(
        -_glorot_limit(288, 432), _glorot_limit(288, 432), (3, 3, 48, 32)
    )
    np.testing.assert_array_equal(ours["weight"].transpose(2, 3, 1, 0), drawn)


def test_keras_embedding_and_attention(keras) -> None:
    emb = keras.layers.Embedding(1000, 16)
    emb.build((None,))
    ours = init_arrays(nn.Embedding(1000, 16), np.random.default_rng(0), "keras")["weight"]
    _assert_same_uniform(ours, np.asarray(emb.embeddings), 0.05)

    mha = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)
    x = np.zeros((1, 5, 64), np.float32)
    mha(x, x)
    ours = init_arrays(nn.MultiheadAttention(64, 4), np.random.default_rng(0), "keras")
    limit = _glorot_limit(64, 64)
    blocks = np.split(ours["in_proj_weight"], 3)
    for dense, block in zip((mha.query_dense, mha.key_dense, mha.value_dense), blocks, strict=True):
        _assert_same_uniform(block.T, np.asarray(dense.kernel).reshape(64, 64), limit)
    _assert_same_uniform(
        ours["out_proj.weight"].T, np.asarray(mha.output_dense.kernel).reshape(64, 64), limit
    )
    assert not ours["in_proj_bias"].any() and not ours["out_proj.bias"].any()


def test_keras_scheme_refuses_what_keras_cannot_express() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(
        LayoutError, match=r"'weight_hr_l0' of the root module \(LSTM\): Keras's LSTM has no projection"
    ):
        init_arrays(nn.LSTM(3, 4, proj_size=2), rng, "keras")
    with pytest.raises(
        LayoutError, match=r"'weight', 'bias' of the root module \(Bilinear\): Keras has no layer equivalent"
    ):
        init_arrays(nn.Bilinear(2, 3, 4), rng, "keras")
    # ... unless overrides cover it
    arrays = init_arrays(
        nn.Bilinear(2, 3, 4), rng, "keras", overrides={"weight": np.zeros((4, 2, 3)), "bias": np.ones(4)}
    )
    assert arrays["bias"].tolist() == [1, 1, 1, 1]


# Reproducibility.

_HASH_SCRIPT = """
import hashlib, sys
import numpy as np
from torch import nn
from weightport.initializers import init_arrays

model = nn.Sequential(
    nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.GRU(8, 3), nn.Linear(3, 2),
    nn.Conv1d(2, 4, 3), nn.Embedding(6, 3, padding_idx=1), nn.BatchNorm1d(4),
)
digest = hashlib.sha256()
for name, array in init_arrays(model, np.random.RandomState(313), sys.argv[1]).items():
    digest.update(name.encode() + np.ascontiguousarray(array, array.dtype.newbyteorder('<')).tobytes())
print(digest.hexdigest())
"""


# NumPy freezes RandomState's streams, so this holds on every machine and NumPy version; it changes
# only if weightport's rules or drawing order change (which would break users' reproducibility).
GOLDEN_TORCH_SHA256 = "7b3952dcc0045ff999076e9b4c82f66a9a54e65f8cb787fca5d2334e6a6db27b"


@pytest.mark.parametrize("scheme", ["torch", "keras"])
def test_same_seed_gives_identical_bytes_in_another_process(
    scheme: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "hash_init.py"
    script.write_text(_HASH_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), scheme], capture_output=True, text=True, check=True, timeout=120
    )
    monkeypatch.setattr(sys, "argv", [str(script), scheme])
    runpy.run_path(str(script))
    here = capsys.readouterr().out.strip()
    assert len(here) == 64 and done.stdout.strip() == here
    if scheme == "torch":
        assert here == GOLDEN_TORCH_SHA256


def test_generator_and_random_state_are_both_accepted() -> None:
    values = {}
    for rng in (np.random.default_rng(313), np.random.RandomState(313), np.random.RandomState(313)):
        lstm = nn.LSTM(3, 4)
        init(lstm, rng)
        values.setdefault(type(rng).__name__, []).append(lstm.weight_ih_l0.detach().clone())
    assert torch.equal(*values["RandomState"])
    assert not torch.equal(values["Generator"][0], values["RandomState"][0])
    with pytest.raises(
        TypeError, match=r"rng must be a np.random.Generator or np.random.RandomState .* got int"
    ):
        init(nn.LSTM(3, 4), 313)  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match=r"unknown initializer scheme 'flax': use one of 'torch', 'keras'"):
        init(nn.LSTM(3, 4), np.random.default_rng(0), "flax")


def test_values_are_drawn_in_float64_and_rounded_to_each_dtype() -> None:
    arrays = init_arrays(nn.Linear(4, 3), np.random.RandomState(313))
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float64)}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        lin = nn.Linear(4, 3).to(dtype)
        init(lin, np.random.RandomState(313))
        assert lin.weight.dtype == dtype
        assert torch.equal(lin.weight.detach(), torch.from_numpy(arrays["weight"]).to(dtype))


def test_order_is_state_dict_order_so_appending_a_module_keeps_earlier_values() -> None:
    short = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 2))
    long = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 2), nn.Linear(2, 5))
    first = init_arrays(short, np.random.RandomState(313))
    second = init_arrays(long, np.random.RandomState(313))
    assert list(first) == list(short.state_dict())
    for name, array in first.items():
        np.testing.assert_array_equal(second[name], array)


def test_tied_weights_are_drawn_once_and_loaded_under_both_names() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 3)
            self.decode = nn.Linear(3, 7)
            self.decode.weight = self.embed.weight

    model = Tied()
    rng = RecordingRandomState(313)
    arrays = init_arrays(model, rng)
    assert arrays["embed.weight"] is arrays["decode.weight"]
    assert [c[0] for c in rng.calls] == ["normal", "uniform"]  # the tied weight, then decode.bias
    init(model, np.random.RandomState(313))
    assert model.decode.weight is model.embed.weight
    np.testing.assert_allclose(model.embed.weight.detach().numpy(), arrays["embed.weight"], rtol=1e-7)


def test_norm_running_statistics_are_reset_and_other_buffers_kept() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(3)
            self.register_buffer("table", torch.arange(4.0))

    model = WithBuffer()
    model.norm(torch.randn(8, 3) * 5 + 2)
    report = init(model, np.random.default_rng(0))
    assert model.norm.running_mean.abs().sum() == 0 and torch.equal(model.norm.running_var, torch.ones(3))
    assert model.norm.num_batches_tracked.item() == 0
    assert torch.equal(model.table, torch.arange(4.0)) and report.missing == ["table"]


def test_meta_module_is_materialized() -> None:
    lin = nn.Linear(3, 2, device="meta")
    init(lin, np.random.RandomState(313))
    assert lin.weight.device.type == "cpu"
    np.testing.assert_allclose(
        lin.weight.detach().numpy(),
        init_arrays(nn.Linear(3, 2), np.random.RandomState(313))["weight"],
        rtol=1e-7,
    )


def test_lazy_module_not_yet_materialized_is_refused() -> None:
    with pytest.raises(
        LayoutError, match=r"'weight' of the root module \(LazyLinear\) is not materialized yet"
    ):
        init(nn.LazyLinear(3), np.random.default_rng(0))


# Overrides.


class Block(nn.Module):
    """A custom module owning parameters of its own, which no scheme knows."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(3))
        self.beta = nn.Parameter(torch.zeros(2, 3))
        self.fc = nn.Linear(3, 3)


def test_overrides_by_name_take_an_array_or_a_callable() -> None:
    seen = []

    def forget_one(shape, rng):
        seen.append((shape, type(rng)))
        return np.repeat([0.0, 1.0, 0.0, 0.0], 4)

    lstm = nn.LSTM(3, 4)
    init(lstm, np.random.RandomState(313), overrides={"bias_ih_l0": forget_one, "bias_hh_l0": np.zeros(16)})
    assert seen == [((16,), np.random.RandomState)]
    assert lstm.bias_ih_l0.tolist() == [0.0] * 4 + [1.0] * 4 + [0.0] * 8
    assert not lstm.bias_hh_l0.any()
    assert 0.45 < lstm.weight_ih_l0.abs().max().item() <= 0.5


def test_unknown_module_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(2, 3), Block())
    expected = (
        "weightport.init(scheme='torch') has no rule for 2 parameters; nothing was drawn or written:\n"
        "  - '1.alpha', '1.beta' of '1' (Block): the 'torch' scheme has no rule for Block\n"
        "Fix: pass overrides={'1.alpha': array_or_callable, ...} (a callable gets (shape, rng) and returns an "
        "array), or overrides={Block: fn} where fn(module, rng) returns {'alpha': array, ...} for every Block."
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayoutError) as caught:
        init(model, np.random.default_rng(0))
    assert str(caught.value) == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_module_covered_by_overrides_is_accepted() -> None:
    model = nn.Sequential(nn.Linear(2, 3), Block())
    init(
        model,
        np.random.default_rng(0),
        overrides={"1.alpha": np.ones(3), "1.beta": lambda s, rng: rng.normal(0, 1, s)},
    )
    assert model[1].alpha.tolist() == [1.0, 1.0, 1.0] and model[1].beta.abs().sum() > 0

    def block_init(module, rng):
        return {"alpha": np.full(3, 2.0), "beta": np.zeros((2, 3))}

    init(model, np.random.default_rng(0), overrides={Block: block_init})
    assert model[1].alpha.tolist() == [2.0, 2.0, 2.0]
    assert model[1].fc.weight.abs().sum() > 0  # Block's child Linear still follows the scheme
    with pytest.raises(
        LayoutError, match=r"the override for Block returned 'gamma' for '1' \(Block\), which has only"
    ):
        init(
            model,
            np.random.default_rng(0),
            overrides={Block: lambda m, rng: {"alpha": np.ones(3), "gamma": 1}},
        )
    with pytest.raises(LayoutError, match=r"the override for Block returned no 'beta' for '1' \(Block\)"):
        init(model, np.random.default_rng(0), overrides={Block: lambda m, rng: {"alpha": np.ones(3)}})


def test_unknown_override_names_are_refused() -> None:
    lstm = nn.LSTM(3, 4)
    with pytest.raises(
        LayoutError,
        match=r"overrides name 'bias_ih_0' \(did you mean 'bias_ih_l0'\?\) is not a tensor of LSTM",
    ):
        init(lstm, np.random.default_rng(0), overrides={"bias_ih_0": np.zeros(16)})
    with pytest.raises(LayoutError, match=r"overrides\[Block\]: LSTM has no Block module; remove it"):
        init(lstm, np.random.default_rng(0), overrides={Block: lambda m, rng: {}})
    with pytest.raises(
        LayoutError, match=r"overrides key 3: expected a state-dict name \(str\) or an nn.Module"
    ):
        init(lstm, np.random.default_rng(0), overrides={3: np.zeros(16)})  # type: ignore[dict-item]


def test_override_of_the_wrong_shape_changes_nothing() -> None:
    lstm = nn.LSTM(3, 4)
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    with pytest.raises(LoadError, match=r"'bias_ih_l0': expected shape \(16,\) = \(4\*hidden_size,\)"):
        init(lstm, np.random.RandomState(313), overrides={"bias_ih_l0": np.zeros(12)})
    assert all(torch.equal(before[k], v) for k, v in lstm.state_dict().items())


def test_wrapped_modules_are_initialized_through_their_wrapper() -> None:
    inner = torch.nn.Linear(3, 2)
    wrapped = torch.nn.DataParallel(inner)
    init(wrapped, np.random.RandomState(313))
    expected = init_arrays(torch.nn.Linear(3, 2), np.random.RandomState(313))
    np.testing.assert_array_equal(inner.weight.detach().numpy(), expected["weight"].astype(np.float32))


def test_a_meta_buffer_no_rule_draws_is_refused_in_inits_terms() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 5))
        model.register_buffer("extra", torch.empty(3))
    with pytest.raises(LoadError) as info:
        init(model, np.random.default_rng(0))
    (problem,) = info.value.problems
    assert problem.name == "extra" and problem.found == "no rule of the scheme draws it"
    assert problem.fix.startswith("give it with overrides={'extra': ...}")
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    init(model, np.random.default_rng(0), overrides={"extra": np.zeros(3)})
    assert model.extra.tolist() == [0.0] * 3 and not model[0].weight.is_meta
