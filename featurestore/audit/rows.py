"""The rows an audit reads: every split of a store in one array, and the key that says whether they changed.

The store's fingerprint hash names what a feature is (backbone, weights, preprocessing), not which items the store
holds: an incremental ``extract`` adds rows under the same hash. The audit's results are therefore keyed to the
fingerprint hash and a digest of the rows (per split, in order: content ids, labels and paths).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..store.hdf5 import FeatureStore

LABEL_SPLIT = "train"  # the split a store must have: its labels are the ones the audit is for


@dataclass
class StoreRows:
    """All rows of a store, split after split in the store's order: ``features`` (N, D) float32, ``labels`` (N,)
    int64, ``splits`` and ``paths`` (N,) str (paths as the store records them); ``class_names``; ``counts``
    {split: rows}; ``fingerprint_hash`` and ``rows_sha256`` (module docstring)."""

    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: np.ndarray
    class_names: list[str]
    counts: dict[str, int]
    fingerprint_hash: str
    rows_sha256: str


def rows_digest(store: FeatureStore) -> str:
    """SHA-256 (hex) of every split's name, ids, labels and paths, in the store's order; reads no features."""
    digest = hashlib.sha256()
    for split in store.splits:
        digest.update(f"split {split} {store.count(split)}\n".encode())
        for values in (store.ids(split), store.labels(split).astype(np.int64), store.paths(split)):
            digest.update("\n".join(map(str, values.tolist())).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def open_store(path: str | Path) -> FeatureStore:
    """The store at ``path``, checked for what the audit needs: a train split with at least two rows. Raises
    :class:`StoreError` naming the file and the problem (missing, not a feature store, no train split)."""
    store = FeatureStore(path)
    if LABEL_SPLIT not in store.splits:
        raise StoreError(f"{store.path}: no {LABEL_SPLIT!r} split to audit (splits are {store.splits})")
    if store.count(LABEL_SPLIT) < 2:
        raise StoreError(f"{store.path}: the {LABEL_SPLIT!r} split holds {store.count(LABEL_SPLIT)} rows; the audit "
                         f"needs at least 2")
    return store


def load_rows(store: FeatureStore) -> StoreRows:
    """Every row of ``store`` (see :class:`StoreRows`), read split by split into one float32 array."""
    counts = {split: store.count(split) for split in store.splits}
    features = np.empty((sum(counts.values()), store.feature_dim), dtype=np.float32)
    labels, splits, paths = [], [], []
    start = 0
    for split in store.splits:  # filled in place: the whole array never exists twice
        X, y, _ = store.load(split, np.float32)
        features[start:start + len(y)] = X
        start += len(y)
        labels.append(y.astype(np.int64))
        splits.append(np.full(len(y), split, dtype=object))
        paths.append(store.paths(split).astype(object))
    return StoreRows(features=features, labels=np.concatenate(labels), splits=np.concatenate(splits),
                     paths=np.concatenate(paths), class_names=list(store.class_names), counts=counts,
                     fingerprint_hash=store.fingerprint_hash, rows_sha256=rows_digest(store))
