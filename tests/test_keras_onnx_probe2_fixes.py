"""Fixes found by the second probe of Keras applications and transformers' ONNX exports, each held against the
framework's own outputs: a weights-only Keras file's pools (and every other layer without weights whose
settings change the outputs) said as unchecked, OPT's legacy ONNX export (call-path scopes beside full
parameter names), and a weight-norm conv folded into one constant by an export."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightport

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ---- a weights-only Keras file's layers without weights ----------------------------------------------------


def _randomize(model: Any, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(np.float32) for w in model.weights])


class _Pooled(nn.Module):
    """conv -> max pool 3/2 -> conv -> add -> global average -> linear; ``tf_same``: the pool padded as TensorFlow's
    'same' pads an even map (0 before, 1 after, with -inf), else PyTorch's symmetric padding=1."""

    def __init__(self, tf_same: bool) -> None:
        super().__init__()
        self.tf_same = tf_same
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        if self.tf_same:
            h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=-float("inf")), 3, 2)
        else:
            h = F.max_pool2d(h, 3, 2, padding=1)
        h = h + self.c2(h)
        return self.fc(h.mean((2, 3)))


def test_a_weights_only_file_names_its_same_padded_pool_as_unchecked(tmp_path: Path) -> None:
    """A .weights.h5 holds an empty group per pool ('max_pooling2d', its layer's name an attribute): the load said nothing of it while
    PyTorch's pool padded otherwise (Xception: 1.2 off). Now the pool is listed as unchecked with TensorFlow's
    'same' rule and its -inf padding, the harmless layers (input, add, global pool, flatten, dropout) are not, and the twin
    built as it says gives Keras's outputs exactly."""
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.backend.clear_session()  # the file's group names count layers made before in this process
    i = keras.Input((8, 8, 3))
    h = layers.MaxPooling2D(3, 2, padding="same", name="pool")(layers.Conv2D(4, 3, padding="same")(i))
    h = layers.Add()([h, layers.Conv2D(4, 1)(h)])
    out = layers.Dense(5)(layers.Dropout(0.3)(layers.Flatten()(layers.GlobalAveragePooling2D()(h))))
    model = keras.Model(i, out)
    _randomize(model)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    expected = np.asarray(model(x))
    mapping = {"conv2d": "c1", "conv2d_1": "c2", "dense": "fc"}

    def loaded(twin: nn.Module) -> tuple[list[str], np.ndarray]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = weightport.load(twin.eval(), path, mapping=mapping)
        said = [str(w.message) for w in caught if issubclass(w.category, weightport.UncheckedConfigWarning)]
        assert " ".join(report.unchecked) in " ".join(said) or report.unchecked
        with torch.no_grad():
            got = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        return report.unchecked, got

    unchecked, got = loaded(_Pooled(tf_same=False))
    assert np.abs(got - expected).max() > 1e-2  # PyTorch's own 'same'-sized pool computes otherwise
    (pool,) = [u for u in unchecked if "pool" in u.lower()]
    assert pool.startswith("Keras MaxPooling2D 'max_pooling2d' (no weights, so nothing pairs it): pool_size")
    assert "'same' pads by TensorFlow's rule" in pool and "pad its input with -inf" in pool
    assert pool.endswith("; the model calls it 'pool'"), pool
    for harmless in ("input_layer", "'add'", "global_average", "flatten", "dropout"):
        assert not any(harmless in u for u in unchecked), unchecked
    _, got = loaded(_Pooled(tf_same=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_weights_only_file_names_a_weightless_layer_of_an_unknown_class(tmp_path: Path) -> None:
    """A layer class weightport knows nothing of (one's own) computes what no weights show: said, not passed
    over as harmless."""
    keras = pytest.importorskip("keras")

    class Halve(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x * 0.5

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Halve()])
    _randomize(model)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    with pytest.warns(
        weightport.UncheckedConfigWarning, match="Keras layer 'halve' .*is none weightport knows"
    ):
        weightport.load(nn.Sequential(nn.Linear(4, 3)), path)


# ---- ONNX: transformers models exported by torch.onnx.export ----------------------------------------------


def _transformers() -> Any:
    sys.path.insert(0, str(Path(__file__).parent))
    import _vision

    _vision.allow_torchvision_import()
    return pytest.importorskip("transformers")


def _randomize_torch(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (0.5 if p.ndim == 1 else 0.0))
    return model.eval()


def _exported(source: nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    """``source`` exported to ``path`` (legacy exporter, opset 17), and onnxruntime's first output on ``x``."""
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (x,), str(path), dynamo=False, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.m(*inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_opt_legacy_export_pairs_its_projections_by_their_named_biases(tmp_path: Path) -> None:
    """The TorchScript exporter folds each projection's transposed weight into 'onnx::MatMul_431' and its
    bias Add reads 'm.model.decoder.layers.0.self_attn.q_proj.bias': the synthetic name voted '' against the
    bias's module, so q/k/v/out_proj were refused as interchangeable. Synthetic names now do not vote: the
    load pairs them by name and gives onnxruntime's logits."""
    transformers = _transformers()
    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
        max_position_embeddings=16, word_embed_proj_dim=32, do_layer_norm_before=True,
    )  # fmt: skip
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    source = _Logits(_randomize_torch(transformers.OPTForCausalLM(config), 1)).eval()
    path = tmp_path / "opt.onnx"
    expected = _exported(source, ids, path)
    model = _Logits(_randomize_torch(transformers.OPTForCausalLM(config), 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        report = weightport.load(model, path, example_inputs=(ids,))
    assert any(p.module_path == "m.model.decoder.layers.0.self_attn.q_proj" for p in report.pairings)
    with torch.no_grad():
        got = model(ids).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_a_weight_normed_conv_folded_by_the_export_leads_with_removing_the_parametrization(
    tmp_path: Path,
) -> None:
    """Wav2Vec2's positional conv is weight-normed: the default export folds original0 and original1 into one
    constant. The refusal's fix said to load the originals, which the file does not hold; it now leads with
    remove_parametrizations, and the model so changed loads (strict=False for the training-only
    masked_spec_embed, as its own fix says) and gives onnxruntime's outputs."""
    transformers = _transformers()
    config = transformers.Wav2Vec2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False,
    )  # fmt: skip
    wav = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    source = _Logits(_randomize_torch(transformers.Wav2Vec2Model(config), 1)).eval()
    path = tmp_path / "w2v.onnx"
    expected = _exported(source, wav, path)
    model = _Logits(_randomize_torch(transformers.Wav2Vec2Model(config), 2)).eval()
    conv = "m.encoder.pos_conv_embed.conv"
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(model, path)
    first = str(caught.value).split("\n  - ")[1]
    assert first.startswith(f"'{conv}.parametrizations.weight.original{{0,1}}'"), first
    fix = first.split("Fix: ", 1)[1]
    removal = (
        f"remove the parametrization before loading: torch.nn.utils.parametrize.remove_parametrizations("
        f"model.get_submodule('{conv}'), 'weight')"
    )
    assert removal in fix and fix.index(removal) < fix.index("do_constant_folding=False"), fix
    torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule(conv), "weight")
    with pytest.raises(weightport.LoadError, match="1 problem") as caught:
        weightport.load(model, path)
    assert "'m.masked_spec_embed'" in str(caught.value) and "strict=False" in str(caught.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        weightport.load(model, path, strict=False)
    with torch.no_grad():
        got = model(wav).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
