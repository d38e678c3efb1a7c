"""The front door: ``audit_store`` reads a store, builds its neighbour graph once, finds label issues,
near-duplicates and outliers from it, draws the map, and writes the files of :mod:`.reports` with ``summary.json``.

>>> summary = audit_store("data/features/fashion_mnist.h5", "data/reports/audit/fashion_mnist")

Results are keyed to the store (its fingerprint hash and a digest of its rows, :mod:`.rows`) and to the settings:
a rerun on an unchanged store with the same settings reads the written summary back (``"reused": true`` in what it
returns) unless ``force``. ``summary.json`` is written last, so a run killed half-way is never taken for a finished
one. Seconds per step are under ``seconds`` (routed apart from the summary in a pipeline stage, like every report's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import BadValueError
from ..store.hdf5 import FeatureStore
from ..utils.timings import read_json, write_json
from . import reports
from .duplicates import near_duplicates, threshold_for
from .graph import EXACT_MAX_ROWS, neighbour_graph, unit_rows
from .labels import KNN_TEMPERATURE, audit_labels, fold_count
from .outliers import outlier_scores
from .projection import MAP_MAX_ROWS, draw_map, embed_2d, map_sample
from .rows import load_rows, open_store, rows_digest

log = logging.getLogger("featurestore")

DEFAULT_K = 20
DEFAULT_FOLDS = 5
OUTPUTS = (reports.LABEL_ISSUES, reports.NEAR_DUPLICATES, reports.OUTLIERS, reports.MAP, reports.SUMMARY)


def audit_settings(k: int, folds: int, threshold: float, seed: int) -> dict:
    """What, besides the store, decides the results (recorded in the summary; a change recomputes)."""
    return {"k": int(k), "folds": int(folds), "near_duplicate_similarity": float(threshold), "seed": int(seed),
            "knn_temperature": KNN_TEMPERATURE, "exact_max_rows": EXACT_MAX_ROWS, "map_max_rows": MAP_MAX_ROWS}


def reusable(out_dir: Path, key: dict) -> dict | None:
    """The summary of an earlier audit in ``out_dir`` with this key and all its files, else None."""
    if not all((out_dir / name).is_file() for name in OUTPUTS):
        return None
    try:
        summary = read_json(out_dir / reports.SUMMARY)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) and summary.get("key") == key else None


def audit_store(store_path: str | Path, out_dir: str | Path, k: int = DEFAULT_K, folds: int = DEFAULT_FOLDS,
                force: bool = False, threshold: float | None = None, seed: int = 0) -> dict:
    """Audit the store at ``store_path`` into ``out_dir`` (created): ``label_issues.csv``, ``near_duplicates.csv``,
    ``outliers.csv``, ``map.png`` and ``summary.json``, whose content is returned (with ``"reused"``).

    ``k`` neighbours per row in the graph; ``folds`` stratified folds of the out-of-fold head (fewer where a class
    has fewer items); ``threshold`` the near-duplicates' cosine similarity (default: the store's modality's,
    ``duplicates.NEAR_DUPLICATE_SIMILARITY``); ``seed`` for the folds, the recall queries and the map.
    Raises :class:`~featurestore.errors.StoreError` for a missing or unreadable store or one without a train split,
    :class:`~featurestore.errors.BadValueError` for a class with a single labelled item.
    """
    if k < 1 or folds < 2:
        raise BadValueError(f"k must be at least 1 and folds at least 2, got k={k}, folds={folds}")
    store = open_store(store_path)
    out_dir = Path(out_dir)
    settings = audit_settings(k, folds, threshold_for(store.fingerprint) if threshold is None else threshold, seed)
    key = {"fingerprint_hash": store.fingerprint_hash, "rows_sha256": rows_digest(store), "settings": settings}
    if not force and (earlier := reusable(out_dir, key)) is not None:
        log.info("%s: unchanged since the audit in %s (fingerprint %s): reusing it", store.path, out_dir,
                 store.fingerprint_hash)
        return {**earlier, "reused": True}
    try:  # before any work: a class too small for out-of-fold probabilities
        folds = fold_count(np.concatenate([store.labels(split) for split in store.splits]), store.class_names, folds)
    except BadValueError as exc:
        raise BadValueError(f"{store.path}: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / reports.SUMMARY).unlink(missing_ok=True)  # until the new one is written, nothing here is reusable
    summary = run_audit(store, out_dir, {**settings, "folds": folds})
    summary = {"store": str(store.path), "key": key, **summary, "reused": False}
    write_json(out_dir / reports.SUMMARY, summary)
    return summary


def run_audit(store: FeatureStore, out_dir: Path, settings: dict) -> dict:
    """Every step of the audit on ``store`` (already checked), writing its files but the summary; returns the
    summary's content."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 3)
        clock = now
        log.info("audit: %s done in %.1f s", step.replace("_", " "), seconds[step])

    rows = load_rows(store)
    units = unit_rows(rows.features)
    lap("load")
    graph = neighbour_graph(units, settings["k"], seed=settings["seed"])
    lap("graph")
    issues = audit_labels(rows.features, rows.labels, graph, rows.class_names, settings["folds"], settings["seed"])
    reports.write_csv(out_dir / reports.LABEL_ISSUES, reports.label_issue_rows(
        issues.order, rows.paths, rows.splits, rows.labels, issues.suggested, issues.scores, issues.is_issue,
        rows.class_names))
    lap("label_issues")
    pairs, similarities = near_duplicates(graph, settings["near_duplicate_similarity"])
    reports.write_csv(out_dir / reports.NEAR_DUPLICATES,
                      reports.duplicate_rows(pairs, similarities, rows.paths, rows.splits))
    lap("near_duplicates")
    outliers = outlier_scores(graph, units, rows.labels)
    reports.write_csv(out_dir / reports.OUTLIERS, reports.outlier_rows(outliers, rows.paths, rows.splits))
    lap("outliers")
    duplicated = np.zeros(len(rows.labels), bool)
    duplicated[pairs.ravel()] = True
    sample = map_sample(len(rows.labels), issues.is_issue | duplicated, seed=settings["seed"])
    draw_map(embed_2d(units[sample], settings["seed"]), rows.labels[sample], rows.class_names,
             issues.is_issue[sample], duplicated[sample], out_dir / reports.MAP,
             title=f"{store.path.name} ({store.fingerprint_hash}): {len(sample)} of {len(rows.labels)} items, UMAP")
    lap("map")
    return {
        "rows": rows.counts,
        "classes": len(rows.class_names),
        "graph": {"kind": graph.kind, "k": graph.k, "recall": graph.recall},
        "label_issues": {"ranked": int(len(issues.order)), "flagged": int(issues.is_issue.sum()),
                         "flagged_by_split": split_counts(rows.splits, issues.is_issue, rows.counts),
                         "C": issues.C, "folds": issues.folds},
        "near_duplicates": {"threshold": settings["near_duplicate_similarity"], "pairs": int(len(pairs)),
                            "cross_split": int((rows.splits[pairs[:, 0]] != rows.splits[pairs[:, 1]]).sum()),
                            "by_splits": pair_counts(pairs, rows.splits)},
        "outliers": {"scored": int(len(outliers))},
        "map": {"rows": int(len(sample)), "file": reports.MAP},
        "seconds": seconds,
    }


def split_counts(splits: np.ndarray, flags: np.ndarray, counts: dict[str, int]) -> dict[str, int]:
    """{split: flagged rows} for every split of the store."""
    return {split: int(flags[splits == split].sum()) for split in counts}


def pair_counts(pairs: np.ndarray, splits: np.ndarray) -> dict[str, int]:
    """{"<split>/<split>": pairs}, the two split names sorted (``test/train``: a pair across them, a leak)."""
    found: dict[str, int] = {}
    for first, second in pairs:
        name = "/".join(sorted((splits[first], splits[second])))
        found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))
