"""The HDF5 feature cache: layout, fingerprints, an atomic writer and a reader for notebooks.

Layout of ``<name>.h5`` (layout version 2, the root attribute ``featurestore_schema``)::

    /                       attrs: featurestore_schema, fingerprint (JSON), fingerprint_hash,
                                   backbone, feature_dim, dtype, class_names (JSON), skipped (JSON),
                                   duplicates (JSON), source (JSON), feature_shape (JSON)
    /<split>/features       (N, D) float32 or float16, chunks of about 1 MiB of rows, uncompressed
    /<split>/labels         (N,) int64, indices into class_names
    /<split>/ids            (N,) bytes (64), SHA-256 hex of each image file's content
    /<split>/paths          (N,) UTF-8 strings, paths relative to the data root
    /<split>                attrs: class_names (JSON), count

Files are written whole to a uniquely named temporary file beside ``<name>.h5``, fsynced and renamed
over it (atomic.py): a reader (or a killed writer) only ever sees the previous complete file or the new
complete file. Writers take the store's lock (locking.py) for the whole extraction.

``source`` says where the items came from, so that every reader rebuilds its records from the same place:
``{"kind": "folder" | "manifest", "path": <the folder or the manifest file, relative to the store's folder, POSIX>,
"sha256": <hex SHA-256 of the manifest's bytes, or null for a folder>, "splits": <optional: the val/test splits made
for data that lacked them, {"val_fraction", "test_fraction", "seed"} (data/splits.py)>, "corrections": <optional: what
a corrections file left out and relabelled, {"file", "sha256", "dropped", "relabelled"} (corrections.py)>}``. The
path is relative only (as the rows' paths are): a store and its data moved or cloned together still find each
other, and a file written on two machines is the same file.

Migration. Layout 1 (releases before the source record) had ``source_root`` (the data folder, relative to the
store's folder) instead of ``source``; such a file is still read, as a folder source at ``source_root`` (a store of
documents given inline in a manifest, rows ``<manifest>:<line>``, as that manifest), and rewritten as layout 2 by
the next ``extract`` into it, every row reused. The layout version is not in the fingerprint (``SCHEMA_VERSION``,
what a row means, is), so the bump re-extracts nothing. Later additions to layout 2 (per-layer features, a recorded
validation split) are optional attributes or groups whose absence means "not recorded": readers of layout 2 must
accept a file without them, and no further bump is needed for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from ..configs import STORE_DTYPES
from ..errors import DataError, StoreError
from ..utils.atomic import atomic_path
from ..utils.validation import check_choice

SCHEMA_VERSION = 1  # what a feature row is, in every fingerprint: bumping it re-extracts every store
LAYOUT_VERSION = 2  # the file's layout, the root attribute featurestore_schema (see the migration note above)
READABLE_LAYOUTS = (1, 2)
SOURCE_KINDS = ("folder", "manifest")
INLINE_ROW = re.compile(r"^(?P<manifest>[^/]+\.(?:csv|jsonl)):(?P<line>\d+)$")  # a document given in a manifest
CHUNK_BYTES = 1 << 20
CONVERT_BYTES = 64 << 20  # a load that converts the dtype reads this much at a time
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


class StoreWriter:
    """Fills the splits of a store being written: :meth:`write` puts rows ``[start, start + len)`` of a split."""

    def __init__(self, handle: h5py.File, dtype: str, feature_dim: int):
        self.handle, self.dtype, self.feature_dim = handle, dtype, feature_dim

    def write(self, split: str, start: int, rows: SplitArrays) -> None:
        """Rows of ``split`` from ``start``: features (B, D), labels (B,), ids and paths (B strings each)."""
        if rows.features.shape[1] != self.feature_dim:
            raise ValueError(f"split {split}: features have {rows.features.shape[1]} columns, "
                             f"expected {self.feature_dim}")
        group, end = self.handle[split], start + len(rows.ids)
        group["features"][start:end] = rows.features.astype(self.dtype, copy=False)
        group["labels"][start:end] = np.asarray(rows.labels, dtype=np.int64)
        group["ids"][start:end] = np.array(rows.ids, dtype=ID_DTYPE)
        group["paths"][start:end] = np.array(rows.paths, dtype=object)


@contextmanager
def store_writer(
    path: str | Path,
    fingerprint: dict,
    class_names: list[str],
    split_rows: dict[str, int],
    dtype: str = "float32",
    skipped: list[dict] | None = None,
    duplicates: list[dict] | None = None,
    source: dict | None = None,
    feature_shape: list[int] | None = None,
) -> Iterator[StoreWriter]:
    """Write a store of ``split_rows`` rows per split, filled through the yielded :class:`StoreWriter` (so a
    store larger than memory can be written a block at a time); it replaces ``path`` atomically (unique temp
    file, fsync, rename) when the block ends without an error.

    ``skipped``: ``[{path, reason}]`` of items that could not be used; ``duplicates``: groups of rows with
    identical content across splits or labels (``[{id, paths, splits, labels}]``); ``source``: where the items
    came from, ``{kind, path, sha256}`` (module docstring; every reader rebuilds its records there);
    ``feature_shape``: the shape one row is a flattening of (default ``[D]``; a trunk cache
    row is a (C, H, W) activation).
    """
    check_choice("dtype", dtype, DTYPES)
    if source is not None:
        check_choice("source kind", source["kind"], SOURCE_KINDS)
    feature_dim = int(fingerprint["feature_dim"])
    shape = list(feature_shape or [feature_dim])
    if int(np.prod(shape)) != feature_dim:
        raise ValueError(f"feature_shape {shape} does not flatten to {feature_dim} columns")
    with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w", track_order=True) as handle:
        attrs = {"featurestore_schema": LAYOUT_VERSION, "fingerprint": json.dumps(fingerprint, sort_keys=True),
                 "fingerprint_hash": fingerprint_hash(fingerprint), "backbone": fingerprint["backbone"],
                 "feature_dim": feature_dim, "dtype": dtype, "class_names": json.dumps(class_names),
                 "skipped": json.dumps(skipped or []), "duplicates": json.dumps(duplicates or []),
                 "feature_shape": json.dumps(shape)}
        if source is not None:
            made = {key: source[key] for key in ("splits", "corrections") if source.get(key)}
            attrs["source"] = json.dumps({"kind": source["kind"], "path": source["path"], "sha256": source["sha256"],
                                          **made}, sort_keys=True)
        handle.attrs.update(attrs)
        itemsize = np.dtype(dtype).itemsize
        for split, n in split_rows.items():
            group = handle.create_group(split)
            group.create_dataset("features", shape=(n, feature_dim), dtype=dtype, track_times=False,
                                 chunks=(chunk_rows(feature_dim, itemsize, n), feature_dim) if n else None)
            group.create_dataset("labels", shape=(n,), dtype=np.int64, track_times=False)
            group.create_dataset("ids", shape=(n,), dtype=ID_DTYPE, track_times=False)
            group.create_dataset("paths", shape=(n,), dtype=h5py.string_dtype(), track_times=False)
            group.attrs["class_names"] = json.dumps(class_names)
            group.attrs["count"] = n
        yield StoreWriter(handle, dtype, feature_dim)
        handle.flush()


def write_store(path: str | Path, fingerprint: dict, class_names: list[str], splits: dict[str, SplitArrays],
                dtype: str = "float32", **notes) -> Path:
    """Write a complete store from in-memory splits (see :func:`store_writer` for ``notes``); returns its path."""
    with store_writer(path, fingerprint, class_names, {name: len(a.ids) for name, a in splits.items()}, dtype,
                      **notes) as writer:
        for split, arrays in splits.items():
            if len(arrays.ids):
                writer.write(split, 0, arrays)
    return Path(path)


def chunk_infos(dataset: h5py.Dataset) -> list:
    """Every allocated chunk's (offset, byte_offset, size), in one pass over the chunk index. (Asking for the
    i-th chunk, ``get_chunk_info(i)``, walks the index from the start each time: quadratic, 2 s of a 4 GB
    load's 5 s at 4,000 chunks.)"""
    found: list = []
    if hasattr(dataset.id, "chunk_iter"):  # HDF5 >= 1.12.3
        dataset.id.chunk_iter(found.append)
        return found
    return [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]


def ascii_to_str(raw: np.ndarray) -> np.ndarray:
    """Fixed-width ASCII bytes (N,) S<w> → (N,) U<w>. Widening each byte to a UCS-4 code point is the same
    result as ``astype(str)`` for ASCII (what content ids are) at a tenth of its time (0.06 s for 1M ids)."""
    if raw.dtype.kind != "S" or not raw.size:
        return raw.astype(str)
    codes = raw.view(np.uint8).reshape(len(raw), raw.dtype.itemsize)
    if codes.max() >= 128:
        return raw.astype(str)
    return codes.astype(np.uint32).view(f"U{raw.dtype.itemsize}").reshape(len(raw))


def contiguous_runs(chunks: list, rows: int, width: int, total_rows: int) -> list[tuple[int, int, int]]:
    """``(first_row, byte_offset, length)`` of each run of chunks that follow one another both in row order and
    in the file, so that a store written front to back is read in a few large reads (about 90 for 4 GB, where
    one read per 1 MiB chunk was 0.3 s slower than ``np.load``)."""
    runs: list[list[int]] = []
    for chunk in sorted(chunks, key=lambda info: info.chunk_offset[0]):
        start = chunk.chunk_offset[0]
        length = (min(start + rows, total_rows) - start) * width
        if runs and (runs[-1][0] * width + runs[-1][2], runs[-1][1] + runs[-1][2]) == (start * width,
                                                                                      chunk.byte_offset):
            runs[-1][2] += length
        else:
            runs.append([start, chunk.byte_offset, length])
    return [tuple(run) for run in runs]


def _h5py_read(dataset: h5py.Dataset, dtype: np.dtype) -> np.ndarray:
    """The whole dataset through h5py, converted to ``dtype`` as it is read."""
    return dataset[...] if dtype == dataset.dtype else dataset.astype(dtype)[...]


def _read_exactly(fd: int, view: memoryview, byte_offset: int, path: Path) -> None:
    """Fill ``view`` from ``byte_offset`` of ``fd``; one ``pread`` returns at most about 2 GiB on Linux."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + (1 << 30)]], byte_offset + done)
        if got <= 0:
            raise StoreError(f"{path}: truncated feature data (at byte {byte_offset + done})")
        done += got


def _source_record(attrs: dict) -> dict | None:
    """The ``source`` attribute; for a layout-1 file, its ``source_root`` as a folder source (None: not recorded)."""
    if "source" in attrs:
        record = json.loads(attrs["source"])
        if not isinstance(record, dict) or record.get("kind") not in SOURCE_KINDS or "path" not in record:
            raise ValueError("source")
        return record
    root = str(attrs.get("source_root", ""))
    return {"kind": "folder", "path": root, "sha256": None} if root else None


class FeatureStore:
    """Read access to one feature cache file.

    >>> store = FeatureStore("data/features/fashion_mnist.h5")
    >>> X, y, ids = store.load("train")   # (N, D) float32, (N,) int64, (N,) str

    Every read opens the file anew, so a store replaced by a rerun is read whole, old or new, never mixed
    within one call; a read that fails (a file truncated on disk) raises :class:`StoreError`.
    """

    corrections_record: dict | None = None  # what a corrections file changed (store.corrections.CorrectedStore)

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
        self.schema_version = int(attrs.get("featurestore_schema", -1))  # the file's layout
        if self.schema_version not in READABLE_LAYOUTS:
            raise StoreError(f"{self.path}: schema version {attrs.get('featurestore_schema')} is not one of "
                             f"{list(READABLE_LAYOUTS)}; re-extract")
        try:
            self.fingerprint: dict = json.loads(attrs["fingerprint"])
            self.fingerprint_hash: str = str(attrs["fingerprint_hash"])
            self.class_names: list[str] = json.loads(attrs["class_names"])
            self.feature_dim: int = int(attrs["feature_dim"])
            self.dtype: str = str(attrs["dtype"])
            self.skipped: list[dict] = json.loads(attrs.get("skipped", "[]"))
            self.duplicates: list[dict] = json.loads(attrs.get("duplicates", "[]"))
            self.source_record: dict | None = _source_record(attrs)
            self.feature_shape: list[int] = json.loads(attrs.get("feature_shape", json.dumps([self.feature_dim])))
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

    def load(self, split: str, dtype: str | np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, ids)``: features (N, D) in the stored dtype (float32 or float16), or converted to ``dtype``
        (e.g. ``np.float32``) when given; labels (N,) int64; ids (N,) str.

        Everything comes through one open handle on one file: a store replaced on disk during the call (a rerun
        of extract renames a new file over it) gives the old file's rows or the new file's, never a mix.
        """
        self._check_split(split)
        target = None if dtype is None else np.dtype(dtype)
        with self._reading() as handle:
            group = handle[split]
            features = self._read_features(handle, group["features"], target)
            labels = group["labels"][...]
            ids = ascii_to_str(group["ids"][...])
        return features, labels, ids

    def _read_features(self, handle: h5py.File, dataset: h5py.Dataset, dtype: np.dtype | None = None) -> np.ndarray:
        """The whole dataset, (N, D) in ``dtype`` (default: the stored one). Uncompressed chunks of whole rows
        (what :func:`store_writer` makes) are read by their file offsets straight into the result, one copy like
        ``np.load``; anything else through h5py.

        The offsets are read through the file descriptor of ``handle`` itself (the sec2 driver's, which h5py
        exposes as ``FileID.get_vfd_handle()``), never by opening the path again: the chunk index and the bytes
        therefore always come from the same inode, even if the path has been replaced since ``handle`` opened it.
        """
        dtype = dataset.dtype if dtype is None else np.dtype(dtype)
        raw = (dataset.chunks is not None and dataset.compression is None and not dataset.shuffle
               and not dataset.fletcher32 and dataset.scaleoffset is None and dataset.chunks[1] == dataset.shape[1]
               and handle.driver == "sec2")
        if not raw or not dataset.shape[0]:
            return _h5py_read(dataset, dtype)
        width, rows = dataset.shape[1] * dataset.dtype.itemsize, dataset.chunks[0]
        chunks = chunk_infos(dataset)
        if len(chunks) != -(-dataset.shape[0] // rows):  # a chunk never written: let h5py fill it in
            return _h5py_read(dataset, dtype)
        runs = contiguous_runs(chunks, rows, width, dataset.shape[0])
        fd = handle.id.get_vfd_handle()  # HDF5's own descriptor: not ours to close
        out = np.empty(dataset.shape, dtype)
        if dtype == dataset.dtype:
            flat = out.reshape(-1).view(np.uint8)
            for first_row, byte_offset, length in runs:
                _read_exactly(fd, memoryview(flat[first_row * width:first_row * width + length]), byte_offset,
                              self.path)
            return out
        # Converting: read a bounded piece of whole rows at a time and convert it into place, so that the stored
        # copy never exists whole beside the converted one.
        piece_rows = max(1, CONVERT_BYTES // width)
        scratch = np.empty((min(piece_rows, dataset.shape[0]), dataset.shape[1]), dataset.dtype)
        for first_row, byte_offset, length in runs:
            for offset in range(0, length // width, piece_rows):
                count = min(piece_rows, length // width - offset)
                _read_exactly(fd, memoryview(scratch[:count].reshape(-1).view(np.uint8)),
                              byte_offset + offset * width, self.path)
                out[first_row + offset:first_row + offset + count] = scratch[:count]
        return out

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split, (N,) int64, without reading its features."""
        self._check_split(split)
        with self._reading() as handle:
            return handle[split]["labels"][...]

    def ids(self, split: str) -> np.ndarray:
        """Content ids of a split, (N,) str, without reading its features."""
        self._check_split(split)
        with self._reading() as handle:
            return ascii_to_str(handle[split]["ids"][...])

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
            for start in range(0, self._counts[split], step):
                X, y = self._block(handle, split, start, min(start + step, self._counts[split]))
                if len(y):  # a corrected store's block may have lost every row
                    yield X, y

    def _block(self, handle: h5py.File, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` of a split as ``(X, y)``: every chunk read goes through here (a corrected store,
        ``corrections.CorrectedStore``, leaves its dropped rows out)."""
        return handle[split]["features"][start:stop], handle[split]["labels"][start:stop]

    def source(self, data: str | Path | None = None) -> Path:
        """Where this store's items are: the folder or manifest file to scan (``data.sources.scan_source``) for the
        records behind its rows. ``data`` when given (a folder given for a store of a manifest: the manifest of
        that name in it, when there), else the recorded source. Raises :class:`DataError` when it is not there."""
        record = self.source_record
        if data is None and record is None:
            raise DataError(f"{self.path}: records no data source; pass --data with the folder or manifest it was "
                            f"extracted from")
        path = Path(data) if data is not None else (self.path.parent / record["path"]).resolve()
        name = self._manifest_name()
        if name and path.is_dir() and (path / name).is_file():
            path = path / name
        if not path.exists():
            raise DataError(f"{path}: data folder or manifest not found (the source of {self.path}); pass --data "
                            f"with the folder or manifest it was extracted from")
        return path

    def source_folder(self) -> Path | None:
        """The folder the rows' relative paths start from: the recorded folder, or the manifest's folder (None if
        not recorded)."""
        if self.source_record is None:
            return None
        path = (self.path.parent / self.source_record["path"]).resolve()
        return path.parent if self.source_record["kind"] == "manifest" else path

    def _manifest_name(self) -> str | None:
        """The file name of the manifest the store was extracted from: recorded, or for a layout-1 store (which
        recorded only the manifest's folder) named by its first row of a document given inline, if any."""
        if self.source_record is not None and self.source_record["kind"] == "manifest":
            return PurePosixPath(self.source_record["path"]).name
        if self.schema_version == 1:
            with self._reading() as handle:
                for split in self._splits:
                    if self._counts[split]:
                        inline = INLINE_ROW.match(handle[split]["paths"].asstr()[0])
                        if inline:
                            return inline["manifest"]
        return None

    def iter_shuffled(self, splits: str | Sequence[str], batch_rows: int, seed: int,
                      buffer_chunks: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, y)`` minibatches of about ``batch_rows`` rows in a seeded random order: X (≤ batch_rows, D) in the
        stored dtype, y (≤ batch_rows,) int64. ``splits`` is one split or several (e.g. ``("train", "val")``),
        whose chunks are mixed in one random order, so every part of a pass sees rows of each split.

        Memory is bounded by the buffer: chunks are read in a random order, ``buffer_chunks`` at a time, and their
        rows shuffled together (a store written in class order still gives mixed minibatches).
        """
        names = [splits] if isinstance(splits, str) else list(splits)
        for split in names:
            self._check_split(split)
        pieces = []  # (split, first row, rows) of every chunk of every split
        for split in names:
            n = self._counts[split]
            step = (self._chunks[split] or (max(1, n),))[0]
            pieces += [(split, start, step) for start in range(0, n, step)]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(pieces))
        with self._reading() as handle:
            for group in range(0, len(order), buffer_chunks):
                read = [pieces[i] for i in order[group:group + buffer_chunks]]
                blocks = [self._block(handle, split, s, min(s + step, self._counts[split])) for split, s, step in read]
                X = np.concatenate([features for features, _ in blocks])
                y = np.concatenate([labels for _, labels in blocks])
                mixed = rng.permutation(len(y))
                for start in range(0, len(y), batch_rows):
                    picked = mixed[start:start + batch_rows]
                    yield X[picked], y[picked]

    def info(self) -> dict:
        """Everything about the file except the features themselves (JSON-serialisable)."""
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "schema_version": self.schema_version,
            "fingerprint_hash": self.fingerprint_hash,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "class_names": self.class_names,
            "splits": {
                name: {"count": self.count(name), "chunk_rows": (self._chunks[name] or (None,))[0]}
                for name in self._splits
            },
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "source": self.source_record,
            "feature_shape": self.feature_shape,
        }
