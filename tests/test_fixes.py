"""Issue 10: every ``Fix:`` leads somewhere.

Each scenario raises one of weightport's errors whose fix names a keyword (``prefix=``,
``strict=False``, ``mapping=``, ``layout=``, ``example_inputs=``, ``allow_nonfinite=``,
``overrides=``, ``expected=``), a command-line flag or a mapping; checks that the message says it;
then does what it says, literally (a placeholder such as ``'module.path'`` filled with the right path,
as a user would), and checks the outcome: a load that is exact (every tensor the source holds for
the module placed; values, or outputs against the framework's own, equal to 1e-5), or a different,
more specific error. Never a fix that loads a model with real weights left out or silently wrong,
nor one that leads back to the same error. Models have random non-zero biases throughout, so a
crossed or skipped tensor shows.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib
import itertools
import re
import shutil
import textwrap
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport import (
    LayoutError,
    LoadError,
    SourceError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
    WeightportError,
)
from weightport.cli import main

TOL = 1e-5


# --- helpers -----------------------------------------------------------------------------------------------


def quiet(call: Callable[[], Any]) -> Any:
    """Run ``call``; a weights-only file's UncheckedConfigWarning is expected, any other warning fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return call()


def refused(
    call: Callable[[], Any], kind: type[WeightportError], *fixes: str, module: nn.Module | None = None
) -> str:
    """``call`` raises ``kind`` whose message says each of ``fixes``; ``module`` is left as it was."""
    before = snapshot(module) if module is not None else None
    with pytest.raises(kind) as caught:
        quiet(call)
    message = str(caught.value)
    for fix in fixes:
        assert fix in message, f"{fix!r} not in:\n{message}"
    if module is not None:
        assert snapshot(module) == before, "a refused load changed the module"
    return message


def elsewhere(call: Callable[[], Any], first: str) -> str:
    """Following the fix raised a WeightportError that says something else than ``first``."""
    with pytest.raises(WeightportError) as caught:
        quiet(call)
    assert str(caught.value) != first, "the fix leads back to the same error"
    return str(caught.value)


def fix_of(message: str) -> str:
    """The text after the last ``Fix:`` (what a one-error message tells the user to do)."""
    return message.rsplit("Fix:", 1)[1]


def state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def assert_values(module: nn.Module, expected: Mapping[str, np.ndarray]) -> None:
    """The module's tensors are exactly ``expected``, by name: every one given, none left over."""
    got = state(module)
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for name, value in expected.items():
        assert got[name].shape == np.shape(value), name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=TOL, err_msg=name)


def assert_outputs(got: Any, expected: Any) -> None:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert float(np.max(np.abs(got.astype(np.float64) - expected))) < TOL


def run(module: nn.Module, x: np.ndarray) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x))


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with every parameter uniform in ±0.6 (biases non-zero)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(torch.from_numpy(rng.uniform(-0.6, 0.6, tuple(t.shape)).astype(np.float32)))
    return module.eval()


def randomize_keras(model: Any, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, np.shape(w)).astype(np.float32) for w in model.get_weights()])
    return model


def _keras() -> Any:
    pytest.importorskip("h5py")
    return pytest.importorskip("keras")


def _flax() -> tuple[Any, Any, Any]:
    pytest.importorskip("msgpack")
    return (
        pytest.importorskip("jax"),
        pytest.importorskip("flax.linen"),
        pytest.importorskip("flax.serialization"),
    )


def _onnx() -> tuple[Any, Any]:
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def run_onnxruntime(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    _, ort = _onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, dict(feeds))]


def onnx_export(model: nn.Module, x: np.ndarray, path: Path, **kw: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(
            model.eval(), (torch.from_numpy(x),), str(path), dynamo=False, input_names=["x"], **kw
        )
    return path


# --- PyTorch models ------------------------------------------------------------------------------------------


def encoder_head() -> nn.Sequential:
    return nn.Sequential(OrderedDict(encoder=nn.Linear(3, 2), head=nn.Linear(2, 1)))


class Masked(nn.Module):
    """A buffer that holds ``-inf`` on purpose, as an attention mask does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("mask", torch.zeros(3))


class Stack(nn.Module):
    """Two stacked LSTMs in one ``nn.LSTM`` and a head: the Keras ``stack`` model."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Declared(nn.Module):
    """``Linear(4, 4)`` layers declared in the reverse of their call order, then a head."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        for k in reversed(range(n)):
            self.add_module(f"h{k}", nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.n):
            x = self.get_submodule(f"h{k}")(x)
        return self.head(x)


class FirstSecond(nn.Module):
    """The Flax ``Two`` model (``alpha`` then ``beta``) under other names, declared second first."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(4, 4)
        self.first = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class Swapped(nn.Module):
    """The Keras ``enc`` (bidirectional) and ``dec`` layers, under each other's names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(6, 4, batch_first=True)
        self.dec = nn.LSTM(2, 3, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(self.dec(x)[0])[0][:, -1]


class WithPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.PReLU(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Flipped(nn.Module):
    """A forward LSTM run on the time-flipped input: what an ONNX ``direction=reverse`` node computes."""

    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x.flip(0))[0].flip(0)


class BatchedMatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w)


class LstmHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


# --- the frameworks' files, made once ------------------------------------------------------------------------


@dataclass
class Port:
    """A framework's file, an input, and that framework's own output on it."""

    path: Path
    x: np.ndarray
    expected: np.ndarray


class Files:
    """Framework files, each written by the framework itself on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _keras_port(self, name: str, layers: list[Any], shape: tuple[int, ...], seed: int) -> Port:
        keras = _keras()
        keras.backend.clear_session()
        model = randomize_keras(keras.Sequential([keras.Input(shape), *layers]), seed)
        x = np.random.default_rng(seed).standard_normal((2, *shape)).astype(np.float32)
        model.save(self.folder / f"{name}.keras")
        model.save_weights(self.folder / f"{name}.weights.h5")
        return Port(self.folder / f"{name}.keras", x, np.asarray(model(x)))

    @cached_property
    def stack(self) -> Port:
        """LSTM 'l0', LSTM 'l1', Dense 'head': the PyTorch model is :class:`Stack`."""
        L = _keras().layers
        return self._keras_port(
            "stack",
            [L.LSTM(4, return_sequences=True, name="l0"), L.LSTM(4, name="l1"), L.Dense(2, name="head")],
            (5, 3),
            1,
        )

    @cached_property
    def three(self) -> Port:
        """Dense 'a' (4 -> 4), 'b' (4 -> 4), 'c' (4 -> 2)."""
        L = _keras().layers
        return self._keras_port(
            "three", [L.Dense(4, name="a"), L.Dense(4, name="b"), L.Dense(2, name="c")], (4,), 2
        )

    @cached_property
    def prelu(self) -> Port:
        """Dense 'fc' and PReLU 'act', a class the Keras layout has no rule for."""
        L = _keras().layers
        return self._keras_port("prelu", [L.Dense(3, name="fc"), L.PReLU(name="act")], (4,), 3)

    @cached_property
    def custom(self) -> Port:
        """A custom class 'proj' (a Dense in all but class: weightport has no rule for it) and Dense 'head'."""
        keras = _keras()

        class Projection(keras.layers.Dense):  # type: ignore[misc,name-defined]
            pass

        return self._keras_port(
            "custom", [Projection(3, name="proj"), keras.layers.Dense(2, name="head")], (4,), 4
        )

    @cached_property
    def bidirectional(self) -> Port:
        """Bidirectional(LSTM(3)) 'enc', then LSTM(4) 'dec'."""
        L = _keras().layers
        enc = L.Bidirectional(L.LSTM(3, return_sequences=True), name="enc")
        return self._keras_port("bidirectional", [enc, L.LSTM(4, name="dec")], (5, 2), 5)

    @cached_property
    def flax_bn(self) -> tuple[Path, Path, np.ndarray, np.ndarray]:
        """Dense then BatchNorm with never-updated statistics: params only, the whole variables, x, output."""
        jax, linen, serialization = _flax()

        class DenseBN(linen.Module):
            @linen.compact
            def __call__(self, x: Any) -> Any:
                return linen.BatchNorm(use_running_average=True)(linen.Dense(4)(x))

        rng = np.random.default_rng(6)
        x = rng.standard_normal((3, 5)).astype(np.float32)
        variables = DenseBN().init(jax.random.PRNGKey(0), x)
        params = jax.tree_util.tree_map(
            lambda a: rng.uniform(-0.6, 0.6, a.shape).astype(np.float32), variables["params"]
        )
        variables = {"params": params, "batch_stats": variables["batch_stats"]}
        (self.folder / "bn_params.msgpack").write_bytes(serialization.to_bytes(params))
        (self.folder / "bn_all.msgpack").write_bytes(serialization.to_bytes(variables))
        expected = np.asarray(DenseBN().apply(variables, x))
        return self.folder / "bn_params.msgpack", self.folder / "bn_all.msgpack", x, expected

    @cached_property
    def flax_two(self) -> Port:
        """Dense 'alpha' then Dense 'beta', named by attribute: no recorded order."""
        jax, linen, serialization = _flax()

        class Two(linen.Module):
            def setup(self) -> None:
                self.alpha = linen.Dense(4)
                self.beta = linen.Dense(4)

            def __call__(self, x: Any) -> Any:
                return self.beta(linen.relu(self.alpha(x)))

        rng = np.random.default_rng(7)
        x = rng.standard_normal((3, 4)).astype(np.float32)
        variables = Two().init(jax.random.PRNGKey(0), x)
        variables = jax.tree_util.tree_map(
            lambda a: rng.uniform(-0.6, 0.6, a.shape).astype(np.float32), variables
        )
        path = self.folder / "two.msgpack"
        path.write_bytes(serialization.to_bytes(variables))
        return Port(path, x, np.asarray(Two().apply(variables, x)))

    @cached_property
    def flax_mlp(self) -> tuple[Path, Port]:
        """Dense_0 (3 -> 4), relu, Dense_1 (4 -> 2): as a msgpack, and as a flat .npz with '/'-joined keys."""
        jax, linen, serialization = _flax()

        class MLP(linen.Module):
            @linen.compact
            def __call__(self, x: Any) -> Any:
                return linen.Dense(2)(linen.relu(linen.Dense(4)(x)))

        rng = np.random.default_rng(8)
        x = rng.standard_normal((3, 3)).astype(np.float32)
        variables = MLP().init(jax.random.PRNGKey(0), x)
        variables = jax.tree_util.tree_map(
            lambda a: rng.uniform(-0.6, 0.6, a.shape).astype(np.float32), variables
        )
        msgpack = self.folder / "mlp.msgpack"
        msgpack.write_bytes(serialization.to_bytes(variables))
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
        }
        np.savez(self.folder / "mlp.npz", **flat)
        return msgpack, Port(self.folder / "mlp.npz", x, np.asarray(MLP().apply(variables, x)))

    @cached_property
    def flax_dense_embed(self) -> tuple[Path, np.ndarray, np.ndarray]:
        """Embed (10 x 4) then Dense(2): the file, int ids, output."""
        jax, linen, serialization = _flax()

        class DE(linen.Module):
            @linen.compact
            def __call__(self, ids: Any) -> Any:
                return linen.Dense(2)(linen.Embed(10, 4)(ids))

        rng = np.random.default_rng(9)
        ids = rng.integers(0, 10, (2, 3))
        variables = DE().init(jax.random.PRNGKey(0), ids)
        variables = jax.tree_util.tree_map(
            lambda a: rng.uniform(-0.6, 0.6, a.shape).astype(np.float32), variables
        )
        path = self.folder / "de.msgpack"
        path.write_bytes(serialization.to_bytes(variables))
        return path, ids, np.asarray(DE().apply(variables, ids))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("frameworks"))


@dataclass
class Ctx:
    tmp: Path
    files: Files
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]


SCENARIOS: dict[str, Callable[[Ctx], None]] = {}


def scenario(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


# --- names (plan.py) -------------------------------------------------------------------------------------------


@scenario
def unknown_name_like_a_given_one_strict_false(ctx: Ctx) -> None:
    """An extra 'weights' beside 'weight': renaming it onto 'weight' would replace that value, so the fix
    is to skip or remove it."""
    source = state(randomized(nn.Linear(3, 2)))
    bad = dict(source, weights=np.ones((2, 3)))
    target = nn.Linear(3, 2)
    message = refused(
        lambda: weightport.load(target, bad),
        LoadError,
        "remove it (it looks like 'weight', which the source gives already), or pass strict=False",
        module=target,
    )
    assert "Rename it" not in message
    module = nn.Linear(3, 2)
    assert weightport.load(module, bad, strict=False).ignored == ["weights"]
    assert_values(module, source)
    module = nn.Linear(3, 2)  # "remove it"
    weightport.load(module, {k: v for k, v in bad.items() if k != "weights"})
    assert_values(module, source)


@scenario
def unknown_name_strict_false(ctx: Ctx) -> None:
    source = state(randomized(nn.Linear(3, 2)))
    bad = dict(source, zzz=np.ones(4))
    refused(lambda: weightport.load(nn.Linear(3, 2), bad), LoadError, "pass strict=False to skip names")
    module = nn.Linear(3, 2)
    weightport.load(module, bad, strict=False)
    assert_values(module, source)


@scenario
def misspelt_name_on_both_sides_rename_it(ctx: Ctx) -> None:
    source = state(randomized(nn.Linear(3, 2)))
    bad = {"weight": source["weight"], "bais": source["bias"]}
    message = refused(
        lambda: weightport.load(nn.Linear(3, 2), bad), LoadError, "did you mean 'bias'? Rename it"
    )
    assert "pass strict=False" not in message  # the module lacks 'bias': skipping 'bais' would leave it out
    module = nn.Linear(3, 2)
    weightport.load(module, {"weight": bad["weight"], "bias": bad["bais"]})
    assert_values(module, source)


@scenario
def left_over_on_both_sides_mapping_renames_it(ctx: Ctx) -> None:
    source = state(randomized(nn.Linear(3, 2)))
    bad = {"w": source["weight"], "bias": source["bias"]}
    message = refused(
        lambda: weightport.load(nn.Linear(3, 2), bad),
        LoadError,
        "mapping={'w': 'module.tensor'} renames it",
        "mapping={'source name': 'weight'} renames a source tensor to it",
        "not strict=False alone",
    )
    assert "pass strict=False" not in message
    module = nn.Linear(3, 2)
    weightport.load(module, bad, mapping={"w": "weight"})  # 'module.tensor' and 'source name' filled in
    assert_values(module, source)
    module = nn.Linear(3, 2)  # "give it the name of the module tensor it holds"
    weightport.load(module, {"weight": bad["w"], "bias": bad["bias"]})
    assert_values(module, source)


@scenario
def missing_only_strict_false_leaves_it(ctx: Ctx) -> None:
    """The source has no tensor for 'bias' and nothing left over: strict=False places every tensor it
    holds and keeps the module's own bias, which the report lists as missing."""
    source = state(randomized(nn.Linear(3, 2)))
    refused(
        lambda: weightport.load(nn.Linear(3, 2), {"weight": source["weight"]}),
        LoadError,
        "add it to the source, or pass strict=False to leave it as it is",
    )
    module = nn.Linear(3, 2)
    own = state(module)["bias"]
    report = weightport.load(module, {"weight": source["weight"]}, strict=False)
    assert report.missing == ["bias"]
    assert_values(module, {"weight": source["weight"], "bias": own})
    module = nn.Linear(3, 2)  # "add it to the source"
    weightport.load(module, source)
    assert_values(module, source)


@scenario
def prefix_that_is_no_submodule(ctx: Ctx) -> None:
    source = state(randomized(nn.Linear(3, 2)))
    message = refused(
        lambda: weightport.load(encoder_head(), source, prefix="enc."), LoadError, "use one of encoder, head"
    )
    chosen = re.search(r"use one of (\w+)", message)
    assert chosen is not None
    module = encoder_head()
    head = state(module.head)
    weightport.load(module, source, prefix=chosen[1])
    assert_values(module.encoder, source)
    assert_values(module.head, head)  # the source holds nothing for it


@scenario
def nothing_matched_strict_false(ctx: Ctx) -> None:
    """strict=False with no name in common: each of prefix=, layout= and mapping= loads exactly; where the
    names show which (a prefix, '/'-joined names), the fix says it."""
    true = randomized(encoder_head())
    encoder = state(true.encoder)
    fix = "pass prefix= to load into a submodule, layout= if the source is another framework's, or mapping="
    refused(
        lambda: weightport.load(encoder_head(), encoder, strict=False),
        LoadError,
        "pass prefix='encoder.' to load",
    )
    module = encoder_head()
    weightport.load(module, encoder, strict=False, prefix="encoder.")
    assert_values(module.encoder, encoder)

    flax_names = {"params/Dense_0/kernel": encoder["weight"].T, "params/Dense_0/bias": encoder["bias"]}
    refused(
        lambda: weightport.load(nn.Linear(3, 2), flax_names, strict=False), LoadError, "pass layout='flax'"
    )
    module = nn.Linear(3, 2)
    weightport.load(module, flax_names, strict=False, layout="flax")
    assert_values(module, encoder)

    other = {"w": encoder["weight"], "b": encoder["bias"]}
    refused(lambda: weightport.load(encoder_head(), other, strict=False), LoadError, fix)
    module = encoder_head()
    weightport.load(module, other, strict=False, mapping={"w": "encoder.weight", "b": "encoder.bias"})
    assert_values(module.encoder, encoder)


@scenario
def module_names_start_with_a_prefix(ctx: Ctx) -> None:
    source = state(randomized(nn.Linear(3, 2)))
    message = refused(
        lambda: weightport.load(encoder_head(), source), LoadError, "pass prefix='encoder.' to load into that"
    )
    prefix = re.search(r"pass prefix='([\w.]+)'", message)
    assert prefix is not None
    module = encoder_head()
    weightport.load(module, source, prefix=prefix[1])
    assert_values(module.encoder, source)


@scenario
def source_names_start_with_a_prefix(ctx: Ctx) -> None:
    """The fix is code: it is run as written, with the user's arrays and module."""
    true = randomized(nn.Linear(3, 2))
    arrays = {f"bert.{k}": v for k, v in state(true).items()} | {
        "cls.weight": np.ones(2),
        "cls.bias": np.ones(1),
    }
    message = refused(
        lambda: weightport.load(nn.Linear(3, 2), arrays), LoadError, "load the source's 'bert.' part"
    )
    code = re.search(r"(weightport\.load\(module, \{.*?\}\))", message)
    assert code is not None, message
    module = nn.Linear(3, 2)
    eval(code[1], {"weightport": weightport}, {"module": module, "arrays": arrays})
    assert_values(module, state(true))


@scenario
def file_names_start_with_a_prefix_even_with_strict_false(ctx: Ctx) -> None:
    """A head model's file (``bert.*`` and a head the module lacks) into the bare model: the fix reads the
    file's part as written, with the path; strict=False alone, which would write nothing, says the same."""
    true = randomized(nn.Linear(3, 2))
    path = ctx.tmp / "head.safetensors"
    weightport.save({f"bert.{k}": v for k, v in state(true).items()} | {"cls.bias": np.ones(1)}, path)
    for strict in (True, False):
        message = refused(
            lambda strict=strict: weightport.load(nn.Linear(3, 2), path, strict=strict),
            LoadError,
            "load the source's 'bert.' part",
        )
    code = re.search(
        r"(with weightport\.open_source\(path\) as src: weightport\.load\(module, \{.*?\}\))", message
    )
    assert code is not None, message
    module = nn.Linear(3, 2)
    exec(code[1], {"weightport": weightport, "module": module, "path": path})  # one namespace, as in a script
    assert_values(module, state(true))


@scenario
def arrays_given_first(ctx: Ctx) -> None:
    model, arrays = nn.Linear(3, 2), state(randomized(nn.Linear(3, 2)))
    refused(lambda: weightport.load(arrays, model), LoadError, "weightport.load(model, arrays)")  # type: ignore[arg-type]
    weightport.load(model, arrays)
    assert_values(model, arrays)


@scenario
def nonfinite_values_allow_nonfinite(ctx: Ctx) -> None:
    true = randomized(Masked())
    arrays = dict(state(true), mask=np.array([0.0, -np.inf, 0.0], np.float32))
    target = Masked()
    refused(
        lambda: weightport.load(target, arrays),
        LoadError,
        "pass allow_nonfinite=True (or a set of names) if they belong there",
        module=target,
    )
    for allowed in (True, {"mask"}):
        module = Masked()
        weightport.load(module, arrays, allow_nonfinite=allowed)
        assert_values(module, arrays)  # -inf == -inf


@scenario
def allow_nonfinite_name_write_the_full_one(ctx: Ctx) -> None:
    outer = nn.Sequential(OrderedDict(attn=Masked()))
    arrays = {f"attn.{k}": v for k, v in state(randomized(Masked())).items()}
    arrays["attn.mask"] = np.array([0.0, -np.inf, 0.0], np.float32)
    message = refused(
        lambda: weightport.load(outer, arrays, allow_nonfinite={"mask"}), LoadError, "write 'attn.mask'"
    )
    written = re.search(r"write '([\w.]+)'", message)
    assert written is not None
    weightport.load(outer, arrays, allow_nonfinite={written[1]})
    assert_values(outer, arrays)


@scenario
def float64_out_of_float32_range_wider_dtype(ctx: Ctx) -> None:
    arrays = {"weight": np.full((2, 3), 1e300), "bias": np.array([0.25, -0.5])}
    refused(
        lambda: weightport.load(nn.Linear(3, 2), arrays),
        LoadError,
        "load into a wider dtype (module.double())",
    )
    module = nn.Linear(3, 2).double()
    weightport.load(module, arrays)
    assert_values(module, arrays)


@scenario
def unknown_layout_name(ctx: Ctx) -> None:
    msgpack, _ = ctx.files.flax_mlp
    refused(
        lambda: weightport.load(nn.Linear(3, 2), msgpack, layout="jax"), LayoutError, "pass layout= one of"
    )
    for follow in ({"layout": "flax"}, {}):  # "one of" them, or "leave it out"
        module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        quiet(lambda m=module, f=follow: weightport.load(m, msgpack, **f))
        assert_outputs(run(module, ctx.files.flax_mlp[1].x), ctx.files.flax_mlp[1].expected)


# --- layouts said in the first problem (loading.py) --------------------------------------------------------------


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@scenario
def slash_joined_names_pass_layout_flax(ctx: Ctx) -> None:
    _, port = ctx.files.flax_mlp
    refused(lambda: weightport.load(mlp(), port.path), LoadError, "pass layout='flax' for a Flax/JAX pytree")
    module = mlp()
    quiet(lambda: weightport.load(module, port.path, layout="flax"))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def a_layout_that_is_not_the_files_drop_it(ctx: Ctx) -> None:
    port = ctx.files.three
    path = port.path.with_name("three.weights.h5")
    seq = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))  # noqa: E731
    refused(lambda: weightport.load(seq(), path, layout="torch"), LoadError, "drop layout=")
    module = seq()
    quiet(lambda: weightport.load(module, path))
    assert_outputs(run(module, port.x), port.expected)


# --- source tensors no rule reads, in a framework's file ----------------------------------------------------------


@scenario
def keras_layer_without_a_rule_strict_false(ctx: Ctx) -> None:
    """A PReLU the model does not have: the fix says strict=False drops it, and that it changes what the Keras
    model computes; dropped, the rest is exact (the Keras model without it)."""
    keras = _keras()
    port = ctx.files.prelu
    model = lambda: nn.Sequential(OrderedDict(fc=nn.Linear(4, 3)))  # noqa: E731
    message = refused(
        lambda: weightport.load(model(), port.path),
        LoadError,
        "weightport has no rule for Keras PReLU ('act'), and its weights change what the model computes",
        "strict=False would drop it",
    )
    assert "mapping=" not in message
    module = model()
    report = quiet(lambda: weightport.load(module, port.path, strict=False))
    assert report.ignored == ["layers/p_re_lu/vars/0"] and not report.missing
    dense = keras.models.load_model(port.path).get_layer("fc")
    assert_outputs(run(module, port.x), np.asarray(dense(port.x)))


@scenario
def keras_layer_without_a_rule_that_the_model_has(ctx: Ctx) -> None:
    """A PReLU the model has too: mapping= cannot place a class weightport has no rule for (a different,
    specific error); loading the rest with strict=False, then the tensor by hand, is exact."""
    port = ctx.files.prelu
    target = WithPReLU()
    message = refused(
        lambda: weightport.load(target, port.path),
        LoadError,
        "weightport has no rule for Keras PReLU ('act')",
        "pass mapping= to place the source layer that holds it; if weightport has no rule for that layer, load the "
        "rest with strict=False, then this tensor",
        "weightport.load(model, {'act.weight': array}, strict=False)",
        module=target,
    )
    mapped = elsewhere(lambda: weightport.load(WithPReLU(), port.path, mapping={"act": "act"}), message)
    assert "a layer of a class weightport has no rule for cannot be mapped" in mapped
    model = WithPReLU()
    report = quiet(lambda: weightport.load(model, port.path, strict=False))
    assert report.missing == ["act.weight"]
    with weightport.open_source(port.path) as source:
        array = source.read("layers/p_re_lu/vars/0")
    weightport.load(model, {"act.weight": array}, strict=False)
    assert_outputs(run(model, port.x), port.expected)


@scenario
def keras_layer_of_an_unknown_class_mapping_places_it(ctx: Ctx) -> None:
    port = ctx.files.custom
    model = lambda: nn.Sequential(OrderedDict(proj=nn.Linear(4, 3), head=nn.Linear(3, 2)))  # noqa: E731
    refused(lambda: weightport.load(model(), port.path), LoadError, "pass mapping= to place its layer")
    module = model()
    report = quiet(lambda: weightport.load(module, port.path, mapping={"proj": "proj"}))
    assert {p.source_layer: p.how for p in report.pairings}["proj"] == "mapping="
    assert_outputs(run(module, port.x), port.expected)


# --- pairing (layouts/pairing.py, proof.py, the keras/, flax/, onnx/ layouts, call_order.py) ---------------------


@scenario
def mapping_names_a_multi_layer_rnn(ctx: Ctx) -> None:
    port = ctx.files.stack
    message = refused(
        lambda: weightport.load(Stack(), port.path, mapping={"l0": "rnn"}),
        LayoutError,
        "Fix: name one, e.g. 'rnn[0]'",
    )
    one = re.search(r"e\.g\. '([\w.\[\]]+)'", message)
    assert one is not None
    module = Stack()
    quiet(lambda: weightport.load(module, port.path, mapping={"l0": one[1]}))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def mapping_to_no_module(ctx: Ctx) -> None:
    port = ctx.files.stack
    message = refused(
        lambda: weightport.load(Stack(), port.path, mapping={"l0": "nope"}),
        LayoutError,
        "Fix: map it to one of those, by its path: mapping={'l0': 'rnn[0]'}",
    )
    mapping = eval(re.search(r"mapping=(\{.*?\})", fix_of(message))[1])  # type: ignore[index]
    module = Stack()
    quiet(lambda: weightport.load(module, port.path, mapping=mapping))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def mapping_names_no_layer_of_the_source(ctx: Ctx) -> None:
    port = ctx.files.stack
    message = refused(
        lambda: weightport.load(Stack(), port.path, mapping={"lstm_0": "rnn[0]"}),
        LayoutError,
        "l0, l1, head. Fix: key mapping= by those names",
    )
    assert "lstm_0" in message
    module = Stack()
    quiet(lambda: weightport.load(module, port.path, mapping={"l0": "rnn[0]"}))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def mapping_sends_two_layers_to_one_module(ctx: Ctx) -> None:
    port = ctx.files.stack
    refused(
        lambda: weightport.load(Stack(), port.path, mapping={"l0": "rnn[0]", "l1": "rnn[0]"}),
        LayoutError,
        "Fix: map each source layer to a module of its own",
    )
    module = Stack()
    quiet(lambda: weightport.load(module, port.path, mapping={"l0": "rnn[0]", "l1": "rnn[1]"}))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def mapping_to_a_module_of_another_kind(ctx: Ctx) -> None:
    port = ctx.files.stack
    refused(
        lambda: weightport.load(Stack(), port.path, mapping={"head": "rnn[1]"}),
        LayoutError,
        "Fix: map it to an nn.Linear module",
    )
    module = Stack()
    quiet(lambda: weightport.load(module, port.path, mapping={"head": "head"}))
    assert_outputs(run(module, port.x), port.expected)


def _without(path: Path, layer: str) -> dict[str, np.ndarray]:
    """The source's arrays but those of ``layer``, read with weightport.open_source (as the fix says)."""
    with weightport.open_source(path) as source:
        return {n: source.read(n) for n in source.infos if f"/{layer}/" not in f"/{n}"}


@scenario
def too_few_modules_build_or_leave_out(ctx: Ctx) -> None:
    """Three Dense layers, two Linears: pairing by hand cannot help (no free module for the third), so the
    fix does not offer it; building the model, or leaving the layer out, is exact."""
    port = ctx.files.three
    two = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # noqa: E731
    target = two()
    message = refused(
        lambda: weightport.load(target, port.path),
        LayoutError,
        "Fix: build the model with one module per source layer; a layer the model should not take is left "
        "out by loading the source's other arrays as a dict (read with weightport.open_source) with "
        "layout='keras'",
        module=target,
    )
    assert "mapping=" not in fix_of(message)
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    quiet(lambda: weightport.load(module, port.path))
    assert_outputs(run(module, port.x), port.expected)
    arrays = _without(port.path, "dense_1")
    assert len(arrays) == 4
    module = two()
    quiet(lambda: weightport.load(module, arrays, layout="keras"))
    keras_model = _keras().models.load_model(port.path)
    a, c = (keras_model.get_layer(n).get_weights() for n in "ac")
    assert_values(module, {"0.weight": a[0].T, "0.bias": a[1], "1.weight": c[0].T, "1.bias": c[1]})


@scenario
def too_few_modules_that_fit_mapping(ctx: Ctx) -> None:
    """Two Dense (4 -> 4) layers and Linears (4 -> 4) and (3 -> 4): mapping= pairs them, and the plan then
    says which shapes differ (a different, specific error)."""
    keras = _keras()
    keras.backend.clear_session()
    model = randomize_keras(
        keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(4, name="b")]
        )
    )
    path = ctx.tmp / "ab.keras"
    model.save(path)
    torch_model = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(3, 4))  # noqa: E731
    message = refused(
        lambda: weightport.load(torch_model(), path),
        LayoutError,
        "or pass mapping={'a': 'module.path'} to pair them yourself",
    )
    found = elsewhere(lambda: weightport.load(torch_model(), path, mapping={"a": "0", "b": "1"}), message)
    assert "expected shape (4, 3)" in found and "found shape (4, 4)" in found


@scenario
def a_layer_no_module_can_take(ctx: Ctx) -> None:
    path, ids, expected = ctx.files.flax_dense_embed
    message = refused(
        lambda: weightport.load(nn.Linear(4, 2), path),
        LoadError,
        "Fix: build the model with the module this layer needs, or, where the model should not take it, pass "
        "strict=False to load the model without it",
    )
    assert "prefix=" not in message
    module = nn.Linear(4, 2)
    report = quiet(lambda: weightport.load(module, path, strict=False))
    assert sorted(report.ignored) == ["params/Embed_0/embedding"]
    dense = _without(path, "Embed_0")
    assert_values(module, {"weight": dense["params/Dense_0/kernel"].T, "bias": dense["params/Dense_0/bias"]})

    class EmbedDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(ids))

    module = EmbedDense()
    quiet(lambda: weightport.load(module, path))
    assert_outputs(run(module, ids), expected)
    arrays = _without(path, "Embed_0")
    module = nn.Linear(4, 2)
    quiet(lambda: weightport.load(module, arrays, layout="flax"))
    assert_values(
        module, {"weight": arrays["params/Dense_0/kernel"].T, "bias": arrays["params/Dense_0/bias"]}
    )


@scenario
def interchangeable_layers_of_a_recorded_order(ctx: Ctx) -> None:
    """A .keras file records the order; the model's is not known until example_inputs= shows it."""
    keras = _keras()
    keras.backend.clear_session()
    model = randomize_keras(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(4, name="d0"),
                keras.layers.Dense(4, name="d1"),
                keras.layers.Dense(2, name="out"),
            ]
        ),
        10,
    )
    path = ctx.tmp / "ordered.keras"
    model.save(path)
    x = np.random.default_rng(10).standard_normal((3, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    target = Declared()
    message = refused(
        lambda: weightport.load(target, path),
        LayoutError,
        "Fix: pass example_inputs= (inputs for one forward pass",
        "or mapping={'d0': 'module.path', ...} to pair them yourself",
        module=target,
    )
    for follow in ({"example_inputs": torch.from_numpy(x)}, {"mapping": {"d0": "h0", "d1": "h1"}}):
        module = Declared()
        quiet(lambda m=module, f=follow: weightport.load(m, path, **f))
        assert_outputs(run(module, x), expected)

    # with example_inputs= given and still not settled, the fix says mapping= alone
    class NotCalled(Declared):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.h0(x))

    again = refused(
        lambda: weightport.load(NotCalled(), path, example_inputs=torch.from_numpy(x)),
        LayoutError,
        "does not call each of these modules",
    )
    assert "example_inputs=" not in fix_of(again) and "mapping={'d0'" in fix_of(again)
    assert again != message


@scenario
def interchangeable_layers_of_no_recorded_order(ctx: Ctx) -> None:
    """Flax layers named by attribute record no order: example_inputs= cannot settle it, so the fix
    says mapping= alone (before, it offered example_inputs=, which led back to the same error)."""
    port = ctx.files.flax_two
    message = refused(
        lambda: weightport.load(FirstSecond(), port.path),
        LayoutError,
        "does not record the order of these layers",
        "Fix: pass mapping={'alpha': 'module.path', ...} to pair them yourself",
    )
    assert "example_inputs=" not in fix_of(message)
    refused(
        lambda: weightport.load(FirstSecond(), port.path, example_inputs=torch.from_numpy(port.x)),
        LayoutError,
        "Fix: pass mapping=",
    )
    module = FirstSecond()
    quiet(lambda: weightport.load(module, port.path, mapping={"alpha": "first", "beta": "second"}))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def interchangeable_layers_more_modules_than_layers(ctx: Ctx) -> None:
    """Two interchangeable Dense layers, three Linears that could take them: mapping= places the two; the
    third then has no values, which the load says (a different, specific error)."""
    keras = _keras()
    keras.backend.clear_session()
    model = randomize_keras(
        keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4, name="p"), keras.layers.Dense(4, name="q")]
        )
    )
    path = ctx.tmp / "pq.keras"
    model.save(path)

    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u, self.v, self.w = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    message = refused(
        lambda: weightport.load(Three(), path),
        LayoutError,
        "the model has 3 modules",
        "Fix: pass mapping={'p'",
    )
    assert "example_inputs=" not in fix_of(message)
    found = elsewhere(lambda: weightport.load(Three(), path, mapping={"p": "u", "q": "v"}), message)
    assert "'w.bias', 'w.weight' (2 tensors): expected a value for each" in found


@scenario
def example_inputs_the_forward_refuses(ctx: Ctx) -> None:
    keras = _keras()
    keras.backend.clear_session()
    model = randomize_keras(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(4, name="d0"),
                keras.layers.Dense(4, name="d1"),
                keras.layers.Dense(2, name="out"),
            ]
        ),
        11,
    )
    path = ctx.tmp / "ordered.keras"
    model.save(path)
    x = np.random.default_rng(11).standard_normal((3, 4)).astype(np.float32)
    refused(
        lambda: weightport.load(Declared(), path, example_inputs=torch.zeros(3, 7)),
        LayoutError,
        "Fix: pass inputs its forward accepts",
        "or drop example_inputs= and pass mapping= to pair the layers yourself",
    )
    for follow in ({"example_inputs": torch.from_numpy(x)}, {"mapping": {"d0": "h0", "d1": "h1"}}):
        module = Declared()
        quiet(lambda m=module, f=follow: weightport.load(m, path, **f))
        assert_outputs(run(module, x), np.asarray(model(x)))


@scenario
def keras_layer_paired_by_name_with_the_other_direction(ctx: Ctx) -> None:
    port = ctx.files.bidirectional
    refused(
        lambda: weightport.load(Swapped(), port.path),
        LayoutError,
        "Fix: build it with bidirectional=True, or pass mapping= to pair it with one",
    )
    module = Swapped()
    quiet(lambda: weightport.load(module, port.path, mapping={"enc": "dec", "dec": "enc"}))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def keras_ambiguous_class_mapping_says_which(ctx: Ctx) -> None:
    """A subclassed model's .weights.h5 records no classes: a lone 2-D array is a Dense or an Embedding."""
    keras = _keras()
    keras.backend.clear_session()

    class Sub(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.emb = keras.layers.Embedding(10, 4)
            self.proj = keras.layers.Dense(2)

        def call(self, ids: Any) -> Any:
            return self.proj(self.emb(ids))

    ids = np.random.default_rng(12).integers(0, 10, (2, 3)).astype(np.int32)
    model = Sub()
    model(ids)
    randomize_keras(model, 12)
    path = ctx.tmp / "sub.weights.h5"
    model.save_weights(path)

    class EmbedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    message = refused(
        lambda: weightport.load(EmbedHead(), path),
        LayoutError,
        "Fix: pass mapping={'embedding': 'module.path'}",
    )
    mapping = eval(re.search(r"mapping=(\{.*?\})", fix_of(message))[1].replace("module.path", "embed"))  # type: ignore[index]
    module = EmbedHead()
    quiet(lambda: weightport.load(module, path, mapping=mapping))
    assert_outputs(run(module, ids.astype(np.int64)), np.asarray(model(ids)))


# --- refusals whose fix rebuilds the source (layouts/keras/) --------------------------------------------------------


@scenario
def keras_bidirectional_with_go_backwards(ctx: Ctx) -> None:
    """No mapping= can load it (mapping a Bidirectional to one-way modules is refused); rebuilding the
    Keras layer with go_backwards=False is exact."""
    keras = _keras()
    L = keras.layers
    keras.backend.clear_session()
    bad = randomize_keras(
        keras.Sequential(
            [
                keras.Input((5, 2)),
                L.Bidirectional(L.LSTM(3, go_backwards=True), backward_layer=L.LSTM(3), name="bi"),
            ]
        ),
        13,
    )
    bad.save(ctx.tmp / "bad.keras")
    model = lambda: nn.LSTM(2, 3, batch_first=True, bidirectional=True)  # noqa: E731
    message = refused(
        lambda: weightport.load(model(), ctx.tmp / "bad.keras"),
        UnsupportedConfigError,
        "Fix: rebuild the Keras layer with go_backwards=False (the default) and retrain.",
    )
    assert "mapping=" not in message
    good = randomize_keras(keras.Sequential([keras.Input((5, 2)), L.Bidirectional(L.LSTM(3), name="bi")]), 13)
    good.save(ctx.tmp / "good.keras")
    module = model()
    quiet(lambda: weightport.load(module, ctx.tmp / "good.keras"))
    x = np.random.default_rng(13).standard_normal((2, 5, 2)).astype(np.float32)
    with torch.no_grad():
        _, (h, _) = module(torch.from_numpy(x))
    assert_outputs(torch.cat([h[0], h[1]], dim=-1), np.asarray(good(x)))


@scenario
def keras_norm_with_center_and_no_scale(ctx: Ctx) -> None:
    """scale=False, center=True (Keras InceptionV3's BatchNorms): PyTorch's norm computes the same with its
    weight 1, so the .keras file loads exactly; a .weights.h5 of three nameless variables could be
    (gamma, mean, var) or (beta, mean, var), so it is refused with both readings, the module unchanged."""
    keras = _keras()
    L = keras.layers
    keras.backend.clear_session()
    original = randomize_keras(
        keras.Sequential(
            [
                keras.Input((4,)),
                L.Dense(4, name="fc"),
                L.LayerNormalization(scale=False, center=True, name="ln"),
                L.BatchNormalization(scale=False, center=True, name="bn"),
            ]
        ),
        14,
    )
    variance = original.get_layer("bn").moving_variance
    variance.assign(np.abs(np.asarray(variance)) + 0.5)  # randomized, it may be negative
    original.save(ctx.tmp / "no_scale.keras")
    original.save_weights(ctx.tmp / "no_scale.weights.h5")
    model = lambda: nn.Sequential(  # noqa: E731
        OrderedDict(fc=nn.Linear(4, 4), ln=nn.LayerNorm(4, eps=1e-3), bn=nn.BatchNorm1d(4, eps=1e-3))
    ).eval()
    x = np.random.default_rng(14).standard_normal((3, 4)).astype(np.float32)
    module = model()
    report = quiet(lambda: weightport.load(module, ctx.tmp / "no_scale.keras"))
    assert_outputs(run(module, x), np.asarray(original(x, training=False)))
    assert "scale=False, so weight = 1" in str(report)
    module = model()
    refused(
        lambda: weightport.load(module, ctx.tmp / "no_scale.weights.h5"),
        LayoutError,
        "does not record which of gamma (scale=False) and beta (center=False) was left out",
        "Fix: load the .keras file",
        module=module,
    )


# --- Flax ------------------------------------------------------------------------------------------------------


@scenario
def flax_batchnorm_without_batch_stats(ctx: Ctx) -> None:
    params, whole, x, expected = ctx.files.flax_bn
    model = lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))  # noqa: E731
    refused(
        lambda: weightport.load(model(), params),
        LoadError,
        "save the whole variables dict ({'params': ..., 'batch_stats': ...}), or nnx.state(model) whole, not "
        "its nnx.Param part; only if the Flax model's were never updated (both start at mean 0, var 1), pass "
        "strict=False",
    )
    module = model()
    quiet(lambda: weightport.load(module, whole))
    assert_outputs(run(module, x), expected)
    module = model()  # these statistics never were updated: strict=False is exact too
    report = quiet(lambda: weightport.load(module, params, strict=False))
    assert report.missing == ["1.running_mean", "1.running_var"]
    assert_outputs(run(module, x), expected)


# --- ONNX -------------------------------------------------------------------------------------------------------


@scenario
def onnx_weights_computed_by_the_graph(ctx: Ctx) -> None:
    _onnx()
    true = randomized(LstmHead(), 15)
    x = np.random.default_rng(15).standard_normal((5, 2, 3)).astype(np.float32)
    path = onnx_export(true, x, ctx.tmp / "unfolded.onnx", do_constant_folding=False)
    expected = run_onnxruntime(path, {"x": x})[0]
    refused(
        lambda: weightport.load(LstmHead(), path),
        LayoutError,
        "Fix: re-export with do_constant_folding=True",
        "weightport.load(model, path, layout='torch', strict=False) reads it directly",
    )
    model = LstmHead()
    report = quiet(lambda: weightport.load(model, path, layout="torch", strict=False))
    assert not report.missing and report.ignored  # every module tensor placed; the graph's constants skipped
    assert_outputs(run(model, x), expected)
    folded = onnx_export(true, x, ctx.tmp / "folded.onnx", do_constant_folding=True)
    model = LstmHead()
    quiet(lambda: weightport.load(model, folded))
    assert_outputs(run(model, x), expected)


@scenario
def onnx_batched_matmul_is_no_linear(ctx: Ctx) -> None:
    _onnx()
    x = np.random.default_rng(16).standard_normal((2, 5, 3)).astype(np.float32)
    path = onnx_export(randomized(BatchedMatMul(), 16), x, ctx.tmp / "bmm.onnx")
    expected = run_onnxruntime(path, {"x": x})[0]

    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(3, 4, bias=False)

    message = refused(
        lambda: weightport.load(Wrong(), path),
        LoadError,
        "not one nn.Linear: hold it as an nn.Parameter and load it with layout='torch' under its own name",
    )
    assert message.count("Fix:") == message.count("\n  - ")  # one fix per problem
    model = BatchedMatMul()
    weightport.load(model, path, layout="torch")
    assert_outputs(run(model, x), expected)


class RnnHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


@scenario
def onnx_recurrence_unrolled_by_the_exporter(ctx: Ctx) -> None:
    """torch.onnx.export's dynamo exporter unrolls nn.RNN; re-exporting with dynamo=False, as the fix
    says, writes an RNN node, which loads exactly."""
    _onnx()
    pytest.importorskip("onnxscript")
    true = randomized(RnnHead(), 22)
    x = np.random.default_rng(22).standard_normal((2, 5, 3)).astype(np.float32)
    unrolled = ctx.tmp / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on flat weights and pytree deprecations
        torch.onnx.export(true, (torch.from_numpy(x),), str(unrolled), dynamo=True, verbose=False)
    target = RnnHead()
    refused(
        lambda: weightport.load(target, unrolled),
        LayoutError,
        "Fix: export with torch.onnx.export(..., dynamo=False), which writes RNN nodes",
        module=target,
    )
    path = onnx_export(true, x, ctx.tmp / "rnn.onnx")
    expected = run_onnxruntime(path, {"x": x})[0]
    module = RnnHead()
    quiet(lambda: weightport.load(module, path))
    assert_outputs(run(module, x), expected)


def reverse_lstm_onnx(path: Path, seed: int) -> Path:
    onnx, _ = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.uniform(-0.6, 0.6, (1, 16, 3)),
        "R": rng.uniform(-0.6, 0.6, (1, 16, 4)),
        "B": rng.uniform(-0.6, 0.6, (1, 32)),
    }
    node = helper.make_node(
        "LSTM", ["X", "W", "R", "B"], ["Y"], name="rec", hidden_size=4, direction="reverse"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, 1, 2, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@scenario
def onnx_reverse_node_mapping(ctx: Ctx) -> None:
    path = reverse_lstm_onnx(ctx.tmp / "reverse.onnx", 17)
    x = np.random.default_rng(17).standard_normal((5, 2, 3)).astype(np.float32)
    expected = run_onnxruntime(path, {"X": x})[0][:, 0]
    message = refused(
        lambda: weightport.load(Flipped(), path),
        UnsupportedConfigError,
        "pass mapping={'rec': 'module.path'} to load it into that forward layer",
    )
    to_both = elsewhere(
        lambda: weightport.load(Flipped(bidirectional=True), path, mapping={"rec": "lstm"}), message
    )
    assert "Fix: map it to a unidirectional layer run on the time-flipped input" in to_both
    module = Flipped()
    weightport.load(module, path, mapping={"rec": "lstm"})
    assert_outputs(run(module, x), expected)


# --- sources, init, verify ----------------------------------------------------------------------------------------


@scenario
def links_inside_a_folder(ctx: Ctx) -> None:
    """A Hugging Face cache's layout: an index and shards that link into blobs/."""
    true = randomized(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 18)
    arrays = state(true)
    blobs, snapshot_dir = ctx.tmp / "blobs", ctx.tmp / "snapshot"
    blobs.mkdir()
    snapshot_dir.mkdir()
    weight_map = {}
    for i, names in enumerate((["0.weight", "0.bias"], ["1.weight", "1.bias"])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        weightport.save({n: arrays[n] for n in names}, blobs / f"blob{i}.safetensors")
        (snapshot_dir / shard).symlink_to(blobs / f"blob{i}.safetensors")
        weight_map.update(dict.fromkeys(names, shard))
    import json

    (snapshot_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # noqa: E731
    refused(
        lambda: weightport.load(model(), snapshot_dir),
        SourceError,
        "Fix: load from a folder of plain files (huggingface_hub.snapshot_download(repo_id, local_dir=...) "
        "writes one; or copy it with cp -rL), or pass a single file's own path (a shard holds only its part",
    )
    plain = ctx.tmp / "plain"
    shutil.copytree(snapshot_dir, plain, symlinks=False)  # what local_dir= writes: the files themselves
    module = model()
    weightport.load(module, plain)
    assert_values(module, arrays)
    one = snapshot_dir / "model-00001-of-00002.safetensors"  # a single file's own path (a link) loads
    module = model()
    report = weightport.load(module, one, strict=False)
    assert report.missing == ["1.weight", "1.bias"]  # the other shard's, which this file does not hold
    assert_values(module[0], state(true[0]))


@scenario
def msgpack_over_the_size_limit(ctx: Ctx) -> None:
    msgpack, port = ctx.files.flax_mlp
    ctx.monkeypatch.setattr("weightport.sources.flax.MAX_BYTES", 64)
    message = refused(
        lambda: weightport.load(mlp(), msgpack),
        SourceError,
        "Fix: raise weightport.sources.flax.MAX_BYTES if the memory is there, or save the params as .npz or "
        ".safetensors",
    )
    as_npz = elsewhere(lambda: weightport.load(mlp(), port.path), message)  # the flat .npz of the same params
    assert "pass layout='flax'" in as_npz
    module = mlp()
    quiet(lambda: weightport.load(module, port.path, layout="flax"))
    assert_outputs(run(module, port.x), port.expected)
    ctx.monkeypatch.setattr("weightport.sources.flax.MAX_BYTES", 1 << 20)
    module = mlp()
    quiet(lambda: weightport.load(module, msgpack))
    assert_outputs(run(module, port.x), port.expected)


@scenario
def onnx_model_over_the_protobuf_limit(ctx: Ctx) -> None:
    onnx, _ = _onnx()
    true = randomized(LstmHead(), 19)
    x = np.random.default_rng(19).standard_normal((5, 2, 3)).astype(np.float32)
    inline = onnx_export(true, x, ctx.tmp / "inline.onnx")
    expected = run_onnxruntime(inline, {"x": x})[0]
    ctx.monkeypatch.setattr("weightport.sources.onnx.MAX_MODEL_BYTES", inline.stat().st_size - 1)
    refused(
        lambda: weightport.load(LstmHead(), inline),
        SourceError,
        "Fix: save the model with its weights as external data (onnx.save_model(model, path, "
        "save_as_external_data=True))",
    )
    external = ctx.tmp / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True, size_threshold=0)
    assert external.stat().st_size < inline.stat().st_size - 1
    module = LstmHead()
    quiet(lambda: weightport.load(module, external))
    assert_outputs(run(module, x), expected)


@scenario
def init_without_a_rule_overrides(ctx: Ctx) -> None:
    class WithBilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.bil = nn.Bilinear(2, 2, 1)

    rng = np.random.default_rng(20)
    weight, bias = rng.uniform(-1, 1, (1, 2, 2)), rng.uniform(-1, 1, (1,))
    target = WithBilinear()
    message = refused(
        lambda: weightport.init(target, np.random.RandomState(0), scheme="keras"),
        LayoutError,
        "Fix: pass overrides={'bil.weight': array_or_callable, ...}",
        "or overrides={Bilinear: fn} where fn(module, rng) returns {'weight': array, ...} for every Bilinear",
        module=target,
    )
    named = re.findall(r"'(bil\.\w+)'", message.split("Fix:")[0])
    assert sorted(named) == ["bil.bias", "bil.weight"]
    module = WithBilinear()
    weightport.init(
        module, np.random.RandomState(0), scheme="keras", overrides={"bil.weight": weight, "bil.bias": bias}
    )
    np.testing.assert_allclose(state(module)["bil.weight"], weight, atol=TOL)
    np.testing.assert_allclose(state(module)["bil.bias"], bias, atol=TOL)
    module = WithBilinear()
    weightport.init(
        module,
        np.random.RandomState(0),
        scheme="keras",
        overrides={nn.Bilinear: lambda m, r: {"weight": weight, "bias": bias}},
    )
    np.testing.assert_allclose(state(module)["bil.weight"], weight, atol=TOL)


@scenario
def init_of_a_meta_buffer_overrides(ctx: Ctx) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))

    with torch.device("meta"):
        meta = Scaled()
    message = refused(
        lambda: weightport.init(meta, np.random.RandomState(0)),
        LoadError,
        "give it with overrides={'scale': ...}",
    )
    with torch.device("meta"):
        meta = Scaled()
    scale = np.array([0.5, 2.0])
    weightport.init(meta, np.random.RandomState(0), overrides={"scale": scale})
    assert not any(t.is_meta for t in meta.state_dict().values())
    np.testing.assert_array_equal(state(meta)["scale"], scale)
    assert "build the module off meta" in message
    built = Scaled()  # the other way: off meta, the buffer keeps its own value
    weightport.init(built, np.random.RandomState(0))
    np.testing.assert_array_equal(state(built)["scale"], np.ones(2))


@scenario
def verify_against_a_file_onnxruntime_cannot_run(ctx: Ctx) -> None:
    _onnx()
    true = randomized(nn.Linear(3, 2), 21)
    x = np.random.default_rng(21).standard_normal((4, 3)).astype(np.float32)
    npz = weightport.save(true, ctx.tmp / "lin.npz")
    refused(
        lambda: weightport.verify(true, torch.from_numpy(x), against=npz),
        SourceError,
        "Fix: pass an .onnx file, or the other framework's outputs as expected=",
    )
    path = onnx_export(true, x, ctx.tmp / "lin.onnx")
    assert weightport.verify(true, torch.from_numpy(x), against=path)
    assert weightport.verify(true, torch.from_numpy(x), run_onnxruntime(path, {"x": x})[0])


@scenario
def verify_against_a_graph_of_other_outputs(ctx: Ctx) -> None:
    """An nn.LSTM returns three arrays (out, (h, c)); a graph exported from a wrapper returns one. Passing
    the graph's output as expected= then says how to nest it (a different, specific error); the
    outputs in the module's own nesting verify."""
    _onnx()
    lstm = randomized(nn.LSTM(3, 4), 23)

    class OutOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    x = np.random.default_rng(23).standard_normal((5, 2, 3)).astype(np.float32)
    path = onnx_export(OutOnly(), x, ctx.tmp / "out_only.onnx")
    message = refused(
        lambda: weightport.verify(lstm, torch.from_numpy(x), against=path),
        weightport.VerifyError,
        "Fix: compare with the ONNX file exported from this module, or pass the outputs as expected=",
    )
    (y,) = run_onnxruntime(path, {"x": x})
    nested = elsewhere(lambda: weightport.verify(lstm, torch.from_numpy(x), (y,)), message)
    assert "Fix: give expected outputs in the module's own nesting" in nested
    assert weightport.verify(OutOnly(), torch.from_numpy(x), against=path)
    with torch.no_grad():
        _, (h, c) = lstm(torch.from_numpy(x))
    assert weightport.verify(lstm, torch.from_numpy(x), (y, (h.numpy(), c.numpy())))


@scenario
def flax_cell_paired_with_the_other_direction(ctx: Ctx) -> None:
    """A Flax bidirectional LSTM paired by name with a one-way nn.LSTM: mapping= to the bidirectional
    one, or building it bidirectional, loads exactly."""
    jax, linen, serialization = _flax()

    class Bi(linen.Module):
        def setup(self) -> None:
            self.enc = linen.Bidirectional(linen.RNN(linen.LSTMCell(3)), linen.RNN(linen.LSTMCell(3)))

        def __call__(self, x: Any) -> Any:
            return self.enc(x)

    rng = np.random.default_rng(24)
    x = rng.standard_normal((2, 5, 2)).astype(np.float32)
    variables = Bi().init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(
        lambda a: rng.uniform(-0.6, 0.6, a.shape).astype(np.float32), variables
    )
    path = ctx.tmp / "bi.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    expected = np.asarray(Bi().apply(variables, x))

    class OneWayNamedEnc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.LSTM(2, 3, batch_first=True)
            self.both = nn.LSTM(2, 3, batch_first=True, bidirectional=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.both(x)[0]

    message = refused(
        lambda: weightport.load(OneWayNamedEnc(), path),
        LayoutError,
        "Fix: build it with bidirectional=True, or pass mapping= to pair the layers yourself",
    )
    # mapping= pairs it; the model's spare one-way LSTM then has no values, which the load says
    spare = elsewhere(lambda: weightport.load(OneWayNamedEnc(), path, mapping={"enc": "both"}), message)
    assert (
        "'enc.weight_ih_l0'" in spare
        and "expected a value for each" in spare
        and "strict=False to leave it" in spare
    )
    module = OneWayNamedEnc()
    report = quiet(lambda: weightport.load(module, path, mapping={"enc": "both"}, strict=False))
    assert report.missing == [n for n in state(module) if n.startswith("enc.")]
    assert_outputs(run(module, x), expected)
    module = nn.LSTM(2, 3, batch_first=True, bidirectional=True)  # "build it with bidirectional=True"
    quiet(lambda: weightport.load(module, path))
    assert_outputs(run(module, x)[0], expected)


# --- the command line: a keyword's fix, followed with its flag ----------------------------------------------------------


_FACTORY = textwrap.dedent(
    """
    from collections import OrderedDict
    import torch
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    def encoder_head():
        return nn.Sequential(OrderedDict(encoder=nn.Linear(3, 2), head=nn.Linear(2, 1)))

    def encoder():
        return encoder_head().encoder

    class FirstSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 4)
            self.first = nn.Linear(4, 4)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    def first_second():
        return FirstSecond()

    class Declared(nn.Module):
        def __init__(self):
            super().__init__()
            self.h1 = nn.Linear(4, 4)
            self.h0 = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.h1(self.h0(x)))

    def declared():
        return Declared()

    def three():
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    """
)
_factories = itertools.count()


def cli(ctx: Ctx, *argv: str) -> tuple[int, str, str]:
    ctx.capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        code = main(list(argv))
    out, err = ctx.capsys.readouterr()
    return code, out, err


def factories(ctx: Ctx) -> str:
    """A factory module in the working folder, under a name of its own (imports are cached)."""
    name = f"fix_models_{next(_factories)}"
    (ctx.tmp / f"{name}.py").write_text(_FACTORY)
    ctx.monkeypatch.chdir(ctx.tmp)
    importlib.invalidate_caches()  # the finder of '.' may hold the listing of another test's folder
    return name


def io_npz(ctx: Ctx, x: np.ndarray, y: np.ndarray) -> str:
    path = ctx.tmp / "io.npz"
    np.savez(path, input_0=x, output_0=y)
    return str(path)


@scenario
def cli_strict_false_is_lenient(ctx: Ctx) -> None:
    models = factories(ctx)
    arrays = {f"0.{k}": v for k, v in state(randomized(nn.Linear(3, 4))).items()}
    arrays |= {f"2.{k}": v for k, v in state(randomized(nn.Linear(4, 2), 1)).items()}
    np.savez(ctx.tmp / "w.npz", **arrays, extra=np.ones(3))
    out = str(ctx.tmp / "out.safetensors")
    code, _, err = cli(ctx, "load", f"{models}:mlp", str(ctx.tmp / "w.npz"), "--out", out)
    assert code == 2 and "pass --lenient to skip names the module does not have" in err, err
    code, _, err = cli(ctx, "load", f"{models}:mlp", str(ctx.tmp / "w.npz"), "--out", out, "--lenient")
    assert code == 0, err
    module = mlp()
    weightport.load(module, out)
    assert_values(module, arrays)


@scenario
def cli_mapping_is_map(ctx: Ctx) -> None:
    models = factories(ctx)
    port = ctx.files.flax_two
    io = io_npz(ctx, port.x, port.expected)
    code, _, err = cli(ctx, "verify", f"{models}:first_second", str(port.path), io, "--atol", "1e-5")
    assert code == 2 and "Fix: pass --map alpha=module.path ..." in err, err
    argv = ["verify", f"{models}:first_second", str(port.path), io, "--atol", "1e-5"]
    code, out, err = cli(ctx, *argv, "--map", "alpha=first", "--map", "beta=second")
    assert code == 0 and "OK" in out, (out, err)


@scenario
def cli_layout_is_layout(ctx: Ctx) -> None:
    models = factories(ctx)
    _, port = ctx.files.flax_mlp
    io = io_npz(ctx, port.x, port.expected)
    code, _, err = cli(ctx, "verify", f"{models}:mlp", str(port.path), io, "--atol", "1e-5")
    assert code == 2 and "pass --layout flax" in err, err
    code, out, err = cli(
        ctx, "verify", f"{models}:mlp", str(port.path), io, "--atol", "1e-5", "--layout", "flax"
    )
    assert code == 0 and "OK" in out, (out, err)


@scenario
def cli_drop_layout(ctx: Ctx) -> None:
    models = factories(ctx)
    port = ctx.files.three
    io = io_npz(ctx, port.x, port.expected)
    path = str(port.path.with_name("three.weights.h5"))
    code, _, err = cli(ctx, "verify", f"{models}:three", path, io, "--atol", "1e-5", "--layout", "torch")
    assert code == 2 and "drop --layout" in err, err
    code, out, err = cli(ctx, "verify", f"{models}:three", path, io, "--atol", "1e-5")
    assert code == 0 and "OK" in out, (out, err)


@scenario
def cli_example_inputs_is_example_inputs(ctx: Ctx) -> None:
    keras = _keras()
    keras.backend.clear_session()
    model = randomize_keras(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(4, name="d0"),
                keras.layers.Dense(4, name="d1"),
                keras.layers.Dense(2, name="out"),
            ]
        ),
        25,
    )
    path = str(ctx.tmp / "ordered.keras")
    model.save(path)
    x = np.random.default_rng(25).standard_normal((3, 4)).astype(np.float32)
    models = factories(ctx)
    np.savez(ctx.tmp / "inputs.npz", input_0=x)
    out = str(ctx.tmp / "out.safetensors")
    code, _, err = cli(ctx, "load", f"{models}:declared", path, "--out", out)
    assert code == 2 and "Fix: pass --example-input IO.npz (inputs for one forward pass" in err, err
    argv = ["load", f"{models}:declared", path, "--out", out, "--example-input", str(ctx.tmp / "inputs.npz")]
    code, _, err = cli(ctx, *argv)
    assert code == 0, err
    module = Declared()
    weightport.load(module, out)
    assert_outputs(run(module, x), np.asarray(model(x)))


@scenario
def cli_prefix_is_a_factory_of_the_submodule(ctx: Ctx) -> None:
    """--prefix loads into the submodule, as the fix says."""
    models = factories(ctx)
    arrays = state(randomized(nn.Linear(3, 2)))
    np.savez(ctx.tmp / "enc.npz", **arrays)
    out = str(ctx.tmp / "enc.safetensors")
    code, _, err = cli(ctx, "load", f"{models}:encoder_head", str(ctx.tmp / "enc.npz"), "--out", out)
    assert code == 2 and "pass --prefix encoder. to load into that submodule" in err, err
    whole = str(ctx.tmp / "whole.safetensors")
    enc = str(ctx.tmp / "enc.npz")
    code, _, err = cli(ctx, "load", f"{models}:encoder_head", enc, "--prefix", "encoder.", "--out", whole)
    assert code == 0, err
    written = weightport.open_source(whole)
    for name, array in arrays.items():
        np.testing.assert_array_equal(written.read(f"encoder.{name}"), array.astype(np.float32))
    code, _, err = cli(ctx, "load", f"{models}:encoder", str(ctx.tmp / "enc.npz"), "--out", out)
    assert code == 0, err
    module = nn.Linear(3, 2)
    weightport.load(module, out)
    assert_values(module, arrays)


# --- the test -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_following_the_fix_loads_exactly_or_says_something_else(
    name: str,
    tmp_path: Path,
    files: Files,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    SCENARIOS[name](Ctx(tmp_path, files, monkeypatch, capsys))
