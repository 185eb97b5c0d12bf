"""weightport: NumPy arrays into PyTorch modules, checked first, written in place, all or nothing.

>>> import numpy as np, torch, weightport
>>> lin = torch.nn.Linear(3, 2)
>>> report = weightport.load(lin, {"weight": np.ones((2, 3)), "bias": np.zeros(2)})
>>> lin.weight.sum().item()
6.0
"""

from __future__ import annotations

from weightport import reference, rnn
from weightport.errors import (
    LayoutError,
    LoadError,
    MissingDependencyError,
    Problem,
    SourceError,
    UncheckedConfigWarning,
    UnsupportedConfigError,
    VerifyError,
    WeightportError,
)
from weightport.export import save, to_numpy
from weightport.initializers import init
from weightport.loading import load
from weightport.report import LoadReport
from weightport.sources import Source, TensorInfo, open_source
from weightport.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "LayoutError",
    "LoadError",
    "LoadReport",
    "MissingDependencyError",
    "Problem",
    "Source",
    "SourceError",
    "TensorInfo",
    "UncheckedConfigWarning",
    "UnsupportedConfigError",
    "VerifyError",
    "VerifyReport",
    "WeightportError",
    "__version__",
    "init",
    "load",
    "open_source",
    "reference",
    "rnn",
    "save",
    "to_numpy",
    "verify",
]
