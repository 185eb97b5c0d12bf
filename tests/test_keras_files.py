"""Keras files without Keras: golden files, crafted legacy and unsafe files, the layout's own rules.

Needs only torch and h5py. The golden files under tests/golden/keras were written by real
Keras (tests/golden/make_keras.py); the unsafe files are crafted here with h5py and zipfile.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.dtypes import BFLOAT16
from weightport.errors import LayoutError, MissingDependencyError, SourceError, UncheckedConfigWarning
from weightport.layouts.keras import export
from weightport.sources import open_source

h5py = pytest.importorskip("h5py")

GOLDEN = Path(__file__).parent / "golden" / "keras"


class Golden(nn.Module):
    """Input((5, 3)) -> LSTM(4, return_sequences=True) -> GRU(2), batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.gru(self.lstm(x)[0])
        return h_n[-1]


@pytest.mark.parametrize("name", ["model.weights.h5", "model.keras"])
def test_golden_files_give_keras_outputs(name: str) -> None:
    io_ = np.load(GOLDEN / "io.npz")
    module = Golden()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weightport.load(module, GOLDEN / name)
    assert [w.category for w in caught] == ([UncheckedConfigWarning] if name == "model.weights.h5" else [])
    with torch.no_grad():
        y = module(torch.from_numpy(io_["x"])).numpy()
    assert np.max(np.abs(y - io_["y"])) <= 1e-5


def test_golden_keras_metadata() -> None:
    with open_source(GOLDEN / "model.keras") as src:
        assert src.metadata["keras_file"] == "keras"
        assert [(la["path"], la["class_name"]) for la in src.metadata["layers"]] == [
            ("layers/lstm", "LSTM"),
            ("layers/gru", "GRU"),
        ]
        assert src.infos["layers/gru/cell/vars/2"].shape == (2, 6)
    with open_source(GOLDEN / "model.weights.h5") as src:
        assert src.metadata["keras_file"] == "weights.h5" and "layers" not in src.metadata


# ---- a legacy Keras 2 file, laid out as FORMATS.md and tf_keras write it -------------------------------


def write_legacy(
    path: Path, arrays: dict[str, dict[str, np.ndarray]], model_config: str | None = None
) -> None:
    """``{layer: {weight name: array}}`` as tf_keras's save_weights lays it out (model.save with a config)."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if model_config else f
        if model_config:
            f.attrs["model_config"] = model_config
        root.attrs["layer_names"] = np.array([n.encode() for n in ["input_1", *arrays]])
        root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for layer, weights in reversed(arrays.items()):  # group creation order is not model order
            group = root.create_group(layer)
            group.attrs["weight_names"] = np.array([w.encode() for w in weights])
            for name, value in weights.items():
                group[name] = value


def test_crafted_legacy_h5_follows_layer_names(tmp_path: Path, rng: np.random.Generator) -> None:
    k = {
        n: rng.uniform(-1, 1, s).astype(np.float32) for n, s in [("k", (3, 16)), ("r", (4, 16)), ("b", (16,))]
    }
    d = {n: rng.uniform(-1, 1, s).astype(np.float32) for n, s in [("k", (4, 4)), ("b", (4,))]}
    e = {n: rng.uniform(-1, 1, s).astype(np.float32) for n, s in [("k", (4, 2)), ("b", (2,))]}
    arrays = {
        "enc": {"enc/lstm_cell/kernel:0": k["k"], "enc/lstm_cell/recurrent_kernel:0": k["r"], "enc/lstm_cell/bias:0": k["b"]},
        "dense_2": {"dense_2/kernel:0": d["k"], "dense_2/bias:0": d["b"]},  # first Dense, despite its name
        "dense_10": {"dense_10/kernel:0": e["k"], "dense_10/bias:0": e["b"]},
    }  # fmt: skip
    write_legacy(tmp_path / "w.h5", arrays)
    module = nn.ModuleDict({"lstm": nn.LSTM(3, 4), "a": nn.Linear(4, 4), "b": nn.Linear(4, 2)})
    with pytest.warns(UncheckedConfigWarning, match="activation, recurrent_activation"):
        report = weightport.load(module, tmp_path / "w.h5")
    assert [(p.source_layer, p.module_path) for p in report.pairings] == [
        ("enc", "lstm[0]"),
        ("dense_2", "a"),
        ("dense_10", "b"),
    ]
    state = {n: t.numpy() for n, t in module.state_dict().items()}
    assert np.array_equal(state["lstm.weight_ih_l0"], k["k"].T) and np.array_equal(
        state["lstm.weight_hh_l0"], k["r"].T
    )
    assert np.array_equal(state["lstm.bias_ih_l0"], k["b"]) and not state["lstm.bias_hh_l0"].any()
    assert np.array_equal(state["a.weight"], d["k"].T) and np.array_equal(state["b.bias"], e["b"])  # fmt: skip


# ---- unsafe and broken files ---------------------------------------------------------------------------


def dense_file(path: Path, build) -> Path:  # type: ignore[no-untyped-def]
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = np.ones((2, 2), np.float32)
        build(f)
    return path


def virtual(f) -> None:  # type: ignore[no-untyped-def]
    layout = h5py.VirtualLayout(shape=(2, 2), dtype="f4")
    layout[:] = h5py.VirtualSource(f["layers/dense/vars/0"])
    f.create_virtual_dataset("layers/dense/vars/1", layout)


BAD = {
    "external link": (lambda f: f.__setitem__("layers/dense/vars/1", h5py.ExternalLink("/etc/passwd", "/x")),
                      r"'layers/dense/vars/1' is an external link to '/etc/passwd:/x', which would read another file"),
    "soft link": (lambda f: f.__setitem__("layers/dense/vars/1", h5py.SoftLink("/layers/dense/vars/0")),
                  r"'layers/dense/vars/1' is a soft link to '/layers/dense/vars/0'; weightport follows no links"),
    "hard link twice": (lambda f: f.__setitem__("layers/dense/vars/1", f["layers/dense/vars/0"]),
                        r"'layers/dense/vars/1' is a second link to an object already seen"),
    "external storage": (lambda f: f.create_dataset("layers/dense/vars/1", (4,), "f4", external=[("raw.bin", 0, 16)]),
                         r"dataset 'layers/dense/vars/1' keeps its data in external file\(s\) .*raw.bin"),
    "virtual dataset": (virtual, r"dataset 'layers/dense/vars/1' is virtual"),
    "shape beyond stored bytes": (lambda f: f.create_dataset("layers/dense/vars/1", (1000, 1000), "f4"),
                                  r"dataset 'layers/dense/vars/1' declares 4000000 bytes but stores 0"),
    "decompression bomb": (lambda f: f.create_dataset("layers/dense/vars/1", (1 << 28,), "f4", chunks=(1 << 20,), compression="gzip"),
                           r"dataset 'layers/dense/vars/1' declares 1073741824 bytes from 0 compressed bytes .*refusing a decompression bomb"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_unsafe_h5_files_are_refused(name: str, tmp_path: Path) -> None:
    build, message = BAD[name]
    path = dense_file(tmp_path / "bad.weights.h5", build)
    with pytest.raises(SourceError, match=r"^'bad\.weights\.h5': " + message):
        open_source(path)


def test_truncated_h5_is_refused(tmp_path: Path) -> None:
    path = dense_file(
        tmp_path / "t.weights.h5", lambda f: f.create_dataset("layers/dense/vars/1", data=np.ones(4096, "f4"))
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8000])
    with pytest.raises(SourceError, match=r"truncated"):
        open_source(path)


def test_optimizer_state_is_ignored_not_read(tmp_path: Path) -> None:
    path = dense_file(
        tmp_path / "o.weights.h5", lambda f: f.__setitem__("optimizer/vars/0", h5py.SoftLink("/nowhere"))
    )
    with open_source(path) as src:
        assert list(src.infos) == ["layers/dense/vars/0"] and src.ignored == ["optimizer (optimizer state)"]


def test_compact_and_bfloat16_datasets_read(tmp_path: Path) -> None:
    path = tmp_path / "c.weights.h5"
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    with h5py.File(path, "w") as f:
        space = h5py.h5s.create_simple((2, 3))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        f.create_group("layers/dense/vars")
        dsid = h5py.h5d.create(f["layers/dense/vars"].id, b"0", h5py.h5t.NATIVE_FLOAT, space, dcpl=plist)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, values)
        bf = f.create_dataset("layers/dense/vars/1", data=values[0].astype(BFLOAT16).view("V2"))
        bf.attrs["dtype"] = "bfloat16"
    with open_source(path) as src:
        assert np.array_equal(src.read("layers/dense/vars/0"), values)
        assert src.infos["layers/dense/vars/1"].dtype == BFLOAT16
        assert np.array_equal(src.read("layers/dense/vars/1").astype(np.float32), values[0])


def zip_with(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_keras_zip_bomb_is_refused_before_reading(tmp_path: Path) -> None:
    path = zip_with(
        tmp_path / "bomb.keras",
        {"config.json": b"{}", "model.weights.h5": bytes(64 << 20)},
        zipfile.ZIP_DEFLATED,
    )
    assert path.stat().st_size < 200_000
    with pytest.raises(
        SourceError, match=r"member 'model.weights.h5' declares 67108864 bytes from \d+ stored .*zip bomb"
    ):
        open_source(path)


@pytest.mark.parametrize("member", ["../evil.h5", "/abs/model.weights.h5", "a/../../x"])
def test_keras_member_leaving_the_archive_is_refused(member: str, tmp_path: Path) -> None:
    h5 = (GOLDEN / "model.weights.h5").read_bytes()
    path = zip_with(tmp_path / "m.keras", {"model.weights.h5": h5, member: b"x"})
    with pytest.raises(SourceError, match=rf"member name '{member}' leaves the archive; refusing the file"):
        open_source(path)


def test_keras_archive_without_weights_or_with_bad_crc(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"'m.keras': holds no model.weights.h5"):
        open_source(zip_with(tmp_path / "m.keras", {"config.json": b"{}"}))
    h5 = (GOLDEN / "model.weights.h5").read_bytes()
    path = zip_with(tmp_path / "c.keras", {"model.weights.h5": h5})
    data = bytearray(path.read_bytes())
    data[data.index(b"\x89HDF") + 200] ^= 0xFF  # flip a byte of the stored member: its CRC no longer holds
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"member 'model.weights.h5' is corrupt \(Bad CRC-32"):
        open_source(path)
    assert zlib.crc32(h5) != zlib.crc32(bytes(data))


def test_missing_h5py_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(
        MissingDependencyError,
        match=r"Reading 'model.weights.h5' needs h5py: pip install 'weightport\[keras\]'",
    ):
        open_source(GOLDEN / "model.weights.h5")


def test_reading_keras_files_imports_no_framework() -> None:
    code = (
        "import sys, weightport\n"
        "from weightport.sources import open_source\n"
        "import weightport.layouts.keras, weightport.sources.keras_live\n"
        f"open_source({str(GOLDEN / 'model.keras')!r}).close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'jax')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the layout without Keras: round trips, order, ambiguity ----------------------------------------------


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(8, 3)
        self.rnn = nn.RNN(3, 2, nonlinearity="relu", bias=False)
        self.conv = nn.Conv2d(2, 3, (2, 3))
        self.bn = nn.BatchNorm2d(3)
        self.emb = nn.Embedding(7, 3)
        self.ln = nn.LayerNorm(3, bias=False)
        self.heads = nn.Sequential(*(nn.Linear(3, 3) for _ in range(11)))  # a call order by construction


def test_export_then_load_is_the_identity_but_for_the_summed_bias() -> None:
    torch.manual_seed(0)
    source, target = Everything(), Everything()
    with torch.no_grad():
        source.bn.running_mean.uniform_(-1, 1)
        source.bn.running_var.uniform_(0.5, 1.5)
    arrays = export(source)
    assert (
        "layers/bidirectional_1/backward_layer/cell/vars/2" in arrays and "layers/dense_10/vars/1" in arrays
    )
    # nn.LayerNorm(bias=False) exports as Keras center=False: one variable, which read back without the
    # Keras config could as well be beta (scale=False); it is refused, and loads once said under its name
    with pytest.raises(LayoutError, match=r"'layers/layer_normalization' holds 1 variables"):
        weightport.load(target, arrays, layout="keras")
    gamma = arrays.pop("layers/layer_normalization/vars/0")
    with pytest.warns(UncheckedConfigWarning):
        weightport.load(target, arrays, layout="keras", strict=False)
    weightport.load(target, {"ln.weight": gamma}, strict=False)
    got, want = target.state_dict(), source.state_dict()
    for name, value in want.items():
        if "lstm.bias_ih" in name:
            assert torch.equal(got[name], value + want[name.replace("_ih", "_hh")])
        elif "lstm.bias_hh" in name:
            assert not got[name].any()
        elif name != "bn.num_batches_tracked":
            assert torch.equal(got[name], value), name


def test_attribute_named_layers_of_one_kind_need_a_mapping(tmp_path: Path, rng: np.random.Generator) -> None:
    """A subclassed model files layers under attribute names: no order, so no guess."""
    path = tmp_path / "sub.weights.h5"
    with h5py.File(path, "w") as f:
        for group in ("zz", "aa"):
            f[f"{group}/vars/0"] = rng.uniform(-1, 1, (3, 3)).astype(np.float32)
            f[f"{group}/vars/1"] = rng.uniform(-1, 1, (3,)).astype(np.float32)
    module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(
        LayoutError,
        match=r"the layers 'aa', 'zz' and the modules 0 \(Linear \(3, 3\)\), 1 \(Linear \(3, 3\)\) are interchangeable.*'sub.weights.h5' does not record the order of these layers",
    ):
        weightport.load(module, path)
    with pytest.warns(weightport.UncheckedConfigWarning, match="activation"):
        weightport.load(module, path, mapping={"zz": "0", "aa": "1"})
    with h5py.File(path) as f:
        assert np.array_equal(module[0].weight.detach().numpy(), f["zz/vars/0"][()].T)


def test_a_lone_2d_variable_is_ambiguous_when_the_module_has_both_kinds(tmp_path: Path) -> None:
    path = tmp_path / "amb.weights.h5"
    with h5py.File(path, "w") as f:
        f["table/vars/0"] = np.ones((5, 3), np.float32)
    both = nn.ModuleDict({"emb": nn.Embedding(5, 3), "fc": nn.Linear(5, 3, bias=False)})
    with pytest.raises(
        LayoutError,
        match=r"Keras layer 'table' \(table/vars/0 \(5, 3\)\) fits more than one Keras class \(Dense, Embedding\), and the module has layers of each kind \(Linear, Embedding\)",
    ):
        weightport.load(both, path)
    with pytest.warns(weightport.UncheckedConfigWarning, match="mask_zero"):
        weightport.load(nn.Embedding(5, 3), path)  # one kind in the module: no ambiguity
    with pytest.warns(weightport.UncheckedConfigWarning, match="mask_zero"):
        weightport.load(both, path, mapping={"table": "emb"}, strict=False)  # the mapping says which
    assert both["emb"].weight.detach().eq(1).all() and not both["fc"].weight.detach().eq(1).all()


def test_h5_from_bytes_in_memory() -> None:
    buf = io.BytesIO((GOLDEN / "model.weights.h5").read_bytes())
    from weightport.sources.keras_h5 import open_h5

    with open_h5(buf, "'mem'", len(buf.getvalue())) as src:
        assert src.infos["layers/lstm/cell/vars/0"].shape == (3, 16)
