"""A load from an ONNX file runs the file's graph (onnxruntime) and the model with the planned tensors on the
same inputs before writing: a model whose weights all fit but which computes something else between its
layers (another activation, pooling, a residual add, attention heads, layers called in another order) is
refused, nothing written; the exact twin loads. Each file is exported by torch.onnx from a model with random
weights; the oracle is onnxruntime's output on the same input.
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
from conftest import refused
from weightport.errors import LoadError, UncheckedConfigWarning
from weightport.outputs import graph_session, run_graph

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():  # variances positive
                tensor.copy_(
                    torch.rand(tensor.shape, generator=generator) - (0 if name.endswith("var") else 0.5)
                )
    return model.eval()


def _export(model: nn.Module, x: Any, path: Path, **kwargs: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_randomized(model), x, str(path), dynamo=False, opset_version=17, **kwargs)
    return path


def _graph_output(path: Path, *inputs: torch.Tensor) -> np.ndarray:
    return run_graph(graph_session(path, path.name), list(inputs), path.name)[0][0]


def _loads_exactly(twin: nn.Module, path: Path, *inputs: torch.Tensor, **kwargs: Any) -> None:
    """The twin loads, and then computes what onnxruntime computes from the file."""
    weightport.load(twin, path, **kwargs)
    with torch.no_grad():
        np.testing.assert_allclose(twin.eval()(*inputs).numpy(), _graph_output(path, *inputs), atol=1e-5)


def _mlp(act: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 5))


class _Residual(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.conv1, self.conv2, self.skip = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return y + x if self.skip else y


class _Pooled(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3), pool, nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class _Order(nn.Module):
    """Three same-shape Linears with tanh between, called in the given order."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.a, self.b, self.c, self.order = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = torch.tanh(getattr(self, name)(x))
        return x


class _Tokens(nn.Module):
    """An embedding of int ids, then an MLP: its graph input is no float."""

    def __init__(self, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed, self.mlp = nn.Embedding(10, 6), _mlp(act)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))


@pytest.mark.parametrize(
    ("made", "loaded", "x"),
    [
        (_mlp(nn.ReLU), _mlp(nn.GELU), torch.randn(2, 6)),
        (_mlp(nn.SiLU), _mlp(nn.Hardswish), torch.randn(2, 6)),
        (_mlp(lambda: nn.LeakyReLU(0.01)), _mlp(lambda: nn.LeakyReLU(0.2)), torch.randn(2, 6)),
        (_mlp(lambda: nn.GELU("tanh")), _mlp(nn.GELU), torch.randn(2, 6)),
        (_Residual(True), _Residual(False), torch.randn(1, 4, 5, 5)),
        (_Pooled(nn.MaxPool2d(2)), _Pooled(nn.AvgPool2d(2)), torch.randn(1, 3, 8, 8)),
        (_Order("abc"), _Order("cba"), torch.randn(2, 6)),
    ],
    ids=[
        "relu-gelu",
        "silu-hardswish",
        "leaky-slope",
        "gelu-tanh-exact",
        "residual",
        "max-avg-pool",
        "order",
    ],
)
def test_a_model_that_computes_otherwise_is_refused_before_any_write(
    tmp_path: Path, made: nn.Module, loaded: nn.Module, x: torch.Tensor
) -> None:
    path = _export(made, (x,), tmp_path / "m.onnx")
    error = refused(loaded, path, r"outputs.*computes something else between its layers")
    assert "random inputs of its declared shapes" in str(error)
    # the escape hatch loads it as before, and the outputs really differ from the graph's
    weightport.load(loaded, path, check_outputs=False)
    with torch.no_grad():
        assert not np.allclose(loaded.eval()(x).numpy(), _graph_output(path, x), atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_exact_twin_loads_with_its_outputs_compared(tmp_path: Path, dynamic: bool) -> None:
    x = torch.randn(3, 4, 5, 5)
    axes = {"dynamic_axes": {"x": {0: "batch"}}, "input_names": ["x"]} if dynamic else {}
    path = _export(_Residual(True), (x,), tmp_path / "m.onnx", **axes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compared: no warning that it was not
        _loads_exactly(_Residual(True), path, x)


def test_token_ids_are_made_below_the_embedding_rows_and_compared(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 4, 7], [2, 9, 0]])
    path = _export(
        _Tokens(nn.ReLU),
        (ids,),
        tmp_path / "m.onnx",
        dynamic_axes={"ids": {0: "b", 1: "n"}},
        input_names=["ids"],
    )
    refused(_Tokens(nn.GELU), path, r"random inputs of its declared shapes")
    refused(_Tokens(nn.GELU), path, r"on the given example_inputs", example_inputs=ids)
    _loads_exactly(_Tokens(nn.ReLU), path, ids)


def test_inputs_it_cannot_make_are_warned_about(tmp_path: Path) -> None:
    import onnx

    x = torch.randn(2, 6)
    path = _export(_mlp(nn.ReLU), (x,), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING  # no number to make
    onnx.save_model(model, str(path))
    with pytest.warns(
        UncheckedConfigWarning,
        match=r"not compared.*not every input of the graph is a number.*pass example_inputs=",
    ):
        weightport.load(_mlp(nn.GELU), path)  # nothing to run it on: loaded, and said so


def test_attention_heads_are_compared(tmp_path: Path) -> None:
    class Attend(nn.Module):
        def __init__(self, heads: int) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, heads, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 8)
    path = _export(Attend(2), (x,), tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UncheckedConfigWarning
        )  # num_heads is not recorded: only the run tells
        refused(Attend(4), path, r"computes something else")
        _loads_exactly(Attend(2), path, x)


def test_external_data_is_run_from_the_checked_reads(tmp_path: Path) -> None:
    import onnx

    x = torch.randn(2, 6)
    inline = _export(_mlp(nn.ReLU), (x,), tmp_path / "inline.onnx")
    model = onnx.load(str(inline))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(
        model, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    refused(_mlp(nn.GELU), folder / "m.onnx", r"computes something else")
    twin = _mlp(nn.ReLU)
    weightport.load(twin, folder / "m.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(twin(x).numpy(), _graph_output(inline, x), atol=1e-5)


def test_a_dry_run_checks_the_outputs_too(tmp_path: Path) -> None:
    x = torch.randn(2, 6)
    path = _export(_mlp(nn.ReLU), (x,), tmp_path / "m.onnx")
    with pytest.raises(LoadError, match="computes something else"):
        weightport.load(_mlp(nn.Tanh), path, dry_run=True)


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.conv(x)))


def test_the_runs_leave_every_submodule_in_its_own_mode(tmp_path: Path) -> None:
    """A model in train() with a frozen BatchNorm (eval): the load's run of the graph and verify() run it in
    eval, then put each submodule back as it was, not all in the root's mode."""
    x = torch.randn(2, 3, 6, 6)
    path = _export(_Frozen(), (x,), tmp_path / "m.onnx")
    model = _Frozen().train()
    model.norm.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    with pytest.warns(UncheckedConfigWarning, match="BatchNorms the exporter folded"):
        weightport.load(model, path)  # compared on random inputs: it ran
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert weightport.verify(model, x.numpy(), against=path)
    assert {name: m.training for name, m in model.named_modules()} == modes


class _MaskedMean(nn.Module):
    """Token embeddings averaged over the positions a 1/0 attention mask keeps (transformers' convention),
    or over all of them when it ignores the mask."""

    def __init__(self, uses_mask: bool = True) -> None:
        super().__init__()
        self.embed, self.head, self.uses_mask = nn.Embedding(20, 6), nn.Linear(6, 3), uses_mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if not self.uses_mask:
            return self.head(h.mean(1))
        kept = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * kept).sum(1) / kept.sum(1))


def test_a_model_that_ignores_the_mask_is_refused_on_made_masks(tmp_path: Path) -> None:
    """The made mask keeps a different prefix of each row: a mask of ones would hide that the twin ignores it."""
    ids, mask = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    axes = {"ids": {0: "b", 1: "n"}, "mask": {0: "b", 1: "n"}}
    path = _export(
        _MaskedMean(), (ids, mask), tmp_path / "m.onnx", input_names=["ids", "mask"], dynamic_axes=axes
    )
    refused(
        _MaskedMean(uses_mask=False), path, r"random inputs of its declared shapes.*computes something else"
    )
    _loads_exactly(_MaskedMean(), path, ids, mask)


def test_outputs_that_are_not_finite_are_no_comparison(tmp_path: Path) -> None:
    class Log(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 4), scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(self.fc(x) - 100.0) * self.scale  # NaN for every input near 0

    x = torch.randn(2, 4)
    path = _export(Log(1.0), (x,), tmp_path / "m.onnx")
    with pytest.warns(UncheckedConfigWarning, match=r"not compared.*not all finite"):
        weightport.load(Log(2.0), path)  # NaN == NaN would have passed it


def test_a_load_into_a_submodule_runs_that_submodule(tmp_path: Path) -> None:
    class Wrapper(nn.Module):
        def __init__(self, act: Callable[[], nn.Module]) -> None:
            super().__init__()
            self.body, self.extra = _mlp(act), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extra(self.body(x))

    x = torch.randn(2, 6)
    path = _export(_mlp(nn.ReLU), (x,), tmp_path / "m.onnx")
    refused(Wrapper(nn.GELU), path, r"computes something else", prefix="body.")
    # the example is the whole model's: the submodule runs on inputs made for its graph, and the message says so
    refused(
        Wrapper(nn.GELU),
        path,
        r"random inputs of its declared shapes.*computes",
        prefix="body.",
        example_inputs=x,
    )
    wrapper = Wrapper(nn.ReLU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compared, with inputs made for the submodule's graph
        weightport.load(wrapper, path, prefix="body.")
    with torch.no_grad():
        np.testing.assert_allclose(wrapper.body(x).numpy(), _graph_output(path, x), atol=1e-5)


def test_token_ids_reshaped_before_their_embedding_keep_its_bound(tmp_path: Path) -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids.reshape(-1)).reshape(ids.shape[0], -1, 4)

    from weightport.graph_check import _index_bounds
    from weightport.sources import open_source

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    path = _export(
        Flat(), (ids,), tmp_path / "m.onnx", input_names=["ids"], dynamic_axes={"ids": {0: "b", 1: "n"}}
    )
    with open_source(path) as source:
        assert _index_bounds(source) == {"ids": 7}
