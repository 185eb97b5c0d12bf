"""A Flax layer of scale and bias alone is a LayerNorm, or a BatchNorm saved without its statistics
(linen's ``params`` alone, nnx's ``nnx.Param`` part): the module's modules named by the layer's name or by
``mapping=`` settle it; where the module has both kinds and nothing names which, the load is refused listing
both. Checked against nnx's own outputs, with statistics that were never updated (mean 0, var 1).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import weightport

nnx = pytest.importorskip("flax.nnx")


class Flax(nnx.Module):  # type: ignore[misc]
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.ln(self.bn(x))


class Torch(nn.Module):
    def __init__(self, first: str = "bn", second: str = "ln") -> None:
        super().__init__()
        self.first, self.second = first, second
        self.add_module(first, nn.BatchNorm1d(4, eps=1e-5))
        self.add_module(second, nn.LayerNorm(4, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.second)(getattr(self, self.first)(x))


def flax_model() -> Flax:
    model = Flax(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            param[...] = rng.uniform(0.5, 1.5, param[...].shape).astype(np.float32)
    return model


def test_names_or_mapping_settle_a_batch_norm_without_its_statistics() -> None:
    model = flax_model()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    expected = np.asarray(model(x))
    params = nnx.state(model, nnx.Param)
    for module, mapping in ((Torch(), None), (Torch("a", "b"), {"bn": "a", "ln": "b"})):
        module.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # nnx State records no eps
            report = weightport.load(module, params, mapping=mapping, strict=False)
        assert set(report.missing) == {f"{module.first}.running_mean", f"{module.first}.running_var"}
        with torch.no_grad():
            np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_scale_and_bias_no_name_settles_is_refused_listing_both() -> None:
    module = Torch("a", "b")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(weightport.LayoutError) as caught:
        weightport.load(module, nnx.state(flax_model(), nnx.Param), strict=False)
    text = str(caught.value)
    assert (
        "Flax layer 'bn' (bias, scale) reads as a LayerNorm, or as a BatchNorm saved without its batch"
        in text
    )
    assert "mapping={'bn': 'module.path'}" in text and "nnx.state(model), not its nnx.Param part" in text, (
        text
    )
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
