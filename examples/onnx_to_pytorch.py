"""Fill a PyTorch GRU from an ONNX file's GRU node, and check it against ONNX Runtime.

Needs: pip install weightport[onnx] onnxruntime  (ONNX Runtime only to run the ONNX side here).
Run: python examples/onnx_to_pytorch.py
"""

import os
import tempfile
import warnings

import torch

import weightport

# An ONNX model: here exported from a PyTorch GRU; it could come from any framework.
torch.manual_seed(0)
source_model = torch.nn.GRU(6, 10, num_layers=2, bidirectional=True)
x = torch.randn(7, 3, 6)
path = os.path.join(tempfile.mkdtemp(), "gru.onnx")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(
        source_model, (x,), path, opset_version=17, dynamo=False, input_names=["x"], output_names=["y", "h"]
    )

# A fresh model of the same shape: weights come from the ONNX file (gates z,r,h -> r,z,n).
net = torch.nn.GRU(6, 10, num_layers=2, bidirectional=True)
print(weightport.load(net, path))

import onnxruntime  # noqa: E402

y, h = onnxruntime.InferenceSession(path).run(None, {"x": x.numpy()})
check = weightport.verify(net, x.numpy(), (y, h), rtol=1e-4, atol=1e-5)
print(check)
check.raise_if_failed()
