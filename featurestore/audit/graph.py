"""The neighbour graph of a store's rows: every row's k most cosine-similar other rows, built once with faiss and
shared by the label-issue vote, the near-duplicates and the outlier scores.

Cosine similarity is the inner product of L2-normalised rows. Up to :data:`EXACT_MAX_ROWS` rows the search is exact
(``faiss.IndexFlatIP``). Beyond it, approximate: the rows' first :data:`REDUCED_DIMS` principal components (PCA fitted
on a sample of :data:`PCA_SAMPLE_ROWS` rows; rows of no more dimensions are used as they are) go into a
``faiss.IndexHNSWFlat`` (L2, which on unit rows orders as cosine), each row's :data:`CANDIDATES` × (k + 1) nearest
there are re-ranked by their exact cosine similarity in all dimensions, and the graph's recall@k against exact
search is measured on :data:`RECALL_QUERIES` random query rows and recorded. Similarities in the graph are exact
either way (the near-duplicate threshold compares them).

Why these (measured on this 2-core machine, 1,280-d clustered float32 rows, k = 20): exact search of every row took
0.45 s at 3,500 rows and 12.8 s at 20,000 with faiss, 0.85 s and 20.2 s with scikit-learn's brute-force
``NearestNeighbors`` (so faiss for both); HNSW (M 32, efConstruction 80, efSearch 64) took 9.8 s at 20,000 rows
(build 5.4 s, search 4.4 s) at recall 0.999. Exact search grows with N², HNSW about with N log N: past about 20,000
rows the approximate graph is the cheaper one. At 100,000 rows (``benchmarks/audit_scale.py``'s store, the machine
shared with other work) HNSW on all 1,280 dimensions took 107 CPU seconds at M 32, efConstruction 80, efSearch 128
(recall@10 0.998) and 49 at M 16, 40, 64 (0.982), and held a second copy of the rows (512 MB); on 256 principal
components with the re-ranking, at M 16, 40, 64, 13-23 s wall (PCA 1-2 s, build 3-6, search 5-12, re-ranking 1.3,
the recall measured 1.3) at recall@10 0.987 (recall@20 0.975), the index 100 MB. Should a store's neighbours lie
beyond the components (its recall measured below :data:`RECALL_FLOOR`), the graph is rebuilt on all dimensions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("featurestore")

EXACT_MAX_ROWS = 20_000
RECALL_QUERIES = 1_000
RECALL_FLOOR = 0.95  # a graph on the principal components measured below this is rebuilt on all dimensions
REDUCED_DIMS = 256  # principal components the approximate search runs on
PCA_SAMPLE_ROWS = 20_000
HNSW_M = 16  # links per node
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64  # candidates kept while searching; at least the candidates wanted
CANDIDATES = 2  # × (k + 1) approximate neighbours re-ranked exactly
NORM_ROWS = 4_096  # rows whose lengths, or whose covariance, are computed at a time


@dataclass
class NeighbourGraph:
    """indices (N, k) int64: row i's neighbours, most similar first, never i itself (-1 where the approximate
    search found fewer than k); similarities (N, k) float32 cosine (-1 where the index is -1); ``kind`` ``"exact"``
    or ``"hnsw"``; ``recall`` the measured recall@k against exact search (1.0 for an exact graph)."""

    indices: np.ndarray
    similarities: np.ndarray
    kind: str
    recall: float

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def unit_rows(X: np.ndarray, in_place: bool = False) -> np.ndarray:
    """X (N, D) as float32 rows of length 1, C-contiguous (a row of zeros stays zeros); X itself when it already
    is (no copy of a large array that the caller normalised). With ``in_place``, a float32 C-contiguous X is
    normalised where it lies (for a caller done with the raw rows: no second (N, D) array)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.empty((X.shape[0], 1), np.float32)
    for start in range(0, X.shape[0], NORM_ROWS):  # np.linalg.norm squares its whole input first
        norms[start:start + NORM_ROWS] = np.linalg.norm(X[start:start + NORM_ROWS], axis=1, keepdims=True)
    if np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)):
        return X
    return np.divide(X, np.maximum(norms, np.finfo(np.float32).tiny), out=X if in_place else None)


def neighbour_graph(X: np.ndarray, k: int = 20, exact_max_rows: int = EXACT_MAX_ROWS, seed: int = 0,
                    recall_queries: int = RECALL_QUERIES) -> NeighbourGraph:
    """The cosine k-nearest-neighbour graph of the rows of X (N, D) float, self-matches excluded.

    k is capped at N - 1. Exact up to ``exact_max_rows`` rows, approximate beyond (module docstring); ``seed``
    draws the PCA sample and the query rows whose recall is measured.
    """
    import faiss

    units = unit_rows(X)
    n = units.shape[0]
    k = max(0, min(int(k), n - 1))
    if k == 0:
        return NeighbourGraph(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32), "exact", 1.0)
    if n <= exact_max_rows:
        index = faiss.IndexFlatIP(units.shape[1])
        index.add(units)
        indices, similarities = search_without_self(index, units, np.arange(n), k)
        return NeighbourGraph(indices, similarities, "exact", 1.0)
    indices, similarities = approximate_neighbours(units, k, seed, REDUCED_DIMS)
    recall = measure_recall(units, indices, similarities, recall_queries, seed)
    if recall < RECALL_FLOOR and units.shape[1] > REDUCED_DIMS:
        log.warning("neighbour graph: recall@%d %.3f on %d principal components, below %.2f: searching all %d "
                    "dimensions", k, recall, REDUCED_DIMS, RECALL_FLOOR, units.shape[1])
        indices, similarities = approximate_neighbours(units, k, seed, None)
        recall = measure_recall(units, indices, similarities, recall_queries, seed)
    return NeighbourGraph(indices, similarities, "hnsw", recall)


def principal_axes(units: np.ndarray, dims: int, seed: int = 0, sample_rows: int = PCA_SAMPLE_ROWS) -> np.ndarray:
    """(D, dims) float32: the first ``dims`` principal axes of the rows of ``units`` (N, D), from the covariance
    (float64, summed :data:`NORM_ROWS` rows at a time) of ``sample_rows`` rows drawn with ``seed``."""
    n, d = units.shape
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_rows), replace=False))
    mean = units[picked].mean(axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    for start in range(0, len(picked), NORM_ROWS):
        block = units[picked[start:start + NORM_ROWS]].astype(np.float64) - mean
        scatter += block.T @ block
    _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    return np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)


def approximate_neighbours(units: np.ndarray, k: int, seed: int = 0,
                           dims: int | None = REDUCED_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest other rows of ``units`` (N, D) unit float32 by HNSW on their first ``dims``
    principal components (None, or D no more than ``dims``: on the rows themselves) and exact re-ranking (module
    docstring): (N, k) int64 indices and float32 cosine similarities, -1 where fewer than k were found."""
    import faiss

    n, d = units.shape
    reduced = units @ principal_axes(units, dims, seed) if dims is not None and d > dims else units
    index = faiss.IndexHNSWFlat(reduced.shape[1], HNSW_M)  # L2: translation-free, so no centring needed
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(reduced)
    wanted = min(n, CANDIDATES * (k + 1))
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, wanted)
    _, candidates = index.search(reduced, wanted)
    del index, reduced
    return rerank(units, candidates, k)


def rerank(units: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar of each row's ``candidates`` (N, C) int64 row indices (-1: none) among the rows of
    ``units`` (N, D) unit float32, the row itself left out, most similar first (ties in candidate order): (N, k)
    int64 indices and float32 similarities, -1 and -1.0 past the valid candidates. The products come from faiss
    (``fvec_inner_products_by_idx``: no (N, C, D) gather of the candidates' rows)."""
    import faiss

    units = np.ascontiguousarray(units, dtype=np.float32)
    n, width = candidates.shape
    found = np.ascontiguousarray(candidates, dtype=np.int64)
    looked_up = np.maximum(found, 0)
    exact = np.empty((n, width), np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(exact), faiss.swig_ptr(units), faiss.swig_ptr(units),
                                     faiss.swig_ptr(looked_up), units.shape[1], n, width)
    valid = (found >= 0) & (found != np.arange(n)[:, None])
    order = np.argsort(np.where(valid, -exact, np.inf), axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(valid, order, axis=1)
    indices = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
    similarities = np.where(kept, np.take_along_axis(exact, order, axis=1), -1.0).astype(np.float32)
    return indices, similarities


def search_without_self(index, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best matches of ``queries`` (Q, D) unit float32 in ``index``, each query's own row ``rows`` (Q,) left
    out: (Q, k) int64 indices and float32 similarities. k + 1 are searched; where the query's own row is not among
    them (ties between identical rows), the last is dropped instead."""
    similarities, indices = index.search(queries, k + 1)
    return without_self(similarities, indices, rows, k)


def without_self(similarities: np.ndarray, indices: np.ndarray, rows: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k + 1 best matches (Q, k + 1) of queries whose own rows are ``rows`` (Q,), less the query's own row (or,
    where it is not among them, the last): (Q, k) int64 indices and float32 similarities."""
    keep = indices != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept columns, in their order
    indices = np.take_along_axis(indices, order, axis=1).astype(np.int64)
    similarities = np.take_along_axis(similarities, order, axis=1).astype(np.float32)
    similarities[indices < 0] = -1.0
    return indices, similarities


def measure_recall(units: np.ndarray, indices: np.ndarray, similarities: np.ndarray, queries: int,
                   seed: int) -> float:
    """recall@k of an approximate graph against exact search on ``queries`` random rows of ``units`` (N, D).

    A neighbour counts as found when its similarity reaches the exact k-th neighbour's (less 1e-6): rows tied at the
    boundary are interchangeable, so a tie broken differently is no miss."""
    import faiss

    n, k = indices.shape
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    # faiss.knn searches the rows where they lie (an index would hold a copy of them)
    found_similarities, found_indices = faiss.knn(units[picked], units, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, exact_similarities = without_self(found_similarities, found_indices, picked, k)
    boundary = exact_similarities[:, -1:] - 1e-6
    found = ((similarities[picked] >= boundary) & (indices[picked] >= 0)).sum(axis=1)
    return float(np.mean(np.minimum(found, k) / k))
