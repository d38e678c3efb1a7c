"""The phases of an extraction: run an encoder over a source once, into an incremental, crash-safe HDF5 cache.

Items are identified by the SHA-256 of their file's bytes (an augmented view by a hash derived from it).
With the same fingerprint, items already in the store (or in the journal of an interrupted run) are not
run through the model again; items that are gone are dropped. A different fingerprint never reuses
anything. One writer at a time: the store's lock is held from the scan to the final rename.

The work is in three phases that a distributed run reuses (``distributed.py``): :func:`plan_extraction`
(hash, find what is new), :func:`run_items` (decode, encode, journal) and :func:`assemble_store`;
:func:`extract_with` runs them in one process. The front door, ``launch.extract_features``, builds the
encoder and chooses between one process and a torchrun group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..configs import ON_DUPLICATE_CHOICES, ON_ERROR_CHOICES
from ..data.sources import Record, Source, content_id, record_content_id
from ..encode.encoders import Encoder, HashedCollate, HashingDataset, Item, Runner
from ..encode.fingerprint import changed_keys
from ..encode.images import lower_worker_priority
from ..errors import DuplicateItemsError, ImageDecodeError, StoreError
from ..store.hdf5 import DTYPES, LAYOUT_VERSION, FeatureStore, SplitArrays, fingerprint_hash, write_store
from ..store.journal import ExtractionJournal, JournalWriter
from ..store.locking import store_lock
from ..utils.atomic import temp_files_of
from ..utils.console import progress_bar
from ..utils.devices import resolve_device
from ..utils.validation import check_choice, check_range

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
    truncated: int = 0  # texts: documents (of those encoded in this run) longer than the tokenization keeps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _hash_records(records: list[Record], progress: bool) -> tuple[dict[Record, str], dict[Record, str]]:
    """Content ids of readable files, and the reason for each file that cannot be read."""
    ids: dict[Record, str] = {}
    failures: dict[Record, str] = {}
    with progress_bar(len(records), "hashing", unit="file", enabled=progress, leave=False) as bar:
        for record in records:
            try:
                ids[record] = record_content_id(record)
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
               skipped: list[dict], duplicates: list[dict], source: dict, feature_shape: list[int]) -> bool:
    """True when ``store`` already holds exactly these rows, classes and notes in today's layout (rewriting it would
    change nothing; a layout-1 store is rewritten, its rows reused)."""
    if (store is None or store.schema_version != LAYOUT_VERSION or store.fingerprint_hash != fp_hash
            or store.class_names != class_names or store.splits != list(splits) or store.skipped != skipped
            or store.duplicates != duplicates or store.source_record != source or store.feature_shape != feature_shape):
        return False
    for split, arrays in splits.items():
        _, labels, ids = store.load(split)
        same_rows = list(ids) == arrays.ids and list(store.paths(split)) == arrays.paths
        if not (same_rows and np.array_equal(labels, arrays.labels)):
            return False
    return True


def check_options(dtype: str, on_error: str, on_duplicate: str, batch_size: int, workers: int) -> None:
    """The extraction options every entry point accepts, checked before any file is read."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("on_error", on_error, ON_ERROR_CHOICES)
    check_choice("on_duplicate", on_duplicate, ON_DUPLICATE_CHOICES)
    check_range("batch_size", batch_size, 1)
    if workers is not None:
        check_range("workers", workers, 0)


@dataclass
class ExtractionPlan:
    """What an extraction will do, decided before any model runs."""

    source: Source
    out: Path
    fingerprint: dict
    fp_hash: str
    items: list[Item]
    skipped: list[dict]
    duplicates: list[dict]
    store: FeatureStore | None
    reused: dict[str, np.ndarray]
    resumed: dict[str, np.ndarray]
    todo: list[Item]


def plan_extraction(source: Source, out: Path, encoder: Encoder, on_error: str = "skip", on_duplicate: str = "warn",
                    progress: bool = True, journal_prefix: str = "part") -> tuple[ExtractionPlan, ExtractionJournal]:
    """Hash the source, apply the error and duplicate policies, and find the items the model must still run."""
    fingerprint = encoder.fingerprint()
    fp_hash = fingerprint_hash(fingerprint)
    if on_error == "fail" and source.unusable:
        raise ImageDecodeError(source.unusable[0]["path"], source.unusable[0]["reason"])
    ids, failures = _hash_records(source.records, progress)
    if on_error == "fail" and failures:
        record, reason = next(iter(failures.items()))
        raise ImageDecodeError(str(record.path), reason)
    duplicates = find_duplicates(ids, source.class_names)
    _apply_duplicate_policy(duplicates, on_duplicate, source.root)
    store, reused = _existing_rows(out, fingerprint)
    journal = ExtractionJournal(out, fp_hash, prefix=journal_prefix)
    journal.drop_other_fingerprints()
    resumed = journal.load()
    items = [item for record in source.records if record in ids for item in encoder.items(record, ids[record])]
    todo: dict[str, Item] = {}
    for item in items:
        if item.id not in reused and item.id not in resumed:
            todo.setdefault(item.id, item)
    skipped = list(source.unusable) + [{"path": r.rel_path, "reason": reason} for r, reason in failures.items()]
    plan = ExtractionPlan(source, out, fingerprint, fp_hash, items, skipped, duplicates, store, reused, resumed,
                          encoder.order(list(todo.values())))
    return plan, journal


def auto_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader workers: ``workers``, or (None) one on the CPU, where the model's own threads take the cores,
    and up to 8 on CUDA, where decoding is the critical path (the machine's cores less one for this process)."""
    if workers is not None:
        return workers
    return 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _loader(dataset, collate, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    # Decoders yield to the model on the CPU (SCHED_IDLE: a decoder competing with the model's threads stalls
    # every parallel step); on CUDA decoding is the critical path and runs at normal priority.
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                      worker_init_fn=lower_worker_priority if device.type == "cpu" else None)


class Pipeline:
    """The encoder's runner on a thread of its own, one batch in flight: while it computes batch i, this thread
    fetches batch i+1 from the workers and hands batch i-1's rows to the journal writer. (onnxruntime and torch
    release the GIL while they compute; on CUDA the runner's copy back to the host is what the thread waits on.)"""

    def __init__(self, runner: Runner, journal: JournalWriter, new: dict[str, np.ndarray]):
        self.runner, self.journal, self.new = runner, journal, new
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="featurestore-model")
        self.pending: tuple[Future, list[str]] | None = None

    def submit(self, batch, ids: list[str]) -> None:
        future = self.executor.submit(self.runner, batch)
        self.collect()
        self.pending = (future, ids)

    def collect(self) -> None:
        if self.pending is not None:
            future, ids = self.pending
            self.pending = None
            features = future.result()
            self.journal.add(ids, features)
            self.new.update(zip(ids, features, strict=True))

    def close(self) -> None:
        try:
            self.collect()
        finally:
            self.executor.shutdown(wait=True)


def run_items(todo: list[Item], encoder: Encoder, journal: ExtractionJournal, device: torch.device,
              batch_size: int, workers: int | None, on_error: str, progress: bool,
              desc: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str], Runner | None]:
    """Decode planned items in workers, run the encoder a batch at a time on its own thread, journal the rows on
    another (the path of encoders whose items need their ids first: the trunk cache's views; and of torchrun).

    Returns ``(new features by id, decode failure reason by id, the runner or None if nothing ran)``.
    """
    new: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    if not todo:
        return new, failures, None
    # Workers are forked before the engine allocates its memory: forked after, they made the
    # onnxruntime session measurably slower (copy-on-write faults) for as long as they lived.
    batches = iter(_loader(encoder.dataset(todo), encoder.collate, batch_size, auto_workers(workers, device),
                           device))
    runner = encoder.runner(device)
    writer = JournalWriter(journal)
    pipeline = Pipeline(runner, writer, new)
    unit = getattr(encoder, "unit", "img")
    try:
        with progress_bar(len(todo), desc or f"extract {encoder.name}", unit=unit, enabled=progress) as bar:
            for indices, batch, failed in batches:
                for index, reason in failed:
                    if on_error == "fail":
                        raise ImageDecodeError(str(todo[index].path), reason)
                    failures[todo[index].id] = reason
                if batch is not None:
                    pipeline.submit(batch, [todo[i].id for i in indices])
                bar.update(len(indices) + len(failed))
    finally:  # what finished is journalled, also when the run stops on an error
        try:
            pipeline.close()
        finally:
            writer.close()
    return new, failures, runner


@dataclass
class StreamedRun:
    """What a streamed run found: every readable record's content id, the rows it computed, the ids that did not
    decode (with why), and the records that could not be read."""

    ids: dict[Record, str]
    new: dict[str, np.ndarray]
    failures: dict[str, str]
    unreadable: dict[Record, str]
    runner: Runner | None


def stream_records(records: list[Record], encoder: Encoder, known: frozenset[str], journal: ExtractionJournal,
                   device: torch.device, batch_size: int, workers: int | None, on_error: str,
                   progress: bool) -> StreamedRun:
    """Read, hash and decode every record in DataLoader workers (each file read once; an item whose id ``known``
    holds is hashed and not decoded), run the encoder on the rest a batch at a time on its own thread, and
    journal the rows on another."""
    run = StreamedRun({}, {}, {}, {}, None)
    if not records:
        return run
    dataset = HashingDataset(records, encoder.decode, known)
    batches = iter(_loader(dataset, HashedCollate(encoder.collate), batch_size, auto_workers(workers, device),
                           device))
    run.runner = encoder.runner(device)
    writer = JournalWriter(journal)
    pipeline = Pipeline(run.runner, writer, run.new)
    unit = getattr(encoder, "unit", "img")
    try:
        with progress_bar(len(records), f"extract {encoder.name}", unit=unit, enabled=progress) as bar:
            for ids, indices, batch, failed in batches:
                run.ids.update((records[index], cid) for index, cid in ids.items())
                for index, reason in failed:
                    if on_error == "fail":
                        raise ImageDecodeError(str(records[index].path), reason)
                    if index in ids:
                        run.failures[ids[index]] = reason
                    else:
                        run.unreadable[records[index]] = reason
                if batch is not None:
                    pipeline.submit(batch, [ids[index] for index in indices])
                unread = sum(1 for index, _ in failed if index not in ids)  # items with no id: not in ``ids``
                bar.update(len(ids) + unread)
    finally:
        try:
            pipeline.close()
        finally:
            writer.close()
    return run


def source_record(source: Source, out: Path) -> dict:
    """What a store at ``out`` extracted from ``source`` records as its ``source`` (``store/hdf5.py``): the manifest
    (with the SHA-256 of its bytes) or the folder, ``path`` relative to the store's folder (POSIX: portable across
    clones and moves of the whole project)."""
    origin = source.manifest if source.manifest is not None else source.root
    path = Path(os.path.relpath(Path(origin).resolve(), out.parent.resolve())).as_posix()
    if source.manifest is None:
        return {"kind": "folder", "path": path, "sha256": None}
    return {"kind": "manifest", "path": path, "sha256": content_id(source.manifest)}


def assemble_store(plan: ExtractionPlan, encoder: Encoder, new: dict[str, np.ndarray], failures: dict[str, str],
                   dtype: str, summary: ExtractSummary) -> None:
    """Gather every item's row (new, resumed from the journal, or reused from the old store) by split and write
    the store, unless it already holds exactly that."""
    splits: dict[str, list[tuple[Item, np.ndarray]]] = {}
    skipped = list(plan.skipped)
    failed_paths = set()
    for item in plan.items:
        if item.id in failures:
            if item.rel_path not in failed_paths:  # every view of an unreadable file fails: report it once
                skipped.append({"path": item.rel_path, "reason": failures[item.id]})
                failed_paths.add(item.rel_path)
            continue
        for origin, pool in (("extracted", new), ("resumed", plan.resumed), ("reused", plan.reused)):
            if item.id in pool:
                splits.setdefault(item.split, []).append((item, pool[item.id]))
                setattr(summary, origin, getattr(summary, origin) + 1)
                break
    arrays = {}
    for split, rows in splits.items():
        features = np.stack([row for _, row in rows])
        arrays[split] = SplitArrays(features, np.array([item.label for item, _ in rows], dtype=np.int64),
                                    [item.id for item, _ in rows], [item.rel_path for item, _ in rows])
    for split in plan.source.splits:  # a split whose every item failed stays, empty
        if split not in arrays and any(item.split == split for item in plan.items):
            arrays[split] = SplitArrays(np.zeros((0, encoder.feature_dim), dtype=np.float32),
                                        np.zeros(0, dtype=np.int64), [], [])
    summary.skipped, summary.duplicates = skipped, plan.duplicates
    for entry in skipped:
        log.warning("skipped %s: %s", entry["path"], entry["reason"])
    source = source_record(plan.source, plan.out)
    shape = list(encoder.feature_shape)
    if not _unchanged(plan.store, plan.fp_hash, plan.source.class_names, arrays, skipped, plan.duplicates, source,
                      shape):
        write_store(plan.out, plan.fingerprint, plan.source.class_names, arrays, dtype=dtype, skipped=skipped,
                    duplicates=plan.duplicates, source=source, feature_shape=shape)
        summary.written = True


def streams(encoder: Encoder, on_duplicate: str) -> bool:
    """Whether an extraction hashes in its workers (each file read once, while the model runs) rather than in a
    pass of its own before: every encoder with one row per record and a ``decode``, unless duplicates must stop
    the run before the model starts (``on_duplicate="error"``)."""
    return callable(getattr(encoder, "decode", None)) and on_duplicate != "error"


def extract_with(encoder: Encoder, source: Source, out: str | Path, *, device: str | torch.device = "auto",
                 dtype: str = "float32", batch_size: int = 64, workers: int | None = None, on_error: str = "skip",
                 on_duplicate: str = "warn", wait: bool = True, progress: bool = True) -> ExtractSummary:
    """Run ``encoder`` over ``source`` into the store ``out`` (the lock held throughout). ``workers``: DataLoader
    processes (None: chosen by the device, :func:`auto_workers`)."""
    started = time.perf_counter()
    check_options(dtype, on_error, on_duplicate, batch_size, workers)
    out = Path(out)
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    with store_lock(out, wait=wait):
        for stale in temp_files_of(out):  # left by a writer killed mid-write; the lock says none is alive
            stale.unlink(missing_ok=True)
        if streams(encoder, on_duplicate):
            plan, journal, new, failures, runner = _streamed(encoder, source, out, torch_device, batch_size,
                                                             workers, on_error, on_duplicate, progress)
        else:
            plan, journal = plan_extraction(source, out, encoder, on_error, on_duplicate, progress)
            new, failures, runner = run_items(plan.todo, encoder, journal, torch_device, batch_size, workers,
                                              on_error, progress)
        summary = ExtractSummary(out=str(out), backbone=encoder.name, fingerprint_hash=plan.fp_hash,
                                 device=str(torch_device))
        summary.engine = runner.name if runner else None
        summary.truncated = getattr(runner, "truncated", 0)
        summary.model_images = len(new)
        assemble_store(plan, encoder, new, failures, dtype, summary)
        journal.clear()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _streamed(encoder: Encoder, source: Source, out: Path, device: torch.device, batch_size: int,
              workers: int | None, on_error: str, on_duplicate: str, progress: bool):
    """The streamed extraction: what the store and the journal hold is known first; the workers hash every file
    and decode the new ones; the plan (items, duplicates, skipped files) is made from the ids they found."""
    fingerprint = encoder.fingerprint()
    fp_hash = fingerprint_hash(fingerprint)
    if on_error == "fail" and source.unusable:
        raise ImageDecodeError(source.unusable[0]["path"], source.unusable[0]["reason"])
    store, reused = _existing_rows(out, fingerprint)
    journal = ExtractionJournal(out, fp_hash)
    journal.drop_other_fingerprints()
    resumed = journal.load()
    run = stream_records(encoder.order(list(source.records)), encoder, frozenset(reused) | frozenset(resumed),
                         journal, device, batch_size, workers, on_error, progress)
    ids = {record: run.ids[record] for record in source.records if record in run.ids}  # the source's order
    duplicates = find_duplicates(ids, source.class_names)
    _apply_duplicate_policy(duplicates, on_duplicate, source.root)
    items = [item for record, cid in ids.items() for item in encoder.items(record, cid)]
    skipped = list(source.unusable) + [{"path": r.rel_path, "reason": why} for r, why in run.unreadable.items()]
    plan = ExtractionPlan(source, out, fingerprint, fp_hash, items, skipped, duplicates, store, reused, resumed, [])
    return plan, journal, run.new, run.failures, run.runner
