"""Whole CNN zoos through ONNX (issue 12): torchvision's and timm's models, exported by torch.onnx.export with
each exporter's defaults (every BatchNorm folded into the conv before it) and with the settings that keep the
BatchNormalization nodes, loaded back into a fresh instance of the same model: outputs equal onnxruntime's on
the file, and the original model's, to 1e-5 of the output's scale."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from _vision import timm, torchvision
from weightport.errors import LayoutError, UncheckedConfigWarning

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

X = torch.from_numpy(np.random.RandomState(12).standard_normal((1, 3, 64, 64)).astype(np.float32))
TOL = 1e-5

# how each setting calls torch.onnx.export, and whether it keeps the BatchNormalization nodes
SETTINGS: dict[str, tuple[dict[str, Any], bool]] = {
    "dynamo": ({"dynamo": True}, False),
    "dynamo-unoptimized": ({"dynamo": True, "optimize": False}, True),
    "legacy": ({"dynamo": False}, False),
    "legacy-preserve": ({"dynamo": False, "training": "PRESERVE"}, True),
}


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode, its BatchNorms' statistics, weight and bias random (not 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5, generator=gen)
                    module.bias.uniform_(-0.5, 0.5, generator=gen)
    return model.eval()


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    zoo, _, arch = name.partition(":")
    if zoo == "torchvision":
        model = getattr(torchvision().models, arch)(weights=None)
    else:
        model = timm().create_model(arch, pretrained=False)
    return _randomized(model, seed)


def _export(model: nn.Module, path: Path, setting: str) -> Path:
    options = dict(SETTINGS[setting][0])
    if options.get("training") == "PRESERVE":
        options["training"] = torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():  # the exporters warn and print about their own internals
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (X,), str(path), verbose=False, **options)
    return path


def _ort(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    return np.asarray(out)


class Exported:
    def __init__(self, name: str, setting: str, path: Path) -> None:
        self.name, self.setting, self.path = name, setting, path
        self.original = _build(name, 0)
        _export(self.original, path, setting)
        self.expected = _ort(path)
        with torch.no_grad():
            self.torch_out = self.original(X).numpy()
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        self.keeps_batchnorms = "BatchNormalization" in ops
        assert self.keeps_batchnorms == SETTINGS[setting][1]

    def error(self, model: nn.Module, expected: np.ndarray) -> float:
        with torch.no_grad():
            out = model(X).numpy()
        return float(np.abs(out - expected).max() / np.abs(expected).max())


MODELS = ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0"]


@pytest.fixture(
    scope="module", params=[(m, s) for m in MODELS for s in SETTINGS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    name, setting = request.param
    folder = tmp_path_factory.mktemp(name.replace(":", "-"))
    return Exported(name, setting, folder / f"{setting}.onnx")


def _load(model: nn.Module, exported: Exported, **options: Any) -> weightport.LoadReport:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = weightport.load(model, exported.path, **options)
    folded = [
        w for w in caught if issubclass(w.category, UncheckedConfigWarning) and "folded" in str(w.message)
    ]
    assert len(folded) == (0 if exported.keeps_batchnorms else 1)
    return report


def test_a_zoo_model_loads_back_exactly(exported: Exported) -> None:
    model = _build(exported.name, 1)
    # the legacy exporter names folded weights onnx::Conv_193: the call order places them
    inputs = {"example_inputs": (X,)} if exported.setting == "legacy" else {}
    report = _load(model, exported, **inputs)
    assert exported.error(model, exported.expected) < TOL
    assert exported.error(model, exported.torch_out) < TOL
    folded = [p for p in report.pairings if p.how.startswith("folded into")]
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(folded) == (0 if exported.keeps_batchnorms else len(batchnorms))


def test_the_legacy_export_without_a_call_order_loads_by_shape_or_asks_for_one(exported: Exported) -> None:
    """Without names or a call order, convs place only where one assignment fits (kinds and shapes); where
    several would (resnet18's many 64x64x3x3), the refusal asks for example_inputs= and writes nothing."""
    if exported.setting != "legacy":
        pytest.skip("only the legacy default export names its weights onnx::Conv_*")
    model = _build(exported.name, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _load(model, exported)
    except LayoutError as error:
        assert "example_inputs=" in str(error)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    assert exported.error(model, exported.expected) < TOL


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100"])
def test_timm_models_through_the_dynamo_exporter(arch: str, tmp_path: Path) -> None:
    exported = Exported(f"timm:{arch}", "dynamo", tmp_path / "m.onnx")
    model = _build(exported.name, 1)
    _load(model, exported)
    assert exported.error(model, exported.expected) < TOL
    assert exported.error(model, exported.torch_out) < TOL


# --- attention: nn.MultiheadAttention and a small ViT -------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _random_parameters(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _vit(seed: int) -> nn.Module:
    vit = torchvision().models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    return _random_parameters(vit, seed)


def _port(make: Any, x: torch.Tensor, path: Path, dynamo: bool) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    original = make(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original, (x,), str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        return make(1), np.asarray(expected), original(x).numpy()


def _rel(model: nn.Module, x: torch.Tensor, expected: np.ndarray) -> float:
    with torch.no_grad():
        return float(np.abs(model(x).numpy() - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_multihead_attention_loads_exactly(dynamo: bool, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.RandomState(3).standard_normal((2, 5, 8)).astype(np.float32))
    model, expected, torch_out = _port(
        lambda s: _random_parameters(_Attention(), s), x, tmp_path / "m.onnx", dynamo
    )
    with pytest.warns(UncheckedConfigWarning, match="num_heads and batch_first"):
        report = weightport.load(model, tmp_path / "m.onnx")
    assert _rel(model, x, expected) < TOL and _rel(model, x, torch_out) < TOL
    (pairing,) = [p for p in report.pairings if p.module_path == "attn"]
    assert pairing.module_kind == "MultiheadAttention" and pairing.how == "by name"


def test_a_vit_through_the_legacy_exporter_loads_exactly(tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.RandomState(4).standard_normal((1, 3, 32, 32)).astype(np.float32))
    model, expected, torch_out = _port(_vit, x, tmp_path / "vit.onnx", dynamo=False)
    with pytest.warns(UncheckedConfigWarning, match="num_heads and batch_first"):
        # the MLPs' MatMul weights are the exporter's onnx::MatMul_*: the call order places them
        report = weightport.load(model, tmp_path / "vit.onnx", example_inputs=(x,))
    assert _rel(model, x, expected) < TOL and _rel(model, x, torch_out) < TOL
    kinds = [p.module_kind for p in report.pairings]
    assert kinds.count("MultiheadAttention") == 2 and kinds.count("Linear") == 5
    assert {p.module_path for p in report.pairings if p.source_kind == "ONNX initializer"} == {
        "class_token",
        "encoder.pos_embedding",
    }


def test_a_vit_through_the_dynamo_exporter_is_refused_for_its_folded_class_token(tmp_path: Path) -> None:
    """With a fixed batch size the dynamo exporter folds Expand(class_token) into a constant named 'expand':
    nothing proves it is class_token, and the refusal says so (the attention layers themselves pair)."""
    x = torch.from_numpy(np.random.RandomState(4).standard_normal((1, 3, 32, 32)).astype(np.float32))
    model, _, _ = _port(_vit, x, tmp_path / "vit.onnx", dynamo=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(weightport.LoadError) as caught:
        weightport.load(model, tmp_path / "vit.onnx", example_inputs=(x,))
    message = str(caught.value)
    assert "the graph has no initializer named 'class_token' (1, 1, 32)" in message
    assert "unread initializers of its shape: 'expand'" in message
    assert "dynamic batch axis" in message and "dynamo=False" in message
    assert message.count("problems") <= 1 and "unpaired" not in message and "val_" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_attention_without_bias_is_tied_by_its_out_proj_or_refused(dynamo: bool, tmp_path: Path) -> None:
    """bias=False leaves nothing that names the packed in_proj. The dynamo exporter keeps the out_proj's
    name, and the dataflow into it starts at the in_proj alone: loaded, with onnxruntime's outputs. The
    legacy exporter names neither: the two projections are not tied by proof."""

    def make(seed: int) -> nn.Module:
        model = _Attention()
        model.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        return _random_parameters(model, seed)

    x = torch.from_numpy(np.random.RandomState(3).standard_normal((2, 5, 8)).astype(np.float32))
    model, _, expected = _port(make, x, tmp_path / "m.onnx", dynamo)
    if dynamo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedConfigWarning)
            weightport.load(model, tmp_path / "m.onnx")
        assert _rel(model, x, expected) < TOL
        return
    with pytest.raises(LayoutError, match="nothing ties it to 'attn'.*the module has no bias"):
        weightport.load(model, tmp_path / "m.onnx")


class _Norms(nn.Module):
    """Three LayerNorms as built (weight 1, bias 0: equal values) between Linears of their own values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.n1, self.n2, self.n3 = nn.LayerNorm(6), nn.LayerNorm(6), nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.n3(self.fc2(self.n2(self.fc1(self.n1(x)))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_norms_of_equal_values_stored_once_fill_every_module(dynamo: bool, tmp_path: Path) -> None:
    """Exporters store equal values once: the legacy exporter gives n2 and n3 Identities of n1's tensors named
    as their own (by name), the dynamo exporter has all three nodes read n1's (three modules, three nodes:
    by equal values). A model whose norms hold other values takes the file's: onnxruntime's outputs."""

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = _Norms().eval()
        with torch.no_grad():
            (
                model.fc1.weight.normal_(),
                model.fc2.weight.normal_(),
                model.fc1.bias.normal_(),
                model.fc2.bias.normal_(),
            )
        return model

    x = torch.from_numpy(np.random.RandomState(5).standard_normal((2, 3, 6)).astype(np.float32))
    model, expected, _ = _port(make, x, tmp_path / "m.onnx", dynamo)
    with torch.no_grad():
        for norm in (model.n1, model.n2, model.n3):
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)
        report = weightport.load(model, tmp_path / "m.onnx", example_inputs=x)  # fc1, fc2: unnamed MatMuls
    assert _rel(model, x, expected) < TOL
    hows = {p.module_path: p.how for p in report.pairings if p.module_path in ("n1", "n2", "n3")}
    assert set(hows) == {"n1", "n2", "n3"}
    if dynamo:
        assert sum(how.startswith("by equal values") for how in hows.values()) == 2
    else:
        assert set(hows.values()) == {"by name"}


class _Twice(nn.Module):
    """One Linear called twice, and a spare of its shape the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.spare = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def test_a_module_called_twice_gives_its_values_to_no_other_module(tmp_path: Path) -> None:
    """Two nodes read fc's tensors; the exporter records that both ran in 'fc': the spare takes nothing."""
    x = torch.from_numpy(np.random.RandomState(6).standard_normal((2, 6)).astype(np.float32))
    model, _, _ = _port(lambda s: _random_parameters(_Twice(), s), x, tmp_path / "m.onnx", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(weightport.LoadError, match=r"'spare\.(weight|bias)'"):
        weightport.load(model, tmp_path / "m.onnx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
