"""Crash-safe progress of an unfinished extraction.

Finished rows are written in parts, ``part-NNNNNN.npz`` (ids + features), by a background thread
(:class:`JournalWriter`: a few thousand rows or about a second of work a part), under
``<store>.partial/<fingerprint_hash>/``, via a uniquely named temporary file, fsync and rename, so a
part is either complete or absent. A rerun with the same fingerprint loads the parts instead of running
those images again; once the store is written, the journal is deleted. The store's lock (locking.py)
keeps a second writer out of the journal.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
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


class JournalWriter:
    """Writes an extraction's journal on a background thread, so that the model never waits for a file.

    :meth:`add` queues finished rows and returns at once; the thread gathers them and writes a part (atomic, like
    :meth:`ExtractionJournal.append`) once it holds ``part_rows`` rows or its oldest row is ``part_seconds`` old:
    a crash loses at most the last seconds of work, never a part already written. :meth:`close` writes what is
    left and waits; an error on the thread is raised by the next :meth:`add` or by :meth:`close`.
    """

    def __init__(self, journal: ExtractionJournal, part_rows: int | None = None, part_seconds: float = 1.0):
        # $FEATURESTORE_JOURNAL_ROWS sets the rows of a part (the crash tests journal every batch with it).
        self.part_rows = part_rows or int(os.environ.get("FEATURESTORE_JOURNAL_ROWS", 4096))
        self.journal, self.part_seconds = journal, part_seconds
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featurestore-journal", daemon=True)
        self.thread.start()

    def add(self, ids: list[str], features: np.ndarray) -> None:
        """Queue rows: ids (B,) str, features (B, D)."""
        if self.error is not None:
            raise self.error
        self.queue.put((list(ids), features))

    def close(self) -> None:
        """Write the rows still held, stop the thread, and raise its error if it had one."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        oldest = None
        try:
            while True:
                timeout = None if oldest is None else max(0.0, oldest + self.part_seconds - time.monotonic())
                try:
                    entry = self.queue.get(timeout=timeout)
                except queue.Empty:
                    entry = ()  # the oldest row's time is up
                if entry:
                    ids.extend(entry[0])
                    blocks.append(entry[1])
                    oldest = oldest if oldest is not None else time.monotonic()
                if ids and (entry is None or len(ids) >= self.part_rows
                            or time.monotonic() - oldest >= self.part_seconds):
                    self.journal.append(ids, np.concatenate(blocks))
                    ids, blocks, oldest = [], [], None
                if entry is None:
                    return
        except BaseException as exc:  # handed to the extraction's thread
            self.error = exc
