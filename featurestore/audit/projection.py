"""The 2-D map: UMAP (umap-learn, cosine) of at most :data:`MAP_MAX_ROWS` rows, drawn as a PNG coloured by given
label, with the rows the audit flagged marked (label issues by a cross, near-duplicates by a ring).

The sample keeps every flagged row first (up to the limit), then draws the others at random with the seed. With a
``random_state`` UMAP runs on one thread and gives the same map every run (3,500 rows: about 12 s here). Its
neighbours are given to it (``precomputed_knn``), found with faiss as the audit's graph is: exact below UMAP's own
limit for exact search, :data:`EXACT_MAP_ROWS`, approximate above it (HNSW on principal components, then exact
re-ranking, where UMAP would use its own approximate NN-descent). On 20,000 1,280-d rows this took the map from 50
to 24 CPU seconds (the machine shared; faiss's exact search in that measurement).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path
from .graph import neighbour_graph

MAP_MAX_ROWS = 20_000
UMAP_NEIGHBOURS = 15
EXACT_MAP_ROWS = 4_096  # as UMAP itself: exact neighbours below, approximate from here


def map_sample(n_rows: int, flagged: np.ndarray, max_rows: int = MAP_MAX_ROWS, seed: int = 0) -> np.ndarray:
    """Sorted row indices (M,) int64, M = min(n_rows, max_rows): the flagged rows (``flagged`` (N,) bool) first
    (at random among them if they alone exceed the limit), the rest drawn at random."""
    rng = np.random.default_rng(seed)
    marked, others = np.flatnonzero(flagged), np.flatnonzero(~flagged)
    if len(marked) >= max_rows:
        return np.sort(rng.choice(marked, size=max_rows, replace=False)).astype(np.int64)
    extra = rng.choice(others, size=min(len(others), max_rows - len(marked)), replace=False)
    return np.sort(np.concatenate([marked, extra])).astype(np.int64)


def sample_neighbours(X: np.ndarray, neighbours: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's precomputed k-nearest neighbours of the rows of X (M, D) float, each row first among its own: (M,
    ``neighbours``) int64 indices (-1 where fewer were found) and float32 cosine distances. Exact up to
    :data:`EXACT_MAP_ROWS` rows, approximate beyond (:func:`~.graph.neighbour_graph`)."""
    graph = neighbour_graph(X, neighbours - 1, exact_max_rows=EXACT_MAP_ROWS, seed=seed)
    rows = np.arange(len(X))[:, None]
    indices = np.hstack([rows, graph.indices])
    distances = np.hstack([np.zeros((len(X), 1), np.float32), np.maximum(1 - graph.similarities, 0)])
    return indices, np.where(indices >= 0, distances, np.inf).astype(np.float32)


def embed_2d(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """(M, 2) float32 UMAP coordinates of the rows of X (M, D) float (cosine, the neighbours from
    :func:`sample_neighbours`); zeros for fewer than 3 rows."""
    if len(X) < 3:
        return np.zeros((len(X), 2), np.float32)
    import umap

    neighbours = max(2, min(UMAP_NEIGHBOURS, len(X) - 1))
    reducer = umap.UMAP(n_neighbors=neighbours, metric="cosine", random_state=seed,
                        init="spectral" if len(X) > 4 * neighbours else "random",
                        precomputed_knn=sample_neighbours(X, neighbours, seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", tiny-graph notices, no search index
        return reducer.fit_transform(np.asarray(X, dtype=np.float32)).astype(np.float32)


def draw_map(coordinates: np.ndarray, labels: np.ndarray, class_names: list[str], issues: np.ndarray,
             duplicates: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Write the map as a PNG: ``coordinates`` (M, 2), ``labels`` (M,) class indices, ``issues`` and ``duplicates``
    (M,) bool marks. Atomic. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 8), dpi=110)
    colours = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for index, name in enumerate(class_names):
        rows = labels == index
        if rows.any():
            axes.scatter(*coordinates[rows].T, s=6, color=colours(index % colours.N), label=name, linewidths=0)
    if issues.any():
        axes.scatter(*coordinates[issues].T, s=28, marker="x", color="black", linewidths=0.8,
                     label=f"label issue ({int(issues.sum())})")
    if duplicates.any():
        axes.scatter(*coordinates[duplicates].T, s=46, marker="o", facecolors="none", edgecolors="red",
                     linewidths=0.8, label=f"near-duplicate ({int(duplicates.sum())})")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=9)
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(out)
