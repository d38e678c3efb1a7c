"""Progress bars with a rate: live on a terminal, a line every few seconds in logs (DVC, CI)."""

from __future__ import annotations

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
