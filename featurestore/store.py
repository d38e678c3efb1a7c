"""The HDF5 feature cache: layout, fingerprints, an atomic writer and a reader for notebooks.

Layout of ``<name>.h5`` (schema version 1)::

    /                       attrs: featurestore_schema, fingerprint (JSON), fingerprint_hash,
                                   backbone, feature_dim, dtype, class_names (JSON), skipped (JSON),
                                   duplicates (JSON), source_root
    /<split>/features       (N, D) float32 or float16, chunks of about 1 MiB of rows, uncompressed
    /<split>/labels         (N,) int64, indices into class_names
    /<split>/ids            (N,) bytes (64), SHA-256 hex of each image file's content
    /<split>/paths          (N,) UTF-8 strings, paths relative to the data root
    /<split>                attrs: class_names (JSON), count

Files are written whole to a uniquely named temporary file beside ``<name>.h5``, fsynced and renamed
over it (atomic.py): a reader (or a killed writer) only ever sees the previous complete file or the new
complete file. Writers take the store's lock (locking.py) for the whole extraction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path
from .configs import STORE_DTYPES
from .errors import StoreError

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20
ID_DTYPE = "S64"
DTYPES = STORE_DTYPES


def fingerprint_hash(fingerprint: dict) -> str:
    """A short stable hash of a fingerprint dict (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SplitArrays:
    """The rows of one split. features (N, D) float; labels (N,) int64; ids and paths: N strings."""

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    paths: list[str]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.features.ndim != 2 or self.features.shape[0] != n or len(self.labels) != n or len(self.paths) != n:
            raise ValueError(
                f"inconsistent split arrays: features {self.features.shape}, labels {len(self.labels)}, "
                f"ids {n}, paths {len(self.paths)}"
            )


def chunk_rows(feature_dim: int, itemsize: int, n_rows: int) -> int:
    """Rows per chunk so that a chunk holds about 1 MiB (at least 1 row, at most ``n_rows``)."""
    return max(1, min(n_rows, CHUNK_BYTES // max(1, feature_dim * itemsize)))


def write_store(
    path: str | Path,
    fingerprint: dict,
    class_names: list[str],
    splits: dict[str, SplitArrays],
    dtype: str = "float32",
    skipped: list[dict] | None = None,
    duplicates: list[dict] | None = None,
    source_root: str | None = None,
) -> Path:
    """Write a complete store atomically (unique temp file, fsync, rename) and return its path.

    ``skipped``: ``[{path, reason}]`` of items that could not be used; ``duplicates``: groups of rows with
    identical content across splits or labels (``[{id, paths, splits, labels}]``); ``source_root``: the
    data root the relative paths were scanned from, relative to the store's folder (``featurestore verify``
    reads the items there).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = Path(path)
    feature_dim = int(fingerprint["feature_dim"])
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as handle:
        handle.attrs["featurestore_schema"] = SCHEMA_VERSION
        handle.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        handle.attrs["fingerprint_hash"] = fingerprint_hash(fingerprint)
        handle.attrs["backbone"] = fingerprint["backbone"]
        handle.attrs["feature_dim"] = feature_dim
        handle.attrs["dtype"] = dtype
        handle.attrs["class_names"] = json.dumps(class_names)
        handle.attrs["skipped"] = json.dumps(skipped or [])
        handle.attrs["duplicates"] = json.dumps(duplicates or [])
        handle.attrs["source_root"] = source_root or ""
        for split, arrays in splits.items():
            if arrays.features.shape[1] != feature_dim:
                got = arrays.features.shape[1]
                raise ValueError(f"split {split}: features have {got} columns, expected {feature_dim}")
            group = handle.create_group(split)
            n = len(arrays.ids)
            itemsize = np.dtype(dtype).itemsize
            group.create_dataset(
                "features",
                data=arrays.features.astype(dtype, copy=False),
                chunks=(chunk_rows(feature_dim, itemsize, n), feature_dim) if n else None,
                track_times=False,
            )
            group.create_dataset("labels", data=np.asarray(arrays.labels, dtype=np.int64), track_times=False)
            group.create_dataset("ids", data=np.array(arrays.ids, dtype=ID_DTYPE), track_times=False)
            group.create_dataset(
                "paths", data=np.array(arrays.paths, dtype=object), dtype=h5py.string_dtype(), track_times=False
            )
            group.attrs["class_names"] = json.dumps(class_names)
            group.attrs["count"] = n
        handle.flush()
    return path


class FeatureStore:
    """Read access to one feature cache file.

    >>> store = FeatureStore("data/features/efficientnet_lite0.h5")
    >>> X, y, ids = store.load("train")   # (N, D) float32, (N,) int64, (N,) str

    Every read opens the file anew, so a store replaced by a rerun is read whole, old or new, never mixed
    within one call; a read that fails (a file truncated on disk) raises :class:`StoreError`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: feature store not found (run `featurestore extract` first)")
        with self._reading("not a readable HDF5 file") as handle:
            attrs = dict(handle.attrs)
            self._splits = [name for name in handle if isinstance(handle[name], h5py.Group)]
            self._counts = {name: int(handle[name]["ids"].shape[0]) for name in self._splits}
            self._chunks = {name: handle[name]["features"].chunks for name in self._splits}
        if "fingerprint" not in attrs:
            raise StoreError(f"{self.path}: not a featurestore file (no fingerprint attribute)")
        if int(attrs.get("featurestore_schema", -1)) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {attrs.get('featurestore_schema')} is not {SCHEMA_VERSION}; re-extract"
            )
        try:
            self.fingerprint: dict = json.loads(attrs["fingerprint"])
            self.fingerprint_hash: str = str(attrs["fingerprint_hash"])
            self.class_names: list[str] = json.loads(attrs["class_names"])
            self.feature_dim: int = int(attrs["feature_dim"])
            self.dtype: str = str(attrs["dtype"])
            self.skipped: list[dict] = json.loads(attrs.get("skipped", "[]"))
            self.duplicates: list[dict] = json.loads(attrs.get("duplicates", "[]"))
            self.source_root: str = str(attrs.get("source_root", ""))
        except (KeyError, ValueError) as exc:
            raise StoreError(f"{self.path}: not a featurestore file (bad or missing attribute {exc})") from None

    @contextmanager
    def _reading(self, problem: str = "cannot be read") -> Iterator[h5py.File]:
        try:
            with h5py.File(self.path, "r") as handle:
                yield handle
        except OSError as exc:
            raise StoreError(f"{self.path}: {problem} ({exc})") from None
        except KeyError as exc:
            raise StoreError(f"{self.path}: not a featurestore file (missing {exc})") from None

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def count(self, split: str) -> int:
        self._check_split(split)
        return self._counts[split]

    def _check_split(self, split: str) -> None:
        if split not in self._splits:
            raise StoreError(f"{self.path}: no split {split!r}; splits are {self._splits}")

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, ids)``: features (N, D) in the stored dtype, labels (N,) int64, ids (N,) str."""
        self._check_split(split)
        with self._reading() as handle:
            group = handle[split]
            features = group["features"][...]
            labels = group["labels"][...]
            ids = group["ids"][...].astype(str)
        return features, labels, ids

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split, (N,) int64, without reading its features."""
        self._check_split(split)
        with self._reading() as handle:
            return handle[split]["labels"][...]

    def ids(self, split: str) -> np.ndarray:
        """Content ids of a split, (N,) str, without reading its features."""
        self._check_split(split)
        with self._reading() as handle:
            return handle[split]["ids"][...].astype(str)

    def paths(self, split: str) -> np.ndarray:
        """Relative item paths of a split, (N,) str, in row order."""
        self._check_split(split)
        with self._reading() as handle:
            return handle[split]["paths"].asstr()[...]

    def rows(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Features of the given rows, (len(indices), D) in the stored dtype, in the order of ``indices``."""
        self._check_split(split)
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return np.zeros((0, self.feature_dim), dtype=self.dtype)
        unique, inverse = np.unique(indices, return_inverse=True)  # h5py reads increasing indices only
        with self._reading() as handle:
            return handle[split]["features"][unique][inverse]

    def iter_chunks(self, split: str, rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, y)`` blocks of a split in row order: features (≤ rows, D) in the stored dtype, labels int64.

        ``rows`` defaults to the file's chunk height (about 1 MiB), so memory does not grow with N.
        """
        self._check_split(split)
        step = rows or (self._chunks[split] or (max(1, self._counts[split]),))[0]
        with self._reading() as handle:
            features, labels = handle[split]["features"], handle[split]["labels"]
            for start in range(0, self._counts[split], step):
                yield features[start:start + step], labels[start:start + step]

    def source_folder(self) -> Path | None:
        """The data root the store was extracted from (None if not recorded)."""
        return (self.path.parent / self.source_root).resolve() if self.source_root else None

    def info(self) -> dict:
        """Everything about the file except the features themselves (JSON-serialisable)."""
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "schema_version": SCHEMA_VERSION,
            "fingerprint_hash": self.fingerprint_hash,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "class_names": self.class_names,
            "splits": {
                name: {"count": self._counts[name], "chunk_rows": (self._chunks[name] or (None,))[0]}
                for name in self._splits
            },
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "source_root": self.source_root,
        }
