"""Outliers: items far from their neighbours and from their class, scored from the neighbour graph.

The score of a row is ``1 - (mean similarity to its k neighbours + similarity to its class's centroid) / 2``
(cosine; the centroid is the mean of the class's unit rows, all splits, by given label), so it lies in [0, 2] and
higher is more isolated. The centroid term costs one pass over the rows; an item far from its class is often a label
issue as well, which the label-issue ranking says more precisely.
"""

from __future__ import annotations

import numpy as np

from .graph import NeighbourGraph

BLOCK_ROWS = 4_096


def neighbour_similarity(graph: NeighbourGraph) -> np.ndarray:
    """(N,) float64 mean similarity of each row to its neighbours in the graph (0 for a row with none)."""
    valid = graph.indices >= 0
    total = np.where(valid, graph.similarities, 0).sum(axis=1, dtype=np.float64)
    return total / np.maximum(valid.sum(axis=1), 1)


def class_similarity(units: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) float64 cosine similarity of each unit row (N, D) to the centroid of its class (``labels`` (N,) int).
    The sums and products are taken :data:`BLOCK_ROWS` rows at a time: no (N, D) float64 array."""
    from scipy import sparse

    classes, inverse = np.unique(labels, return_inverse=True)
    centroids = np.zeros((len(classes), units.shape[1]))  # (C, D) float64 sums of each class's rows
    for start in range(0, len(labels), BLOCK_ROWS):
        block = inverse[start:start + BLOCK_ROWS]
        members = sparse.csr_matrix((np.ones(len(block)), (block, np.arange(len(block)))),
                                    shape=(len(classes), len(block)))
        centroids += members @ units[start:start + BLOCK_ROWS].astype(np.float64)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    centroids = centroids.astype(units.dtype)
    similarity = np.empty(len(labels))
    for start in range(0, len(labels), BLOCK_ROWS):
        block = slice(start, start + BLOCK_ROWS)
        similarity[block] = np.einsum("nd,nd->n", units[block], centroids[inverse[block]], dtype=np.float64)
    return similarity


def outlier_scores(graph: NeighbourGraph, units: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) float64 outlier score of every row (module docstring): ``units`` (N, D) the graph's rows of length 1,
    ``labels`` (N,) their given classes. Higher is more of an outlier."""
    return 1.0 - (neighbour_similarity(graph) + class_similarity(units, labels)) / 2.0
