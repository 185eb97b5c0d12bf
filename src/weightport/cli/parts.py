"""Part of a weights file, for the fixes that load less than all of it: ``--skip-layer`` leaves out the
layers the model should not take, ``--source-prefix`` takes the tensors under one name, without it.

Both read the kept tensors into memory (as the library's own fix, a dict of the arrays, does) and hand
:func:`weightport.load` a source named after the file, so its messages still say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightport.cli.factories import UsageError

__all__ = ["source_part"]


def source_part(path: str, skip_layers: Sequence[str] | None, prefix: str | None) -> tuple[Any, str | None]:
    """The source to load (``path`` itself, or the part of it the flags keep) and the layout the file
    declares where a part loses it (a plain mapping knows no layout: a Keras file's part is still Keras's)."""
    if not skip_layers and not prefix:
        return path, None
    from weightport.layouts import get_layout
    from weightport.sources import open_source
    from weightport.sources.mapping import MappingSource

    with open_source(path) as source:
        declared = str(source.metadata.get("layout", "torch"))
        names = list(source.infos)
        said = []
        if skip_layers:
            layers = {
                str(layer.get("name")): list(layer.get("tensors") or [])
                for layer in get_layout(declared).describe(source)
            }
            for name in skip_layers:
                if name not in layers:
                    known = ", ".join(layers) or "none: its tensors are loaded by name"
                    raise UsageError(
                        f"--skip-layer {name}: {source.description} has no layer '{name}' (its layers: {known}). "
                        f"Fix: name one of its layers (weightport inspect {path} lists them)."
                    )
            dropped = {tensor for name in skip_layers for tensor in layers[name]}
            names = [n for n in names if n not in dropped]
            said.append(f"without {', '.join(repr(n) for n in skip_layers)}")
        renamed = {n: n for n in names}
        if prefix:
            renamed = {n[len(prefix) :]: n for n in names if n.startswith(prefix) and len(n) > len(prefix)}
            if not renamed:
                first = ", ".join(repr(n) for n in names[:3])
                raise UsageError(
                    f"--source-prefix {prefix}: no tensor of {source.description} starts with it (its names: "
                    f"{first}{' ...' if len(names) > 3 else ''}). Fix: give the start its names share, or drop the flag."
                )
            said.append(f"under '{prefix}'")
        arrays = {new: source.read(old) for new, old in renamed.items()}
        description = f"{source.description} ({', '.join(said)})"
        # what a transformers snapshot says of its model (GPT-2's Conv1D weights are stored (in, out))
        facts: dict[str, Any] = {
            k: source.metadata[k] for k in ("model_type", "architectures") if k in source.metadata
        }
    part = MappingSource.from_mapping(arrays, description=description)
    part.metadata.update(facts)
    return part, (declared if declared != "torch" else None)


def torch_names_hint(source: Any, layout: str | None, model: Any, prefix: str | None) -> Any:
    """The likely cause of a refused ``--layout keras|flax|onnx`` load whose file holds PyTorch state-dict
    names that the model has (a ``Problem`` to list first), else None.

    The library's own hint covers the reverse (``--layout torch`` on a Keras file): its file declares
    a layout; a file of PyTorch names declares none, so their names are compared here.
    """
    if layout in (None, "torch"):
        return None
    from weightport.errors import Problem
    from weightport.sources import open_source

    wanted = [n for n in model.state_dict() if not prefix or n.startswith(prefix)]
    wanted_set = {n[len(prefix) :] if prefix else n for n in wanted}
    with open_source(source) as src:
        if str(src.metadata.get("layout", "torch")) != "torch":
            return None  # the file declares its layout: the library says so itself
        names = list(src.infos)
        matched = [n for n in names if n in wanted_set]
        description = src.description
    if not matched or len(matched) * 2 < len(names):
        return None
    return Problem(
        "(layout)",
        f"names in the '{layout}' layout",
        f"PyTorch state-dict names in {description} ({', '.join(repr(n) for n in matched[:2])}"
        f"{' ...' if len(matched) > 2 else ''}: {len(matched)} of its {len(names)} names are the model's own)",
        f"drop layout='{layout}' (or pass layout='torch'): the file is in PyTorch's layout",
    )
