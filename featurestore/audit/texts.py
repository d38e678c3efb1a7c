"""Edited copies of texts, found from their words: two documents that share most of their word
:data:`SHINGLE`-grams (shingles, Broder 1997), whatever their whitespace, case and punctuation. Why words and not
the embeddings, and how the threshold was chosen: :mod:`.duplicates`.

A document's shingles are the runs of :data:`SHINGLE` consecutive words (``\\w+``, lowercased); the *containment*
of two documents is the share of the shorter one's shingles found in the other (1: one holds all of the other's
text; a copy with one of ten sentences replaced: about 0.9; two articles on one topic: below 0.3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

SHINGLE = 5  # words per shingle
CANDIDATES = 10  # documents compared word by word with each document: its nearest by the features' cosine
WORD = re.compile(r"\w+")


def shingles(text: str) -> frozenset[int]:
    """The hashed word ``SHINGLE``-grams of ``text`` (one shingle for a shorter text; none for no words)."""
    words = WORD.findall(text.lower())
    count = max(len(words) - SHINGLE + 1, 1 if words else 0)
    return frozenset(hash(tuple(words[i:i + SHINGLE])) for i in range(count))


def containment(first: frozenset[int], second: frozenset[int]) -> float:
    """The share of the smaller set's shingles in the other (0 when either is empty)."""
    if not first or not second:
        return 0.0
    return len(first & second) / min(len(first), len(second))


def text_similarity(queries: Sequence[frozenset[int]], references: Sequence[frozenset[int]],
                    pairs: np.ndarray) -> np.ndarray:
    """The containment of each query's shingles with each of its candidates ``pairs`` (Q, C) int64, indices into
    ``references`` (-1: none): (Q, C) float32, -1 where the index is -1."""
    found = np.full(pairs.shape, -1.0, np.float32)
    for i, row in enumerate(pairs):
        for j, reference in enumerate(row):
            if reference >= 0:
                found[i, j] = containment(queries[i], references[reference])
    return found


def store_texts(store, split: str, data=None) -> list[str]:
    """The documents of ``split`` of ``store`` in row order, from its recorded source (``data`` instead when given),
    checked against their content ids (``heads.records``). Raises
    :class:`~featurestore.errors.FeaturestoreError` when they cannot be read or changed since extraction."""
    from ..encode.texts import item_text
    from ..heads.records import store_records

    return [item_text(record) for record in store_records(store, split, data)]
