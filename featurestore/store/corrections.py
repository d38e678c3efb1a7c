"""Corrections: what a user drops or relabels after looking at the data (``featurestore audit`` suggests them).

A corrections file is a CSV with a header and a ``path`` column, the item's path as the store records it (the audit's
files list the same), and an optional ``label`` column: empty drops the item, a class name relabels it. Other columns
(the audit's ``reason``) are ignored.

    path,label
    train/Shirt/00412.png,          ← left out
    train/Coat/00077.png,Pullover   ← relabelled

They act in two places, on one reading (:func:`read_corrections`):
- ``extract --exclude`` (and the pipeline's ``configs/corrections/<store>.csv``) applies them to the data before the
  store is written (``extract.launch.corrected_source``): nothing is re-encoded, the store records the file's SHA-256,
  and everything downstream sees the corrected rows;
- ``train-head --exclude`` reads an existing store through them (:class:`CorrectedStore`) for a quick experiment.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import BadValueError, DataError
from .hdf5 import FeatureStore

log = logging.getLogger("featurestore")


@dataclass(frozen=True)
class Corrections:
    """A read corrections file: ``drop`` (relative paths to leave out) and ``relabel`` ({path: class name})."""

    path: Path
    sha256: str
    drop: frozenset[str]
    relabel: dict[str, str]

    def record(self, dropped: int, relabelled: int) -> dict:
        """What a store or head records of the corrections it was made with (their counts as applied)."""
        return {"file": self.path.name, "sha256": self.sha256, "dropped": int(dropped), "relabelled": int(relabelled)}

    def label_index(self, rel_path: str, class_names: list[str]) -> int:
        """The class index ``rel_path`` is relabelled to; :class:`BadValueError` naming the file for an unknown
        class."""
        name = self.relabel[rel_path]
        if name not in class_names:
            raise BadValueError(f"{self.path}: {rel_path} is relabelled to {name!r}, not a class of the data "
                                f"({', '.join(class_names)})")
        return class_names.index(name)

    def check_known(self, known_paths: set[str], where: str) -> None:
        """Refuse corrections of which not one names an item of ``where`` (a wrong file or paths written another
        way); some unknown ones (items already removed, a typo) are named in one warning line."""
        named = self.drop | set(self.relabel)
        unknown = sorted(named - known_paths)
        if named and len(unknown) == len(named):
            raise DataError(f"{self.path}: none of its {len(named)} paths is an item of {where} (e.g. {unknown[0]!r}); "
                            f"write them as the store records them (the audit's `path` column)")
        if unknown:
            log.warning("%s: %d of its %d paths are no item of %s and change nothing (e.g. %r)", self.path,
                        len(unknown), len(named), where, unknown[0])


def read_corrections(path: str | Path) -> Corrections:
    """Read a corrections file. Raises :class:`DataError` naming the file (and the line) when it is missing, has no
    ``path`` column, an empty path, or one path twice."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the corrections file ({exc})") from None
    header = next(csv.reader(raw.decode("utf-8-sig").splitlines()), [])
    if "path" not in header:
        raise DataError(f"{path}: a corrections file needs a `path` column (and optionally `label`); found "
                        f"{header or 'no header'}")
    drop: set[str] = set()
    relabel: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        item, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not item:
            raise DataError(f"{path}, line {line}: empty path")
        if item in drop or item in relabel:
            raise DataError(f"{path}, line {line}: {item} is listed twice")
        if label:
            relabel[item] = label
        else:
            drop.add(item)
    return Corrections(path, hashlib.sha256(raw).hexdigest(), frozenset(drop), relabel)


class CorrectedStore(FeatureStore):
    """A feature store read through corrections: dropped rows are absent from every read (``load``, ``labels``,
    ``ids``, ``paths``, ``rows``, ``count``, ``iter_chunks``, ``iter_shuffled``) and relabelled rows carry their new
    label. The file itself is untouched; ``corrections_record`` says what was applied."""

    def __init__(self, path: str | Path, corrections: Corrections):
        super().__init__(path)
        self.corrections = corrections
        self._keep: dict[str, np.ndarray] = {}  # split → kept rows, (N',) int64 ascending
        self._labels: dict[str, np.ndarray] = {}  # split → every row's label after relabelling, (N,) int64
        known: set[str] = set()
        dropped = relabelled = 0
        for split in self._splits:
            paths = super().paths(split)
            labels = super().labels(split).astype(np.int64)
            known.update(paths.tolist())
            keep = np.array([p not in corrections.drop for p in paths], dtype=bool)
            for row, item in enumerate(paths):
                if item in corrections.relabel:
                    new = corrections.label_index(item, self.class_names)
                    relabelled += int(new != labels[row])
                    labels[row] = new
            dropped += int((~keep).sum())
            self._keep[split], self._labels[split] = np.flatnonzero(keep), labels
        corrections.check_known(known, str(self.path))
        self.corrections_record = corrections.record(dropped, relabelled)

    def count(self, split: str) -> int:
        self._check_split(split)
        return len(self._keep[split])

    def load(self, split, dtype=None):
        features, _, ids = super().load(split, dtype)
        keep = self._keep[split]
        return features[keep], self._labels[split][keep], ids[keep]

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        return self._labels[split][self._keep[split]]

    def ids(self, split: str) -> np.ndarray:
        return super().ids(split)[self._keep[split]]

    def paths(self, split: str) -> np.ndarray:
        return super().paths(split)[self._keep[split]]

    def rows(self, split: str, indices: np.ndarray) -> np.ndarray:
        self._check_split(split)
        return super().rows(split, self._keep[split][np.asarray(indices, dtype=np.int64)])

    def _block(self, handle: h5py.File, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        keep = self._keep[split]
        rows = keep[np.searchsorted(keep, start):np.searchsorted(keep, stop)]
        features = handle[split]["features"][start:stop]
        return features[rows - start], self._labels[split][rows]

    def info(self) -> dict:
        return {**super().info(), "corrections": self.corrections_record}


def open_store(path: str | Path, corrections: str | Path | None = None) -> FeatureStore:
    """The store at ``path``, read through the corrections file ``corrections`` when given."""
    return FeatureStore(path) if corrections is None else CorrectedStore(path, read_corrections(corrections))
