"""Files the probes found loading silently wrong or refused for a wrong reason: a training-mode BatchNorm below
opset 14, onnxruntime's fused node names, a buffer stored once and read through Identity nodes, a weight
standardized in the graph, and a pad inside a conv's own forward. Each is checked against onnxruntime's outputs
on the file, every weight (BatchNorm statistics too) random."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightport
from _vision import timm
from conftest import refused
from weightport.call_order import CallOrder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every float parameter and buffer random (BatchNorm's running variance positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator) + 0.5
                tensor.copy_(values if name.endswith("running_var") else values - 1.0)
    return model


def _export(model: nn.Module, x: torch.Tensor, path: Path, **options: Any) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], **options)
    return path


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _error(model: nn.Module, x: torch.Tensor, expected: np.ndarray) -> float:
    with torch.no_grad():
        out = model(x)
    return float(np.abs((out[0] if isinstance(out, tuple) else out).numpy() - expected).max())


# --- 1. a training-mode BatchNormalization below opset 14 -------------------------------------------------


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("opset", [11, 13])
def test_a_training_mode_batchnorm_below_opset_14_gets_the_batch_statistics_note(
    opset: int, tmp_path: Path
) -> None:
    """Before opset 14 a BatchNormalization has no training_mode: the legacy exporter in training mode gives
    it its running statistics as extra outputs, and onnxruntime normalizes with the batch's statistics. The
    load notes it as for training_mode=1; in train() the module gives the file's outputs, in eval() not."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    source = _randomize(_ConvBn(), 1).train()
    path = _export(
        source,
        x,
        tmp_path / "m.onnx",
        dynamo=False,
        opset_version=opset,
        training=torch.onnx.TrainingMode.TRAINING,
    )
    (bn,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert len(bn.output) > 1 and "training_mode" not in {a.name for a in bn.attribute}
    expected = _run(path, x)
    model = _randomize(_ConvBn(), 2)
    with pytest.warns(weightport.ForwardNoteWarning, match=r"training_mode=1\): run the module in train\(\)"):
        report = weightport.load(model, path)
    assert "normalizes with the batch's statistics" in str(report)
    assert _error(model.train(), x, expected) < TOL
    assert _error(model.eval(), x, expected) > 1e-2  # the note is needed


# --- 2. onnxruntime's fused node names ----------------------------------------------------------------------


class _Attention(nn.Module):
    """Query, key and value projections of one shape, run side by side (no call order tells them apart)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Attention() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = x + block(x)
        return x


def test_a_file_saved_at_ort_enable_basic_pairs_its_fused_gemms_by_their_names(tmp_path: Path) -> None:
    """onnxruntime's basic optimizations fuse MatMul and Add into a Gemm named after the MatMul with a segment
    of its own ('/layer.0/query/MatMul/MatMulAddFusion'); the module path is still the name's scope, so the
    interchangeable projections pair by name, without example_inputs=."""
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_Encoder(), 1).eval(), x, tmp_path / "m.onnx", dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "basic.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    basic = Path(options.optimized_model_filepath)
    fused = [n.name for n in onnx.load(str(basic)).graph.node if n.name.endswith("Fusion")]
    assert len(fused) == 8 and all(n.startswith("/layer.") for n in fused)
    model = _randomize(_Encoder(), 2).eval()
    report = weightport.load(model, basic)
    assert all(p.how.startswith("by name") for p in report.pairings)
    assert _error(model, x, _run(basic, x)) < TOL


# --- 3. a buffer stored once, the others Identity nodes named as them ----------------------------------------


class _Indexed(nn.Module):
    """A relative-position table read through an int64 index buffer, equal in every block (as Swin's)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(7, 4))
        self.register_buffer("index", torch.tensor([[0, 3, 6], [2, 1, 5]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[self.index.reshape(-1)].reshape(2, 3, 4).sum(0)


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_Indexed() for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_a_buffer_stored_once_loads_into_each_buffer_an_identity_names(tmp_path: Path) -> None:
    """The legacy exporter without constant folding stores equal buffers once and writes each other one as an
    Identity named as that buffer: each takes the stored values, by that name."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    source = _randomize(_Blocks(), 1).eval()
    path = _export(source, x, tmp_path / "m.onnx", dynamo=False, opset_version=17, do_constant_folding=False)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.initializer if "index" in i.name] == ["blocks.0.index"]
    assert {o for n in graph.node if n.op_type == "Identity" for o in n.output} >= {"blocks.1.index"}
    model = _randomize(_Blocks(), 2).eval()
    for block in model.blocks:
        block.index.zero_()
    report = weightport.load(model, path)
    assert all(torch.equal(block.index, source.blocks[0].index) for block in model.blocks)
    assert "through an Identity" in report.table()
    assert _error(model, x, _run(path, x)) < TOL


def test_transformers_swin_loads_its_relative_position_indexes_stored_once(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
    )
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    source = _randomize(transformers.SwinModel(config), 1).eval()
    path = _export(source, x, tmp_path / "m.onnx", dynamo=False, opset_version=17, do_constant_folding=False)
    model = _randomize(transformers.SwinModel(config), 2).eval()
    with pytest.warns(weightport.UncheckedConfigWarning, match="transformers model's configuration"):
        weightport.load(model, path)
    with torch.no_grad():
        out = model(x).last_hidden_state.numpy()
    assert np.abs(out - _run(path, x)).max() < 1e-4


# --- 4. a weight the graph standardizes ---------------------------------------------------------------------


class _StdConv(nn.Conv2d):
    """timm's StdConv2d in small: F.batch_norm over the reshaped weight, then the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class _StdNet(nn.Module):
    def __init__(self, conv: type[nn.Module] = _StdConv) -> None:
        super().__init__()
        self.conv, self.fc = conv(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


_KEEPS_NAMES = {
    "legacy": {"dynamo": False, "opset_version": 17, "do_constant_folding": False},
    "dynamo": {"dynamo": True, "optimize": False},
}


@pytest.mark.parametrize("export", sorted(_KEEPS_NAMES))
def test_a_weight_the_graph_standardizes_is_refused_as_such_and_the_fix_loads(
    export: str, tmp_path: Path
) -> None:
    """The graph computes a BatchNormalization over the stored conv weight: refused naming that, not a
    Keras LayerNormalization; the fix it gives (load the initializers by name) loads the file exactly."""
    if export == "dynamo":
        pytest.importorskip("onnxscript")
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_StdNet(), 1).eval(), x, tmp_path / "m.onnx", **_KEEPS_NAMES[export])
    error = refused(
        _randomize(_StdNet(), 2),
        path,
        r"normalizes the stored 'conv\.weight' \(regrouped\) with its own mean and variance.*weight "
        r"standardization.*Fix: .*weightport\.load\(model, path, layout='torch', strict=False\)",
        weightport.UnsupportedConfigError,
    )
    assert "tf2onnx" not in str(error)
    model = _randomize(_StdNet(), 2).eval()
    report = weightport.load(model, path, layout="torch", strict=False)  # the fix, as given
    assert not report.missing
    assert _error(model, x, _run(path, x)) < TOL


def test_timms_std_conv_follows_the_same_fix(tmp_path: Path) -> None:
    layers = timm().layers
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    for conv in (layers.StdConv2d, layers.ScaledStdConv2d):
        path = _export(_randomize(_StdNet(conv), 1).eval(), x, tmp_path / "m.onnx", **_KEEPS_NAMES["legacy"])
        refused(_StdNet(conv), path, r"normalizes the stored 'conv\.weight'.*layout='torch', strict=False")
        model = _randomize(_StdNet(conv), 2).eval()
        assert not weightport.load(model, path, layout="torch", strict=False).missing
        assert _error(model, x, _run(path, x)) < TOL


# --- 5. a pad inside a conv's own forward --------------------------------------------------------------------


class _Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame in small: its own forward pads the input (right and bottom), then convolves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0)


class _SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = _Conv2dSame(4, 6, 3, stride=2), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_the_forward_pass_shows_a_pad_inside_a_convs_own_forward() -> None:
    model = _SameNet()
    order = CallOrder(model, torch.zeros(1, 4, 8, 8))
    assert order.padded_input("conv") == (0, 1, 0, 1)
    assert order.padded_input("fc") is None


def test_a_pad_inside_a_convs_forward_merged_into_the_conv_loads_with_example_inputs(tmp_path: Path) -> None:
    """dynamo=True's optimizer merges the conv's own F.pad into its uneven pads: with example_inputs= the
    forward pass shows the pad inside the conv's forward, and the file loads exactly."""
    pytest.importorskip("onnxscript")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_SameNet(), 1).eval(), x, tmp_path / "m.onnx", dynamo=True)
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "Pad"]  # merged into the Conv
    refused(_SameNet(), path, r"pads begin \(0, 0\), end \(1, 1\)")
    model = _randomize(_SameNet(), 2).eval()
    weightport.load(model, path, example_inputs=x)
    assert _error(model, x, _run(path, x)) < TOL


def test_timms_conv2d_same_loads_with_example_inputs(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    create_conv2d = timm().layers.create_conv2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = create_conv2d(8, 8, [3, 5], stride=2, padding="same", depthwise=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(Net(), 1).eval(), x, tmp_path / "m.onnx", dynamo=True)
    model = _randomize(Net(), 2).eval()
    weightport.load(model, path, example_inputs=x)
    assert _error(model, x, _run(path, x)) < TOL


# --- 6. a GroupNorm's weight and bias stored unnamed after its InstanceNormalization ----------------------


class _GroupNet(nn.Module):
    def __init__(self, dims: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv, self.norm, self.head = (
            conv(2, 8, 3, bias=False),
            nn.GroupNorm(groups, 8, eps=eps),
            conv(8, 3, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.norm(self.conv(x))))


@pytest.mark.parametrize("export", ["legacy", "dynamo"])
@pytest.mark.parametrize(("dims", "groups"), [(1, 8), (1, 2), (2, 8), (2, 4)])
def test_a_group_norms_folded_weight_and_bias_load_into_it(
    export: str, dims: int, groups: int, tmp_path: Path
) -> None:
    """The default exports store a GroupNorm's weight and bias as unnamed (C, 1, ...) vectors of the Mul and
    Add after its InstanceNormalization: they load into it, its eps and groups checked."""
    options: dict[str, Any] = {"dynamo": False, "opset_version": 17}
    if export == "dynamo":
        pytest.importorskip("onnxscript")
        options = {"dynamo": True}
    x = torch.randn(2, 2, *(10,) * dims, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_GroupNet(dims, groups), 1).eval(), x, tmp_path / "m.onnx", **options)
    assert "norm.weight" not in {i.name for i in onnx.load(str(path)).graph.initializer}
    model = _randomize(_GroupNet(dims, groups), 2).eval()
    weightport.load(model, path)
    assert _error(model, x, _run(path, x)) < TOL
    other = 2 if groups != 2 else 4
    refused(_GroupNet(dims, other), path, rf"over {groups} groups of channels.*num_groups={other}")
    refused(_GroupNet(dims, groups, eps=1e-3), path, r"epsilon=1e-05.*built with eps=0\.001")


class _InstanceAffine(nn.Module):
    """An InstanceNorm without affine, then the model's own per-channel scale and shift, and (``gn``) a GroupNorm
    of the same width: the Mul and Add after the InstanceNormalization are its own tensors, no GroupNorm's."""

    def __init__(self, group_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.norm = nn.InstanceNorm2d(8)
        self.gamma, self.beta = nn.Parameter(torch.ones(8, 1, 1)), nn.Parameter(torch.zeros(8, 1, 1))
        self.gn = nn.GroupNorm(2, 8) if group_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)) * self.gamma + self.beta
        return self.gn(y) if self.gn is not None else y


@pytest.mark.parametrize("group_norm", [False, True])
@pytest.mark.parametrize("export", ["legacy", "dynamo"])
def test_an_instance_norm_and_the_models_own_scale_and_shift_are_no_group_norm(
    export: str, group_norm: bool, tmp_path: Path
) -> None:
    """The GroupNorm pattern took the model's own named gamma and beta after an InstanceNorm for a GroupNorm's
    weight and bias: the exact twin was refused ('the model has no nn.GroupNorm'), and beside a real GroupNorm
    they were paired into it, 1.1 off with strict=False. They load by their names, as before."""
    options: dict[str, Any] = {"dynamo": False, "opset_version": 17}
    if export == "dynamo":
        pytest.importorskip("onnxscript")
        options = {"dynamo": True}
    x = torch.randn(2, 2, 10, 10, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_InstanceAffine(group_norm), 1).eval(), x, tmp_path / "m.onnx", **options)
    model = _randomize(_InstanceAffine(group_norm), 2).eval()
    weightport.load(model, path)
    assert _error(model, x, _run(path, x)) < TOL


class _TwoGroupNorms(nn.Module):
    """Two GroupNorms of one shape, declared in the other order than the forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.second, self.first = nn.GroupNorm(2, 8), nn.GroupNorm(2, 8)
        self.c1, self.c2, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.c2(torch.relu(self.first(self.c1(x))))))


@pytest.mark.parametrize("export", ["legacy", "dynamo"])
def test_two_same_shape_group_norms_folded_go_each_into_its_own(export: str, tmp_path: Path) -> None:
    """Shapes cannot tell two GroupNorms of one width apart: each folded weight and bias goes into its own
    (by the node's module path), not by declaration order, which is swapped here."""
    options: dict[str, Any] = {"dynamo": False, "opset_version": 17}
    if export == "dynamo":
        pytest.importorskip("onnxscript")
        options = {"dynamo": True}
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    path = _export(_randomize(_TwoGroupNorms(), 1).eval(), x, tmp_path / "m.onnx", **options)
    for example in (None, x):
        model = _randomize(_TwoGroupNorms(), 2).eval()
        weightport.load(model, path, example_inputs=example)
        assert _error(model, x, _run(path, x)) < TOL
