"""Validation and test splits made for data that lacks them: stratified, seeded, and recorded in the store.

A user's folder of classes (``root/<class>/<file>``, split "all") or a train/test manifest cannot train a head,
which chooses its settings on a ``val`` split. :func:`make_splits` draws the missing splits from the items of
"all" (else "train"): per class, the items are ordered by a seeded hash of their path, the first
``round(n * test_fraction)`` go to ``test``, the next ``round(n * val_fraction)`` to ``val``, the rest to ``train``
(items of "all" not drawn become ``train``). A class of two items or more gives at least one item to each split
asked for, and always keeps one in train. The order depends on the path and the seed only, so a rerun, another
machine or an added file leave every other item where it was.

The rule (``configs.SplitRule``) is recorded in the store's ``source`` (``"splits"``), and every reader that rebuilds
the store's records from its source applies it again (``heads.records.store_records``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from ..configs import SplitRule
from ..errors import DataError
from .sources import FLAT_SPLIT, Record, Source, scan_source

log = logging.getLogger("featurestore")


def _draw_key(seed: int, rel_path: str) -> str:
    return hashlib.sha256(f"{seed}\0{rel_path}".encode()).hexdigest()


def _count(n: int, fraction: float) -> int:
    """Items of a class of ``n`` drawn for a split of ``fraction`` (> 0): at least one from a class of two or more."""
    return max(round(n * fraction), 1 if n >= 2 else 0)


def make_splits(source: Source, rule: SplitRule | None) -> Source:
    """``source`` with the ``val`` and/or ``test`` splits ``rule`` asks for drawn from its "all" (else "train")
    items (module docstring); the rule recorded as ``source.split_rule``. A split the data already has is an
    error, not a silent second one. No rule (or fractions of 0): ``source`` itself."""
    if rule is None or not rule.makes_any:
        return source
    present = set(source.splits)
    origin = FLAT_SPLIT if FLAT_SPLIT in present else "train"
    if origin not in present:
        raise DataError(f"{source.manifest or source.root}: no 'train' or '{FLAT_SPLIT}' items to draw val/test from")
    for split, fraction in (("val", rule.val_fraction), ("test", rule.test_fraction)):
        if fraction > 0 and split in present:
            raise DataError(f"{source.manifest or source.root}: the data already has a {split!r} split; "
                            f"drop --{split}-fraction or that split")
    by_class: dict[int, list[Record]] = defaultdict(list)
    for record in source.records:
        if record.split == origin:
            by_class[record.label].append(record)
    assigned: dict[str, str] = {}
    for records in by_class.values():
        ordered = sorted(records, key=lambda r: _draw_key(rule.seed, r.rel_path))
        n = len(ordered)
        n_test = _count(n, rule.test_fraction) if rule.test_fraction > 0 else 0
        n_val = _count(n, rule.val_fraction) if rule.val_fraction > 0 else 0
        while n_test + n_val >= n and (n_test or n_val):  # one item stays in train
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        for index, record in enumerate(ordered):
            assigned[record.rel_path] = "test" if index < n_test else "val" if index < n_test + n_val else "train"
    records = [replace(r, split=assigned[r.rel_path]) if r.split == origin else r for r in source.records]
    made = replace(source, records=records, split_rule=rule.to_dict())
    counts = {split: sum(r.split == split for r in records) for split in ("train", "val", "test")}
    log.info("%s: split %s items of %r into train %d, val %d, test %d (%s)", source.manifest or source.root,
             sum(len(v) for v in by_class.values()), origin, counts["train"], counts["val"], counts["test"],
             ", ".join(f"{k} {v}" for k, v in rule.to_dict().items()))
    return made


def scan_with_splits(data: str | Path, rule: SplitRule | dict | None) -> Source:
    """:func:`~.sources.scan_source`, then the splits ``rule`` (or its recorded dict) makes (:func:`make_splits`)."""
    return make_splits(scan_source(data), rule if isinstance(rule, SplitRule) or rule is None
                       else SplitRule.from_dict(rule))
