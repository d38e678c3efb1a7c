"""Head files that are safe to receive: skops, never pickle.

A head file is a skops archive of ``{"format", "metadata", "estimator"}``: the metadata (config, C,
classes, fingerprint, C sweep) is plain JSON, and the estimator is loaded only if every type in it is
on :data:`TRUSTED_TYPES` (scikit-learn's scalers, the three heads and their calibration). Loading a
file therefore never runs code from the file.

Heads written by featurestore 0.1 are pickles (joblib). Unpickling runs whatever code the file holds,
so they load only when the caller says the file is trusted (``--trust-pickle``).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict
from pathlib import Path

from .atomic import atomic_path
from .errors import HeadFileError
from .heads import HEAD_FORMAT, HeadConfig, TrainedHead

log = logging.getLogger("featurestore")

HEAD_SUFFIX = ".skops"
# Types skops does not trust by default but a featurestore head legitimately holds.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "featurestore.scaling.FeatureScaler",
)
METADATA_FIELDS = ("C", "class_names", "feature_dim", "fingerprint_hash", "fingerprint", "store_path", "sweep",
                   "train_seconds", "n_train")


def save_head(head: TrainedHead, path: str | Path) -> Path:
    """Write ``head`` to ``path`` as a skops archive (unique temporary file, renamed into place)."""
    import skops.io as sio

    path = Path(path)
    metadata = {name: getattr(head, name) for name in METADATA_FIELDS}
    metadata["config"] = asdict(head.config)
    document = {"format": HEAD_FORMAT, "metadata": json.dumps(metadata, sort_keys=True), "estimator": head.estimator}
    with atomic_path(path) as tmp:
        sio.dump(document, tmp)
    return path


def _load_pickle(path: Path) -> TrainedHead:
    import joblib

    log.warning("%s: loading a pickled head because --trust-pickle was given; re-save it with skops "
                "(`featurestore train-head`) so that it can be shared safely", path)
    try:
        head = joblib.load(path)
    except Exception as exc:
        raise HeadFileError(f"{path}: not a readable head file ({type(exc).__name__}: {exc})") from None
    if not isinstance(head, TrainedHead):
        raise HeadFileError(f"{path}: the pickle holds a {type(head).__name__}, not a featurestore head")
    head.format_version = HEAD_FORMAT
    return head


def load_head(path: str | Path, trust_pickle: bool = False) -> TrainedHead:
    """Read a head file. Raises :class:`HeadFileError` naming the file and the problem: missing, corrupt,
    another format, untrusted types inside, or a pickle without ``trust_pickle``."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"{path}: head file not found (run `featurestore train-head` first)")
    if not zipfile.is_zipfile(path):
        if trust_pickle:
            return _load_pickle(path)
        raise HeadFileError(
            f"{path}: not a skops head file. If it is a pickled (joblib) head from featurestore 0.1, loading it "
            f"would run any code it holds: pass --trust-pickle only if you trust its origin, or retrain the head"
        )
    try:
        untrusted = sio.get_untrusted_types(file=path)
        unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if unexpected:
            raise HeadFileError(f"{path}: the head holds types featurestore does not trust: {', '.join(unexpected)}")
        document = sio.load(path, trusted=list(untrusted))
        metadata = json.loads(document["metadata"])
        config = HeadConfig(**metadata.pop("config"))
        if document.get("format") != HEAD_FORMAT:
            raise HeadFileError(f"{path}: head format {document.get('format')} is not {HEAD_FORMAT}; retrain it")
        return TrainedHead(estimator=document["estimator"], config=config, **metadata)
    except HeadFileError:
        raise
    except Exception as exc:  # skops, zipfile and json raise many types for a damaged archive
        raise HeadFileError(f"{path}: not a readable head file ({type(exc).__name__}: {exc})") from None
