"""A Keras Embedding flattened into a Dense: the kernel's rows run (position, feature), which a PyTorch model
reads as they are (``emb(ids).flatten(1)``) or features first (``emb(ids).transpose(1, 2).flatten(1)``).
Without ``example_inputs=`` both readings are listed; with them the forward pass shows which, and the rows are
put in that order. The trace read an Embedding's output as an NCL map, so the first model was refused even with
``example_inputs=``, told it flattens 'channels, length'."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

import weightport  # noqa: E402
from conftest import refused  # noqa: E402


class EmbeddingHead(nn.Module):
    def __init__(self, features_first: bool) -> None:
        super().__init__()
        self.emb, self.fc, self.features_first = nn.Embedding(20, 8), nn.Linear(48, 5), features_first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = self.emb(ids)
        return self.fc((embedded.transpose(1, 2) if self.features_first else embedded).flatten(1))


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    ids = keras.Input((6,), dtype="int32")
    out = keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.Embedding(20, 8)(ids)))
    model = keras.Model(ids, out)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.standard_normal(weight.shape).astype("float32"))
    path = tmp_path_factory.mktemp("keras") / "embedding.keras"
    model.save(path)
    x = rng.integers(0, 20, (3, 6)).astype("int32")
    return path, x, model(x).numpy()


@pytest.mark.parametrize("features_first", [False, True], ids=["as-is", "features-first"])
def test_an_embedding_flattened_into_a_dense_loads_in_the_order_forward_shows(
    keras_file: tuple[Path, np.ndarray, np.ndarray], features_first: bool
) -> None:
    path, x, expected = keras_file
    model = EmbeddingHead(features_first)
    error = refused(model, path, r"moves the features first \(x\.transpose\(1, 2\)\.flatten\(1\)")
    assert "(input axis 1, channels)" in str(error) and "(channels, input axis 1)" in str(error)
    ids = torch.from_numpy(x).long()
    weightport.load(model, path, example_inputs=(ids,))
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).numpy(), expected, rtol=1e-5, atol=1e-5)
