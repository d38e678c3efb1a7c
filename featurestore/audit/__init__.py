"""A data audit over a feature store: one neighbour graph (:mod:`.graph`), label issues ranked with cleanlab
(:mod:`.labels`), near-duplicates within and across splits (:mod:`.duplicates`: edited image copies by their pixels,
:mod:`.copies`; texts by shared word 5-grams, :mod:`.texts`), outliers (:mod:`.outliers`), a 2-D map
(:mod:`.projection`) and its HTML page (:mod:`.page`), the most likely issues shown (:mod:`.gallery`), the files
other tools read (:mod:`.reports`), and the front door :func:`audit_store` (:mod:`.run`), keyed to the store's rows
(:mod:`.rows`).
"""

from ..utils.lazy import lazy_exports

# Imported on first use: these modules pull in faiss, cleanlab, scikit-learn and umap-learn.
_HOMES = {
    "NEAR_DUPLICATE_SIMILARITY": "duplicates",
    "near_duplicates": "duplicates",
    "store_near_duplicates": "duplicates",
    "find_leaks": "duplicates",
    "audit_leaks": "duplicates",
    "threshold_for": "duplicates",
    "NeighbourGraph": "graph",
    "neighbour_graph": "graph",
    "LabelIssues": "labels",
    "audit_labels": "labels",
    "outlier_scores": "outliers",
    "draw_map": "projection",
    "embed_2d": "projection",
    "audit_store": "run",
}
__getattr__ = lazy_exports(__name__, _HOMES)
__all__ = list(_HOMES)
