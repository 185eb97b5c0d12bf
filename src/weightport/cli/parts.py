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
