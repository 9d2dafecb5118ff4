"""``python -m extproc serve ...`` is the same as ``prefix-router serve ...``."""

from .cli import main

raise SystemExit(main())
