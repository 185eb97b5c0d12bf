"""Port a Keras model (Conv1D -> LSTM -> Dense) to the equivalent PyTorch model, and check it.

Needs: pip install weightport[keras] tensorflow-cpu keras  (TensorFlow only to build and run the
Keras side here; weightport reads the .keras file with h5py alone).
Run: python examples/keras_to_pytorch.py
"""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
import numpy as np
import torch

import weightport

# The Keras model, trained elsewhere; here random weights with non-zero biases.
inputs = keras.Input((20, 8))
x = keras.layers.Conv1D(16, 3, padding="valid")(inputs)
x = keras.layers.LSTM(32)(x)
outputs = keras.layers.Dense(4)(x)
keras_model = keras.Model(inputs, outputs)
rng = np.random.default_rng(0)
keras_model.set_weights(
    [rng.uniform(-0.3, 0.3, w.shape).astype("float32") for w in keras_model.get_weights()]
)
path = os.path.join(tempfile.mkdtemp(), "model.keras")
keras_model.save(path)


# The equivalent PyTorch model. Keras is channels-last: the forward permutes for Conv1d.
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, 3)
        self.lstm = torch.nn.LSTM(16, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


net = Net()
report = weightport.load(net, path)  # layout inferred from the file; layers paired by order and kind
print(report)  # the pairing (Keras layer -> module) and every tensor's transform

x = rng.standard_normal((2, 20, 8)).astype("float32")
check = weightport.verify(net, x, keras_model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
print(check)
check.raise_if_failed()
