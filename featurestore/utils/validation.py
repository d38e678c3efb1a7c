"""The one check of a setting's value: one of a set of choices, or inside a range. Every bad value raises
:class:`~featurestore.errors.BadValueError` (a ``ValueError`` too), which the CLI prints as one line, exit 2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from ..errors import BadValueError

T = TypeVar("T")


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``; else "<name> must be one of a, b, c, got 'x'"."""
    choices = tuple(choices)
    if value not in choices:
        raise BadValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` if ``low <= value <= high`` (``<`` where the end is open; None: unbounded); else an error that
    gives the interval, e.g. "crop_pct must be in (0, 1], got 2"."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise BadValueError(f"{name} must be in {interval}, got {value}")
    return value
