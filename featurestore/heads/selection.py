"""Settings chosen on validation: the one protocol every head follows.

A head family (:class:`HeadFamily`, one per ``HeadConfig.head``) offers candidate settings, a sweep: each candidate is
fitted on the train split and scored on the val split, giving a **sweep point**, the settings (``{"C": 0.01}``; a kNN
head's would be ``{"k": 20, "temperature": 0.07}``, a multi-layer head's its layers) plus ``val_accuracy`` and
``seconds``. The best validation accuracy wins; among ties the family's :attr:`HeadFamily.prefer` order picks the
simplest (for C the smallest, the most regularised). The chosen settings are refitted on train+val.

What a family returns (:class:`Fitted`) is what a head records: its settings and its whole sweep, so reports, the
verdict and later candidates look up what was chosen and how it scored without knowing which settings a family has.
Families register by head name (``families.register_family``), where the built-in ones (the C-swept heads and the
streamed ``sgd_logreg``) are registered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import FeaturestoreError

# The keys of a sweep point that are scores, not settings.
SCORE_KEYS = ("val_accuracy", "seconds")
DIRECTIONS = ("min", "max")


def settings_of(point: dict) -> dict:
    """The settings of a sweep point: every key but the scores (:data:`SCORE_KEYS`)."""
    return {key: value for key, value in point.items() if key not in SCORE_KEYS}


def choose_point(sweep: Sequence[dict], prefer: Sequence[tuple[str, str]]) -> dict:
    """The sweep point with the best ``val_accuracy``; among ties the first by ``prefer``, a sequence of
    ``(setting, "min" | "max")`` applied in order (a setting a point lacks sorts last)."""
    if not sweep:
        raise FeaturestoreError("no candidate settings were scored on validation")
    for key, direction in prefer:
        if direction not in DIRECTIONS:
            raise FeaturestoreError(f"preference {key}: {direction!r} is not one of {DIRECTIONS}")
    best = max(point["val_accuracy"] for point in sweep)
    tied = [point for point in sweep if point["val_accuracy"] == best]

    def order(point: dict) -> tuple:
        return tuple((key not in point, (1 if direction == "min" else -1) * point.get(key, 0))
                     for key, direction in prefer)

    return min(tied, key=order)


def point_of(sweep: Sequence[dict], settings: dict) -> dict | None:
    """The sweep point scored at ``settings`` (numbers compared to 1e-9 relative), None if the sweep has none."""
    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b

    for point in sweep:
        if settings_of(point).keys() == settings.keys() and all(same(point[k], v) for k, v in settings.items()):
            return point
    return None


def validation_accuracy(sweep: Sequence[dict], settings: dict) -> float:
    """The validation accuracy of ``settings`` in ``sweep`` (a fit on train alone, scored on val); NaN if not swept."""
    point = point_of(sweep, settings)
    return float(point["val_accuracy"]) if point is not None else float("nan")


@dataclass
class Fitted:
    """What a head family's training gives: ``estimator`` (features (N, D) float32 → probabilities over the
    classes it saw), refitted on train+val at ``settings``; ``sweep``, every candidate's point; ``n_train``, the
    rows of the refit; ``report``, the family's account of its search (JSON-able, e.g. the C grid's edges)."""

    estimator: object
    settings: dict
    sweep: list[dict]
    n_train: int
    report: dict | None = None


class HeadFamily:
    """A kind of head: how its candidate settings are swept on validation and how the chosen ones are refitted.

    ``prefer``: the tie-break among equal validation accuracies (:func:`choose_point`). Subclasses implement
    :meth:`train`; :meth:`build` makes an unfitted estimator at given settings (used to refit on train alone,
    e.g. for the verdict's per-item answers), :meth:`refit` fits it, and :meth:`refits` says whether that is
    possible."""

    prefer: tuple[tuple[str, str], ...] = (("C", "min"),)

    def train(self, store, config, progress: bool = False) -> Fitted:
        raise NotImplementedError

    def refits(self) -> bool:
        """Whether :meth:`build` makes an in-memory estimator (a streamed head is not refitted in memory)."""
        return True

    def build(self, config, settings: dict):
        raise NotImplementedError

    def refit(self, config, settings: dict, X, y):
        """The head at ``settings``, fitted on rows X (N, D) float32, y (N,) int (train+val for the head itself,
        train alone for the verdict's answers)."""
        raise NotImplementedError

    def choose(self, sweep: Sequence[dict]) -> dict:
        """The chosen settings of a sweep."""
        return settings_of(choose_point(sweep, self.prefer))
