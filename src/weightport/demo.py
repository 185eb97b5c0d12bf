"""``weightport demo``: the seed question end to end, on ``nn.RNN(3, 4, 2)``.

Fills the RNN from arrays drawn from ``np.random.RandomState(313)``, shows the
plan, loads, verifies against the NumPy reference, then shows the classic
mistake (layer 0's ``weight_ih`` given as (4, 4)) and the error weightport gives.
"""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np
import torch

import weightport

__all__ = ["run_demo"]


def run_demo(out: TextIO = sys.stdout) -> int:
    """Run the demo, printing to ``out``; returns 0 when every step behaved as shown."""
    say = lambda *parts: print(*parts, file=out)  # noqa: E731
    torch.manual_seed(0)
    rnn = torch.nn.RNN(input_size=3, hidden_size=4, num_layers=2)
    rng = np.random.RandomState(313)
    arrays = {name: rng.uniform(-0.5, 0.5, size=tuple(p.shape)) for name, p in rnn.named_parameters()}

    say("1. Arrays from np.random.RandomState(313), float64 as NumPy makes them:")
    for name, array in arrays.items():
        say(f"   {name:<14} {array.shape!s:<8} {array.dtype}")

    say("\n2. The plan (dry_run=True checks everything and writes nothing):")
    say(_indent(str(weightport.load(rnn, arrays, dry_run=True))))

    report = weightport.load(rnn, arrays)
    say(
        f"\n3. Loaded {len(report.written)} tensors in place; the Parameters are the same objects, float32 still."
    )

    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    check = weightport.verify(rnn, x)
    say("\n4. " + str(check))

    say("\n5. The classic mistake: layer 0's weight_ih given as (4, 4) instead of (4, 3).")
    before = weightport.to_numpy(rnn)
    wrong = dict(arrays, weight_ih_l0=rng.uniform(-0.5, 0.5, size=(4, 4)))
    try:
        weightport.load(rnn, wrong)
    except weightport.LoadError as error:
        say(_indent(str(error)))
        unchanged = all(np.array_equal(before[k], v) for k, v in weightport.to_numpy(rnn).items())
        say(f"   The module is unchanged: {unchanged}.")
        return 0 if (check and unchanged) else 1
    say("   (no error: this should not happen)")
    return 1


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())
