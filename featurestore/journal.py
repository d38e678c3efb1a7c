"""Crash-safe progress of an unfinished extraction.

Each finished batch is written as its own ``part-NNNNNN.npz`` (ids + features) under
``<store>.partial/<fingerprint_hash>/``, via a temporary file, fsync and rename, so a part is
either complete or absent. A rerun with the same fingerprint loads the parts instead of running
those images again; once the store is written, the journal is deleted.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np


class ExtractionJournal:
    """Parts of one (store, fingerprint) extraction. ``append`` is atomic per batch."""

    def __init__(self, store_path: str | Path, fingerprint_hash: str):
        self.root = Path(str(store_path) + ".partial")
        self.folder = self.root / fingerprint_hash
        self._next = 0

    def drop_other_fingerprints(self) -> None:
        """Parts left by an extraction with another fingerprint can never be used: delete them."""
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other != self.folder:
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()

    def load(self) -> dict[str, np.ndarray]:
        """Features already computed, as ``{content id: (D,) array}``."""
        done: dict[str, np.ndarray] = {}
        if not self.folder.is_dir():
            return done
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part) as data:
                    ids, features = data["ids"].astype(str), data["features"]
            except Exception as exc:  # cannot happen with atomic renames, but never trust a disk
                warnings.warn(f"{part}: unreadable journal part ignored ({exc})", stacklevel=2)
                continue
            done.update(zip(ids, features, strict=True))
            self._next = max(self._next, int(part.stem.split("-")[1]) + 1)
        return done

    def append(self, ids: list[str], features: np.ndarray) -> None:
        """Persist one batch: ids (B,) and features (B, D)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"part-{self._next:06d}.npz"
        tmp = self.folder / f".part-{self._next:06d}.tmp"
        with open(tmp, "wb") as handle:
            np.savez(handle, ids=np.array(ids, dtype="S64"), features=features)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        self._next += 1

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
