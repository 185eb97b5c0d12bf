"""A BatchNorm that torch.onnx.export folded into the conv before it: loaded as its exact eval-mode equivalent by
the onnx layout (the default for .onnx), refused with the cause said once by any other."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import (
    LayoutError,
    LoadError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
    WeightportError,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

X = torch.from_numpy(np.random.RandomState(5).standard_normal((2, 3, 8, 8)).astype(np.float32))

FIX = (
    "Fix: load it with layout='onnx' (the default for .onnx), which loads each folded BatchNorm as its exact "
    "eval-mode equivalent (weight 1, running_mean 0, running_var 1 - eps, the folded bias); or re-export keeping "
    "the BatchNormalization nodes: torch.onnx.export(model, args, path, dynamo=False, "
    "training=torch.onnx.TrainingMode.PRESERVE); or load it into a model without these BatchNorms: "
    "nn.Identity() in place of each, and the layer before it built with bias=True."
)


def _with_stats(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode with random weights and non-zero BatchNorm statistics, weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                if tensor.is_floating_point():
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) - 0.5)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _cnn(seed: int, *, bias: bool = False, batchnorm: bool = True) -> nn.Module:
    def norm(n: int) -> nn.Module:
        return nn.BatchNorm2d(n) if batchnorm else nn.Identity()

    return _with_stats(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=bias),
            norm(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, bias=bias),
            norm(6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 5),
        ),
        seed,
    )


def _export(model: nn.Module, path: Path, *, dynamo: bool = False, **options: object) -> Path:
    with warnings.catch_warnings():  # the exporters warn about their own internals
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (X,), str(path), dynamo=dynamo, **options)  # type: ignore[arg-type]
    return path


def _ort(path: Path, x: torch.Tensor = X) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return np.asarray(out)


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def exporter(request: pytest.FixtureRequest) -> str:
    if request.param == "dynamo":
        pytest.importorskip("onnxscript")
    return str(request.param)


@pytest.fixture(scope="module", params=[False, True], ids=["conv-no-bias", "conv-bias"])
def folded(
    request: pytest.FixtureRequest, exporter: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bool]:
    """The default export of the CNN (each BatchNorm folded into its conv), and whether the convs have bias."""
    bias = bool(request.param)
    path = tmp_path_factory.mktemp("folded") / "m.onnx"
    _export(_cnn(0, bias=bias), path, dynamo=exporter == "dynamo")
    assert "BatchNormalization" not in _ops(path)
    return path, bias


def _refusal(model: nn.Module, path: Path, **options: object) -> str:
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(WeightportError) as caught:
        weightport.load(model, path, **options)  # type: ignore[arg-type]
    assert isinstance(caught.value, (LoadError, LayoutError))
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit
    return str(caught.value)


@pytest.mark.parametrize("strict", [False, True])
def test_a_folded_batchnorm_is_refused_with_its_cause_said_once_by_the_torch_layout(
    folded: tuple[Path, bool], strict: bool
) -> None:
    path, bias = folded
    message = _refusal(_cnn(1, bias=bias), path, layout="torch", strict=strict)
    assert message.count("(folded BatchNorm)") == 1  # the cause is said once, not once per conv
    assert message.count("fused each eval-mode BatchNorm") == 1
    assert "none for '1', '4':" in message
    assert "build it with bias=True" not in message
    assert FIX in message


def test_the_refusal_in_full(tmp_path: Path) -> None:
    message = _refusal(_cnn(1), _export(_cnn(0), tmp_path / "m.onnx"), layout="torch", strict=False)
    assert message == (
        "weightport refused to load into Sequential: 1 problem; nothing was written.\n"
        "  - '(folded BatchNorm)': expected a BatchNormalization node in 'm.onnx' for each BatchNorm that "
        "follows a Conv or Linear, found none for '1', '4': the exporter fused each eval-mode BatchNorm into "
        "the layer before it, so the file holds only the fused weights; loading them would leave these "
        "BatchNorms as they are and the outputs wrong. " + FIX
    )


def test_a_dry_run_is_refused_too(tmp_path: Path) -> None:
    _refusal(_cnn(1), _export(_cnn(0), tmp_path / "m.onnx"), layout="torch", strict=False, dry_run=True)


def test_under_a_prefix_the_listed_batchnorms_have_their_full_names(tmp_path: Path) -> None:
    path = _export(_cnn(0), tmp_path / "m.onnx")
    model = nn.Sequential()
    model.add_module("body", _cnn(1))
    message = _refusal(model, path, layout="torch", strict=False, prefix="body.")
    assert "none for 'body.1', 'body.4':" in message


@pytest.mark.parametrize("options", [{"training": "PRESERVE"}, {"do_constant_folding": False}])
@pytest.mark.parametrize("layout", ["torch", "onnx"])
def test_an_export_that_keeps_the_batchnorm_nodes_loads(
    tmp_path: Path, options: dict[str, object], layout: str
) -> None:
    if "training" in options:
        options = {"training": torch.onnx.TrainingMode.PRESERVE}
    path = _export(_cnn(0), tmp_path / "m.onnx", **options)
    assert _ops(path).count("BatchNormalization") == 2
    model = _cnn(1)
    weightport.load(model, path, layout=layout, strict=False)
    with torch.no_grad():
        out = model(X).numpy()
    assert np.abs(out - _ort(path)).max() < 1e-5


def test_the_folded_export_loads_into_a_model_without_the_batchnorms(exporter: str, tmp_path: Path) -> None:
    path = _export(_cnn(0), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    model = _cnn(1, bias=True, batchnorm=False)
    weightport.load(model, path)
    with torch.no_grad():
        out = model(X).numpy()
    assert np.abs(out - _ort(path)).max() < 1e-5
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    assert np.array_equal(model[0].weight.detach().numpy(), stored[conv.input[1]])
    assert np.array_equal(model[0].bias.detach().numpy(), stored[conv.input[2]])


class _Block(nn.Sequential):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__(
            nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()
        )


class _Net(nn.Module):
    """torchvision's naming: features.0.0 (conv), features.0.1 (BatchNorm); a BatchNorm1d after a Linear."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(*(_Block(3 if i == 0 else 4, 4) for i in range(blocks)))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 8 * 8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_nested_batchnorms_after_convs_and_a_linear(exporter: str, tmp_path: Path) -> None:
    path = _export(_with_stats(_Net(), 0), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    message = _refusal(_with_stats(_Net(), 1), path, layout="torch", strict=False)
    assert message.count("fused each eval-mode BatchNorm") == 1
    if exporter == "dynamo":  # folds the BatchNorm1d into the Gemm too
        assert "none for 'features.0.1', 'features.1.1', 'classifier.2':" in message
    else:  # keeps it after the MatMul: only the convs' are listed
        assert _ops(path).count("BatchNormalization") == 1
        assert "none for 'features.0.1', 'features.1.1':" in message


def test_a_long_list_is_capped(tmp_path: Path) -> None:
    path = _export(_with_stats(_Net(blocks=10), 0), tmp_path / "m.onnx")
    message = _refusal(_with_stats(_Net(blocks=10), 1), path, layout="torch", strict=False)
    listed = ", ".join(f"'features.{i}.1'" for i in range(8))
    assert f"none for {listed} and 2 more:" in message


def test_a_batchnorm_the_graph_keeps_is_not_taken_for_a_folded_one(tmp_path: Path) -> None:
    """A BatchNorm after a ReLU is no conv's to fold: the export keeps its node, and it loads."""
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), 0)
    path = _export(model, tmp_path / "m.onnx")
    assert "BatchNormalization" in _ops(path)
    fresh = _with_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), 1)
    weightport.load(fresh, path)
    with torch.no_grad():
        assert np.abs(fresh(X).numpy() - _ort(path)).max() < 1e-5


def test_one_batchnorm_is_named_in_the_singular(tmp_path: Path) -> None:
    def model(seed: int) -> nn.Module:
        return _with_stats(nn.Sequential(nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU()), seed)

    x = torch.ones(1, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model(0), (x,), str(tmp_path / "m.onnx"), dynamo=False)
    message = _refusal(model(1), tmp_path / "m.onnx", layout="torch")
    assert "none for '1': " in message
    assert "would leave this BatchNorm as it is and the outputs wrong" in message
    assert (
        "into a model without this BatchNorm: nn.Identity() in its place, and the layer before it" in message
    )


# --- the onnx layout: a folded BatchNorm loads as its exact eval-mode equivalent ---------------------------------


def _stored(path: Path) -> tuple[dict[str, np.ndarray], list[onnx.NodeProto]]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}, list(model.graph.node)


def _load_onnx(model: nn.Module, path: Path, **options: object) -> weightport.LoadReport:
    with pytest.warns(UncheckedConfigWarning, match=r"train\(\) normalizes each batch") as caught:
        report = weightport.load(model, path, **options)  # type: ignore[arg-type]
    assert sum("folded into the layer before them" in str(w.message) for w in caught) == 1
    return report


def _assert_close(model: nn.Module, path: Path, x: torch.Tensor = X) -> None:
    with torch.no_grad():
        out = model(x).numpy()
    expected = _ort(path, x)
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("strict", [False, True])
def test_the_onnx_layout_loads_a_folded_batchnorm_exactly(folded: tuple[Path, bool], strict: bool) -> None:
    path, bias = folded
    model = _cnn(1, bias=bias)
    report = _load_onnx(model, path, strict=strict)
    _assert_close(model, path)
    stored, nodes = _stored(path)
    convs = [n for n in nodes if n.op_type == "Conv"]
    for conv, bn_path, conv_path in zip(convs, ("1", "4"), ("0", "3")):
        bn = model.get_submodule(bn_path)
        conv_module = model.get_submodule(conv_path)
        assert np.array_equal(conv_module.weight.detach().numpy(), stored[conv.input[1]])
        folded_bias = stored[conv.input[2]]
        assert torch.equal(bn.weight, torch.ones(bn.num_features))
        assert torch.equal(bn.running_mean, torch.zeros(bn.num_features))
        assert torch.equal(bn.running_var, torch.full((bn.num_features,), np.float32(1 - bn.eps)))
        assert int(bn.num_batches_tracked) == 0  # as for a BatchNormalization node: ONNX counts no batches
        if bias:  # the conv keeps the bias; the BatchNorm is the identity
            assert np.array_equal(conv_module.bias.detach().numpy(), folded_bias)
            assert torch.equal(bn.bias, torch.zeros(bn.num_features))
        else:
            assert np.array_equal(bn.bias.detach().numpy(), folded_bias)
        (pairing,) = [p for p in report.pairings if p.module_path == bn_path]
        assert pairing.how.startswith(f"folded into '{conv_path}' by the exporter")
    origins = {row.target: row.origin for row in report.rows}
    assert "folded into '0' by the exporter" in origins["1.running_var"]
    assert ("0 (the bias stays in the layer)" in origins["1.bias"]) == bias


def test_nested_batchnorms_after_convs_and_a_linear_load(exporter: str, tmp_path: Path) -> None:
    x = torch.from_numpy(np.random.RandomState(6).standard_normal((2, 3, 8, 8)).astype(np.float32))
    original = _with_stats(_Net(), 0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original, (x,), str(path), dynamo=exporter == "dynamo")
    model = _with_stats(_Net(), 1)
    report = _load_onnx(model, path)
    _assert_close(model, path, x)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - original(x).numpy()).max() < 1e-5 * original(x).abs().max().item()
    folded = {p.module_path for p in report.pairings if p.how.startswith("folded into")}
    assert folded == (
        {"features.0.1", "features.1.1", "classifier.2"}
        if exporter == "dynamo"
        else {"features.0.1", "features.1.1"}  # the legacy exporter keeps the BatchNorm1d's node
    )


def test_a_batchnorm_without_affine_takes_the_bias_as_its_mean(exporter: str, tmp_path: Path) -> None:
    def model(seed: int) -> nn.Module:
        return _with_stats(
            nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU()), seed
        )

    path = _export(model(0), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    fresh = model(1)
    _load_onnx(fresh, path)
    _assert_close(fresh, path)
    stored, nodes = _stored(path)
    (conv,) = [n for n in nodes if n.op_type == "Conv"]
    assert np.array_equal(fresh[1].running_mean.numpy(), -stored[conv.input[2]])
    assert torch.equal(fresh[1].running_var, torch.full((4,), np.float32(1 - fresh[1].eps)))


def test_a_batchnorm_with_batch_statistics_is_refused(tmp_path: Path) -> None:
    """track_running_stats=False normalizes with each batch's statistics in eval() too: no weights undo that."""
    path = _export(_cnn(0), tmp_path / "m.onnx")
    model = _cnn(1)
    model[1] = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(UnsupportedConfigError, match=r"'1' \(BatchNorm2d\(track_running_stats=False\)\)"):
        weightport.load(model, path)


def test_a_folded_bias_with_nowhere_to_go_is_refused(exporter: str, tmp_path: Path) -> None:
    """No BatchNorm after the conv, and the conv built with bias=False: the folded bias has no place."""
    path = _export(_cnn(0), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    message = _refusal(_cnn(1, batchnorm=False), path)
    assert "was built with bias=False. Fix: build it with bias=True" in message


def test_the_call_order_says_which_conv_a_batchnorm_follows(tmp_path: Path) -> None:
    """Registered right after 'a' but, as example_inputs= shows, called right after 'b': b's BatchNorm."""

    class Crossed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.b(torch.relu(self.a(x))))

    path = _export(_with_stats(Crossed(), 0), tmp_path / "m.onnx")
    model = _with_stats(Crossed(), 1)
    # by registration, the BatchNorm would be a's, and b's folded bias would have nowhere to go
    refusal = _refusal(model, path)
    assert "'b' was built with bias=False" in refusal
    assert (
        "pass example_inputs= (an input for one forward pass), which shows which BatchNorm follows" in refusal
    )
    report = _load_onnx(model, path, example_inputs=(X,))
    _assert_close(model, path)
    (pairing,) = [p for p in report.pairings if p.module_path == "bn"]
    assert pairing.how.startswith("folded into 'b' by the exporter (the BatchNorm called right after it)")


class _Shortcut(nn.Module):
    """A residual block whose strided shortcut conv has the main branch's first conv's shape (1x1, 4 -> 8)."""

    def __init__(self) -> None:
        super().__init__()

        def conv_bn(inputs: int, outputs: int, kernel: int, stride: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(outputs)
            )

        self.conv1 = conv_bn(3, 8, 1, 1)
        self.conv2 = conv_bn(8, 8, 3, 2)
        self.down = conv_bn(3, 8, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x).relu()) + self.down(x)


def test_convs_of_one_shape_but_other_strides_pair_by_their_strides(exporter: str, tmp_path: Path) -> None:
    """Each node's stride fits one conv only: the pairing is proven (RegNet, ResNeXt, RepVGG blocks), where
    convs alike in shape were once asked as one group, the strided one fitting nothing, and refused."""
    path = _export(_with_stats(_Shortcut(), 0), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    model = _with_stats(_Shortcut(), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedConfigWarning)  # the folded BatchNorms' statistics
        weightport.load(model, path, example_inputs=X)
    with torch.no_grad():
        out = model(X).numpy()
    assert np.abs(out - _ort(path)).max() < 1e-5
