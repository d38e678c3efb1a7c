"""Run a frozen backbone over an image source once, into an incremental, crash-safe HDF5 cache.

Images are identified by the SHA-256 of their bytes. With the same fingerprint, images already in
the store (or in the journal of an interrupted run) are not run through the model again; images
that are gone are dropped. A different fingerprint never reuses anything. One writer at a time:
the store's lock is held from the scan to the final rename.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .atomic import temp_files_of
from .backbones import DEFAULT_BACKBONE, FeatureModel, get_spec, load_backbone
from .configs import ON_DUPLICATE_CHOICES, ON_ERROR_CHOICES
from .console import progress_bar
from .data import Record, Source, content_id, scan_source
from .devices import resolve_device
from .engines import make_engine
from .errors import DuplicateItemsError, ImageDecodeError, StoreError
from .fingerprint import changed_keys, fingerprint_for
from .images import DecodedImages, collate_decoded, lower_worker_priority
from .journal import ExtractionJournal
from .locking import store_lock
from .store import DTYPES, FeatureStore, SplitArrays, fingerprint_hash, write_store

log = logging.getLogger("featurestore")



@dataclass
class ExtractSummary:
    """What one extraction did. Counts are images (rows written), by where their feature came from."""

    out: str
    backbone: str
    fingerprint_hash: str
    device: str
    extracted: int = 0
    reused: int = 0
    resumed: int = 0
    model_images: int = 0
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    written: bool = False
    engine: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _hash_records(records: list[Record], progress: bool) -> tuple[dict[Record, str], dict[Record, str]]:
    """Content ids of readable files, and the reason for each file that cannot be read."""
    ids: dict[Record, str] = {}
    failures: dict[Record, str] = {}
    with progress_bar(len(records), "hashing", unit="file", enabled=progress, leave=False) as bar:
        for record in records:
            try:
                ids[record] = content_id(record.path)
            except FileNotFoundError:
                failures[record] = "file not found"
            except OSError as exc:
                failures[record] = f"cannot read file ({exc.strerror or exc})"
            bar.update(1)
    return ids, failures


def find_duplicates(ids: dict[Record, str], class_names: list[str]) -> list[dict]:
    """Groups of files with identical bytes in two splits or under two labels:
    ``[{id, paths, splits, labels}]`` (copies within one split and label are harmless and not listed)."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record, cid in ids.items():
        groups[cid].append(record)
    found = []
    for cid, records in groups.items():
        splits = sorted({r.split for r in records})
        labels = sorted({class_names[r.label] for r in records})
        if len(splits) > 1 or len(labels) > 1:
            found.append({"id": cid, "paths": [r.rel_path for r in records], "splits": splits, "labels": labels})
    return found


def describe_duplicates(duplicates: list[dict], shown: int = 3) -> str:
    examples = "; ".join(" = ".join(group["paths"]) for group in duplicates[:shown])
    more = f" (and {len(duplicates) - shown} more)" if len(duplicates) > shown else ""
    return f"{len(duplicates)} group(s) of identical files across splits or labels: {examples}{more}"


def _apply_duplicate_policy(duplicates: list[dict], on_duplicate: str, source_root: Path) -> None:
    if not duplicates:
        return
    message = f"{source_root}: {describe_duplicates(duplicates)}"
    if on_duplicate == "error":
        raise DuplicateItemsError(message + "; remove them, or pass --on-duplicate warn|keep")
    if on_duplicate == "warn":
        log.warning("%s; they are kept and listed in the store's `duplicates` (evaluation refuses a test split "
                    "that shares items with train/val)", message)


def _existing_rows(out: Path, fingerprint: dict) -> tuple[FeatureStore | None, dict[str, np.ndarray]]:
    """Features of the current store by content id, if its fingerprint matches; else nothing."""
    if not out.exists():
        return None, {}
    try:
        store = FeatureStore(out)
    except StoreError as exc:
        log.warning("%s: existing file unusable, it will be replaced (%s)", out, exc)
        return None, {}
    fp_hash = fingerprint_hash(fingerprint)
    if store.fingerprint_hash != fp_hash:
        log.warning("%s: fingerprint changed (%s → %s: %s differ): extracting every image again, nothing is mixed",
                    out, store.fingerprint_hash, fp_hash, ", ".join(changed_keys(store.fingerprint, fingerprint)))
        return store, {}
    rows: dict[str, np.ndarray] = {}
    for split in store.splits:
        features, _, ids = store.load(split)
        rows.update(zip(ids, features, strict=True))
    return store, rows


def _unchanged(store: FeatureStore | None, fp_hash: str, class_names: list[str], splits: dict[str, SplitArrays],
               skipped: list[dict], duplicates: list[dict], source_root: str) -> bool:
    """True when ``store`` already holds exactly these rows, classes and notes (rewriting it would change nothing)."""
    if (store is None or store.fingerprint_hash != fp_hash or store.class_names != class_names
            or store.splits != list(splits) or store.skipped != skipped or store.duplicates != duplicates
            or store.source_root != source_root):
        return False
    for split, arrays in splits.items():
        _, labels, ids = store.load(split)
        same_rows = list(ids) == arrays.ids and list(store.paths(split)) == arrays.paths
        if not (same_rows and np.array_equal(labels, arrays.labels)):
            return False
    return True


def _check_options(dtype: str, on_error: str, on_duplicate: str, batch_size: int, workers: int) -> None:
    for name, value, choices in (("dtype", dtype, DTYPES), ("on_error", on_error, ON_ERROR_CHOICES),
                                 ("on_duplicate", on_duplicate, ON_DUPLICATE_CHOICES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError("batch_size must be >= 1 and workers >= 0")


def extract_features(
    data: str | Path | Source,
    out: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int = 1,
    device: str = "auto",
    engine: str = "auto",
    dtype: str = "float32",
    on_error: str = "skip",
    on_duplicate: str = "warn",
    wait: bool = True,
    progress: bool = True,
    model: FeatureModel | None = None,
) -> ExtractSummary:
    """Extract features of every image in ``data`` into the store ``out``.

    ``model`` may be passed to reuse a loaded backbone (``backbone``/``weights``/``image_size``/
    ``crop_pct`` are then ignored). ``engine`` is ``auto``, ``torch`` or ``onnxruntime`` (see
    :mod:`featurestore.engines`). Raises :class:`ImageDecodeError` on the first bad image when
    ``on_error="fail"``, after saving every finished batch in the journal. ``on_duplicate`` decides what
    identical files in two splits or under two labels do: ``warn`` (default), ``error`` or ``keep``; they
    are listed in the store either way. ``wait=False`` fails at once when another process holds the store.
    """
    started = time.perf_counter()
    _check_options(dtype, on_error, on_duplicate, batch_size, workers)
    out = Path(out)
    if model is None:
        get_spec(backbone)  # an unknown name fails before any file is read
    source = data if isinstance(data, Source) else scan_source(data)
    with store_lock(out, wait=wait):
        for stale in temp_files_of(out):  # left by a writer killed mid-write; the lock says none is alive
            stale.unlink(missing_ok=True)
        return _extract_locked(source, out, started, backbone, weights, image_size, crop_pct, batch_size, workers,
                               device, engine, dtype, on_error, on_duplicate, progress, model)


def _extract_locked(source: Source, out: Path, started: float, backbone: str, weights, image_size, crop_pct,
                    batch_size: int, workers: int, device: str, engine: str, dtype: str, on_error: str,
                    on_duplicate: str, progress: bool, model: FeatureModel | None) -> ExtractSummary:
    torch_device = resolve_device(device)
    model = model or load_backbone(backbone, weights=weights, image_size=image_size, crop_pct=crop_pct)
    autocast = torch_device.type == "cuda" and engine != "onnxruntime"
    fingerprint = fingerprint_for(model, dtype, autocast)
    fp_hash = fingerprint_hash(fingerprint)
    summary = ExtractSummary(out=str(out), backbone=model.name, fingerprint_hash=fp_hash, device=str(torch_device))

    if on_error == "fail" and source.unusable:
        raise ImageDecodeError(source.unusable[0]["path"], source.unusable[0]["reason"])
    ids, failures = _hash_records(source.records, progress)
    if on_error == "fail" and failures:
        record, reason = next(iter(failures.items()))
        raise ImageDecodeError(str(record.path), reason)
    duplicates = find_duplicates(ids, source.class_names)
    _apply_duplicate_policy(duplicates, on_duplicate, source.root)
    store, reused = _existing_rows(out, fingerprint)
    journal = ExtractionJournal(out, fp_hash)
    journal.drop_other_fingerprints()
    resumed = journal.load()

    todo: dict[str, Path] = {}
    for record, cid in ids.items():
        if cid not in reused and cid not in resumed:
            todo.setdefault(cid, record.path)
    new: dict[str, np.ndarray] = {}
    decode_failures: dict[str, str] = {}
    if todo:
        summary.engine = _run_model(
            lambda: make_engine(model, torch_device, engine),
            model, todo, journal, new, decode_failures, batch_size, workers, on_error, progress,
        )
    summary.model_images = len(new)

    splits: dict[str, SplitArrays] = {}
    skipped = list(source.unusable) + [{"path": r.rel_path, "reason": reason} for r, reason in failures.items()]
    for split in source.splits:
        rows, labels, row_ids, paths = [], [], [], []
        for record in source.records:
            if record.split != split or record not in ids:
                continue
            cid = ids[record]
            if cid in decode_failures:
                skipped.append({"path": record.rel_path, "reason": decode_failures[cid]})
                continue
            for origin, pool in (("extracted", new), ("resumed", resumed), ("reused", reused)):
                if cid in pool:
                    rows.append(pool[cid])
                    setattr(summary, origin, getattr(summary, origin) + 1)
                    break
            labels.append(record.label)
            row_ids.append(cid)
            paths.append(record.rel_path)
        features = np.stack(rows) if rows else np.zeros((0, model.feature_dim), dtype=np.float32)
        splits[split] = SplitArrays(features, np.asarray(labels, dtype=np.int64), row_ids, paths)
    summary.skipped, summary.duplicates = skipped, duplicates
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])

    root = os.path.relpath(source.root.resolve(), out.parent.resolve())  # portable: clones and moved projects
    if not _unchanged(store, fp_hash, source.class_names, splits, skipped, duplicates, root):
        write_store(out, fingerprint, source.class_names, splits, dtype=dtype, skipped=skipped,
                    duplicates=duplicates, source_root=root)
        summary.written = True
    journal.clear()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _run_model(
    make_runner,
    model: FeatureModel,
    todo: dict[str, Path],
    journal: ExtractionJournal,
    new: dict[str, np.ndarray],
    decode_failures: dict[str, str],
    batch_size: int,
    workers: int,
    on_error: str,
    progress: bool,
) -> str:
    """Decode in workers, run the engine batch by batch, journal each batch as soon as it is done.

    Returns the engine's name.
    """
    todo_ids = list(todo)
    loader = DataLoader(
        DecodedImages(list(todo.values()), model.preprocessing),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        worker_init_fn=lower_worker_priority,
    )
    batches = iter(loader)
    # Workers are forked before the engine allocates its memory: forked after, they made the
    # onnxruntime session measurably slower (copy-on-write faults) for as long as they lived.
    runner = make_runner()
    with progress_bar(len(todo_ids), f"extract {model.name}", enabled=progress) as bar:
        for indices, batch, failed in batches:
            for index, reason in failed:
                if on_error == "fail":
                    raise ImageDecodeError(str(todo[todo_ids[index]]), reason)
                decode_failures[todo_ids[index]] = reason
            if batch is not None:
                features = runner(batch)
                batch_ids = [todo_ids[i] for i in indices]
                journal.append(batch_ids, features)
                new.update(zip(batch_ids, features, strict=True))
            bar.update(len(indices) + len(failed))
    return runner.name
