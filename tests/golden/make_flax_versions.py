"""Golden files from older Flax releases: params as users save them, and Flax's own outputs.

Run with the Python of a virtualenv holding the Flax release to record (JAX on the CPU):

    python -m venv /tmp/f08 && /tmp/f08/bin/pip install flax==0.8.5 jax==0.4.30 jaxlib==0.4.30
    /tmp/f08/bin/python tests/golden/make_flax_versions.py tests/golden/flax_versions/0.8.5

It needs only Flax, JAX and NumPy, and works on every release from 0.7.5 on (linen's
``SimpleCell`` came in 0.8, ``flax.nnx`` in 0.8, nnx's recurrent cells in 0.10; what a
release lacks is left out). Into OUTDIR it writes,
for each model, with seeded random params and non-zero biases:

- ``linen_<model>.msgpack``: ``flax.serialization.to_bytes`` of the linen variables
  (``params``, and ``batch_stats`` where there are any);
- ``nnx_<model>.msgpack``: the nnx model's ``Param`` and ``BatchStat`` state as a pure
  dict (``State.to_pure_dict()`` where the release has it), ``serialization.msgpack_serialize``'d;
- ``nnx_<model>.npz``: the same arrays flat (``np.savez_compressed``), keys ``/``-joined (``State.flat_state()``'s paths);
- ``nnx_<model>_tree.msgpack``: the State's own pytree, nested by its key paths as
  ``jax.tree_util`` gives them, so each variable keeps its attribute (``value`` or, in
  0.8, ``raw_value``): what generic pytree checkpointers store for an nnx State;
- ``io.npz``: the inputs ``x`` (2, 5, 3), ``tokens`` (2, 5), ``img`` (2, 5, 5, 2), and for each
  model Flax's outputs ``<api>_<model>/y`` (``/z`` too for ``layers``; the final carry
  ``/h``, and ``/c`` for LSTMs, for cells), plus ``flax_version``.

Models: ``nn.RNN`` / ``nnx.RNN`` over LSTMCell, OptimizedLSTMCell, GRUCell, SimpleCell;
a Bidirectional LSTM; and ``layers``: Embed, Conv (1-D and 2-D), LayerNorm, BatchNorm
(running averages) and Dense. Inputs are (2, 5, 3), hidden size 4.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

try:
    from flax import nnx
except ImportError:  # releases before flax.nnx
    nnx = None

SEED = 20240613
B, T, F, H, V = 2, 5, 3, 4, 10


def _noise(path: str, value: Any, rng: np.random.Generator) -> np.ndarray:
    """``value`` plus noise, so biases are non-zero; BatchNorm variances stay positive."""
    array = np.asarray(value)
    array = array + rng.normal(0.0, 0.3, array.shape).astype(array.dtype)
    return np.abs(array) + 0.5 if path.rsplit("/", 1)[-1] == "var" else array


def _perturb(tree: Mapping[Any, Any], rng: np.random.Generator, prefix: str = "") -> dict[Any, Any]:
    """A linen variables dict with every leaf perturbed, in the tree's own key order."""
    return {
        key: _perturb(value, rng, f"{prefix}{key}/")
        if isinstance(value, Mapping)
        else _noise(f"{prefix}{key}", value, rng)
        for key, value in tree.items()
    }


def _inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x": rng.normal(size=(B, T, F)).astype(np.float32),
        "tokens": rng.integers(0, V, size=(B, T)).astype(np.int32),
        "img": rng.normal(size=(B, 5, 5, 2)).astype(np.float32),
    }


def _outputs(name: str, kind: str, out: Any, io: dict[str, np.ndarray]) -> None:
    """Record outputs: ``(carry, y)`` of an RNN over a cell (LSTM carry ``(c, h)``), ``(y, z)`` of ``layers``."""
    if kind == "layers":
        io[f"{name}/y"], io[f"{name}/z"] = np.asarray(out[0]), np.asarray(out[1])
    elif kind == "lstm":
        (c, h), y = out
        io[f"{name}/c"], io[f"{name}/h"], io[f"{name}/y"] = np.asarray(c), np.asarray(h), np.asarray(y)
    elif kind == "cell":
        h, y = out
        io[f"{name}/h"], io[f"{name}/y"] = np.asarray(h), np.asarray(y)
    else:
        io[f"{name}/y"] = np.asarray(out)


def _kind(name: str) -> str:
    return {"layers": "layers", "bilstm": "outputs"}.get(name, "lstm" if name.endswith("lstm") else "cell")


# --- linen ---------------------------------------------------------------------------------------------


class LinenLayers(nn.Module):
    @nn.compact
    def __call__(self, tokens: Any, x: Any, img: Any) -> tuple[Any, Any]:
        e = nn.Embed(V, 4)(tokens)
        c = nn.Conv(4, (2,), padding="VALID")(x)
        h = nn.LayerNorm()(e[:, 1:] + c)
        h = nn.BatchNorm(use_running_average=True)(h)
        y = nn.Dense(2)(h)
        z = nn.Conv(3, (3, 3), padding="VALID")(img).mean(axis=(1, 2))
        return y, z


LINEN_CELLS = {"lstm": "LSTMCell", "optlstm": "OptimizedLSTMCell", "gru": "GRUCell", "simple": "SimpleCell"}


def linen(out: Path, inputs: dict[str, np.ndarray], rng: np.random.Generator, io: dict) -> None:
    x = inputs["x"]
    models: list[tuple[str, Any, tuple[Any, ...]]] = [
        (name, nn.RNN(getattr(nn, cell)(H), return_carry=True), (x,))
        for name, cell in LINEN_CELLS.items()
        if hasattr(nn, cell)  # SimpleCell came in 0.8
    ]
    models.append(("bilstm", nn.Bidirectional(nn.RNN(nn.LSTMCell(H)), nn.RNN(nn.LSTMCell(H))), (x,)))
    models.append(("layers", LinenLayers(), (inputs["tokens"], x, inputs["img"])))
    for name, model, args in models:
        variables = _perturb(model.init(jax.random.PRNGKey(SEED), *args), rng)
        _outputs(f"linen_{name}", _kind(name), model.apply(variables, *args), io)
        (out / f"linen_{name}.msgpack").write_bytes(serialization.to_bytes(variables))


# --- nnx -----------------------------------------------------------------------------------------------


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _nested(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _weights(model: Any) -> Any:
    return nnx.state(model, (nnx.Param, nnx.BatchStat))  # a tuple of filters: any of them


def _perturb_nnx(model: Any, rng: np.random.Generator) -> None:
    state = _weights(model)
    paths = ["/".join(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    leaves, treedef = jax.tree_util.tree_flatten(state)
    new = [jnp.asarray(_noise(path.rsplit("/", 1)[0], v, rng)) for path, v in zip(paths, leaves)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def _save_nnx(out: Path, name: str, model: Any) -> None:
    state = _weights(model)
    # the pytree's own paths end in the variable's attribute ('value'; 'raw_value' in 0.8)
    tree = {
        tuple(_key_name(k) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    flat = {path[:-1]: value for path, value in tree.items()}
    if hasattr(state, "flat_state"):  # the same names as the release's own flat view
        listed = state.flat_state()
        pairs = listed.items() if hasattr(listed, "items") else listed
        # 0.10 keeps a Param(None) for a Linear without bias: it has no array, so no key here
        keys = [tuple(str(k) for k in path) for path, v in pairs if v.value is not None]
        assert sorted(keys) == sorted(flat), (keys, list(flat))
    pure = state.to_pure_dict() if hasattr(state, "to_pure_dict") else _nested(flat)
    pure = jax.tree_util.tree_map(np.asarray, pure)
    (out / f"nnx_{name}.msgpack").write_bytes(serialization.msgpack_serialize(pure))
    np.savez_compressed(out / f"nnx_{name}.npz", **{"/".join(path): value for path, value in flat.items()})
    (out / f"nnx_{name}_tree.msgpack").write_bytes(serialization.msgpack_serialize(_nested(tree)))


def nnx_models(out: Path, inputs: dict[str, np.ndarray], rng: np.random.Generator, io: dict) -> None:
    class Layers(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.emb = nnx.Embed(V, 4, rngs=rngs)
            self.conv = nnx.Conv(F, 4, (2,), padding="VALID", rngs=rngs)
            self.ln = nnx.LayerNorm(4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.fc = nnx.Linear(4, 2, rngs=rngs)
            self.conv2 = nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=rngs)

        def __call__(self, tokens: Any, x: Any, img: Any) -> tuple[Any, Any]:
            h = self.bn(self.ln(self.emb(tokens)[:, 1:] + self.conv(x)))
            return self.fc(h), self.conv2(img).mean(axis=(1, 2))

    x = inputs["x"]
    models: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("layers", Layers(nnx.Rngs(SEED)), (inputs["tokens"], x, inputs["img"]))
    ]
    if hasattr(nnx, "LSTMCell"):  # nnx's recurrent cells came in 0.10
        cells = {
            "lstm": nnx.LSTMCell,
            "optlstm": nnx.OptimizedLSTMCell,
            "gru": nnx.GRUCell,
            "simple": nnx.SimpleCell,
        }
        for name, cls in cells.items():
            model = nnx.RNN(cls(F, H, rngs=nnx.Rngs(SEED)), return_carry=True)
            models.append((name, model, (x,)))
        rngs = nnx.Rngs(SEED)
        bilstm = nnx.Bidirectional(
            nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs)), nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs)), rngs=rngs
        )
        models.append(("bilstm", bilstm, (x,)))
    for name, model, args in models:
        _perturb_nnx(model, rng)
        _outputs(f"nnx_{name}", _kind(name), model(*args), io)
        _save_nnx(out, name, model)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python tests/golden/make_flax_versions.py OUTDIR")
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    inputs = _inputs(rng)
    io: dict[str, np.ndarray] = {"flax_version": np.array(flax.__version__), **inputs}
    linen(out, inputs, rng, io)
    if nnx is not None:
        nnx_models(out, inputs, rng, io)
    np.savez_compressed(out / "io.npz", **dict(sorted(io.items())))
    print(f"flax {flax.__version__} (jax {jax.__version__}): wrote {len(list(out.iterdir()))} files to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
