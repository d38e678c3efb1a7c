"""The audit's files, written whole and atomically, for other tools to read: three CSVs (columns in
:data:`COLUMNS`) with item paths exactly as the store records them. The summary and the map are written by
:mod:`.run` and :mod:`.projection`."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path

LABEL_ISSUES = "label_issues.csv"
NEAR_DUPLICATES = "near_duplicates.csv"
OUTLIERS = "outliers.csv"
SUMMARY = "summary.json"
MAP = "map.png"
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given", "suggested", "score", "is_issue"),
    NEAR_DUPLICATES: ("path", "split", "duplicate_path", "duplicate_split", "similarity"),
    OUTLIERS: ("path", "split", "score"),
}


def write_csv(path: str | Path, rows: Iterable[tuple]) -> Path:
    """``rows`` under the header :data:`COLUMNS` names for ``path``'s file name, atomically. Returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS[Path(path).name])
        writer.writerows(rows)
    return Path(path)


def number(value: float) -> str:
    """A score as written: 6 significant digits."""
    return f"{float(value):.6g}"


def label_issue_rows(order: np.ndarray, paths: np.ndarray, splits: np.ndarray, given: np.ndarray,
                     suggested: np.ndarray, scores: np.ndarray, is_issue: np.ndarray,
                     class_names: list[str]) -> Iterable[tuple]:
    """One row per index of ``order`` (the ranking), given and suggested labels as class names."""
    for row in order:
        yield (paths[row], splits[row], class_names[given[row]], class_names[suggested[row]], number(scores[row]),
               "true" if is_issue[row] else "false")


def duplicate_rows(pairs: np.ndarray, similarities: np.ndarray, paths: np.ndarray,
                   splits: np.ndarray) -> Iterable[tuple]:
    """One row per pair (P, 2) of row indices, most similar first as given."""
    for (first, second), similarity in zip(pairs, similarities, strict=True):
        yield paths[first], splits[first], paths[second], splits[second], number(similarity)


def outlier_rows(scores: np.ndarray, paths: np.ndarray, splits: np.ndarray) -> Iterable[tuple]:
    """Every row, highest score first (ties in row order)."""
    for row in np.argsort(-scores, kind="stable"):
        yield paths[row], splits[row], number(scores[row])
