"""Initialize an nn.RNN from NumPy arrays, checked, in place, and verified.

Run: python examples/rnn_from_numpy.py
"""

import numpy as np
import torch

import weightport

rnn = torch.nn.RNN(input_size=3, hidden_size=4, num_layers=2)
rng = np.random.RandomState(313)

# By state-dict name: every shape, dtype and value is checked before anything is written.
arrays = {name: rng.uniform(-0.5, 0.5, size=tuple(p.shape)) for name, p in rnn.named_parameters()}
print(weightport.load(rnn, arrays))

# Or by layer and gate (here: layer 1's hidden-to-hidden weights).
weightport.rnn.set_layer(rnn, 1, weight_hh=rng.uniform(-0.5, 0.5, size=(4, 4)))

# Compare the module with a NumPy forward pass that uses PyTorch's equations.
x = rng.standard_normal((5, 2, 3)).astype(np.float32)
print(weightport.verify(rnn, x).raise_if_failed())

# A wrong shape is refused with a message that says what to do, and nothing is written.
try:
    weightport.load(rnn, dict(arrays, weight_ih_l0=np.zeros((4, 4))))
except weightport.LoadError as error:
    print(error)
