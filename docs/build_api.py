"""Build the API reference, a static HTML site made from the docstrings, with pdoc.

Run: python docs/build_api.py [OUT]   (OUT defaults to build/api; open OUT/index.html)

`scripts/test` runs it before the tests; it fails on any warning pdoc gives (a name in `__all__`
that does not resolve, a docstring it cannot convert), so the reference never silently loses a name.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

# The public API (`weightport`, with its submodules `rnn` and `reference`); the layouts, whose
# `export` writes a framework's layout back; and the registry a new file format is added through.
MODULES = [
    "weightport",
    "weightport.layouts",
    "weightport.layouts.keras",
    "weightport.layouts.flax",
    "weightport.layouts.onnx",
    "weightport.sources",
]


def build(out: Path) -> list[Path]:
    """Write the reference under ``out``; returns the pages written."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", footer_text="weightport API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=out)
    ours = [w for w in caught if "pdoc" in w.filename or issubclass(w.category, UserWarning)]
    if ours:
        raise SystemExit(
            "docs/build_api.py: pdoc warned, so the reference would be incomplete:\n"
            + "\n".join(f"  {w.category.__name__}: {w.message}" for w in ours)
        )
    return sorted(out.rglob("*.html"))


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "build/api")
    pages = build(out)
    print(f"API reference: {len(pages)} pages in {out}/ (open {out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
