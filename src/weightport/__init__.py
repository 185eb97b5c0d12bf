"""weightport: NumPy arrays into PyTorch modules, checked first, written in place, all or nothing.

>>> import numpy as np, torch, weightport
>>> lin = torch.nn.Linear(3, 2)
>>> report = weightport.load(lin, {"weight": np.ones((2, 3)), "bias": np.zeros(2)})
>>> lin.weight.sum().item()
6.0
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from weightport.errors import (
    ForwardNoteWarning,
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

if TYPE_CHECKING:
    from weightport import reference, rnn
    from weightport.export import save, to_numpy
    from weightport.initializers import init
    from weightport.loading import load
    from weightport.report import LoadReport
    from weightport.sources import Source, TensorInfo, open_source
    from weightport.verifying import VerifyReport, verify

# The rest of the public API is imported on first use, so `weightport --help` and `inspect` start
# without torch: name -> the module that defines it ("" for a submodule of that name).
_LAZY = {
    "reference": "",
    "rnn": "",
    "save": "weightport.export",
    "to_numpy": "weightport.export",
    "init": "weightport.initializers",
    "load": "weightport.loading",
    "LoadReport": "weightport.report",
    "Source": "weightport.sources",
    "TensorInfo": "weightport.sources",
    "open_source": "weightport.sources",
    "VerifyReport": "weightport.verifying",
    "verify": "weightport.verifying",
}


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'weightport' has no attribute {name!r}")
    value = (
        importlib.import_module(f"weightport.{name}")
        if home == ""
        else getattr(importlib.import_module(home), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# A program that imported torch before weightport is about to load weights: the loading machinery
# (pure Python; its cost is in docs/benchmarks.md) comes in now rather than inside the first load's
# time. The command line starts without torch, so it stays lazy.
if "torch" in sys.modules:
    importlib.import_module("weightport.loading")

__version__ = "0.1.0"

__all__ = [
    "ForwardNoteWarning",
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
