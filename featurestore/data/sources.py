"""Labelled sources: which items there are, their labels and splits, and their content hashes.

A source is a folder tree (``<split>/<class>/<file>``, or ``<class>/<file>`` as split "all"; images or
``.txt`` documents alike) or a manifest: CSV or JSON Lines with ``path`` (or, for texts, ``text``),
``label`` and optionally ``split``. Decoding lives with its modality (``images.py``, ``texts.py``); a
source never opens an item. :func:`nested_subset` draws label budgets that grow by inclusion.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

SPLIT_NAMES = ("train", "val", "test")
FLAT_SPLIT = "all"  # split name for a tree without train/val/test folders
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One labelled item: ``path`` on disk, ``rel_path`` as stored in the cache (relative to the source's
    root, POSIX separators), ``label`` an index into the source's class names (-1: unlabelled). A document
    given inline in a manifest has its ``text`` here, ``path`` the manifest and ``rel_path`` ``<manifest>:<line>``."""

    path: Path
    rel_path: str
    label: int
    split: str
    text: str | None = None


@dataclass(frozen=True)
class Source:
    """A scanned data set: records in a stable order, the class names that labels index, and the files
    that cannot be used at all (``unusable``: ``[{path, reason}]``, e.g. names that are not UTF-8).
    ``manifest``: the manifest file it was read from (None: the folder tree ``root``). ``split_rule``: the
    val/test splits made for it (``splits.SplitRule.to_dict()``; None: its own splits). ``corrections``: what a
    corrections file dropped and relabelled in it (``extract.launch.corrected_source``)."""

    root: Path
    class_names: list[str]
    records: list[Record]
    unusable: list[dict] = field(default_factory=list)
    manifest: Path | None = None
    split_rule: dict | None = None
    corrections: dict | None = None  # Corrections.record of what extract --exclude applied (None: none)

    @property
    def splits(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.setdefault(record.split, None)
        return list(seen)


def printable_name(name: str) -> str:
    """A file name as UTF-8 text; bytes that are not UTF-8 (kept by Python as surrogates) shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def is_utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: Path) -> Source:
    """``root/<split>/<class>/<file>`` for splits train/val/test, or ``root/<class>/<file>`` (split "all").

    Every visible file in a class folder is a candidate; files that do not decode are reported per file
    at extraction time, and so are file names that are not UTF-8 (``Source.unusable``). A class folder
    with no files, or whose name is not UTF-8, is an error.
    """
    split_dirs = [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    if not split_dirs:
        split_dirs = [(FLAT_SPLIT, root)]
    per_split: list[tuple[str, Path, list[Path]]] = []
    for split, split_dir in split_dirs:
        class_dirs = _visible_dirs(split_dir)
        if not class_dirs:
            raise DataError(
                f"{split_dir}: no class folders; expected {split_dir}/<class>/<file> "
                f"(or {root}/{{train,val,test}}/<class>/<file>)"
            )
        for class_dir in class_dirs:
            if not is_utf8_name(class_dir.name):
                raise DataError(f"{printable_name(str(class_dir))}: class folder name is not valid UTF-8; rename it")
            files = _visible_files(class_dir)
            if not files:
                raise DataError(f"{class_dir}: class folder is empty (no files)")
            per_split.append((split, class_dir, files))
    class_names = sorted({class_dir.name for _, class_dir, _ in per_split})
    label_of = {name: index for index, name in enumerate(class_names)}
    records, unusable = [], []
    for split, class_dir, files in per_split:
        for path in files:
            rel = path.relative_to(root).as_posix()
            if is_utf8_name(path.name):
                records.append(Record(path, rel, label_of[class_dir.name], split))
            else:
                unusable.append({"path": printable_name(rel), "reason": "file name is not valid UTF-8"})
    return Source(root, class_names, records, unusable)


def _visible_files_under(folder: Path) -> list[Path]:
    """Every visible file under ``folder`` at any depth: its own files, then each visible subfolder's in turn
    (sorted); nothing in a hidden folder. A folder reached again through a symbolic link is read once."""
    found, seen, pending = [], set(), [folder]
    while pending:
        current = pending.pop(0)
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        found.extend(_visible_files(current))
        pending[:0] = _visible_dirs(current)  # depth first, in sorted order
    return found


def unread_files(source: Source, reason: str) -> list[dict]:
    """The visible files under ``source.root`` (a folder) that ``source`` neither reads nor lists as unusable, as
    ``[{path, reason}]``: what a layout leaves out, so that a caller can say so instead of dropping it silently."""
    accounted = {record.rel_path for record in source.records} | {item["path"] for item in source.unusable}
    relative = (printable_name(path.relative_to(source.root).as_posix())
                for path in _visible_files_under(source.root))
    return [{"path": rel, "reason": reason} for rel in relative if rel not in accounted]


def scan_flat_folder(root: Path, recursive: bool = False) -> Source:
    """A folder of new, unlabelled items: its visible files (label -1, split "all"); with ``recursive`` also those
    of its visible subfolders at any depth (``rel_path`` ``sub/file``). Names that are not UTF-8 are ``unusable``;
    hidden files and folders are never read (:func:`unread_files` lists what a non-recursive scan leaves out)."""
    files = _visible_files_under(root) if recursive else _visible_files(root)
    named = [(path, path.relative_to(root).as_posix()) for path in files]
    records = [Record(path, rel, -1, FLAT_SPLIT) for path, rel in named if is_utf8_name(rel)]
    unusable = [{"path": printable_name(rel), "reason": "file name is not valid UTF-8"}
                for _, rel in named if not is_utf8_name(rel)]
    return Source(root, [], records, unusable)


def _relative_inside(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (POSIX), judged lexically (``..`` resolved, symbolic links placed in the
    root deliberately are followed by whoever opens the file), or None when it lies outside."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative):
        return None
    return Path(relative).as_posix()


def _manifest_rows(manifest: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (header line 1) or JSON Lines manifest; string values, stripped."""
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            if manifest.suffix.lower() == ".jsonl":
                rows = []
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except ValueError as exc:
                            raise DataError(f"{manifest}:{number}: not a JSON object ({exc})") from None
                        if not isinstance(row, dict):
                            raise DataError(f"{manifest}:{number}: not a JSON object")
                        rows.append((number, {k: "" if v is None else str(v) for k, v in row.items()}))
                return rows
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = ([] if {"path", "text"} & set(columns) else ["path"]) + ([] if "label" in columns else ["label"])
            if missing:
                raise DataError(f"{manifest}: manifest lacks column(s) {missing}; found {columns}, need path "
                                f"(or text),label[,split]")
            return [(number, {k: (v or "") for k, v in row.items() if k}) for number, row in enumerate(reader, start=2)]
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest}: manifest is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{manifest}: not a readable CSV manifest ({exc})") from None


def read_manifest(manifest: Path) -> Source:
    """A CSV or JSON Lines manifest with ``path`` or ``text``, ``label`` and optionally ``split``.

    Relative paths are relative to the manifest's folder, and every path (relative or absolute) must lie
    inside that folder. Labels are class names; class indices follow their sorted order. A missing ``split``
    or an empty one gives split "all".
    """
    root = manifest.parent
    records_in = []
    for number, row in _manifest_rows(manifest):
        path, label = row.get("path", "").strip(), row.get("label", "").strip()
        if not label or not (path or "text" in row):
            raise DataError(f"{manifest}:{number}: empty path (or no text) or label")
        text = None if path else row["text"]  # an empty text is skipped at extraction, with its reason
        records_in.append((number, path, text, label, row.get("split", "").strip() or FLAT_SPLIT))
    if not records_in:
        raise DataError(f"{manifest}: manifest has no rows")
    class_names = sorted({label for _, _, _, label, _ in records_in})
    label_of = {name: index for index, name in enumerate(class_names)}
    records = []
    for number, path, text, label, split in records_in:
        if text is not None:
            records.append(Record(manifest, f"{manifest.name}:{number}", label_of[label], split, text=text))
            continue
        full = Path(path) if Path(path).is_absolute() else root / path
        relative = _relative_inside(full, root)
        if relative is None:
            raise DataError(f"{manifest}:{number}: path {path!r} lies outside the manifest's folder "
                            f"{root.resolve()}; keep the manifest at the top of its data")
        records.append(Record(full, relative, label_of[label], split))
    return Source(root, class_names, records, manifest=manifest)


def scan_source(data: str | Path) -> Source:
    """A folder tree (a directory) or a CSV manifest (a ``.csv`` file). (``splits.scan_with_splits`` also makes
    the val/test splits a store records.)"""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: data folder or manifest not found")
    if data.is_file():
        if data.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataError(f"{data}: expected a data folder or a .csv / .jsonl manifest")
        return read_manifest(data)
    return scan_folder(data)


def record_content_id(record: Record) -> str:
    """The identity of a record's content: the SHA-256 of its inline text (UTF-8), or of its file's bytes."""
    if record.text is not None:
        return hashlib.sha256(record.text.encode("utf-8")).hexdigest()
    return content_id(record.path)


def content_id(path: Path) -> str:
    """Hex SHA-256 of the file's bytes: the item's identity in the cache (renames keep it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nested_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Row indices: the first ``per_class`` rows of each class in a seeded order, so the subset for a larger
    budget contains the one for a smaller budget. labels (N,) int → sorted indices (≤ K·per_class,) int64."""
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = [order[labels[order] == cls][:per_class] for cls in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def budget_shortfall(labels: np.ndarray, per_class: int) -> dict[int, int]:
    """Classes (label → items it has) with fewer than ``per_class`` items in labels (N,) int: where a label budget
    is capped, since :func:`nested_subset` then takes all of them."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < per_class}


def rows_for_ids(available: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    """Positions in ``available`` (N,) str of the content ids ``wanted`` (M,) str, in ``wanted``'s order → (M,)
    int64. An id wanted twice (identical files) takes two distinct rows with that id. Raises
    :class:`DataError` naming ``where`` when an id is missing."""
    positions: dict[str, deque[int]] = defaultdict(deque)
    for index, cid in enumerate(available):
        positions[str(cid)].append(index)
    found = []
    for cid in wanted:
        if not positions[str(cid)]:
            raise DataError(f"{where} has no row for item {str(cid)[:12]}…: the data changed since it was "
                            f"extracted; extract again")
        found.append(positions[str(cid)].popleft())
    return np.asarray(found, dtype=np.int64)


def ids_digest(ids) -> str:
    """A short SHA-256 of content ids in order: what a curve point trained on (probe and fine-tune must agree)."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]

