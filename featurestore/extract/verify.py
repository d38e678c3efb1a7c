"""Is a store still what its items and backbone give today? Re-extract a sample and compare.

``verify_store`` checks two things, for image and text stores alike:

1. every row's item is still in the store's source (the folder or manifest it records, or ``data``: a file, or
   a row of the manifest for a document given inline) and still hashes to the row's content id (an item edited or
   replaced since extraction is a drift);
2. a seeded sample of rows, decoded (texts: read and tokenised as the store's tokenization says) and run
   through the backbone again with today's code and libraries, gives the stored features within a tolerance
   set by how they were stored (float32, float16, float16-autocast compute). The largest difference is
   reported either way.

The fingerprint of today's code and libraries is compared too: a difference (an upgrade, an edit) is
reported, and the sample says whether it moved the features.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ..configs import Tokenization
from ..data.sources import Record, content_id, read_manifest, record_content_id
from ..encode.backbones import get_spec, load_backbone, load_text_backbone
from ..encode.backbones.loading import recorded_weights
from ..encode.encoders import Encoder, ImageEncoder, Item
from ..encode.fingerprint import changed_keys
from ..encode.text_layers import sentence_encoder
from ..errors import WeightsMismatchError
from ..store.hdf5 import FeatureStore
from ..utils.console import progress_bar
from ..utils.devices import resolve_device

log = logging.getLogger("featurestore")

# (atol, rtol) by how the features were stored and computed: engines agree to ~1e-5 in float32; float16
# storage rounds to half an ulp (4.9e-4 relative); float16-autocast compute differs from float32 by ~1e-2.
TOLERANCES = {
    ("float32", "float32"): (1e-4, 1e-3),
    ("float16", "float32"): (1e-3, 4e-3),
    ("float32", "autocast-float16"): (2e-2, 3e-2),
    ("float16", "autocast-float16"): (2e-2, 3e-2),
}


@dataclass
class VerifyReport:
    """What ``featurestore verify`` found. ``ok`` is False when any file is missing or changed, or any
    sampled row differs from today's re-extraction by more than ``atol + rtol·|stored|``. ``source_changed``: the
    manifest's bytes differ from those recorded at extraction (rows added or removed; each row is still checked by
    its content id)."""

    store: str
    data_root: str
    rows: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    undecodable: list[dict] = field(default_factory=list)
    sampled: int = 0
    max_abs_diff: float = 0.0
    drifted_rows: list[dict] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    fingerprint_changes: list[str] = field(default_factory=list)
    source_changed: bool = False
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class ItemsOnDisk:
    """The records behind a store's rows in its source ``origin``: for a folder, the file at ``origin/<path>``; for
    a manifest, its rows (a document given inline, or the file it names) by relative path. An item that is not there
    is None (reported as missing: the folder is not scanned, so a damaged tree still gets its per-file report)."""

    def __init__(self, origin: Path):
        self.root = origin if origin.is_dir() else origin.parent
        self.listed = None if origin.is_dir() else {r.rel_path: r for r in read_manifest(origin).records}

    def record(self, rel_path: str, split: str, label: int) -> Record | None:
        if self.listed is None:
            record = Record(self.root / rel_path, rel_path, label, split)
        else:
            record = self.listed.get(rel_path)
        return None if record is None or (record.text is None and not record.path.is_file()) else record


def _check_hashes(store: FeatureStore, items: ItemsOnDisk, report: VerifyReport,
                  progress: bool) -> list[tuple[Item, int]]:
    """Hash every row's item; return the intact ones as (item, row of its split)."""
    intact = []
    with progress_bar(report.rows, "verify hashes", unit="item", enabled=progress) as bar:
        for split in store.splits:
            rows = zip(store.paths(split), store.ids(split), store.labels(split), strict=True)
            for row, (rel, cid, label) in enumerate(rows):
                record = items.record(str(rel), split, int(label))
                if record is None:
                    report.missing.append(str(rel))
                elif record_content_id(record) != cid:
                    report.changed.append(str(rel))
                else:
                    intact.append((Item(cid, record.path, record.rel_path, int(label), split, text=record.text),
                                   row))
                bar.update(1)
    return intact


def encoder_of(store: FeatureStore, weights: str | Path | None, device, engine: str) -> Encoder:
    """The encoder that would extract ``store`` today: its backbone (with ``weights``, checked against the
    store's), its preprocessing or tokenization, its stored dtype."""
    fp = store.fingerprint
    spec = get_spec(fp["backbone"], search=(store.path.parent,))
    if fp.get("kind") != "text":
        pre = fp["preprocessing"]
        checkpoint = recorded_weights(spec, fp["weights_sha256"], weights, built=f"store {store.path}")
        model = load_backbone(spec, weights=checkpoint, image_size=pre["image_size"], crop_pct=pre["crop_pct"],
                              layers=[name for name, _ in fp["layers"]] if "layers" in fp else None)
        return ImageEncoder(model, fp["dtype"], device, engine)
    model = load_text_backbone(spec, weights)
    if model.weights_sha256 != fp["weights_sha256"]:
        raise WeightsMismatchError(
            f"{weights or spec.weights_file or spec.model_dir()}: not the weights {store.path} was extracted with "
            f"(sha256 {fp['weights_sha256'][:12]}…); pass --weights with that checkpoint"
        )
    return sentence_encoder(model, Tokenization(**fp["tokenization"]), fp["dtype"], engine,
                            [name for name, _ in fp["layers"]] if "layers" in fp else None)


def verify_store(store: str | Path | FeatureStore, data: str | Path | None = None, sample: int = 32, seed: int = 0,
                 weights: str | Path | None = None, device: str = "cpu", engine: str = "auto",
                 progress: bool = True) -> VerifyReport:
    """Check ``store`` against its items (in ``data``, default: the folder or manifest it records as its source)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    origin = store.source(data)
    recorded = (store.source_record or {}).get("sha256")
    report = VerifyReport(store=str(store.path), data_root=str(origin),
                          rows=sum(store.count(split) for split in store.splits),
                          source_changed=bool(recorded and origin.is_file() and content_id(origin) != recorded))
    intact = _check_hashes(store, ItemsOnDisk(origin), report, progress)
    torch_device = resolve_device(device)
    encoder = encoder_of(store, weights, torch_device, engine if torch_device.type == "cpu" else "torch")
    fp = store.fingerprint
    report.fingerprint_changes = changed_keys(fp, encoder.fingerprint())
    report.atol, report.rtol = TOLERANCES[(fp["dtype"], fp.get("compute", "float32"))]
    rng = np.random.default_rng(seed)
    picked = [intact[i] for i in sorted(rng.choice(len(intact), size=min(sample, len(intact)), replace=False))]
    if picked:
        _compare_sample(store, picked, encoder, torch_device, report, progress)
    report.ok = not (report.missing or report.changed or report.undecodable or report.drifted_rows)
    return report


def _compare_sample(store: FeatureStore, picked: list[tuple[Item, int]], encoder: Encoder, torch_device,
                    report: VerifyReport, progress: bool) -> None:
    items = [item for item, _ in picked]
    stored = np.concatenate([store.rows(item.split, [row]) for item, row in picked]).astype(np.float32)
    loader = DataLoader(encoder.dataset(items), batch_size=32, num_workers=0, collate_fn=encoder.collate)
    runner = encoder.runner(torch_device)
    with progress_bar(len(picked), "verify features", unit=getattr(encoder, "unit", "img"), enabled=progress) as bar:
        for indices, batch, failed in loader:  # indices are positions in ``items``
            for index, reason in failed:
                report.undecodable.append({"path": items[index].rel_path, "reason": reason})
            if batch is not None:
                fresh = runner(batch)
                for row, index in enumerate(indices):
                    diff = np.abs(fresh[row] - stored[index])
                    report.max_abs_diff = max(report.max_abs_diff, float(diff.max()))
                    if (diff > report.atol + report.rtol * np.abs(stored[index])).any():
                        report.drifted_rows.append({"path": items[index].rel_path, "max_abs_diff": float(diff.max())})
                report.sampled += len(indices)
            bar.update(len(indices) + len(failed))
