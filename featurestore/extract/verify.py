"""Is a store still what its images and backbone give today? Re-extract a sample and compare.

``verify_store`` checks two things:

1. every row's file still exists under the data root and still hashes to the row's content id (an
   image edited or replaced on disk since extraction is a drift);
2. a seeded sample of rows, decoded and run through the backbone again with today's code and
   libraries, gives the stored features within a tolerance set by how they were stored (float32,
   float16, float16-autocast compute). The largest difference is reported either way.

The fingerprint of today's code and libraries is compared too: a difference (an upgrade, an edit) is
reported, and the sample says whether it moved the features.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ..data.sources import content_id
from ..encode.backbones import get_spec, load_backbone
from ..encode.engines import make_engine
from ..encode.fingerprint import changed_keys, fingerprint_for
from ..encode.images import DecodedImages, collate_decoded
from ..errors import DataError, WeightsMismatchError
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
    sampled row differs from today's re-extraction by more than ``atol + rtol·|stored|``."""

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
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _check_hashes(store: FeatureStore, root: Path, report: VerifyReport, progress: bool) -> list[tuple[str, int]]:
    """Hash every row's file; return the (split, row) pairs whose file is intact."""
    intact = []
    with progress_bar(report.rows, "verify hashes", unit="file", enabled=progress) as bar:
        for split in store.splits:
            for row, (rel, cid) in enumerate(zip(store.paths(split), store.ids(split), strict=True)):
                path = root / rel
                if not path.is_file():
                    report.missing.append(rel)
                elif content_id(path) != cid:
                    report.changed.append(rel)
                else:
                    intact.append((split, row))
                bar.update(1)
    return intact


def verify_store(store: str | Path | FeatureStore, data: str | Path | None = None, sample: int = 32, seed: int = 0,
                 weights: str | Path | None = None, device: str = "cpu", engine: str = "auto",
                 progress: bool = True) -> VerifyReport:
    """Check ``store`` against its images (under ``data``, default: the root it was extracted from)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    root = Path(data) if data is not None else store.source_folder()
    if root is None or not root.is_dir():
        raise DataError(f"{store.path}: its data folder {root} is not there; pass --data with the folder it was "
                        f"extracted from")
    fp = store.fingerprint
    report = VerifyReport(store=str(store.path), data_root=str(root),
                          rows=sum(store.count(split) for split in store.splits))
    intact = _check_hashes(store, root, report, progress)

    pre = fp["preprocessing"]
    spec = get_spec(fp["backbone"], search=(store.path.parent,))
    model = load_backbone(spec, weights=weights, image_size=pre["image_size"], crop_pct=pre["crop_pct"])
    if model.weights_sha256 != fp["weights_sha256"]:
        raise WeightsMismatchError(
            f"{model.weights_path}: not the weights {store.path} was extracted with (sha256 "
            f"{fp['weights_sha256'][:12]}…); pass --weights with that checkpoint"
        )
    torch_device = resolve_device(device)
    autocast = fp.get("compute") == "autocast-float16" and torch_device.type == "cuda"
    report.fingerprint_changes = changed_keys(fp, fingerprint_for(model, fp["dtype"], autocast))
    report.atol, report.rtol = TOLERANCES[(fp["dtype"], fp.get("compute", "float32"))]

    rng = np.random.default_rng(seed)
    picked = [intact[i] for i in sorted(rng.choice(len(intact), size=min(sample, len(intact)), replace=False))]
    if picked:
        _compare_sample(store, root, picked, model, torch_device, engine, report, progress)
    report.ok = not (report.missing or report.changed or report.undecodable or report.drifted_rows)
    return report


def _compare_sample(store: FeatureStore, root: Path, picked: list[tuple[str, int]], model, torch_device,
                    engine: str, report: VerifyReport, progress: bool) -> None:
    paths = {split: store.paths(split) for split in store.splits}
    rel_paths = [str(paths[split][row]) for split, row in picked]
    stored = np.concatenate([store.rows(split, [row]) for split, row in picked]).astype(np.float32)
    loader = DataLoader(DecodedImages([root / rel for rel in rel_paths], model.preprocessing), batch_size=32,
                        num_workers=0, collate_fn=collate_decoded)
    runner = make_engine(model, torch_device, engine if torch_device.type == "cpu" else "torch")
    with progress_bar(len(picked), "verify features", enabled=progress) as bar:
        offset = 0
        for indices, batch, failed in loader:
            for index, reason in failed:
                report.undecodable.append({"path": rel_paths[offset + index], "reason": reason})
            if batch is not None:
                fresh = runner(batch)
                for row, index in enumerate(indices):
                    reference = stored[offset + index]
                    diff = np.abs(fresh[row] - reference)
                    report.max_abs_diff = max(report.max_abs_diff, float(diff.max()))
                    excess = diff - (report.atol + report.rtol * np.abs(reference))
                    if (excess > 0).any():
                        report.drifted_rows.append({"path": rel_paths[offset + index],
                                                    "max_abs_diff": float(diff.max())})
                report.sampled += len(indices)
            offset += len(indices) + len(failed)
            bar.update(len(indices) + len(failed))
