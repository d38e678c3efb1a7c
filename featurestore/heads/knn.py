"""The kNN head: a weighted vote of the k nearest train rows by cosine, DINOv2's kNN evaluation of frozen features.

Features are L2-normalised; a query's k nearest train rows by cosine similarity ``s`` each vote for their class with
weight ``exp(s / T)``; the votes summed per class and normalised are its probabilities. The head's ``normalize``
setting does not apply: the cosine of the raw features is the method (measured on the default image store, 500 val
rows: standardising the features first scored 0.800 at best against 0.806 without).

k and the temperature T are chosen on validation through the head protocol (``selection.py``, the family in
``families.py``): every pair of :data:`K_GRID` (capped by the train rows) and :data:`TEMPERATURES` is scored from one
neighbour search of the val rows among the train rows (:func:`sweep_knn`); ties are broken towards DINOv2's
T = 0.07, then the larger k (the smoother vote; :func:`choose_knn`). The chosen pair is refitted on train+val, which
for a kNN head is storing those rows, unit-normalised, in the head file (:class:`KNNClassifier`).

Neighbours are ranked by similarity, equal similarities by train row (the lower row first), as ONNX's ``TopK`` ranks
them, so the exported graph (``deploy/knn_export.py``) picks the same neighbours.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ..errors import FeaturestoreError
from ..utils.console import progress_bar

# k swept on validation (DINOv2 reports 10, 20, 100 and 200), each capped by the train rows.
K_GRID = (5, 10, 20, 50, 100, 200)
# Temperatures swept: DINOv2's 0.07 among values up to a decade either side (the default stores chose 0.07 for the
# images, 0.5 for the texts, whose MiniLM similarities spread less; beyond 0.5 the text store's accuracy fell).
TEMPERATURES = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5)
DEFAULT_TEMPERATURE = 0.07
# Similarities held at once while searching, queries x train rows: 16 MiB of float32 (and twice that in the running
# counts that rank equal similarities).
BLOCK_VALUES = 1 << 22


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows of X (N, D) divided by their L2 norm (at least 1e-12, as scikit-learn's ``Normalizer``), float32."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.float32(1e-12))


def nearest(similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of ``similarities`` (N, M) and their columns: values (N, k) float32 descending and
    indices (N, k) int64; equal values in column order (ONNX ``TopK``'s order). k is capped by M."""
    n, m = similarities.shape
    k = min(int(k), m)
    if k < m:  # the k-th largest value, then every column above it and the first columns equal to it
        kth = np.partition(similarities, m - k, axis=1)[:, m - k, None]
        above = similarities > kth
        equal = similarities == kth
        chosen = above | (equal & (np.cumsum(equal, axis=1) <= (k - above.sum(axis=1))[:, None]))
        indices = np.nonzero(chosen)[1].reshape(n, k)  # k per row, in column order
    else:
        indices = np.broadcast_to(np.arange(m), (n, m))
    values = np.take_along_axis(similarities, indices, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # stable: equal values keep column order
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1).astype(np.int64)


def vote(values: np.ndarray, labels: np.ndarray, n_classes: int, temperature: float,
         valid: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities (N, n_classes) float64 from each query's neighbours: similarities ``values`` (N, k) and
    the neighbours' ``labels`` (N, k) int in [0, n_classes); ``valid`` (N, k) bool, the neighbours that count
    (default all; a row with none gets the uniform vote: the audit's graph pads short lists). Weights
    ``exp((s - s_max) / T)``: the shift by the nearest neighbour's similarity cancels in the normalisation and keeps
    small T from overflowing."""
    values = values.astype(np.float64)
    valid = np.ones(values.shape, bool) if valid is None else valid
    top = np.where(valid, values, -np.inf).max(axis=1, initial=-np.inf, keepdims=True)
    weights = np.where(valid, np.exp((values - np.where(np.isfinite(top), top, 0)) / temperature), 0.0)
    n = len(values)
    cells = (np.arange(n)[:, None] * n_classes + np.where(valid, labels, 0)).ravel()
    votes = np.bincount(cells, weights.ravel(), minlength=n * n_classes).reshape(n, n_classes)
    totals = votes.sum(axis=1, keepdims=True)
    return np.where(totals > 0, votes / np.where(totals > 0, totals, 1), 1.0 / n_classes)


def search(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest` of unit ``queries`` (N, D) among unit ``rows`` (M, D), both float32, in blocks of queries
    holding at most :data:`BLOCK_VALUES` similarities: values (N, k') float32 and indices (N, k') int64,
    k' = min(k, M)."""
    block = max(1, BLOCK_VALUES // max(1, len(rows)))
    found = [nearest(queries[start:start + block] @ rows.T, k) for start in range(0, len(queries), block)]
    if not found:
        k = min(int(k), len(rows))
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """The kNN head's estimator: ``fit`` stores the train rows unit-normalised, ``predict_proba`` votes.

    Fitted: ``rows_`` (M, D) float32 unit rows, ``labels_`` (M,) int64 positions in ``classes_`` (the labels seen,
    ascending), ``n_features_in_``. ``k`` is capped by M at prediction."""

    def __init__(self, k: int = 20, temperature: float = DEFAULT_TEMPERATURE):
        self.k = k
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNClassifier:
        """X (M, D) float, y (M,) labels."""
        self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
        self.labels_ = labels.astype(np.int64)
        self.rows_ = unit_rows(X)
        self.n_features_in_ = self.rows_.shape[1]
        return self

    def neighbours(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k nearest stored rows: similarities (N, k') float32 descending, row indices (N, k') int64."""
        return search(unit_rows(X), self.rows_, self.k)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, len(classes_)) float64 for features X (N, D)."""
        values, indices = self.neighbours(X)
        return vote(values, self.labels_[indices], len(self.classes_), self.temperature)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def candidate_ks(n_train: int) -> list[int]:
    """The k values swept for ``n_train`` train rows: :data:`K_GRID` capped by it (each once)."""
    return sorted({min(k, n_train) for k in K_GRID})


def sweep_knn(X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, progress: bool = False) -> list[dict]:
    """Validation accuracy of every (k, temperature): ``[{"k", "temperature", "val_accuracy", "seconds"}]``, from one
    search of the val rows Xv (N, D) among the train rows X (M, D) (float), labels y (M,) and yv (N,) int. A point's
    seconds are its vote plus its share of the search."""
    started = time.perf_counter()
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    ks = candidate_ks(len(y))
    values, indices = search(unit_rows(Xv), unit_rows(X), max(ks))
    neighbour_labels = labels[indices]
    share = (time.perf_counter() - started) / (len(ks) * len(TEMPERATURES))
    sweep = []
    with progress_bar(len(ks), "sweep k, T (knn)", unit="k", enabled=progress, leave=False) as bar:
        for k in ks:
            for temperature in TEMPERATURES:
                began = time.perf_counter()
                proba = vote(values[:, :k], neighbour_labels[:, :k], len(classes), temperature)
                accuracy = float(np.mean(classes[proba.argmax(axis=1)] == yv))
                sweep.append({"k": int(k), "temperature": float(temperature), "val_accuracy": accuracy,
                              "seconds": round(share + time.perf_counter() - began, 4)})
            bar.update(1)
    return sweep


def choose_knn(sweep: list[dict]) -> dict:
    """The chosen ``{"k", "temperature"}``: the best validation accuracy; among ties the temperature nearest
    :data:`DEFAULT_TEMPERATURE` (in log scale), then the larger k."""
    if not sweep:
        raise FeaturestoreError("no candidate settings were scored on validation")
    best = max(point["val_accuracy"] for point in sweep)
    tied = [point for point in sweep if point["val_accuracy"] == best]
    chosen = min(tied, key=lambda p: (abs(np.log(p["temperature"] / DEFAULT_TEMPERATURE)), -p["k"]))
    return {"k": chosen["k"], "temperature": chosen["temperature"]}


def knn_report(sweep: list[dict]) -> dict:
    """What the sweep covered (JSON-able): the ``k`` and ``temperature`` values swept, and ``on_edge``, the settings
    whose chosen value is the smallest or largest swept (``{"temperature": "up"}``: the best may lie beyond)."""
    chosen = choose_knn(sweep)
    report: dict = {"k": sorted({p["k"] for p in sweep}), "temperature": sorted({p["temperature"] for p in sweep})}
    edges = {}
    for key in ("k", "temperature"):
        swept = report[key]
        if len(swept) > 1 and chosen[key] in (swept[0], swept[-1]):
            edges[key] = "down" if chosen[key] == swept[0] else "up"
    return {**report, "on_edge": edges or None}
