"""Re-exports imported on first use, for the subpackages whose modules pull in torch or scikit-learn: a stage
that only reads a JSON report, or skips its work, should not pay seconds of imports for names it never uses."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: name → ``getattr(<homes[name]>, name)``, the home module relative to
    ``package`` (``"train"``: ``package.train``; ``".configs"``: its parent's ``configs``), imported when
    first asked for (PEP 562)."""
    def __getattr__(name: str) -> object:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{homes[name]}", package), name)

    return __getattr__
