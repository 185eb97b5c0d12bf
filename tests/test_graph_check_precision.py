"""The graph check's precision and reach: a float16 ONNX file is compared as storage (its graph widened to
float32, the model run in float32), so a twin 2% off is refused and the exact twin loads, in float32 and
float16 models and with either kind of inputs (float16, or float32 with casts inside); outputs that are
finite are compared even where another is not; a graph with symbolic spatial axes runs on sizes it takes.
Each file is exported by torch.onnx from a model with random weights; the oracle is onnxruntime's output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightport
from conftest import refused
from weightport.errors import UncheckedConfigWarning

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FLOAT, FLOAT16 = 1, 10  # TensorProto's


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.4)
    return model.eval()


def _export(model: nn.Module, x: Any, path: Path, **kwargs: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, **kwargs)
    return path


def _to_float16(path: Path, keep_io_types: bool) -> Path:
    """The file as onnxconverter_common's convert_float_to_float16 writes it: every float32 initializer and
    constant stored as float16, casts to float32 made float16, and either float16 inputs and outputs or
    float32 ones cast at the graph's edges (``keep_io_types``)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    for tensor in [*graph.initializer, *(a.t for n in graph.node for a in n.attribute if a.name == "value")]:
        if tensor.data_type == FLOAT:
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
            )
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16
    del graph.value_info[:]
    if not keep_io_types:
        for value in [*graph.input, *graph.output]:
            value.type.tensor_type.elem_type = FLOAT16
    else:
        for value in graph.input:
            inside = f"{value.name}_as_float16"
            for node in graph.node:
                node.input[:] = [inside if n == value.name else n for n in node.input]
            graph.node.insert(0, helper.make_node("Cast", [value.name], [inside], to=FLOAT16))
        for value in graph.output:
            inside = f"{value.name}_in_float16"
            for node in graph.node:
                node.output[:] = [inside if n == value.name else n for n in node.output]
            graph.node.append(helper.make_node("Cast", [inside], [value.name], to=FLOAT))
    onnx.checker.check_model(model)
    out = path.with_name(f"{path.stem}_fp16_{'keep' if keep_io_types else 'all'}.onnx")
    onnx.save(model, str(out))
    return out


def _run_file(path: Path, *inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for info, x in zip(session.get_inputs(), inputs):
        feeds[info.name] = x.astype(np.float16) if info.type == "tensor(float16)" else x
    return [np.asarray(o) for o in session.run(None, feeds)]


class _Net(nn.Module):
    """Conv, ReLU, mean pooling, LayerNorm, Linear, an activation, Linear: exact GELU (an Erf over x/sqrt(2),
    whose sqrt(2) the float16 file stores as 1.414) or a twin's."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor] = F.gelu) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv(x)))).mean((2, 3))
        return self.fc2(self.act(self.fc1(self.ln(x))))


_TWINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "activation scaled by 1.02": lambda h: F.gelu(h) * 1.02,
    "GELU's tanh approximation": lambda h: F.gelu(h, approximate="tanh"),
}


@pytest.fixture(scope="module")
def fp16_files(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    folder = tmp_path_factory.mktemp("fp16")
    x = torch.randn(2, 3, 12, 12)
    base = _export(
        _randomized(_Net(), 0), (x,), folder / "net.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}}
    )
    return {keep: _to_float16(base, keep) for keep in (False, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep_io_types", [False, True])
@pytest.mark.parametrize("twin", list(_TWINS))
def test_a_float16_file_refuses_a_twin_a_little_off(
    fp16_files: dict[bool, Path], keep_io_types: bool, dtype: torch.dtype, twin: str
) -> None:
    path = fp16_files[keep_io_types]
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    model = _randomized(_Net(_TWINS[twin]), 5).to(dtype)
    with torch.no_grad():  # what the twin computes with the file's weights, against the file's own outputs
        probe = _Net(_TWINS[twin]).eval()
        weightport.load(probe, path, check_outputs=False)
        off = np.abs(probe(torch.from_numpy(x)).numpy() - _run_file(path, x)[0].astype(np.float32)).max()
    assert off < 0.03  # within the old check's 64 float16 epsilons of the outputs: it let these through
    refused(model, path, r"output '.*' off by up to .*rounding allows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep_io_types", [False, True])
def test_the_exact_twin_of_a_float16_file_loads_without_a_note(
    fp16_files: dict[bool, Path], keep_io_types: bool, dtype: torch.dtype
) -> None:
    path = fp16_files[keep_io_types]
    model = _randomized(_Net(), 5).to(dtype)
    weightport.load(model, path)  # warnings are errors: no note either
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert np.array_equal(model.fc1.weight.detach().float().numpy(), stored["fc1.weight"].astype(np.float32))
    x = np.random.default_rng(2).standard_normal((2, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        y = model.float()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, _run_file(path, x)[0].astype(np.float32), atol=4e-3)


def test_a_float16_comparison_that_cannot_widen_says_it_was_coarse(fp16_files: dict[bool, Path]) -> None:
    class Half(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.half())  # runs only in float16: the comparison falls back to it

    model = _randomized(Half(), 5).half()
    with pytest.warns(UncheckedConfigWarning, match=r"compared with the graph's only to float16's precision"):
        weightport.load(model, fp16_files[False])
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).float().numpy()
    np.testing.assert_allclose(y, _run_file(fp16_files[False], x)[0].astype(np.float32), atol=4e-3)


class _TwoHeads(nn.Module):
    """One output finite on any input, one NaN on negative inputs (a log)."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> None:
        super().__init__()
        self.fc, self.fc2, self.act = nn.Linear(4, 3), nn.Linear(4, 3), act

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act(self.fc(x)), self.fc2(torch.log(x))


def test_outputs_finite_on_made_inputs_are_compared_where_another_is_not(tmp_path: Path) -> None:
    x = torch.rand(2, 4) + 0.1
    path = _export(_randomized(_TwoHeads(), 0), (x,), tmp_path / "m.onnx", input_names=["x"],
                   output_names=["finite", "logged"], dynamic_axes={"x": {0: "b"}})  # fmt: skip
    refused(_randomized(_TwoHeads(torch.tanh), 3), path, r"output 'finite' off by up to")
    model = _randomized(_TwoHeads(), 3)
    with pytest.warns(
        UncheckedConfigWarning,
        match=r"outputs were not compared with the graph's for 'logged' \(the others were\).*not all finite",
    ):
        weightport.load(model, path)
    with torch.no_grad():
        ys = [y.numpy() for y in model(x)]
    for y, want in zip(ys, _run_file(path, x.numpy())):
        np.testing.assert_allclose(y, want, atol=1e-5)


def _vit(heads: int, seed: int) -> nn.Module:
    import torchvision.models as tv

    torch.manual_seed(seed)
    model = tv.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=heads, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return _randomized(model, seed)


def test_symbolic_spatial_axes_are_run_on_a_size_the_graph_takes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A ViT exported with symbolic height and width runs only on its own image size (its position
    embeddings): the made inputs try sizes until the graph runs, quietly."""
    pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32)
    path = _export(_vit(2, 0), (x,), tmp_path / "vit.onnx", input_names=["x"],
                   dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})  # fmt: skip
    capfd.readouterr()
    refused(_vit(4, 5), path, r"output '.*' off by up to")
    model = _vit(2, 5)
    with pytest.warns(
        UncheckedConfigWarning
    ) as caught:  # only the note on num_heads, which no weight records
        weightport.load(model, path)
    assert all("num_heads" in str(w.message) and "not compared" not in str(w.message) for w in caught)
    assert "onnxruntime" not in capfd.readouterr().err
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), _run_file(path, x.numpy())[0], atol=1e-4)
