"""The HDF5 feature cache: layout, fingerprints, an atomic writer and a reader for notebooks.

Layout of ``<name>.h5`` (schema version 1)::

    /                       attrs: featurestore_schema, fingerprint (JSON), fingerprint_hash,
                                   backbone, feature_dim, dtype, class_names (JSON), skipped (JSON)
    /<split>/features       (N, D) float32 or float16, chunks of about 1 MiB of rows, uncompressed
    /<split>/labels         (N,) int64, indices into class_names
    /<split>/ids            (N,) bytes (64), SHA-256 hex of each image file's content
    /<split>/paths          (N,) UTF-8 strings, paths relative to the data root
    /<split>                attrs: class_names (JSON), count

Files are written whole to ``<name>.h5.tmp``, fsynced and renamed over ``<name>.h5``: a reader (or a
killed writer) only ever sees the previous complete file or the new complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import StoreError

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20
ID_DTYPE = "S64"
DTYPES = ("float32", "float16")


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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_store(
    path: str | Path,
    fingerprint: dict,
    class_names: list[str],
    splits: dict[str, SplitArrays],
    dtype: str = "float32",
    skipped: list[dict] | None = None,
) -> Path:
    """Write a complete store atomically (temp file, fsync, rename) and return its path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    feature_dim = int(fingerprint["feature_dim"])
    with h5py.File(tmp, "w", track_order=True) as handle:
        handle.attrs["featurestore_schema"] = SCHEMA_VERSION
        handle.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        handle.attrs["fingerprint_hash"] = fingerprint_hash(fingerprint)
        handle.attrs["backbone"] = fingerprint["backbone"]
        handle.attrs["feature_dim"] = feature_dim
        handle.attrs["dtype"] = dtype
        handle.attrs["class_names"] = json.dumps(class_names)
        handle.attrs["skipped"] = json.dumps(skipped or [])
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
        os.fsync(handle.id.get_vfd_handle())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


class FeatureStore:
    """Read access to one feature cache file.

    >>> store = FeatureStore("data/features/efficientnet_lite0.h5")
    >>> X, y, ids = store.load("train")   # (N, D) float32, (N,) int64, (N,) str
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: feature store not found (run `featurestore extract` first)")
        try:
            with h5py.File(self.path, "r") as handle:
                attrs = dict(handle.attrs)
                self._splits = [name for name in handle if isinstance(handle[name], h5py.Group)]
                self._counts = {name: int(handle[name]["ids"].shape[0]) for name in self._splits}
                self._chunks = {name: handle[name]["features"].chunks for name in self._splits}
        except OSError as exc:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        except KeyError as exc:
            raise StoreError(f"{self.path}: not a featurestore file (missing {exc})") from exc
        if "fingerprint" not in attrs:
            raise StoreError(f"{self.path}: not a featurestore file (no fingerprint attribute)")
        if int(attrs.get("featurestore_schema", -1)) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {attrs.get('featurestore_schema')} is not {SCHEMA_VERSION}; re-extract"
            )
        self.fingerprint: dict = json.loads(attrs["fingerprint"])
        self.fingerprint_hash: str = str(attrs["fingerprint_hash"])
        self.class_names: list[str] = json.loads(attrs["class_names"])
        self.feature_dim: int = int(attrs["feature_dim"])
        self.dtype: str = str(attrs["dtype"])
        self.skipped: list[dict] = json.loads(attrs.get("skipped", "[]"))

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def _check_split(self, split: str) -> None:
        if split not in self._splits:
            raise StoreError(f"{self.path}: no split {split!r}; splits are {self._splits}")

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, ids)``: features (N, D) in the stored dtype, labels (N,) int64, ids (N,) str."""
        self._check_split(split)
        with h5py.File(self.path, "r") as handle:
            group = handle[split]
            features = group["features"][...]
            labels = group["labels"][...]
            ids = group["ids"][...].astype(str)
        return features, labels, ids

    def paths(self, split: str) -> np.ndarray:
        """Relative image paths of a split, (N,) str, in row order."""
        self._check_split(split)
        with h5py.File(self.path, "r") as handle:
            return handle[split]["paths"].asstr()[...]

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
        }
