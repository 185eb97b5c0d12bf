"""Port a Flax (linen) LSTM + Dense to PyTorch from a msgpack checkpoint, and check it.

Needs: pip install weightport[flax] jax flax  (JAX only to build and run the Flax side here;
weightport reads the .msgpack with msgpack alone).
Run: python examples/flax_to_pytorch.py
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import flax.linen as nn
import jax
import numpy as np
import torch
from flax import serialization

import weightport


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.RNN(nn.LSTMCell(16))(x)
        return nn.Dense(3)(x)


flax_model = Model()
x = np.random.default_rng(0).standard_normal((2, 7, 5)).astype("float32")
variables = flax_model.init(jax.random.PRNGKey(0), x)
variables = jax.tree_util.tree_map(lambda a: a + 0.05, variables)  # non-zero biases, as after training
path = os.path.join(tempfile.mkdtemp(), "model.msgpack")
with open(path, "wb") as f:
    f.write(serialization.to_bytes(variables))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


net = Net()
print(weightport.load(net, path))  # Flax's per-gate Dense layers become PyTorch's fused i,f,g,o blocks
expected = np.asarray(flax_model.apply(variables, x))
check = weightport.verify(net, x, expected, rtol=1e-4, atol=1e-5)
print(check)
check.raise_if_failed()
