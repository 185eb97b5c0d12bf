"""Keras files written by other Keras versions than the one installed: same outputs as Keras gave.

Needs only torch, h5py and NumPy. tests/golden/keras_versions/<version>/ holds, for each Keras
version, the files that version wrote for two small models (``.weights.h5``, ``.keras``,
legacy ``.h5``, gzipped byte for byte) and the outputs that version computed on a random input
(tests/golden/make_keras_versions.py, run once per version in a virtualenv with that Keras).
Each file is loaded with ``weightport.load`` into the equivalent PyTorch model, whose output
must match Keras's within 1e-5. What differs on disk between versions:

- Keras 3.0-3.3, and Keras 2.13-2.15's new format: no ``name`` attribute on ``vars`` groups,
  so a ``.keras`` file's layers are found by their per-class keys alone;
- Keras 3.0 and Keras 2.12-2.15: an empty ``layers/bidirectional/layer`` group (the wrapped
  layer's template);
- Keras 2.12 (``save_format="keras_v3"`` and ``.weights.h5``): layers filed under
  ``_layer_checkpoint_dependencies``, numbered with gaps (``dense``, ``dense_2``): each layer with
  weights was counted twice;
- Keras 2.12 ``model.save("m.keras")``: a legacy HDF5 full-model file under a ``.keras`` name;
- legacy ``.h5`` from Keras 3: weight names without ``:0``, stored as variable-length strings.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import UncheckedConfigWarning

pytest.importorskip("h5py")

ROOT = Path(__file__).parent / "golden" / "keras_versions"
VERSIONS = sorted(p.name for p in ROOT.iterdir() if p.is_dir())
TOL = 1e-5


class Seq(nn.Module):
    """Embedding(7, 4) -> Conv1D(3, 2) -> BatchNormalization -> LSTM(3) -> GRU(3) ->
    Bidirectional(LSTM(2)) -> LayerNormalization -> Dense(2), channels last as Keras runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.bn = nn.BatchNorm1d(3, eps=1e-3)
        self.lstm = nn.LSTM(3, 3, batch_first=True)
        self.gru = nn.GRU(3, 3, batch_first=True)
        self.bi = nn.LSTM(3, 2, batch_first=True, bidirectional=True)
        self.ln = nn.LayerNorm(4, eps=1e-3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.emb(x.long()).transpose(1, 2))).transpose(1, 2)
        h = self.gru(self.lstm(h)[0])[0]
        h_n = self.bi(h)[1][0]
        return self.fc(self.ln(torch.cat([h_n[0], h_n[1]], dim=1)))


class Fn(nn.Module):
    """SimpleRNN(4, relu) 'rnn_in' -> Bidirectional(GRU(2)) 'bi' -> GRU(3) -> Dense(4) 'hidden' ->
    Dropout (a layer without weights, numbered all the same) -> Dense(2) 'out'."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn_in = nn.RNN(3, 4, nonlinearity="relu", batch_first=True)
        self.bi = nn.GRU(4, 2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(4, 3, batch_first=True)
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_n = self.gru(self.bi(self.rnn_in(x)[0])[0])[1]
        return self.out(self.hidden(h_n[-1]))


MODELS: dict[str, type[nn.Module]] = {"seq": Seq, "fn": Fn}


def listed(version: str) -> list[str]:
    """The files the generator wrote for ``version`` (files.txt), so a missing one fails here."""
    lines = (ROOT / version / "files.txt").read_text().splitlines()[1:]
    return [n for n in lines if n.endswith(".gz")]


CASES = [(v, n) for v in VERSIONS for n in listed(v)]


def unpacked(version: str, name: str, tmp_path: Path) -> Path:
    """The golden file as Keras wrote it, under its own name (``seq.weights.h5``)."""
    path = tmp_path / name.removesuffix(".gz")
    path.write_bytes(gzip.decompress((ROOT / version / name).read_bytes()))
    return path


def keras_outputs(version: str, stem: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ROOT / version / f"{stem}.io.npz", allow_pickle=False) as io_:
        return io_["x"], io_["y"]


def max_error(module: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    module.eval()
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == y.shape and got.dtype == np.float32 and y.dtype == np.float32
    return float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))


def test_golden_folders_cover_the_versions_and_formats() -> None:
    assert {"3.0.5", "3.3.3", "3.6.0", "3.10.0", "2.12.0", "2.13.1", "2.15.0"} <= set(VERSIONS)
    for version in VERSIONS:
        names = listed(version)
        for stem in MODELS:
            assert (ROOT / version / f"{stem}.io.npz").is_file()
            assert f"{stem}.keras.gz" in names and f"{stem}.weights.h5.gz" in names, (version, names)
            assert all((ROOT / version / n).is_file() for n in names)
        if version.startswith("2."):  # Keras 2 writes legacy files for every model
            assert {f"{s}.legacy_weights.h5.gz" for s in MODELS} <= set(names), (version, names)


@pytest.mark.parametrize(("version", "name"), CASES, ids=[f"{v}/{n}" for v, n in CASES])
def test_file_from_keras_version_gives_keras_outputs(version: str, name: str, tmp_path: Path) -> None:
    stem = name.split(".", 1)[0]
    path = unpacked(version, name, tmp_path)
    x, y = keras_outputs(version, stem)
    torch.manual_seed(0)
    module = MODELS[stem]()
    before = max_error(module, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(module, path)  # strict: every Keras variable must fill a parameter
    others = [str(w.message) for w in caught if not issubclass(w.category, UncheckedConfigWarning)]
    assert not others, others
    err = max_error(module, x, y)
    print(f"maxerr keras {version} {path.name}: {err:.2e} (before loading {before:.2e})")
    assert before > 1e-2  # the oracle can tell a loaded model from a fresh one
    assert err <= TOL, f"keras {version} {path.name}: max error {err}"


def test_how_older_files_are_read(tmp_path: Path) -> None:
    """What the version differences above come to in the source's metadata."""
    from weightport.sources import open_source

    with open_source(unpacked("2.12.0", "fn.keras.gz", tmp_path)) as src:  # HDF5 under a .keras name
        assert src.metadata["keras_file"] == "legacy-model-h5"
    with open_source(unpacked("2.12.0", "fn.v3.keras.gz", tmp_path)) as src:  # numbered with gaps
        paths = {la["name"]: la["path"] for la in src.metadata["layers"]}
        assert paths["hidden"] == "_layer_checkpoint_dependencies/dense"
        assert paths["out"] == "_layer_checkpoint_dependencies/dense_2"
    with open_source(unpacked("3.3.3", "fn.keras.gz", tmp_path)) as src:  # no vars/@name: keys only
        assert src.metadata["vars_names"] == {}
        assert {la["name"]: la["path"] for la in src.metadata["layers"]}["out"] == "layers/dense_1"
