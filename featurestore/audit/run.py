"""The front door: ``audit_store`` reads a store, builds its neighbour graph once, finds label issues,
near-duplicates and outliers from it, draws the map, and writes the files of :mod:`.reports` with ``summary.json``.

>>> summary = audit_store("data/features/fashion_mnist.h5", "data/reports/audit/fashion_mnist")

Results are keyed to the store (its fingerprint hash and a digest of its rows, :mod:`.rows`) and to the settings:
a rerun on an unchanged store with the same settings reads the written summary back (``"reused": true`` in what it
returns) unless ``force``. ``summary.json`` is written last, so a run killed half-way is never taken for a finished
one. Seconds per step are under ``seconds`` (routed apart from the summary in a pipeline stage, like every report's).

Memory: the out-of-fold head, the only user of the raw rows, runs first; the rows are then normalised where they lie
for the graph and what follows, so one (N, D) float32 array lives at a time (``benchmarks/audit_scale.py``: 100,000
x 1,280 rows, 512 MB, audited in at most 1.3 GB).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..configs import HEADS
from ..errors import BadValueError, FeaturestoreError
from ..store.hdf5 import FeatureStore
from ..utils.timings import read_json, write_json
from ..utils.validation import check_choice
from . import reports
from .duplicates import store_near_duplicates, threshold_for
from .gallery import GALLERY_ITEMS, draw_gallery, issue_captions
from .graph import EXACT_MAX_ROWS, neighbour_graph, unit_rows
from .labels import KNN_TEMPERATURE, fold_count, label_model, rank_labels
from .outliers import outlier_scores
from .page import PREVIEW_MAX_ROWS, item_previews, write_map_page
from .projection import MAP_MAX_ROWS, draw_map, embed_2d, map_sample
from .rows import load_rows, open_store, rows_digest

log = logging.getLogger("featurestore")

DEFAULT_K = 20
DEFAULT_FOLDS = 5
OUTPUTS = (reports.LABEL_ISSUES, reports.NEAR_DUPLICATES, reports.OUTLIERS, reports.SUGGESTED_CORRECTIONS, reports.MAP,
           reports.MAP_PAGE, reports.SUMMARY)
# What a change of the audit's method (not its settings) bumps: audits written by an earlier method are recomputed.
METHOD_VERSION = 2  # 2: near-duplicates by pixels / word 5-grams, graphs past EXACT_MAX_ROWS on principal components


def audit_settings(k: int, folds: int, threshold: float, seed: int, head: str = "logreg") -> dict:
    """What, besides the store, decides the results (recorded in the summary; a change recomputes)."""
    return {"k": int(k), "folds": int(folds), "near_duplicate_similarity": float(threshold), "seed": int(seed),
            "head": head,
            "knn_temperature": KNN_TEMPERATURE, "exact_max_rows": EXACT_MAX_ROWS, "map_max_rows": MAP_MAX_ROWS,
            "method_version": METHOD_VERSION}


def reusable(out_dir: Path, key: dict) -> dict | None:
    """The summary of an earlier audit in ``out_dir`` with this key and all its files, else None."""
    if not all((out_dir / name).is_file() for name in OUTPUTS):
        return None
    try:
        summary = read_json(out_dir / reports.SUMMARY)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) and summary.get("key") == key else None


def items_came_back(summary: dict, store: FeatureStore) -> bool:
    """Whether an audit that could not read the items (near-duplicates by the features' cosine, the fallback) now
    could: its source is there again, so the audit is redone rather than reused."""
    if summary.get("near_duplicates", {}).get("rule") != "features":
        return False
    try:
        store.source()
    except FeaturestoreError:
        return False
    return True


def audit_store(store_path: str | Path, out_dir: str | Path, k: int = DEFAULT_K, folds: int = DEFAULT_FOLDS,
                force: bool = False, threshold: float | None = None, seed: int = 0, head: str = "logreg") -> dict:
    """Audit the store at ``store_path`` into ``out_dir`` (created): ``label_issues.csv``, ``near_duplicates.csv``,
    ``outliers.csv``, ``suggested_corrections.csv`` (a corrections file to review: ``store.corrections``), ``map.png``
    and ``map.html`` (the map with each item on hover), ``label_issues.png`` (the most likely issues, shown) and
    ``summary.json``, whose content is returned (with ``"reused"``).

    ``k`` neighbours per row in the graph; ``folds`` stratified folds of the out-of-fold head (fewer where a class
    has fewer items); ``threshold`` the near-duplicate rule's similarity (default: the store's modality's,
    ``duplicates.NEAR_DUPLICATE_SIMILARITY``: pixels for images, word 5-grams for texts, the features' cosine where
    the items cannot be read); ``seed`` for the folds, the recall queries and the map; ``head`` the head family whose
    out-of-fold probabilities judge the labels (logreg; any in-memory head: ``labels.head_label_model``).
    Raises :class:`~featurestore.errors.StoreError` for a missing or unreadable store or one without a train split,
    :class:`~featurestore.errors.BadValueError` for a class with a single labelled item.
    """
    if k < 1 or folds < 2:
        raise BadValueError(f"k must be at least 1 and folds at least 2, got k={k}, folds={folds}")
    store = open_store(store_path)
    out_dir = Path(out_dir)
    check_choice("head", head, HEADS)
    settings = audit_settings(k, folds, threshold_for(store.fingerprint) if threshold is None else threshold, seed,
                              head)
    key = {"fingerprint_hash": store.fingerprint_hash, "rows_sha256": rows_digest(store), "settings": settings}
    earlier = None if force else reusable(out_dir, key)
    if earlier is not None and not items_came_back(earlier, store):
        log.info("%s: unchanged since the audit in %s (fingerprint %s): reusing it", store.path, out_dir,
                 store.fingerprint_hash)
        return {**earlier, "reused": True}
    try:  # before any work: a class too small for out-of-fold probabilities
        folds = fold_count(np.concatenate([store.labels(split) for split in store.splits]), store.class_names, folds)
    except BadValueError as exc:
        raise BadValueError(f"{store.path}: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / reports.SUMMARY).unlink(missing_ok=True)  # until the new one is written, nothing here is reusable
    (out_dir / reports.ISSUE_GALLERY).unlink(missing_ok=True)  # drawn only where the items can be read
    summary = run_audit(store, out_dir, {**settings, "folds": folds})
    summary = {"store": str(store.path), "key": key, **summary, "reused": False}
    write_json(out_dir / reports.SUMMARY, summary)
    return summary


def run_audit(store: FeatureStore, out_dir: Path, settings: dict) -> dict:
    """Every step of the audit on ``store`` (already checked), writing its files but the summary; returns the
    summary's content."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:  # a step timed in two parts adds them up
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(seconds.get(step, 0.0) + now - clock, 3)
        log.info("audit: %s: %.1f s", step.replace("_", " "), now - clock)
        clock = now

    rows = load_rows(store)
    lap("load")
    model = label_model(rows.features, rows.labels, rows.class_names, settings["folds"], settings["seed"],
                        settings["head"])
    lap("label_issues")
    # The head was the only reader of the raw rows: normalised where they lie, one (N, D) array lives at a time.
    units = unit_rows(rows.features, in_place=True)
    lap("load")
    graph = neighbour_graph(units, settings["k"], seed=settings["seed"])
    lap("graph")
    issues = rank_labels(model, rows.labels, graph, rows.class_names)
    reports.write_csv(out_dir / reports.LABEL_ISSUES, reports.label_issue_rows(
        issues.order, rows.paths, rows.splits, rows.labels, issues.suggested, issues.scores, issues.is_issue,
        rows.class_names))
    lap("label_issues")
    found = store_near_duplicates(store, graph, settings["near_duplicate_similarity"])
    pairs, similarities = found.pairs, found.similarities
    reports.write_csv(out_dir / reports.NEAR_DUPLICATES,
                      reports.duplicate_rows(pairs, similarities, rows.paths, rows.splits))
    lap("near_duplicates")
    outliers = outlier_scores(graph, units, rows.labels)
    reports.write_csv(out_dir / reports.OUTLIERS, reports.outlier_rows(outliers, rows.paths, rows.splits))
    reports.write_csv(out_dir / reports.SUGGESTED_CORRECTIONS, reports.suggested_correction_rows(
        issues.order, rows.paths, rows.splits, rows.labels, issues.suggested, issues.is_issue, rows.class_names,
        pairs, similarities))
    lap("outliers")
    duplicated = np.zeros(len(rows.labels), bool)
    duplicated[pairs.ravel()] = True
    sample = map_sample(len(rows.labels), issues.is_issue | duplicated, seed=settings["seed"])
    coordinates = embed_2d(units[sample], settings["seed"])
    title = f"{store.path.name} ({store.fingerprint_hash}): {len(sample)} of {len(rows.labels)} items, UMAP"
    draw_map(coordinates, rows.labels[sample], rows.class_names, issues.is_issue[sample], duplicated[sample],
             out_dir / reports.MAP, title=title)
    lap("map")
    flagged = (issues.is_issue | duplicated)[sample]
    shown = np.sort(np.concatenate([sample[flagged], sample[~flagged]])[:PREVIEW_MAX_ROWS])  # the flagged first
    top = issues.order[:GALLERY_ITEMS]
    previewed = np.union1d(shown, top)  # the items are read once, for the page and the gallery
    previews = dict(zip(previewed.tolist(), item_previews(store, rows.splits, rows.paths, previewed), strict=True))
    on_page = set(shown.tolist())
    write_map_page(out_dir / reports.MAP_PAGE, coordinates, rows.labels[sample], issues.suggested[sample],
                   rows.class_names, rows.splits[sample], rows.paths[sample], issues.is_issue[sample],
                   duplicated[sample], [previews[row] if row in on_page else None for row in sample.tolist()], title)
    top_previews = [previews[row] for row in top.tolist()]
    draw_gallery(top_previews, issue_captions(top, rows.paths, rows.labels, issues.suggested, rows.class_names),
                 out_dir / reports.ISSUE_GALLERY, f"{store.path.name}: the {len(top)} most likely label issues")
    lap("pages")
    return {
        "rows": rows.counts,
        "classes": len(rows.class_names),
        "graph": {"kind": graph.kind, "k": graph.k, "recall": graph.recall},
        "label_issues": {"ranked": int(len(issues.order)), "flagged": int(issues.is_issue.sum()),
                         "flagged_by_split": split_counts(rows.splits, issues.is_issue, rows.counts),
                         "head": issues.head, "settings": issues.settings, "C": issues.C, "folds": issues.folds},
        "near_duplicates": {"threshold": found.threshold, "rule": found.rule, "pairs": int(len(pairs)),
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
