"""What the user sees on stderr: featurestore's log lines and progress bars with a rate."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True, leave: bool = True) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        leave=leave,
        mininterval=0.2 if interactive else 5.0,
        smoothing=0.1,
        dynamic_ncols=interactive,
    )


def setup_logging(level: int = logging.INFO) -> None:
    """Send featurestore's own log records to stderr. Other libraries' loggers (the ONNX exporter
    narrates every optimisation at INFO) are left at their defaults, i.e. warnings only."""
    logger = logging.getLogger("featurestore")
    if not any(getattr(handler, "_featurestore", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._featurestore = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
