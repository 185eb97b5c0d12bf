"""Fixes from a second probe of the Flax layout, each against Flax's own outputs.

- A source layer the model has no free module of its kind for at all (a checkpoint of a bigger model: T5's
  decoder into ``T5EncoderModel``, BERT's pooler, CLIP's text half, an extra LayerNorm) is left out, so its
  arrays are unread: ``strict=False`` loads the rest exactly, ``strict=True`` refuses with why and the fix.
  Layers that still have free modules of their kind are refused as before (which to skip is ambiguous).
- A ``ConvTranspose`` kernel ``(k, k, c, c)`` reads both ways: the note's fix for ``transpose_kernel=True``
  works.
- Orbax checkpoint folders are refused with the way to load them; ``nn.scan`` stacks with the way to unstack.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from _flax import flax_outputs, save_msgpack
from weightport import LayoutError, LoadError, UncheckedConfigWarning
from weightport.layouts.flax import torch_padding

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
linen = pytest.importorskip("flax.linen")

TOL = 1e-5


def _load(module: nn.Module, source: Any, **kwargs: Any) -> weightport.LoadReport:
    with warnings.catch_warnings():  # params carry no settings (epsilons, padding): noted, not checked
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, source, **kwargs)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# --- 1. layers the model has no module for ------------------------------------------------------------


class _BodyAndNorm(linen.Module):
    @linen.compact
    def __call__(self, x: Any) -> Any:
        h = linen.Dense(8, name="body")(x)
        linen.LayerNorm(name="aux_norm")(h)  # trained beside, not on the path the PyTorch model keeps
        return h


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_layer_the_model_has_no_module_for_is_ignored_with_strict_false(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    variables, expected = flax_outputs(_BodyAndNorm(), x)
    path = save_msgpack(variables, tmp_path)
    model = _Body()
    before = _state(model)
    with pytest.raises(LoadError) as caught:
        _load(model, path)
    assert _unchanged(model, before)
    text = str(caught.value)
    assert "'params/aux_norm/scale'" in text and "'params/aux_norm/bias'" in text, text
    assert "1 Flax LayerNorm layer ('aux_norm'); the model has no nn.LayerNorm" in text, text
    assert "pass strict=False to load the model without it" in text, text
    report = _load(model, path, strict=False)
    assert sorted(report.ignored) == ["params/aux_norm/bias", "params/aux_norm/scale"]
    assert report.missing == []
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), expected, atol=TOL)


def test_an_extra_layer_of_a_kind_the_model_has_stays_refused(tmp_path: Path) -> None:
    """Three Dense layers for two Linears: which one to skip is not proven, with strict=False too."""

    class Three(linen.Module):
        @linen.compact
        def __call__(self, x: Any) -> Any:
            return linen.Dense(8)(linen.Dense(8)(linen.Dense(8)(x)))

    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    variables, _ = flax_outputs(Three(), x)
    path = save_msgpack(variables, tmp_path)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before = _state(model)
    with pytest.raises(LayoutError, match=r"the source has 3 unpaired Linear layer\(s\)"):
        _load(model, path, strict=False)
    assert _unchanged(model, before)


def test_a_cell_beside_a_half_mapped_bidirectional_module_stays_refused() -> None:
    """The bidirectional module's other side is free: the unmapped cell may be that side's, so it is not
    left out, with strict=False too."""

    class Model(linen.Module):
        @linen.compact
        def __call__(self, x: Any) -> Any:
            return linen.Bidirectional(linen.RNN(linen.GRUCell(4)), linen.RNN(linen.GRUCell(4)))(x)

    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    variables, _ = flax_outputs(Model(), x)
    assert {"GRUCell_0", "GRUCell_1"} <= set(variables["params"])
    model = nn.Sequential(nn.GRU(3, 4, bidirectional=True, batch_first=True))
    with pytest.raises(LayoutError, match="no free nn.GRU left"):
        _load(model, variables, layout="flax", strict=False, mapping={"GRUCell_0": "0[0]:forward"})


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def _noisy(tree: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a) + rng.uniform(-0.3, 0.3, np.shape(a)).astype(np.float32), tree
    )


def test_t5_model_snapshot_loads_into_its_encoder_with_strict_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _transformers()
    import jax.numpy as jnp

    clip = jnp.clip  # transformers' FlaxT5 calls jnp.clip(a, a_min=, a_max=), which this jax renamed
    monkeypatch.setattr(
        jnp, "clip", lambda a, a_min=None, a_max=None, **k: clip(a, k.get("min", a_min), k.get("max", a_max))
    )
    config = tr.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    flax_model = tr.FlaxT5Model(config, seed=0)
    flax_model.params = _noisy(flax_model.params, 3)
    flax_model.save_pretrained(tmp_path)
    ids = np.random.default_rng(7).integers(0, 50, (2, 6))
    expected = np.asarray(flax_model.encode(ids).last_hidden_state)
    model = tr.T5EncoderModel(config).eval()
    before = _state(model)
    with pytest.raises(LoadError, match=r"Flax Dense layers \('decoder/block/0/.*no free nn.Linear left"):
        _load(model, tmp_path)
    assert _unchanged(model, before)
    report = _load(model, tmp_path, strict=False)
    assert report.ignored and all(n.startswith("decoder/") for n in report.ignored), report.ignored
    assert report.missing == []
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=TOL * max(1.0, float(np.abs(expected).max())))


def test_bert_with_pooler_loads_into_a_token_classifiers_bert(tmp_path: Path) -> None:
    tr = _transformers()
    config = tr.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    flax_model = tr.FlaxBertModel(config, seed=0)
    flax_model.params = _noisy(flax_model.params, 4)
    flax_model.save_pretrained(tmp_path)
    ids = np.random.default_rng(7).integers(0, 50, (2, 6))
    expected = np.asarray(flax_model(ids).last_hidden_state)
    model = tr.BertForTokenClassification(config).eval()
    report = _load(model, tmp_path, strict=False, prefix="bert.")
    assert sorted(report.ignored) == ["pooler/dense/bias", "pooler/dense/kernel"]
    assert report.missing == []
    with torch.no_grad():
        got = model.bert(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=TOL * max(1.0, float(np.abs(expected).max())))


def test_clip_model_snapshot_loads_into_its_vision_model(tmp_path: Path) -> None:
    tr = _transformers()
    config = tr.CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    flax_model = tr.FlaxCLIPModel(config, seed=0)
    flax_model.params = _noisy(flax_model.params, 5)
    flax_model.save_pretrained(tmp_path)
    pixels = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32)
    vision = tr.FlaxCLIPVisionModel(config.vision_config, _do_init=False)
    expected = np.asarray(
        vision(pixels, params={"vision_model": flax_model.params["vision_model"]}).last_hidden_state
    )
    model = tr.CLIPVisionModel(config.vision_config).eval()
    report = _load(model, tmp_path, strict=False)
    assert report.ignored and not any(n.startswith("vision_model/") for n in report.ignored), report.ignored
    assert report.missing == []
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=TOL * max(1.0, float(np.abs(expected).max())))


# --- 2. a ConvTranspose kernel with as many inputs as outputs ------------------------------------------


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_square_conv_transpose_note_gives_the_fix_for_transpose_kernel(transpose_kernel: bool) -> None:
    class Up(linen.Module):
        @linen.compact
        def __call__(self, x: Any) -> Any:
            return linen.ConvTranspose(
                3, (3, 3), strides=(2, 2), padding="VALID", transpose_kernel=transpose_kernel
            )(x)

    x = np.random.default_rng(2).standard_normal((2, 5, 5, 3)).astype(np.float32)
    variables, expected = flax_outputs(Up(), x)
    padding, extra = torch_padding((3, 3), (2, 2), "VALID")
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 3, 2, padding=padding, output_padding=extra))
    report = _load(model, variables, layout="flax")
    (note,) = [n for n in report.unchecked if "transpose_kernel=True" in n]
    fix = note.split("fix the weight after the load: ", 1)[1]

    def run() -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()

    if not transpose_kernel:
        np.testing.assert_allclose(run(), expected, atol=TOL)  # the default needs nothing
        return
    assert np.abs(run() - expected).max() > 100 * TOL  # the default reading, wrong for this layer
    exec(fix, {"torch": torch, "model": model})  # the note's own line
    np.testing.assert_allclose(run(), expected, atol=TOL)


# --- 3. Orbax checkpoint folders ------------------------------------------------------------------------


class _TwoDense(linen.Module):
    @linen.compact
    def __call__(self, x: Any) -> Any:
        return linen.Dense(3)(linen.relu(linen.Dense(6)(x)))


def _two_linears() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _restore_call(message: str) -> str:
    """The fix's code: the statements after 'pass the pytree: '."""
    return message.split("pass the pytree: ", 1)[1]


@pytest.mark.parametrize("manager", [False, True], ids=["checkpointer", "checkpoint_manager"])
def test_an_orbax_folder_is_refused_with_the_restore_that_loads_it(tmp_path: Path, manager: bool) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    variables, expected = flax_outputs(_TwoDense(), x)
    folder = tmp_path / "ckpt"
    if manager:
        with ocp.CheckpointManager(folder) as saver:
            saver.save(3, args=ocp.args.StandardSave(variables))
            saver.save(7, args=ocp.args.StandardSave(variables))
            saver.wait_until_finished()
    else:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(folder, variables)
        checkpointer.wait_until_finished()
    model = _two_linears()
    before = _state(model)
    with pytest.raises(weightport.SourceError, match="Orbax") as caught:
        weightport.load(model, folder)
    assert _unchanged(model, before)
    message = str(caught.value)
    assert "never unpickles" in message, message
    assert ("/7/default'" in message) == manager, message
    exec(_restore_call(message), {"weightport": weightport, "model": model})
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), expected, atol=TOL)


def test_a_folder_with_orbax_markers_is_refused_as_orbax(tmp_path: Path) -> None:
    step = tmp_path / "ckpt" / "12"
    (step / "default").mkdir(parents=True)
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        (step / name).write_text("{}")
    for name in ("_METADATA", "manifest.ocdbt"):
        (step / "default" / name).write_text("{}")
    for folder, what in [
        (tmp_path / "ckpt", "an Orbax CheckpointManager's folder (steps 12"),
        (step, "an Orbax checkpoint step holding the item(s) default"),
        (step / "default", "an Orbax checkpoint,"),
    ]:
        with pytest.raises(weightport.SourceError) as caught:
            weightport.open_source(folder)
        message = str(caught.value)
        assert what in message and "does not read" in message, message
        assert f"restore('{(step / 'default').resolve()}')" in message, message
        assert "holds no .npy files: it is" in message, message
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    with pytest.raises(weightport.SourceError, match=r"holds no \.npy files\. Fix: save each tensor"):
        weightport.open_source(plain)


# --- 4. nn.scan stacks ----------------------------------------------------------------------------------


class _Block(linen.Module):
    @linen.compact
    def __call__(self, h: Any, _: Any) -> Any:
        return h + linen.Dense(8)(linen.LayerNorm()(h)), None


class _Scanned(linen.Module):
    @linen.compact
    def __call__(self, x: Any) -> Any:
        scan = linen.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


class _TorchBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.LayerNorm_0 = nn.LayerNorm(8, eps=1e-6)
        self.Dense_0 = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.Dense_0(self.LayerNorm_0(h))


class _TorchStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_TorchBlock() for _ in range(3)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            h = block(h)
        return h


def test_scanned_layers_refusal_gives_the_unstacking_that_loads_them(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    variables, expected = flax_outputs(_Scanned(), x)
    path = save_msgpack(variables, tmp_path)
    model = _TorchStack()
    with pytest.raises(weightport.UnsupportedConfigError, match="loads them unstacked") as caught:
        _load(model, path)
    code = str(caught.value).split("you loaded): ", 1)[1]
    assert "k = 'params/layers'" in code, code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        exec(code, {"weightport": weightport, "model": model, "source": path})
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), expected, atol=TOL)
