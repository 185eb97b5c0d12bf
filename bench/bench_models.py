"""Whole real models: weightport's load beside the frameworks' own converters, for the same files.

For each model, one file is written by the real framework (transformers' ``save_pretrained`` of a
TF or Flax model; ``torch.onnx.export`` of a torchvision CNN), then, side by side in one run
(median of interleaved rounds, imports done before the clock):

- **weightport**: ``weightport.load(model, file)`` into an existing PyTorch model (checks included);
- **anchor**: the converter users reach for otherwise, end to end: transformers'
  ``from_pretrained(folder, from_tf=True / from_flax=True)`` (builds the model too: a separate
  column, not a like-for-like ratio), and ``onnx2torch.convert(file)`` for ONNX (builds an fx graph);
- the max abs error of weightport's model against the framework's own output (eval mode).

A model weightport refuses prints its reason instead of a time: a refusal is an answer.

Run: .venv/bin/python bench/bench_models.py [--rounds 5] [--size small|base]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved  # noqa: E402

import weightport  # noqa: E402

SIZES = {
    "small": {"hidden": 64, "layers": 2, "heads": 4, "inner": 128},
    "base": {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072},
}
IDS = np.random.default_rng(0).integers(0, 99, (2, 16)).astype(np.int32)


def _bert_config(size: dict[str, int]) -> Any:
    import transformers

    return transformers.BertConfig(
        vocab_size=1000,
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["inner"],
    )


def _gpt2_config(size: dict[str, int]) -> Any:
    import transformers

    return transformers.GPT2Config(
        vocab_size=1000, n_embd=size["hidden"], n_layer=size["layers"], n_head=size["heads"], n_positions=128
    )


def _transformers_case(kind: str, framework: str, size: dict[str, int], folder: Path) -> dict[str, Any]:
    """Save a random TF/Flax model the way transformers does; return how to load it both ways."""
    import transformers

    config = _bert_config(size) if kind == "bert" else _gpt2_config(size)
    names = {"bert": "BertModel", "gpt2": "GPT2Model"}
    source_class = getattr(transformers, ("TF" if framework == "tf" else "Flax") + names[kind])
    source = source_class(config) if framework == "tf" else source_class(config, seed=0)
    expected = np.asarray(source(IDS).last_hidden_state)
    source.save_pretrained(folder)
    file = folder / ("tf_model.h5" if framework == "tf" else "flax_model.msgpack")
    torch_class = getattr(transformers, names[kind])
    model = torch_class(config).eval()
    flag = {"from_tf": True} if framework == "tf" else {"from_flax": True}

    def anchor() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch_class.from_pretrained(folder, **flag)

    def output() -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(IDS).long()).last_hidden_state.numpy()

    return {
        "model": model,
        "file": file,
        "anchor": anchor,
        "anchor_name": "from_pretrained",
        "expected": expected,
        "output": output,
    }


def _onnx_case(name: str, folder: Path) -> dict[str, Any]:
    """A torchvision CNN exported with torch.onnx.export's defaults (legacy exporter), random weights."""
    import onnx2torch
    import torchvision

    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None).eval()
    for module in original.modules():  # statistics as a trained model has them, not the defaults
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64)
    file = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original, (x,), str(file), dynamo=False)
    with torch.no_grad():
        expected = original(x).numpy()
    model = getattr(torchvision.models, name)(weights=None).eval()

    def output() -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    return {
        "model": model,
        "file": file,
        "anchor": lambda: onnx2torch.convert(str(file)),
        "anchor_name": "onnx2torch",
        "expected": expected,
        "output": output,
    }


def _run(label: str, make: Callable[[Path], dict[str, Any]], rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            case = make(Path(tmp))
        except ImportError as e:
            print(f"  {label:<22} skipped: {e}")
            return
        model, file = case["model"], case["file"]

        def ours() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
                return weightport.load(model, file)

        try:
            ours()
        except weightport.WeightportError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = next((line for line in lines if line.startswith("- ")), lines[0])
            print(f"  {label:<22} refused: {reason.removeprefix('- ')[:200]}")
            return
        error = float(np.abs(case["output"]() - case["expected"]).max())
        scale = float(np.abs(case["expected"]).max())
        medians = interleaved({"weightport": ours, "anchor": case["anchor"]}, rounds=rounds)
        mb = os.path.getsize(file) / 1e6
        print(
            f"  {label:<22} {mb:8.1f} MB  weightport {medians['weightport'] * 1e3:9.1f} ms   "
            f"{case['anchor_name']} {medians['anchor'] * 1e3:9.1f} ms ({medians['weightport'] / medians['anchor']:5.2f}x)"
            f"   max error {error:.2e} (output scale {scale:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    size = SIZES[args.size]
    print(f"Whole models ({args.size} transformers; ratio = weightport / the anchor, same file, one run)")
    for kind in ("bert", "gpt2"):
        for framework in ("flax", "tf"):
            _run(
                f"{kind} ({framework})",
                lambda folder, k=kind, f=framework: _transformers_case(k, f, size, folder),
                args.rounds,
            )
    for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        _run(f"{name} (onnx)", lambda folder, n=name: _onnx_case(n, folder), args.rounds)


if __name__ == "__main__":
    main()
