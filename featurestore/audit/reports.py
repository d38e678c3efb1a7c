"""The audit's files, written whole and atomically, for other tools to read: CSVs (columns in :data:`COLUMNS`) with
item paths exactly as the store records them, among them ``suggested_corrections.csv``, a corrections file
(``store.corrections``: ``extract --exclude``, ``train-head --exclude``, the pipeline's ``configs/corrections``) to
review before use. The summary, the map and its page are written by :mod:`.run`, :mod:`.projection` and :mod:`.page`.
"""

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
MAP_PAGE = "map.html"
ISSUE_GALLERY = "label_issues.png"
SUGGESTED_CORRECTIONS = "suggested_corrections.csv"
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given", "suggested", "score", "is_issue"),
    NEAR_DUPLICATES: ("path", "split", "duplicate_path", "duplicate_split", "similarity"),
    OUTLIERS: ("path", "split", "score"),
    SUGGESTED_CORRECTIONS: ("path", "label", "reason"),  # a corrections file (store.corrections), to review
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


def suggested_correction_rows(order: np.ndarray, paths: np.ndarray, splits: np.ndarray, given: np.ndarray,
                              suggested: np.ndarray, is_issue: np.ndarray, class_names: list[str],
                              pairs: np.ndarray, similarities: np.ndarray, test_split: str = "test",
                              relabel_split: str = "train") -> Iterable[tuple]:
    """What the audit would correct: every flagged label issue of ``relabel_split`` relabelled to its suggested class
    (most likely issue first, ``order`` being the ranking), then the ``test_split`` side of every near-duplicate pair
    across it and another split left out (a leak: the test item scores what training saw). An item is listed once.
    Issues flagged in val and test are not suggested: relabelling them to what a head on these very features predicts
    would raise that head's own scores; they are for a person to look at (``label_issues.csv``)."""
    listed: set[str] = set()
    for row in order:
        if (is_issue[row] and splits[row] == relabel_split and suggested[row] != given[row]
                and paths[row] not in listed):
            listed.add(paths[row])
            yield (paths[row], class_names[suggested[row]],
                   f"label issue: labelled {class_names[given[row]]}, looks {class_names[suggested[row]]}")
    for (first, second), similarity in zip(pairs, similarities, strict=True):
        if (splits[first] == test_split) == (splits[second] == test_split):
            continue
        leak, original = (first, second) if splits[first] == test_split else (second, first)
        if paths[leak] not in listed:
            listed.add(paths[leak])
            yield paths[leak], "", f"near-duplicate of {splits[original]} item {paths[original]} ({number(similarity)})"

