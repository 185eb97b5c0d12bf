"""Flax checkpoints from older releases (0.7, 0.8, 0.10, 0.11) load and compute what that Flax computed.

The golden files under ``golden/flax_versions/<release>/`` were written by
``golden/make_flax_versions.py`` run with each release installed (see its doc):
linen variables as ``flax.serialization.to_bytes`` msgpack, nnx state as a pure
dict in msgpack, as a flat ``.npz``, and as the State's own pytree (variables
wrapped as ``{"value": array}``, ``{"raw_value": array}`` in 0.8), with Flax's
outputs on a random input. Each is loaded into the PyTorch twin of the model and
run; outputs must match Flax's within 1e-5. Needs only torch, numpy and msgpack.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import UncheckedConfigWarning

pytest.importorskip("msgpack")

GOLDEN = Path(__file__).parent / "golden" / "flax_versions"
RELEASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "io.npz").is_file())
TOL = 1e-5
F, H = 3, 4


class Layers(nn.Module):
    """The twin of ``layers`` in make_flax_versions.py (Flax runs channels-last)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(F, 4, 2)
        self.ln = nn.LayerNorm(4, eps=1e-6)  # Flax's LayerNorm epsilon
        self.bn = nn.BatchNorm1d(4, eps=1e-5).eval()
        self.fc = nn.Linear(4, 2)
        self.conv2 = nn.Conv2d(2, 3, 3)

    def forward(
        self, tokens: torch.Tensor, x: torch.Tensor, img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = self.ln(self.emb(tokens)[:, 1:] + c)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.fc(h), self.conv2(img.permute(0, 3, 1, 2)).mean(dim=(2, 3))


TWINS = {
    "lstm": lambda: nn.LSTM(F, H, batch_first=True),
    "optlstm": lambda: nn.LSTM(F, H, batch_first=True),
    "gru": lambda: nn.GRU(F, H, batch_first=True),
    "simple": lambda: nn.RNN(F, H, batch_first=True),
    "bilstm": lambda: nn.LSTM(F, H, batch_first=True, bidirectional=True),
    "layers": Layers,
}


def _cases() -> list[tuple[str, str]]:
    """(release, file) for every params file recorded."""
    return [
        (release, path.name)
        for release in RELEASES
        for path in sorted((GOLDEN / release).iterdir())
        if path.name != "io.npz"
    ]


def _model(file: str) -> tuple[str, str]:
    """``nnx_lstm_tree.msgpack`` -> (``nnx_lstm``, ``lstm``)."""
    api, name = file.split(".")[0].split("_")[:2]
    return f"{api}_{name}", name


def _close(found: torch.Tensor, expected: np.ndarray, what: str) -> float:
    found_np = found.detach().numpy()
    assert found_np.shape == expected.shape, what
    error = float(np.max(np.abs(found_np - expected)))
    print(f"maxerr {what}: {error:.2e}")  # pytest -s
    assert error <= TOL, f"{what}: max error {error}"
    return error


def test_every_release_has_golden_files() -> None:
    assert {"0.7.5", "0.8.5", "0.10.2", "0.11.2"} <= set(RELEASES)
    for release in RELEASES:
        io = np.load(GOLDEN / release / "io.npz")
        assert str(io["flax_version"]) == release


@pytest.mark.parametrize(("release", "file"), _cases(), ids=[f"{r}-{f}" for r, f in _cases()])
def test_old_flax_checkpoint_computes_what_flax_computed(release: str, file: str) -> None:
    path = GOLDEN / release / file
    io = np.load(GOLDEN / release / "io.npz")
    model_key, name = _model(file)
    module = TWINS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(module, path, layout="flax")
    assert report.layout == "flax"
    what = f"{release} {file}"
    with torch.no_grad():
        if name == "layers":
            y, z = module(*(torch.from_numpy(io[k]) for k in ("tokens", "x", "img")))
            _close(y, io[f"{model_key}/y"], f"{what}: y")
            _close(z, io[f"{model_key}/z"], f"{what}: z")
            return
        out, state = module(torch.from_numpy(io["x"]))
    _close(out, io[f"{model_key}/y"], f"{what}: outputs")
    if name == "bilstm":
        return
    if isinstance(state, tuple):  # Flax's LSTM carry is (c, h); PyTorch returns (h_n, c_n)
        _close(state[0][-1], io[f"{model_key}/h"], f"{what}: h")
        _close(state[1][-1], io[f"{model_key}/c"], f"{what}: c")
    else:
        _close(state[-1], io[f"{model_key}/h"], f"{what}: h")


@pytest.mark.parametrize("release", RELEASES)
def test_a_wrong_twin_is_caught(release: str) -> None:
    """The oracle can fail: a GRU's golden params, gate blocks swapped after loading, miss Flax's outputs."""
    io = np.load(GOLDEN / release / "io.npz")
    module = nn.GRU(F, H, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        weightport.load(module, GOLDEN / release / "linen_gru.msgpack")
    with torch.no_grad():
        module.weight_ih_l0.copy_(module.weight_ih_l0.roll(H, 0))  # r, z, n -> n, r, z
        out = module(torch.from_numpy(io["x"]))[0]
    with pytest.raises(AssertionError, match="max error"):
        _close(out, io["linen_gru/y"], f"{release} swapped gates")


# --- in-memory State of Flax 0.8 to 0.10 ----------------------------------------------------------------
# Those releases' ``nnx.state(model)`` holds ``VariableState`` leaves: the array in ``.value``,
# the variable class in ``.type`` (Param, BatchStat, RngKey, ...), and 0.10 keeps a
# ``Param(None)`` for a Linear without bias. Stand-ins with the same classes, module
# names and attributes (checked against real 0.8.5 and 0.10.2 States) test the reader here.


def _nnx_class(name: str, base: type = object) -> type:
    return type(name, (base,), {"__module__": "flax.nnx.variablelib"})


_Variable = _nnx_class("Variable")
_Param, _RngKey = _nnx_class("Param", _Variable), _nnx_class("RngKey", _Variable)
_VariableState = _nnx_class("VariableState")
_State = type("State", (dict,), {"__module__": "flax.nnx.statelib"})


def _wrapped(kind: type, value: object) -> object:
    state = _VariableState()
    state.type, state.value = kind, value  # type: ignore[attr-defined]
    return state


def test_variable_state_leaves_of_old_nnx_load() -> None:
    rng = np.random.default_rng(5)
    kernel, bias = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    state = _State(
        fc=_State(kernel=_wrapped(_Param, kernel), bias=_wrapped(_Param, bias)),
        extra=_State(bias=_wrapped(_Param, None)),
        rngs=_State(default=_State(key=_wrapped(_RngKey, np.zeros(2, np.uint32)))),
    )
    module = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(module, state)
    assert report.ignored == [
        "extra/bias (an nnx Param holding None, not an array)",
        "rngs/default/key (an nnx RngKey, not a Param or BatchStat)",
    ]
    x = rng.normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        _close(module(torch.from_numpy(x)), x @ kernel + bias, "VariableState Linear")


def test_a_layer_named_value_is_not_a_variable() -> None:
    """Only a node whose one child is an array named ``value``/``raw_value`` is a variable's wrapper."""
    rng = np.random.default_rng(6)
    kernel, bias = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    module = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(
            module, {"params": {"value": {"kernel": kernel, "bias": bias}}}, layout="flax"
        )
    assert [p.source_layer for p in report.pairings] == ["value"]
    assert np.array_equal(module.weight.detach().numpy(), kernel.T)
