"""Run a frozen backbone over an image source once, into an incremental, crash-safe HDF5 cache.

Images are identified by the SHA-256 of their bytes. With the same fingerprint, images already in
the store (or in the journal of an interrupted run) are not run through the model again; images
that are gone are dropped. A different fingerprint never reuses anything.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import DEFAULT_BACKBONE, FeatureModel, get_spec, load_backbone
from .console import progress_bar
from .data import RGB_CONVERSION, ImageRecord, ImageSource, content_id, load_image, scan_source
from .devices import resolve_device
from .engines import make_engine
from .errors import ImageDecodeError, StoreError
from .journal import ExtractionJournal
from .preprocess import Preprocessing
from .store import DTYPES, SCHEMA_VERSION, FeatureStore, SplitArrays, fingerprint_hash, write_store

log = logging.getLogger("featurestore")

ON_ERROR_CHOICES = ("skip", "fail")


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
    seconds: float = 0.0
    written: bool = False
    engine: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def fingerprint_for(model: FeatureModel, dtype: str, autocast: bool) -> dict:
    """Everything that changes a feature value; two stores share rows only if these are equal."""
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone": model.name,
        "weights_sha256": model.weights_sha256,
        "layer": "penultimate (classifier removed), global average pooled",
        "feature_dim": model.feature_dim,
        "preprocessing": model.preprocessing.as_dict(),
        "rgb_conversion": RGB_CONVERSION,
        "dtype": dtype,
        "compute": "autocast-float16" if autocast else "float32",
    }


class DecodedImages(Dataset):
    """Decodes and preprocesses images in DataLoader workers.

    Item: ``(index, uint8 tensor (3, S, S) or None, failure reason or None)``.
    """

    def __init__(self, paths: list[Path], preprocessing: Preprocessing):
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocessing(load_image(self.paths[index])), None
        except ImageDecodeError as exc:
            return index, None, exc.reason
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return index, None, f"cannot preprocess ({type(exc).__name__}: {exc})"


def _lower_worker_priority(worker_id: int) -> None:
    """Run decoding only on CPU time the model leaves idle.

    Decoding is cheap next to the model, but on a small CPU a decoder competing with the model's
    threads stalls them (each parallel step waits for its slowest thread). SCHED_IDLE lets the
    worker fill the model's gaps; the prefetch queue absorbs the timing.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted
        try:
            os.nice(19)
        except OSError:
            pass


def collate_decoded(items):
    """→ (indices of decoded images, uint8 batch (B, 3, S, S) or None, [(index, reason)] failures)."""
    ok = [(index, tensor) for index, tensor, _ in items if tensor is not None]
    failed = [(index, reason) for index, tensor, reason in items if tensor is None]
    batch = torch.stack([tensor for _, tensor in ok]) if ok else None
    return [index for index, _ in ok], batch, failed


def _hash_records(records: list[ImageRecord], progress: bool) -> tuple[dict[ImageRecord, str], dict[ImageRecord, str]]:
    """Content ids of readable files, and the reason for each file that cannot be read."""
    ids: dict[ImageRecord, str] = {}
    failures: dict[ImageRecord, str] = {}
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


def _existing_rows(out: Path, fp_hash: str) -> tuple[FeatureStore | None, dict[str, np.ndarray]]:
    """Features of the current store by content id, if its fingerprint matches; else nothing."""
    if not out.exists():
        return None, {}
    try:
        store = FeatureStore(out)
    except StoreError as exc:
        log.warning("%s: existing file unusable, it will be replaced (%s)", out, exc)
        return None, {}
    if store.fingerprint_hash != fp_hash:
        log.warning(
            "%s: fingerprint changed (%s → %s): extracting every image again, nothing is mixed",
            out, store.fingerprint_hash, fp_hash,
        )
        return store, {}
    rows: dict[str, np.ndarray] = {}
    for split in store.splits:
        features, _, ids = store.load(split)
        rows.update(zip(ids, features, strict=True))
    return store, rows


def _unchanged(store: FeatureStore | None, fp_hash: str, splits: dict[str, SplitArrays], skipped: list[dict]) -> bool:
    """True when ``store`` already holds exactly these rows (so rewriting it would change nothing)."""
    if store is None or store.fingerprint_hash != fp_hash or store.splits != list(splits) or store.skipped != skipped:
        return False
    for split, arrays in splits.items():
        _, labels, ids = store.load(split)
        same_rows = list(ids) == arrays.ids and list(store.paths(split)) == arrays.paths
        if not (same_rows and np.array_equal(labels, arrays.labels)):
            return False
    return True


def extract_features(
    data: str | Path | ImageSource,
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
    progress: bool = True,
    model: FeatureModel | None = None,
) -> ExtractSummary:
    """Extract features of every image in ``data`` into the store ``out``.

    ``model`` may be passed to reuse a loaded backbone (``backbone``/``weights``/``image_size``/
    ``crop_pct`` are then ignored). ``engine`` is ``auto``, ``torch`` or ``onnxruntime`` (see
    :mod:`featurestore.engines`). Raises :class:`ImageDecodeError` on the first bad image when
    ``on_error="fail"``, after saving every finished batch in the journal.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError("batch_size must be >= 1 and workers >= 0")
    out = Path(out)
    if model is None:
        get_spec(backbone)  # an unknown name fails before any file is read
    source = data if isinstance(data, ImageSource) else scan_source(data)
    torch_device = resolve_device(device)
    model = model or load_backbone(backbone, weights=weights, image_size=image_size, crop_pct=crop_pct)
    autocast = torch_device.type == "cuda" and engine != "onnxruntime"
    fingerprint = fingerprint_for(model, dtype, autocast)
    fp_hash = fingerprint_hash(fingerprint)
    summary = ExtractSummary(out=str(out), backbone=model.name, fingerprint_hash=fp_hash, device=str(torch_device))

    ids, failures = _hash_records(source.records, progress)
    if on_error == "fail" and failures:
        record, reason = next(iter(failures.items()))
        raise ImageDecodeError(str(record.path), reason)
    store, reused = _existing_rows(out, fp_hash)
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
    skipped = [{"path": r.rel_path, "reason": reason} for r, reason in failures.items()]
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
    summary.skipped = skipped
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])

    if not _unchanged(store, fp_hash, splits, skipped):
        write_store(out, fingerprint, source.class_names, splits, dtype=dtype, skipped=skipped)
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
        worker_init_fn=_lower_worker_priority,
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
