"""``python -m weightport``: the same command line as ``weightport``."""

from weightport.cli import main

raise SystemExit(main())
