"""Near-duplicates: pairs of rows, in one split or across two, whose cosine similarity in the neighbour graph reaches
a threshold fixed in advance per modality, :data:`NEAR_DUPLICATE_SIMILARITY` (the store's fingerprint ``kind``,
``image`` when absent). A train/test pair is a leak.

How the thresholds were chosen (measured once, on the default stores of a project where ``dvc repro`` ran, the
copies extracted with each store's own settings):

- Images, 0.95. EfficientNet-Lite0 penultimate features of Fashion-MNIST at 112 px: the most similar train image
  of each of the 2,000 test images: 99th percentile 0.923, largest 0.947; of each of the 1,000 train images 0.920
  and 0.936; over all 3,500 rows 5 pairs of distinct images reach 0.95 (0.951-0.957: plain pullovers and boots
  hard to tell apart by eye). Copies of 20 train images, similarity to their original: upscaled 2x 0.976-0.996
  (all found), 1.1x 0.891-0.983 (median 0.955), 0.9x 0.873-0.971, cropped by one pixel on each side 0.843-0.955,
  saved as JPEG at quality 75 0.735-0.960, all three at once 0.41-0.88 (the original the nearest train image for
  only 10 of 20). On 28-pixel images these edits change the penultimate features more than the difference between
  two garments of a class does, so no threshold on them finds such copies without flagging distinct images: the
  audit finds what stays within 0.95 (copies, re-saves, upscales) and no more.
- Texts, 0.92. all-MiniLM-L6-v2 embeddings of BBC News at 256 tokens: 60 train articles copied with their
  whitespace changed and one random sentence replaced: 0.933-1.000 (1.000 where the sentence lay beyond the 256
  tokens read), 10th percentile 0.972; found: all at 0.92, 57 of 60 at 0.95. The most similar train article of
  each of the 500 test articles reaches 0.92 for 4 of them (0.8%; 0.6% at 0.95): near-identical articles that the
  corpus holds twice (its exact duplicates are dropped by ``prepare-text``).

The pairs come from the graph, so a row with more than k near-duplicates lists only its k nearest.
"""

from __future__ import annotations

import numpy as np

from .graph import NeighbourGraph

NEAR_DUPLICATE_SIMILARITY = {"image": 0.95, "text": 0.92}


def threshold_for(fingerprint: dict) -> float:
    """The near-duplicate threshold for a store of this fingerprint (its ``kind``; ``image`` when absent)."""
    return NEAR_DUPLICATE_SIMILARITY.get(fingerprint.get("kind", "image"), NEAR_DUPLICATE_SIMILARITY["image"])


def near_duplicates(graph: NeighbourGraph, threshold: float = NEAR_DUPLICATE_SIMILARITY["image"]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows at cosine similarity >= ``threshold``, each pair once: (P, 2) int64 row indices, the smaller
    first, and (P,) float32 similarities; most similar first (ties by row indices)."""
    rows = np.repeat(np.arange(graph.indices.shape[0], dtype=np.int64), graph.k)
    neighbours = graph.indices.ravel()
    similarities = graph.similarities.ravel()
    close = (neighbours >= 0) & (similarities >= threshold)
    pairs = np.stack([np.minimum(rows[close], neighbours[close]), np.maximum(rows[close], neighbours[close])], axis=1)
    similarities = similarities[close]
    if not len(pairs):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    # A pair is found from both ends (with similarities equal up to rounding): keep its largest.
    order = np.lexsort((-similarities, pairs[:, 1], pairs[:, 0]))
    pairs, similarities = pairs[order], similarities[order]
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    pairs, similarities = pairs[first], similarities[first]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -similarities))
    return pairs[order], similarities[order].astype(np.float32)
