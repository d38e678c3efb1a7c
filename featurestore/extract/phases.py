"""The phases of an extraction: run an encoder over a source once, into an incremental, crash-safe HDF5 cache.

Items are identified by the SHA-256 of their file's bytes (an augmented view by a hash derived from it).
With the same fingerprint, items already in the store (or in the journal of an interrupted run) are not
run through the model again; items that are gone are dropped. A different fingerprint never reuses
anything. One writer at a time: the store's lock is held from the scan to the final rename.

The work is in three phases that a distributed run reuses (``distributed.py``): :func:`plan_extraction`
(hash, find what is new), :func:`encode` (decode, encode, journal) and :func:`assemble_store`;
:func:`extract_with` runs them in one process. Where the encoder allows it, one process streams instead: its
workers hash every file while the model runs (:class:`StreamedRecords`), the same loop over another feed.
The front door, ``launch.extract_features``, builds the encoder and chooses between one process and a torchrun group.
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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.sources import Record, Source, content_id, record_content_id
from ..encode.encoders import Encoder, HashedCollate, HashingDataset, Item, Runner
from ..encode.fingerprint import changed_keys
from ..encode.images import lower_worker_priority
from ..errors import DuplicateItemsError, ImageDecodeError, StoreError
from ..store.hdf5 import LAYOUT_VERSION, FeatureStore, SplitArrays, fingerprint_hash, write_store
from ..store.journal import ExtractionJournal, JournalWriter
from ..store.locking import store_lock
from ..utils.atomic import temp_files_of
from ..utils.console import progress_bar
from .options import ExtractOptions

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


def _refuse_unusable(source: Source, on_error: str) -> None:
    if on_error == "fail" and source.unusable:
        raise ImageDecodeError(source.unusable[0]["path"], source.unusable[0]["reason"])


def _duplicates(ids: dict[Record, str], source: Source, on_duplicate: str) -> list[dict]:
    """The duplicate groups of ``ids`` (:func:`find_duplicates`), after ``on_duplicate`` had its say."""
    duplicates = find_duplicates(ids, source.class_names)
    message = f"{source.root}: {describe_duplicates(duplicates)}"
    if duplicates and on_duplicate == "error":
        raise DuplicateItemsError(message + "; remove them, or pass --on-duplicate warn|keep")
    if duplicates and on_duplicate == "warn":
        log.warning("%s; they are kept and listed in the store's `duplicates` (evaluation refuses a test split "
                    "that shares items with train/val)", message)
    return duplicates


@dataclass
class ExtractionPlan:
    """What an extraction will do, decided before any model runs (the streamed path completes it from what its
    workers found): the rows the store (``reused``) and an interrupted run's journal (``resumed``) already hold,
    then the items of every readable record in the source's order, the files skipped, the duplicate groups, and
    the items still to encode (``todo``, in the encoder's order)."""

    source: Source
    out: Path
    fingerprint: dict
    fp_hash: str
    store: FeatureStore | None
    reused: dict[str, np.ndarray]
    resumed: dict[str, np.ndarray]
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    todo: list[Item] = field(default_factory=list)

    def found(self, encoder: Encoder, ids: dict[Record, str], unreadable: dict[Record, str],
              duplicates: list[dict]) -> None:
        """The items of the records that read (content ids ``ids``), in the source's order; the unusable names and
        the ``unreadable`` files, skipped, in the source's order too (whichever order they were read in)."""
        records = self.source.records
        self.items = [item for record in records if record in ids for item in encoder.items(record, ids[record])]
        self.skipped = list(self.source.unusable) + [{"path": record.rel_path, "reason": unreadable[record]}
                                                     for record in records if record in unreadable]
        self.duplicates = duplicates


def _begin(source: Source, out: Path, encoder: Encoder,
           journal_prefix: str = "part") -> tuple[ExtractionPlan, ExtractionJournal]:
    """A plan's start: the rows the store and the journal hold for the encoder's fingerprint (a journal of another
    fingerprint is dropped), and the journal this run adds to."""
    fingerprint = encoder.fingerprint()
    fp_hash = fingerprint_hash(fingerprint)
    store, reused = _existing_rows(out, fingerprint)
    journal = ExtractionJournal(out, fp_hash, prefix=journal_prefix)
    journal.drop_other_fingerprints()
    return ExtractionPlan(source, out, fingerprint, fp_hash, store, reused, journal.load()), journal


def plan_extraction(source: Source, out: Path, encoder: Encoder, options: ExtractOptions,
                    journal_prefix: str = "part") -> tuple[ExtractionPlan, ExtractionJournal]:
    """Hash the source, apply the error and duplicate policies, and find the items the model must still run."""
    _refuse_unusable(source, options.on_error)
    ids, unreadable = _hash_records(source.records, options.progress)
    if options.on_error == "fail" and unreadable:
        record, reason = next(iter(unreadable.items()))
        raise ImageDecodeError(str(record.path), reason)
    duplicates = _duplicates(ids, source, options.on_duplicate)
    plan, journal = _begin(source, out, encoder, journal_prefix)
    plan.found(encoder, ids, unreadable, duplicates)
    todo: dict[str, Item] = {}
    for item in plan.items:
        if item.id not in plan.reused and item.id not in plan.resumed:
            todo.setdefault(item.id, item)
    plan.todo = encoder.order(list(todo.values()))
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


class Step(NamedTuple):
    """One batch from a feed's DataLoader, told the same way by every feed: the content ids of the decoded rows,
    their model input (None: nothing decoded), the ``(index, reason)`` of the items that failed, and how many of
    the feed's ``total`` the batch accounts for."""

    ids: list[str]
    batch: Any
    failed: list[tuple[int, str]]
    done: int


class PlannedItems:
    """A feed of planned items (ids known before: the planned path, torchrun's ranks): the encoder's dataset
    decodes them; a failure is the item's (``failures``: reason by id)."""

    def __init__(self, todo: list[Item], encoder: Encoder):
        self.todo, self.total = todo, len(todo)
        self.dataset, self.collate = encoder.dataset(todo), encoder.collate
        self.failures: dict[str, str] = {}

    def step(self, loaded) -> Step:
        indices, batch, failed = loaded
        return Step([self.todo[i].id for i in indices], batch, failed, len(indices) + len(failed))

    def path(self, index: int) -> Path:
        return self.todo[index].path

    def fail(self, index: int, reason: str) -> None:
        self.failures[self.todo[index].id] = reason


class StreamedRecords:
    """A feed of records read, hashed and decoded in the workers (each file read once; one whose id ``known``
    holds is hashed and not decoded). Found: ``ids`` (content id of every record that read), ``failures``
    (reason by id of those that did not decode), ``unreadable`` (reason by record of those that did not read)."""

    def __init__(self, records: list[Record], encoder: Encoder, known: frozenset[str]):
        self.records, self.total = records, len(records)
        self.dataset = HashingDataset(records, encoder.decode, known)
        self.collate = HashedCollate(encoder.collate)
        self.ids: dict[Record, str] = {}
        self.failures: dict[str, str] = {}
        self.unreadable: dict[Record, str] = {}

    def step(self, loaded) -> Step:
        ids, indices, batch, failed = loaded
        self.ids.update((self.records[index], cid) for index, cid in ids.items())
        unread = sum(1 for index, _ in failed if index not in ids)  # records with no id: not in ``ids``
        return Step([ids[index] for index in indices], batch, failed, len(ids) + unread)

    def path(self, index: int) -> Path:
        return self.records[index].path

    def fail(self, index: int, reason: str) -> None:
        record = self.records[index]
        if record in self.ids:
            self.failures[self.ids[record]] = reason
        else:
            self.unreadable[record] = reason


def encode(feed: PlannedItems | StreamedRecords, encoder: Encoder, journal: ExtractionJournal,
           device: torch.device, options: ExtractOptions,
           desc: str | None = None) -> tuple[dict[str, np.ndarray], Runner | None]:
    """The one extraction loop: decode ``feed``'s items in DataLoader workers, run the encoder a batch at a time
    on its own thread (:class:`Pipeline`), journal the rows on another, handle failures by ``options.on_error``
    (the feed records them), and show one progress bar over the feed's ``total``.

    Returns ``(new features by content id: (D,) float32 each, the runner or None if the feed was empty)``. Raises
    :class:`ImageDecodeError` on the first failure with ``on_error="fail"``, after journalling every finished batch.
    """
    new: dict[str, np.ndarray] = {}
    if not feed.total:
        return new, None
    # Workers are forked before the engine allocates its memory: forked after, they made the
    # onnxruntime session measurably slower (copy-on-write faults) for as long as they lived.
    batches = iter(_loader(feed.dataset, feed.collate, options.batch_size, auto_workers(options.workers, device),
                           device))
    runner = encoder.runner(device)
    writer = JournalWriter(journal)
    pipeline = Pipeline(runner, writer, new)
    unit = getattr(encoder, "unit", "img")
    try:
        with progress_bar(feed.total, desc or f"extract {encoder.name}", unit=unit, enabled=options.progress) as bar:
            for loaded in batches:
                step = feed.step(loaded)
                for index, reason in step.failed:
                    if options.on_error == "fail":
                        raise ImageDecodeError(str(feed.path(index)), reason)
                    feed.fail(index, reason)
                if step.batch is not None:
                    pipeline.submit(step.batch, step.ids)
                bar.update(step.done)
    finally:  # what finished is journalled, also when the run stops on an error
        try:
            pipeline.close()
        finally:
            writer.close()
    return new, runner


def source_record(source: Source, out: Path) -> dict:
    """What a store at ``out`` extracted from ``source`` records as its ``source`` (``store/hdf5.py``): the manifest
    (with the SHA-256 of its bytes) or the folder, ``path`` relative to the store's folder (POSIX: portable across
    clones and moves of the whole project), with the split rule and the corrections applied, if any."""
    origin = source.manifest if source.manifest is not None else source.root
    path = Path(os.path.relpath(Path(origin).resolve(), out.parent.resolve())).as_posix()
    made = {"splits": source.split_rule} if source.split_rule else {}
    if source.corrections:
        made["corrections"] = source.corrections
    if source.manifest is None:
        return {"kind": "folder", "path": path, "sha256": None, **made}
    return {"kind": "manifest", "path": path, "sha256": content_id(source.manifest), **made}


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


def extract_with(encoder: Encoder, source: Source, out: str | Path, options: ExtractOptions | None = None,
                 **keywords) -> ExtractSummary:
    """Run ``encoder`` over ``source`` into the store ``out`` (the lock held throughout), by ``options`` (with
    ``keywords`` in place of its fields: :meth:`ExtractOptions.of`)."""
    started = time.perf_counter()
    options = ExtractOptions.of(options, **keywords)
    out = Path(out)
    device = options.torch_device()
    with store_lock(out, wait=options.wait):
        for stale in temp_files_of(out):  # left by a writer killed mid-write; the lock says none is alive
            stale.unlink(missing_ok=True)
        run = _streamed if streams(encoder, options.on_duplicate) else _planned
        plan, journal, new, failures, runner = run(encoder, source, out, device, options)
        summary = ExtractSummary(out=str(out), backbone=encoder.name, fingerprint_hash=plan.fp_hash,
                                 device=str(device))
        summary.engine = runner.name if runner else None
        summary.truncated = getattr(runner, "truncated", 0)
        summary.model_images = len(new)
        assemble_store(plan, encoder, new, failures, options.dtype, summary)
        journal.clear()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _planned(encoder: Encoder, source: Source, out: Path, device: torch.device, options: ExtractOptions):
    """The planned extraction: every file hashed first (duplicates known before the model runs), then the new
    items encoded. → (plan, journal, new rows by id, decode failures by id, runner or None)."""
    plan, journal = plan_extraction(source, out, encoder, options)
    feed = PlannedItems(plan.todo, encoder)
    new, runner = encode(feed, encoder, journal, device, options)
    return plan, journal, new, feed.failures, runner


def _streamed(encoder: Encoder, source: Source, out: Path, device: torch.device, options: ExtractOptions):
    """The streamed extraction: what the store and the journal hold is known first; the workers hash every file
    and decode the new ones; the plan (items, duplicates, skipped files) is made from the ids they found."""
    _refuse_unusable(source, options.on_error)
    plan, journal = _begin(source, out, encoder)
    known = frozenset(plan.reused) | frozenset(plan.resumed)
    feed = StreamedRecords(encoder.order(list(source.records)), encoder, known)
    new, runner = encode(feed, encoder, journal, device, options)
    ids = {record: feed.ids[record] for record in source.records if record in feed.ids}  # the source's order
    plan.found(encoder, ids, feed.unreadable, _duplicates(ids, source, options.on_duplicate))
    return plan, journal, new, feed.failures, runner
