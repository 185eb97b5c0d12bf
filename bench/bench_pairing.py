"""What proving a pairing costs: many layers of one kind and shape, which only order can place.

A model of N equal ``nn.Linear(64, 64)`` layers takes Keras-layout arrays (as a ``.weights.h5``
holds them: ``dense``, ``dense_1``, ... numbered in model order), so every layer is interchangeable
with every other and pairing must match the recorded order with the model's call order. Side by
side in one run (median of interleaved rounds), as ratios to ``load_state_dict`` of the same
tensors already in PyTorch layout:

- weightport, torch layout (names match: no pairing), the floor of a checked load;
- weightport, Keras layout into an ``nn.Sequential`` (call order by construction);
- weightport, Keras layout into a custom module with ``example_inputs=`` (call order from one
  forward pass on meta tensors);
- and that forward pass alone (``call_order``), against the model's own real forward.

Run: .venv/bin/python bench/bench_pairing.py [--layers 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved, print_ratios

import weightport
from weightport.call_order import call_order
from weightport.layouts import get_layout


class Chain(nn.Module):
    """Equal layers under attribute names, declared in reverse of the order forward calls them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for i in reversed(range(n)):
            self.add_module(f"step{i}", nn.Linear(64, 64))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            x = getattr(self, f"step{i}")(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.layers
    torch.manual_seed(0)
    source = nn.Sequential(*(nn.Linear(64, 64) for _ in range(n)))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    arrays = {k: v.numpy() for k, v in state.items()}
    keras = get_layout("keras").export(source)
    sequential, chain = nn.Sequential(*(nn.Linear(64, 64) for _ in range(n))), Chain(n)
    x = torch.randn(8, 64)
    warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)  # .weights.h5 records no settings

    report = weightport.load(chain, keras, layout="keras", example_inputs=x)
    assert torch.allclose(chain(x), source(x), atol=1e-5), "crossed pairing"
    print(f"{n} x Linear(64, 64); pairings: {report.pairings[0].how!r}")
    cases = {
        "load_state_dict": lambda: sequential.load_state_dict(state),
        "weightport, torch layout (no pairing)": lambda: weightport.load(sequential, arrays),
        "weightport, keras layout, nn.Sequential": lambda: weightport.load(sequential, keras, layout="keras"),
        "weightport, keras layout, example_inputs=": lambda: weightport.load(
            chain, keras, layout="keras", example_inputs=x
        ),
    }
    medians = interleaved(cases, rounds=args.rounds)
    print_ratios("Loads (ratio to load_state_dict)", medians, "load_state_dict")
    traces = interleaved(
        {
            "the model's own forward": lambda: chain(x),
            "call_order (meta forward)": lambda: call_order(chain, x),
        },
        rounds=args.rounds,
    )
    print_ratios("The order-finding pass (ratio to a real forward)", traces, "the model's own forward")


if __name__ == "__main__":
    main()
