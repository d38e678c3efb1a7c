"""Crash-safe progress of an unfinished extraction.

Each finished batch is written as its own ``part-NNNNNN.npz`` (ids + features) under
``<store>.partial/<fingerprint_hash>/``, via a uniquely named temporary file, fsync and rename, so a
part is either complete or absent. A rerun with the same fingerprint loads the parts instead of running
those images again; once the store is written, the journal is deleted. The store's lock (locking.py)
keeps a second writer out of the journal.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path

log = logging.getLogger("featurestore")


class ExtractionJournal:
    """Parts of one (store, fingerprint) extraction. ``append`` is atomic per batch."""

    def __init__(self, store_path: str | Path, fingerprint_hash: str, prefix: str = "part"):
        self.root = Path(str(store_path) + ".partial")
        self.folder = self.root / fingerprint_hash
        self.prefix = prefix  # torchrun ranks journal under rank-qualified prefixes
        self._next = 0

    def drop_other_fingerprints(self) -> None:
        """Parts left by an extraction with another fingerprint can never be used: delete them."""
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other != self.folder:
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()

    def load(self, pattern: str = "*.npz") -> dict[str, np.ndarray]:
        """Features already computed, as ``{content id: (D,) array}``.

        A part that cannot be read (disk corruption: renames make partial writes impossible) is reported in
        one line, deleted, and its images are simply computed again.
        """
        done: dict[str, np.ndarray] = {}
        if not self.folder.is_dir():
            return done
        for part in sorted(self.folder.glob(pattern)):
            try:
                with np.load(part) as data:
                    ids, features = data["ids"].astype(str), data["features"]
                if features.ndim != 2 or len(ids) != len(features):
                    raise ValueError(f"ids {ids.shape} and features {features.shape} do not match")
            except Exception as exc:
                log.warning("%s: unreadable journal part deleted, its images are extracted again (%s: %s)",
                            part, type(exc).__name__, exc)
                part.unlink(missing_ok=True)
                continue
            done.update(zip(ids, features, strict=True))
            if part.name.startswith(self.prefix + "-"):
                self._next = max(self._next, int(part.stem.rsplit("-", 1)[1]) + 1)
        return done

    def append(self, ids: list[str], features: np.ndarray) -> Path:
        """Persist one batch: ids (B,) and features (B, D) float. Returns the part's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{self.prefix}-{self._next:06d}.npz"
        with atomic_path(final) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, ids=np.array(ids, dtype="S64"), features=features)
        self._next += 1
        return final

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
