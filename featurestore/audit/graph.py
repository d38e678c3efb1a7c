"""The neighbour graph of a store's rows: every row's k most cosine-similar other rows, built once with faiss and
shared by the label-issue vote, the near-duplicates and the outlier scores.

Cosine similarity is the inner product of L2-normalised rows. Up to :data:`EXACT_MAX_ROWS` rows the search is exact
(``faiss.IndexFlatIP``); beyond it approximate (``faiss.IndexHNSWFlat``), and then its recall@k against exact search
is measured on :data:`RECALL_QUERIES` random query rows and recorded.

Why these (measured on this 2-core machine, 1,280-d clustered float32 rows, k = 20): exact search of every row took
0.45 s at 3,500 rows and 12.8 s at 20,000 with faiss, 0.85 s and 20.2 s with scikit-learn's brute-force
``NearestNeighbors`` (so faiss for both); HNSW (M 32, efConstruction 80, efSearch 64) took 9.8 s at 20,000 rows
(build 5.4 s, search 4.4 s) at recall 0.999. Exact search grows with N², HNSW about with N log N: past about 20,000
rows the approximate graph is the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_MAX_ROWS = 20_000
RECALL_QUERIES = 1_000
HNSW_M = 32  # links per node
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # candidates kept while searching; at least 2k is used


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


def unit_rows(X: np.ndarray) -> np.ndarray:
    """X (N, D) as float32 rows of length 1, C-contiguous (a row of zeros stays zeros); X itself when it already
    is (no copy of a large array that the caller normalised)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)):
        return X
    return X / np.maximum(norms, np.finfo(np.float32).tiny)


def neighbour_graph(X: np.ndarray, k: int = 20, exact_max_rows: int = EXACT_MAX_ROWS, seed: int = 0,
                    recall_queries: int = RECALL_QUERIES) -> NeighbourGraph:
    """The cosine k-nearest-neighbour graph of the rows of X (N, D) float, self-matches excluded.

    k is capped at N - 1. Exact up to ``exact_max_rows`` rows, HNSW beyond (module docstring); ``seed`` draws the
    query rows whose recall is measured.
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
    index = faiss.IndexHNSWFlat(units.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(units)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * (k + 1))
    indices, similarities = search_without_self(index, units, np.arange(n), k)
    recall = measure_recall(units, indices, similarities, recall_queries, seed)
    return NeighbourGraph(indices, similarities, "hnsw", recall)


def search_without_self(index, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best matches of ``queries`` (Q, D) unit float32 in ``index``, each query's own row ``rows`` (Q,) left
    out: (Q, k) int64 indices and float32 similarities. k + 1 are searched; where the query's own row is not among
    them (ties between identical rows), the last is dropped instead."""
    similarities, indices = index.search(queries, k + 1)
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
    exact = faiss.IndexFlatIP(units.shape[1])
    exact.add(units)
    _, exact_similarities = search_without_self(exact, units[picked], picked, k)
    boundary = exact_similarities[:, -1:] - 1e-6
    found = ((similarities[picked] >= boundary) & (indices[picked] >= 0)).sum(axis=1)
    return float(np.mean(np.minimum(found, k) / k))
