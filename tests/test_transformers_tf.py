"""transformers' TF checkpoints (``tf_model.h5``) into transformers' PyTorch classes (issue 12).

Each case builds a tiny TF model, gives every weight random values (non-zero biases, norm scales off
one), saves it as ``save_pretrained`` does and loads the file into the PyTorch class built from the
same config: the outputs match TensorFlow's within 1e-5 of their scale, and the state dict is bit for
bit what transformers' own converter gives. GPT-2's ``c_proj`` is square, so only the outputs (and the
value check against the file) show that its ``weight`` is not transposed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from conftest import snapshot
from weightport import UncheckedConfigWarning, WeightportError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")  # transformers' TF models need Keras 2 beside Keras 3
h5py = pytest.importorskip("h5py")

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
IDS = np.random.default_rng(1).integers(0, 99, (2, 7)).astype(np.int32)
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2], dtype=np.int32)
PIXELS = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
AUDIO = np.random.default_rng(4).standard_normal((2, 800)).astype(np.float32)
TOL = 1e-5  # of the output's scale


_CVT_STAGES = {  # CvT's per-stage settings, one each for its three stages
    "mlp_ratio": 4.0,
    "attention_drop_rate": 0.0,
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "qkv_bias": True,
    "qkv_projection_method": "dw_bn",
    "kernel_qkv": 3,
    "padding_kv": 1,
    "stride_kv": 2,
    "padding_q": 1,
    "stride_q": 1,
}


def _config(kind: str) -> Any:
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64
        )
    if kind == "vit":
        return transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **SIZES)
    if kind == "t5":
        return transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    if kind == "resnet":
        return transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
    if kind == "bart":
        return transformers.BartConfig(
            vocab_size=99,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
        )
    if kind.startswith("wav2vec2"):
        return transformers.Wav2Vec2Config(
            vocab_size=99,
            use_weighted_layer_sum=kind == "wav2vec2_weighted",
            num_labels=3,
            classifier_proj_size=8,
            **SIZES,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    if kind == "cvt":
        config = transformers.CvtConfig(
            patch_sizes=[7, 3, 3],
            patch_stride=[4, 2, 2],
            patch_padding=[2, 1, 1],
            embed_dim=[8, 16, 24],
            num_heads=[1, 2, 3],
            depth=[1, 2, 3],  # TF CvT indexes its drop-path rates by stage: each stage needs that many layers
            cls_token=[False, False, True],
            **{f: [v] * 3 for f, v in _CVT_STAGES.items()},
        )
        config.image_size = 32  # the TF model's input signature reads it
        return config
    return transformers.BertConfig(vocab_size=99, **SIZES)


TEXT = {"input_ids": IDS, "attention_mask": MASK}
# kind -> (TF class, PyTorch class, inputs: name -> array)
MODELS: dict[str, tuple[str, str, dict[str, np.ndarray]]] = {
    "bert": ("TFBertModel", "BertModel", TEXT),
    "gpt2": ("TFGPT2Model", "GPT2Model", TEXT),
    "vit": ("TFViTModel", "ViTModel", {"pixel_values": PIXELS}),
    # a head beside 'bert'
    "bert_classifier": ("TFBertForSequenceClassification", "BertForSequenceClassification", TEXT),
    # 'mlm___cls' (the PyTorch 'cls') also lists, and the file holds again, BERT's embeddings it uses
    "bert_pretraining": ("TFBertForPreTraining", "BertForPreTraining", TEXT),
    # 'shared' is built outside the model's scope ('shared/shared/embeddings:0'), listed again under both stacks
    "t5": ("TFT5Model", "T5Model", {"input_ids": IDS, "decoder_input_ids": IDS[:, ::-1].copy()}),
    # Conv2D kernels and BatchNormalization's moving statistics
    "resnet": ("TFResNetModel", "ResNetModel", {"pixel_values": PIXELS}),
    # 'model.shared/model.shared/embeddings:0' inside 'model'; 'final_logits_bias:0', a layer of one
    # variable, fills a persistent buffer
    "bart": ("TFBartForConditionalGeneration", "BartForConditionalGeneration", TEXT),
    # the last stage's cls_token is a variable named by its PyTorch path, in no scope
    # ('cvt/cvt.encoder.stages.2.cls_token:0'); its BatchNormalization statistics fill the dw_bn projections
    "cvt": (
        "TFCvtModel",
        "CvtModel",
        {"pixel_values": np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)},
    ),
    # weight_g/weight_v fill the weight-norm parametrization's original0/original1
    "wav2vec2": ("TFWav2Vec2Model", "Wav2Vec2Model", {"input_values": AUDIO}),
    # the model's own 'layer_weights', filed under 'top_level_model_weights', in no layer
    "wav2vec2_weighted": (
        "TFWav2Vec2ForSequenceClassification",
        "Wav2Vec2ForSequenceClassification",
        {"input_values": AUDIO},
    ),
}
_OUTPUTS = ("logits", "prediction_logits", "logits_per_image", "last_hidden_state")


def _tf_output(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    out = model(inputs, training=False)
    return np.asarray(next(out[k] for k in _OUTPUTS if k in out))


def _torch_output(module: nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    args = {
        k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
        for k, v in inputs.items()
    }
    with torch.no_grad():
        out = module.eval()(**args)
    return next(out[k] for k in _OUTPUTS if k in out).numpy()


Checkpoint = tuple[str, Path, np.ndarray]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Checkpoint]:
    """kind -> (kind, ``tf_model.h5`` with random weights, TensorFlow's output), each built once."""
    built: dict[str, Checkpoint] = {}

    def get(kind: str) -> Checkpoint:
        if kind not in built:
            tf_class, _, inputs = MODELS[kind]
            model = getattr(transformers, tf_class)(_config(kind))
            model(model.dummy_inputs)  # builds the weights
            rng = np.random.default_rng(3)
            for variable in model.weights:
                value = variable.numpy()
                variable.assign(value + rng.normal(0.0, 0.1, value.shape).astype(value.dtype))
            folder = tmp_path_factory.mktemp(f"tf_{kind}")
            model.save_pretrained(folder)
            built[kind] = (kind, folder / "tf_model.h5", _tf_output(model, inputs))
        return built[kind]

    return get


@pytest.fixture(params=sorted(MODELS))
def checkpoint(request: pytest.FixtureRequest, checkpoints: Callable[[str], Checkpoint]) -> Checkpoint:
    return checkpoints(request.param)


def _torch_model(kind: str) -> nn.Module:
    return getattr(transformers, MODELS[kind][1])(_config(kind)).eval()


def _load(module: nn.Module, path: Path, **kwargs: Any) -> weightport.LoadReport:
    with warnings.catch_warnings():  # the file records no settings: the config builds both twins
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        return weightport.load(module, path, **kwargs)


def _refused(module: nn.Module, path: Path, **kwargs: Any) -> WeightportError:
    before = snapshot(module)
    with pytest.raises(WeightportError) as caught:
        _load(module, path, **kwargs)
    assert snapshot(module) == before, "a refused load wrote to the module"
    return caught.value


def _converted(kind: str, path: Path) -> nn.Module:
    # from_pretrained(folder, from_tf=True) may leave meta parameters with torch 2.13: the converter
    # it calls is given a built model instead
    from transformers.modeling_tf_pytorch_utils import load_tf2_checkpoint_in_pytorch_model

    with warnings.catch_warnings():  # its torch.from_numpy of read-only arrays warns
        warnings.simplefilter("ignore", UserWarning)
        return load_tf2_checkpoint_in_pytorch_model(_torch_model(kind), str(path))


def test_loads_exactly(checkpoint: Checkpoint) -> None:
    kind, path, expected = checkpoint
    module = _torch_model(kind)
    report = _load(module, path)
    error = np.abs(_torch_output(module, MODELS[kind][2]) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max())), f"max error {error}\n{report}"
    assert set(dict(module.named_parameters())) <= set(report.written) <= set(module.state_dict())
    assert all(p.how.startswith("by name") for p in report.pairings)


def test_state_dict_is_transformers_converters_bit_for_bit(checkpoint: Checkpoint) -> None:
    kind, path, _ = checkpoint
    module = _torch_model(kind)
    report = _load(module, path)
    ours, theirs = module.state_dict(), _converted(kind, path).state_dict()
    assert list(ours) == list(theirs)
    # transformers' converter reads parameters only: buffers the file holds (BatchNorm's statistics,
    # BART's final_logits_bias) it leaves as built; they are the file's here
    params = dict(module.named_parameters(remove_duplicate=False))
    from_file = {row.target: row.origin.split(" ", 1)[1] for row in report.rows if row.target not in params}
    assert (kind in ("resnet", "bart", "cvt")) == bool(from_file)
    # nor the model's own weights, filed under 'top_level_model_weights': it leaves Wav2Vec2's layer_weights
    own = {
        row.target: row.origin.split(" ", 1)[1]
        for row in report.rows
        if "top_level_model_weights" in row.origin
    }
    assert (kind == "wav2vec2_weighted") == bool(own)
    from_file |= own
    with weightport.open_source(path) as source:
        for name in ours:
            if name in from_file and not name.endswith("num_batches_tracked"):
                assert np.array_equal(
                    ours[name].numpy(), source.read(from_file[name]).reshape(ours[name].shape)
                )
            elif name not in from_file:
                assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_batchnorm_statistics_are_the_files(checkpoints: Callable[[str], Checkpoint]) -> None:
    """Keras's moving_mean/moving_variance fill running_mean/running_var (transformers' converter leaves
    them as built, so its model computes otherwise in eval mode); num_batches_tracked is 0."""
    kind, path, _ = checkpoints("resnet")
    module = _torch_model(kind)
    report = _load(module, path)
    state = module.state_dict()
    with weightport.open_source(path) as source:
        moving = {n: source.read(n) for n in source.infos if "moving_" in n}
    assert moving and len(moving) == len([n for n in state if n.endswith(("running_mean", "running_var"))])
    for name in moving:
        target = next(row.target for row in report.rows if row.origin.endswith(name))
        assert target.endswith("running_mean" if "moving_mean" in name else "running_var")
        assert np.array_equal(state[target].numpy(), moving[name])
    assert all(int(t) == 0 for n, t in state.items() if n.endswith("num_batches_tracked"))


def test_gpt2_square_conv1d_weight_is_not_transposed(checkpoints: Callable[[str], Checkpoint]) -> None:
    kind, path, _ = checkpoints("gpt2")
    module = _torch_model(kind)
    _load(module, path)
    with h5py.File(path, "r") as f:
        stored = np.asarray(f["transformer/tfgpt2_model/transformer/h_._0/attn/c_proj/weight:0"])
        bias = np.asarray(f["transformer/tfgpt2_model/transformer/h_._0/attn/c_proj/bias:0"])
    state = module.state_dict()
    loaded = state["h.0.attn.c_proj.weight"].numpy()
    assert stored.shape == loaded.shape == (32, 32) and not np.array_equal(stored, stored.T)
    assert np.array_equal(loaded, stored)  # Conv1D keeps TF's (in, out)
    assert bias.shape == (1, 32) and np.array_equal(state["h.0.attn.c_proj.bias"].numpy(), bias[0])


def test_wrapped_model_loads_inside_its_attribute(checkpoint: Checkpoint) -> None:
    kind, path, expected = checkpoint

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.m = inner

    wrapper = Wrap(_torch_model(kind))
    report = _load(wrapper, path)
    assert all(name.startswith("m.") for name in report.written)
    error = np.abs(_torch_output(wrapper.m, MODELS[kind][2]) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max()))


def test_head_the_module_lacks_is_refused_then_skipped_with_strict_false(
    checkpoints: Callable[[str], Checkpoint],
) -> None:
    _, path, _ = checkpoints("bert_classifier")
    error = _refused(_torch_model("bert"), path)
    assert "classifier.weight" in str(error) and "strict=False" in str(error)
    module = _torch_model("bert")
    report = _load(module, path, strict=False)  # what transformers' converter does, with a warning
    assert {"classifier/tf_bert_for_sequence_classification/classifier/kernel:0"} <= set(report.ignored)
    reference = _converted("bert", path).state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in module.state_dict().items())


@pytest.mark.parametrize(
    ("kind", "into"), [("bert", "gpt2"), ("gpt2", "bert"), ("bert", "vit"), ("vit", "bert")]
)
def test_another_architecture_is_refused_and_nothing_written(
    checkpoints: Callable[[str], Checkpoint], kind: str, into: str
) -> None:
    _, path, _ = checkpoints(kind)
    module = _torch_model(into)
    message = str(_refused(module, path))
    assert "another architecture" in message and "transformers TF checkpoint" in message
    assert type(module).__name__ in message


def test_layer_holding_a_model_with_other_names_is_still_refused(
    checkpoints: Callable[[str], Checkpoint], tmp_path: Path
) -> None:
    """Weights under one layer that holds a whole model, named without transformers' model scope: no
    naming weightport knows pairs the inner layers, so the one refusal names the layer."""
    _, path, _ = checkpoints("bert")
    other = tmp_path / "other.h5"
    with h5py.File(path, "r") as src, h5py.File(other, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        group = dst.create_group("bert")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in src["bert"].attrs["weight_names"]]
        renamed = [n.split("/", 1)[1] for n in names]  # 'bert/embeddings/...', no model scope
        for name, new in zip(names, renamed):
            group.create_dataset(new, data=np.asarray(src["bert"][name]))
        group.attrs["weight_names"] = np.array([n.encode() for n in renamed])
    error = _refused(_torch_model("bert"), other)
    assert "'bert'" in str(error)


def test_mapping_names_where_the_top_level_layer_goes(checkpoints: Callable[[str], Checkpoint]) -> None:
    kind, path, expected = checkpoints("bert")

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _torch_model("bert")
            self.b = _torch_model("bert")

    two = Two()
    assert "prefix=" in str(_refused(two, path))  # either could take it
    assert all(name.startswith("b.") for name in _load(two, path, prefix="b.").written)
    two = Two()
    report = _load(two, path, mapping={"bert": "b"}, strict=False)  # 'a' is left as it is
    assert all(name.startswith("b.") for name in report.written)
    assert report.missing and all(name.startswith("a.") for name in report.missing)
    error = np.abs(_torch_output(two.b, MODELS[kind][2]) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max()))
    assert "'nope'" in str(_refused(_torch_model("bert"), path, mapping={"nope": ""}))


def test_folder_of_save_pretrained_loads(checkpoints: Callable[[str], Checkpoint]) -> None:
    """The folder ``save_pretrained`` wrote (config.json beside tf_model.h5) reads as its one weights file."""
    kind, path, expected = checkpoints("vit")
    module = _torch_model(kind)
    _load(module, path.parent)
    error = np.abs(_torch_output(module, MODELS[kind][2]) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max()))


def test_persistent_buffer_the_file_lacks_is_named_then_kept_with_strict_false(
    checkpoints: Callable[[str], Checkpoint],
) -> None:
    """transformers' converter reads parameters only; a persistent buffer the file has no value for is
    a problem saying so, and strict=False leaves it as built, as the converter does."""
    _, path, expected = checkpoints("bert")
    module = _torch_model("bert")
    module.get_submodule("embeddings").register_buffer("scale", torch.full((3,), 7.0))
    error = _refused(module, path)
    assert "embeddings.scale" in str(error) and "converter leaves it as the module built it" in str(error)
    report = _load(module, path, strict=False)
    assert report.missing == ["embeddings.scale"]
    assert torch.equal(module.get_buffer("embeddings.scale"), torch.full((3,), 7.0))
    error_ = np.abs(_torch_output(module, TEXT) - expected).max()
    assert error_ <= TOL * max(1.0, float(np.abs(expected).max()))


def test_a_weight_built_twice_with_other_values_is_refused(tmp_path: Path) -> None:
    """TF ESM builds its word embeddings twice (the encoder's, and the decoder's under lm_head): the file
    files the second as a copy of the first, but after training they differ, and one tied PyTorch tensor
    cannot take both. It was loaded from the first, the second dropped as the same weight again."""
    config = transformers.EsmConfig(
        vocab_size=33, pad_token_id=1, mask_token_id=32, max_position_embeddings=64,
        position_embedding_type="absolute", **{**SIZES, "num_hidden_layers": 1},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TF's unseeded initializer used twice
        model = transformers.TFEsmForMaskedLM(config)
        model(model.dummy_inputs)
    rng = np.random.default_rng(5)
    for variable in model.weights:
        variable.assign(variable.numpy() + rng.normal(0.0, 0.1, variable.shape).astype(np.float32))
    model.save_pretrained(tmp_path)
    error = _refused(transformers.EsmForMaskedLM(config).eval(), tmp_path / "tf_model.h5")
    assert "word_embeddings/embeddings:0' is filed as a copy of" in str(error)
    assert "hold different values" in str(error)


@pytest.mark.parametrize(
    "composite", ["EncoderDecoderModel", "VisionEncoderDecoderModel", "VisionTextDualEncoderModel"]
)
def test_a_composites_parts_load_without_their_main_layer_names(composite: str, tmp_path: Path) -> None:
    """TF files a composite's encoder under its main layer (``encoder/bert/...``, ``encoder/vit/...``), where the
    PyTorch part (a ``BertModel``, ``ViTModel``) holds its tensors at its top: the name its
    ``base_model_prefix`` gives goes, as transformers' own loading drops it. Logits as TensorFlow's."""
    decoder = transformers.BertConfig(vocab_size=99, is_decoder=True, add_cross_attention=True, **SIZES)
    if composite == "EncoderDecoderModel":
        encoder = transformers.BertConfig(vocab_size=99, **SIZES)
        config: Any = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, ::-1].copy()}
    elif composite == "VisionEncoderDecoderModel":
        encoder = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **SIZES)
        config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        inputs = {"pixel_values": PIXELS, "decoder_input_ids": IDS}
    else:  # its own logit_scale, filed under top_level_model_weights as (1,), is the model's () parameter
        vision = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **SIZES)
        text = transformers.BertConfig(vocab_size=99, **SIZES)
        config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            vision, text, projection_dim=8
        )
        inputs = {**TEXT, "pixel_values": PIXELS}
    model = getattr(transformers, f"TF{composite}")(config)
    model(model.dummy_inputs)
    rng = np.random.default_rng(6)
    for variable in model.weights:
        value = variable.numpy()
        variable.assign(value + rng.normal(0.0, 0.1, value.shape).astype(value.dtype))
    model.save_pretrained(tmp_path)
    expected = _tf_output(model, inputs)
    module = getattr(transformers, composite)(config).eval()
    report = _load(module, tmp_path / "tf_model.h5")
    error = np.abs(_torch_output(module, inputs) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max())), f"max error {error}\n{report}"
    assert set(dict(module.named_parameters())) <= set(report.written)


def test_albert_mlm_heads_unused_zero_bias_is_set_aside(tmp_path: Path) -> None:
    """TF ALBERT's MLM head builds ``bias`` and ``decoder/bias`` (both start at zero) and adds only
    ``decoder/bias``; PyTorch ties the two. A trained checkpoint keeps the unused one at zero: it is set aside
    and the logits are TensorFlow's. Two non-zero copies that differ are still refused (which one the TF
    model reads is not in the file)."""
    config = transformers.AlbertConfig(vocab_size=99, embedding_size=16, **SIZES)
    model = transformers.TFAlbertForMaskedLM(config)
    model(model.dummy_inputs)
    rng = np.random.default_rng(7)
    for variable in model.weights:
        value = variable.numpy()
        variable.assign(value + rng.normal(0.0, 0.1, value.shape).astype(value.dtype))
    (unused,) = [v for v in model.weights if v.name.endswith("predictions/bias:0")]
    model.save_pretrained(tmp_path / "both")  # two trained copies: refused
    with pytest.raises(WeightportError, match="they are one tied tensor"):
        _load(transformers.AlbertForMaskedLM(config), tmp_path / "both" / "tf_model.h5")
    unused.assign(np.zeros(unused.shape, np.float32))
    model.save_pretrained(tmp_path / "trained")
    expected = _tf_output(model, TEXT)
    module = transformers.AlbertForMaskedLM(config).eval()
    report = _load(module, tmp_path / "trained" / "tf_model.h5")
    error = np.abs(_torch_output(module, TEXT) - expected).max()
    assert error <= TOL * max(1.0, float(np.abs(expected).max())), f"max error {error}\n{report}"
    assert any("predictions/bias:0 (all zeros where" in i for i in report.ignored), report.ignored
