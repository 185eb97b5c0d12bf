"""Regenerate tests/golden/onnx/: a tiny LSTM exported by torch.onnx.export, and onnxruntime's outputs.

Run from the repository root: ``python tests/golden/make_onnx.py``. Needs torch, onnx and
onnxruntime. The model is ``nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)``
with seeded weights; ``lstm.npz`` holds the input ``x`` (batch 2, 5 steps) and onnxruntime's
outputs ``y`` (2, 5, 8) and ``h_n`` (4, 2, 4). tests/test_onnx.py loads the file into a fresh
model and compares against these, without onnxruntime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

HERE = Path(__file__).parent / "onnx"


def main() -> None:
    HERE.mkdir(exist_ok=True)
    torch.manual_seed(20240601)
    model = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = np.random.default_rng(7).standard_normal((2, 5, 3)).astype(np.float32)
    path = HERE / "lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and batch-size advice
        torch.onnx.export(
            model,
            (torch.from_numpy(x),),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=["x"],
            output_names=["y", "h_n", "c_n"],
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, h_n, _ = session.run(None, {"x": x})
    np.savez(HERE / "lstm.npz", x=x, y=y, h_n=h_n)
    print(f"wrote {path} ({path.stat().st_size} bytes) and lstm.npz")


if __name__ == "__main__":
    main()
