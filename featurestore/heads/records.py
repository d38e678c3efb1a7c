"""The records behind a store's rows, rebuilt from where the store says its items came from (its ``source``: a
folder or a manifest, see ``store/hdf5.py``): the one path for every reader that needs the items themselves (int8
calibration and comparison, the baselines and the hybrid head, the evaluate stage, fine-tuning from a head). Here,
below ``transfer`` and ``deploy``, beside the baseline and hybrid heads that read raw items."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.sources import Record, Source, record_content_id
from ..data.splits import scan_with_splits
from ..errors import FeaturestoreError
from ..store.hdf5 import FeatureStore


def match_records(source: Source, store: FeatureStore, split: str, rows: np.ndarray | None = None) -> list[Record]:
    """The source's records of ``rows`` (default all) of ``split``, in their order, each checked against its
    content id and given the store's label (documents given inline keep their text): an item edited, renamed away
    or relabelled since extraction is an error, not a silent shift."""
    if source.class_names != store.class_names:
        raise FeaturestoreError(f"{source.manifest or source.root}: classes {source.class_names} differ from the "
                                f"store's {store.class_names} ({store.path})")
    paths, ids, labels = store.paths(split), store.ids(split), store.labels(split)
    if rows is not None:
        paths, ids, labels = paths[rows], ids[rows], labels[rows]
    by_path = {record.rel_path: record for record in source.records if record.split == split}
    records = []
    for rel_path, cid, label in zip(paths, ids, labels, strict=True):
        record = by_path.get(str(rel_path))
        if record is None or record_content_id(record) != cid:
            problem = "is gone" if record is None else "changed"
            raise FeaturestoreError(f"{source.root / str(rel_path)}: {problem} since {store.path} was extracted; "
                                    f"extract again")
        records.append(replace(record, label=int(label)))
    return records


def store_source(store: FeatureStore, data: str | Path | None = None) -> Source:
    """The source behind a store as the store holds it: scanned where it records (``data`` instead when given), with
    the val/test splits its extraction made for it made again (``data.splits``), restricted to the items the store
    holds and given the store's labels. So what a corrections file left out or relabelled (``extract --exclude``,
    ``store.corrections``) stays so for every reader of the items (fine-tuning, the fine-tuned store, the
    baselines), and items that could not be decoded are not offered again."""
    made = (store.source_record or {}).get("splits")
    source = scan_with_splits(store.source(data), made)
    if source.class_names != store.class_names:
        return source  # match_records names the mismatch
    held = {(split, str(path)): int(label) for split in store.splits
            for path, label in zip(store.paths(split), store.labels(split), strict=True)}
    records = [replace(record, label=held[(record.split, record.rel_path)]) for record in source.records
               if (record.split, record.rel_path) in held]
    return replace(source, records=records, corrections=store.corrections_record
                   or (store.source_record or {}).get("corrections"))


def store_records(store: FeatureStore, split: str, data: str | Path | None = None,
                  rows: np.ndarray | None = None) -> list[Record]:
    """The records behind ``rows`` (default all) of ``split``, in row order, from the store's recorded source
    (:meth:`FeatureStore.source`; ``data`` instead when given), checked as :func:`match_records` checks them."""
    return match_records(store_source(store, data), store, split, rows)
