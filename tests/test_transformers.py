"""Real transformers checkpoints (issue 10): exact against the framework's own output, or refused.

transformers' ``flax_model.msgpack`` holds the params dict as it stands, and after any
``jax.tree_util.tree_map`` (a training step, a cast) its keys come back sorted: BERT's
``attention/output`` before ``attention/self``, ``position_embeddings`` before ``word_embeddings``.
Pairing by key order crossed same-shaped layers and loaded silently wrong. Each case builds a tiny
model in Flax or TensorFlow, perturbs every parameter (non-zero biases, norm scales that are not
ones), saves it the way transformers does, and loads it into the PyTorch twin: the load reproduces
the framework's ``last_hidden_state`` within 1e-4 or raises ``WeightportError`` having written
nothing. It never loads wrong.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import refused, snapshot
from weightport import UncheckedConfigWarning, WeightportError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
# "equal" makes the three embedding tables one shape, so only names can tell them apart:
# the case that loaded silently wrong (max error 5.4) when pairing went by key order.
EMBEDDINGS = {"distinct": {}, "equal": {"max_position_embeddings": 99, "type_vocab_size": 99}}
IDS = np.random.default_rng(1).integers(0, 99, (2, 7)).astype(np.int32)
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2], dtype=np.int32)


class Wrap(nn.Module):
    """A user's model holding the transformers model as ``self.m``, as in issue 10."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.m = inner


def _bert_config(embeddings: str) -> Any:
    return transformers.BertConfig(vocab_size=99, **SIZES, **EMBEDDINGS[embeddings])


def _gpt2_config() -> Any:
    return transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64)


def _noisy(seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """``x + noise``, fresh noise per call: every bias non-zero, every norm scale off one."""
    rng = np.random.default_rng(seed)
    return lambda x: np.asarray(x) + rng.normal(0.0, 0.1, np.shape(x)).astype(np.float32)


def _assert_all_random(arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        assert np.all(array != 0) and np.ptp(array) > 0, name


def _wrapped(model: nn.Module, wrap: bool) -> nn.Module:
    return (Wrap(model) if wrap else model).eval()


def _inner(module: nn.Module) -> nn.Module:
    return module.m if isinstance(module, Wrap) else module


def _torch_output(module: nn.Module, mask: np.ndarray | None) -> np.ndarray:
    kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
    with torch.no_grad():
        return _inner(module)(torch.from_numpy(IDS).long(), **kwargs).last_hidden_state.numpy()


def _load(module: nn.Module, path: Path) -> weightport.LoadReport | WeightportError:
    """The report, or the refusal, after checking that a refusal wrote nothing."""
    before = snapshot(module)
    # Neither file records LayerNorm's epsilon; transformers builds both twins with config.layer_norm_eps.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        try:
            return weightport.load(module, path)
        except WeightportError as e:
            assert snapshot(module) == before, "a refused load wrote to the module"
            return e


def _exact_or_refused(
    module: nn.Module, path: Path, expected: np.ndarray, mask: np.ndarray | None
) -> weightport.LoadReport | WeightportError:
    outcome = _load(module, path)
    if isinstance(outcome, weightport.LoadReport):
        error = np.abs(_torch_output(module, mask) - expected).max()
        assert error < TOL, f"loaded silently wrong: max error {error}\n{outcome}"
    return outcome


def _converted(reference: Callable[[nn.Module, str], nn.Module], model: nn.Module, path: Path) -> nn.Module:
    with warnings.catch_warnings():  # its torch.from_numpy of read-only arrays warns
        warnings.simplefilter("ignore", UserWarning)
        return reference(model, str(path))


def _assert_same_state(loaded: nn.Module, reference: nn.Module) -> None:
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


# --- Flax: BERT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(EMBEDDINGS))
def flax_bert(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path, np.ndarray]:
    """(config, ``flax_model.msgpack`` with sorted keys, Flax's ``last_hidden_state``)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    config = _bert_config(request.param)
    model = transformers.FlaxBertModel(config, seed=0)
    # tree_map sorts every dict's keys, as a training step does
    model.params = jax.tree_util.tree_map(_noisy(0), model.params)
    folder = tmp_path_factory.mktemp(f"flax_bert_{request.param}")
    model.save_pretrained(folder)
    path = folder / "flax_model.msgpack"
    with weightport.open_source(path) as source:
        names = list(source.infos)
        _assert_all_random({name: source.read(name) for name in names})
    # the case: file order is not the model's order
    assert names.index("encoder/layer/0/attention/output/dense/kernel") < names.index(
        "encoder/layer/0/attention/self/query/kernel"
    )
    return config, path, np.asarray(model(IDS, attention_mask=MASK).last_hidden_state)


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_flax_bert_loads_exactly_or_is_refused(flax_bert: tuple[Any, Path, np.ndarray], wrap: bool) -> None:
    config, path, expected = flax_bert
    _exact_or_refused(_wrapped(transformers.BertModel(config), wrap), path, expected, MASK)


def test_flax_bert_loads_exactly(flax_bert: tuple[Any, Path, np.ndarray]) -> None:
    config, path, expected = flax_bert
    model = _wrapped(transformers.BertModel(config), wrap=False)
    report = _load(model, path)
    assert isinstance(report, weightport.LoadReport), str(report)
    assert np.abs(_torch_output(model, MASK) - expected).max() < TOL
    assert {p.how for p in report.pairings} == {"by name"}


def test_flax_bert_wrapped_as_self_m_loads_inside_m(flax_bert: tuple[Any, Path, np.ndarray]) -> None:
    """Every layer pairs by name inside ``m`` alone: loaded as if ``prefix="m."`` were given."""
    config, path, expected = flax_bert
    wrapper = _wrapped(transformers.BertModel(config), wrap=True)
    report = _load(wrapper, path)
    assert isinstance(report, weightport.LoadReport), str(report)
    assert np.abs(_torch_output(wrapper, MASK) - expected).max() < TOL
    assert "'m'" in str(report)
    assert all(name.startswith("m.") for name in report.written)
    assert len(report.written) == len(wrapper.state_dict())


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_flax_bert_matches_transformers_converter(
    flax_bert: tuple[Any, Path, np.ndarray], wrap: bool
) -> None:
    # BertModel.from_pretrained(folder, from_flax=True) leaves every parameter on the meta device
    # (transformers 4.57.6, torch 2.13), so the converter it calls is given a built model instead.
    from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model

    config, path, _ = flax_bert
    module = _wrapped(transformers.BertModel(config), wrap)
    assert isinstance(_load(module, path), weightport.LoadReport)
    reference = _converted(load_flax_checkpoint_in_pytorch_model, transformers.BertModel(config), path)
    _assert_same_state(_inner(module), reference)


# --- Flax: GPT-2 (Conv1D: weight (in, out); c_proj is square, so only outputs show a wrong transpose) ---


@pytest.fixture(scope="module")
def flax_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    config = _gpt2_config()
    model = transformers.FlaxGPT2Model(config, seed=0)
    model.params = jax.tree_util.tree_map(_noisy(1), model.params)
    folder = tmp_path_factory.mktemp("flax_gpt2")
    model.save_pretrained(folder)
    path = folder / "flax_model.msgpack"
    with weightport.open_source(path) as source:
        _assert_all_random({name: source.read(name) for name in source.infos})
    return config, path, np.asarray(model(IDS).last_hidden_state)


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_flax_gpt2_loads_exactly_or_is_refused(flax_gpt2: tuple[Any, Path, np.ndarray], wrap: bool) -> None:
    from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model

    config, path, expected = flax_gpt2
    module = _wrapped(transformers.GPT2Model(config), wrap)
    if isinstance(_exact_or_refused(module, path, expected, None), weightport.LoadReport):
        reference = _converted(load_flax_checkpoint_in_pytorch_model, transformers.GPT2Model(config), path)
        _assert_same_state(_inner(module), reference)


# --- TensorFlow: BERT's tf_model.h5 (every weight under the one top-level layer 'bert', paired by name) ---


@pytest.fixture(scope="module")
def tf_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, np.ndarray]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")  # transformers' TF models need Keras 2 beside Keras 3
    pytest.importorskip("h5py")
    config = _bert_config("distinct")
    model = transformers.TFBertModel(config)
    model(IDS)  # builds the weights
    noisy = _noisy(2)
    for variable in model.weights:
        variable.assign(noisy(variable.numpy()))
    folder = tmp_path_factory.mktemp("tf_bert")
    model.save_pretrained(folder)
    path = folder / "tf_model.h5"
    with weightport.open_source(path) as source:
        _assert_all_random({name: source.read(name) for name in source.infos})
    return config, path, model(IDS, attention_mask=MASK).last_hidden_state.numpy()


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "wrapped"])
def test_tf_bert_loads_exactly_or_is_refused(tf_bert: tuple[Any, Path, np.ndarray], wrap: bool) -> None:
    from transformers.modeling_tf_pytorch_utils import load_tf2_checkpoint_in_pytorch_model

    config, path, expected = tf_bert
    module = _wrapped(transformers.BertModel(config), wrap)
    if isinstance(_exact_or_refused(module, path, expected, MASK), weightport.LoadReport):
        reference = _converted(load_tf2_checkpoint_in_pytorch_model, transformers.BertModel(config), path)
        _assert_same_state(_inner(module), reference)


def test_tf_bert_loads_by_transformers_names(tf_bert: tuple[Any, Path, np.ndarray]) -> None:
    """Issue 12: the inner layers of 'bert' pair by transformers' names (tests/test_transformers_tf.py)."""
    config, path, expected = tf_bert
    model = _wrapped(transformers.BertModel(config), wrap=False)
    report = _load(model, path)
    assert isinstance(report, weightport.LoadReport), str(report)
    assert np.abs(_torch_output(model, MASK) - expected).max() < TOL


class WithHead(nn.Module):
    """A user's model: a transformers encoder and a head of its own."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.encoder = transformers.BertModel(config)
        self.head = nn.Linear(config.hidden_size, 3)


def test_a_meta_model_is_not_left_partly_on_meta_by_a_load_that_picks_its_submodule(
    flax_bert: tuple[Any, Path, np.ndarray],
) -> None:
    """Every Flax layer pairs inside 'encoder', so the load goes there by itself: on a model built on the meta
    device that left the head without values (and report.missing empty); now it is refused, unless prefix= says so."""
    config, path, expected = flax_bert
    with torch.device("meta"):
        model = WithHead(config)
    embeddings = model.encoder.embeddings
    embeddings.to_empty(device="cpu")  # the non-persistent buffers (position_ids, token_type_ids) need values
    embeddings.position_ids.copy_(torch.arange(config.max_position_embeddings).expand((1, -1)))
    embeddings.token_type_ids.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        with pytest.raises(
            WeightportError, match=r"'head.weight, head.bias'.*on meta.*Fix: pass prefix='encoder.'"
        ):
            weightport.load(model, path)
        assert model.head.weight.is_meta
        weightport.load(model, path, prefix="encoder.")
    assert not any(t.is_meta for t in model.encoder.state_dict().values())
    np.testing.assert_allclose(_torch_output(model.encoder.eval(), MASK), expected, atol=TOL)


def test_a_safetensors_file_written_from_flax_is_refused_not_read_as_pytorch_names(
    flax_bert: tuple[Any, Path, np.ndarray], tmp_path: Path
) -> None:
    """transformers' Flax save_pretrained(safe_serialization=True) writes Flax names and (in, out) kernels into
    model.safetensors, with __metadata__ format='flax'; the refusal said to rename 'kernel' to 'weight', which
    loads square kernels transposed."""
    config, path, _ = flax_bert
    with weightport.open_source(
        path
    ) as source:  # the Flax params under '.'-joined names, as transformers writes them
        arrays = {name.replace("/", "."): source.read(name) for name in source.infos}
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file(arrays, str(tmp_path / "model.safetensors"), metadata={"format": "flax"})
    model = transformers.BertModel(config)
    before = snapshot(model)
    with pytest.raises(WeightportError, match=r"written by transformers from a Flax model.*format='flax'"):
        weightport.load(model, tmp_path / "model.safetensors")
    assert snapshot(model) == before


@pytest.mark.parametrize("pooler", [False, True], ids=["no-pooler", "pooler"])
def test_a_pytorch_checkpoint_with_a_head_loads_into_its_base_model(tmp_path: Path, pooler: bool) -> None:
    """BertForMaskedLM's model.safetensors ('bert.*' beside the head's 'cls.*') into BertModel (whose
    base_model_prefix is 'bert', with no 'bert' child): the 'bert.' part fills it as transformers' own
    from_pretrained takes it, giving the masked-LM model's encoder outputs; a strict load refuses over the
    head's tensors (and the pooler the checkpoint lacks) and writes nothing, strict=False loads the rest."""
    config = _bert_config("equal")
    torch.manual_seed(0)
    source = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    source.save_pretrained(tmp_path / "mlm")
    torch.manual_seed(1)
    module = transformers.BertModel(config, add_pooling_layer=pooler).eval()
    refused(module, tmp_path / "mlm", r"'cls\.predictions\.bias'.*unknown name.*strict=False")
    untouched = snapshot(module)
    report = weightport.load(module, tmp_path / "mlm", strict=False)
    with weightport.open_source(tmp_path / "mlm") as saved:
        head = sorted(n for n in saved.infos if not n.startswith("bert."))
    assert head and sorted(report.ignored) == head
    ids = torch.from_numpy(IDS).long()
    with torch.no_grad():
        expected = source.bert(ids).last_hidden_state
        torch.testing.assert_close(module(ids).last_hidden_state, expected, rtol=0, atol=0)
    if pooler:  # the checkpoint has no pooler: it keeps its values
        assert all(snapshot(module)[n] == untouched[n] for n in untouched if n.startswith("pooler."))
    # a model with a 'bert' child (the head model itself) takes the names as they are
    twin = transformers.BertForMaskedLM(config).eval()
    weightport.load(twin, tmp_path / "mlm")
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, source(ids).logits, rtol=0, atol=0)
