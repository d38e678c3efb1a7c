"""A trained head (:class:`TrainedHead`: the fitted estimator and everything needed to use it safely) and its
file format: skops, never pickle, so head files are safe to receive.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.pipeline import Pipeline

from ..configs import HeadConfig
from ..errors import HeadFileError, HeadMismatchError
from ..store.hdf5 import FeatureStore
from ..utils.atomic import atomic_path

log = logging.getLogger("featurestore")

HEAD_FORMAT = 2  # 1: a pickled TrainedHead (joblib); 2: skops

def spread_over_classes(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities (N, len(classes)) over the classes an estimator saw → (N, n_classes), same dtype, column
    ``classes[j]`` holding column j and 0 for a class with no training rows (``proba`` itself when all were seen)."""
    if len(classes) == n_classes:
        return proba
    full = np.zeros((len(proba), n_classes), dtype=proba.dtype)
    full[:, classes] = proba
    return full


def describe(fingerprint: dict) -> str:
    """A short human description of a store fingerprint, e.g. ``efficientnet_lite0, 112 px, float32``."""
    size = fingerprint.get("preprocessing", {}).get("image_size")
    return f"{fingerprint.get('backbone')}, {size} px, {fingerprint.get('dtype')}"


@dataclass
class TrainedHead:
    """A fitted head and everything needed to use it safely.

    ``estimator`` maps features (N, feature_dim) float32 to class probabilities over the classes it saw in
    training (``estimator.classes_``); :meth:`predict_proba` spreads them over all ``class_names`` (N, K),
    so column k is always the store's class k, also when a class had no training rows.
    """

    estimator: Pipeline
    config: HeadConfig
    C: float
    class_names: list[str]
    feature_dim: int
    fingerprint_hash: str
    fingerprint: dict
    store_path: str
    sweep: list[dict] = field(default_factory=list)
    c_grid: dict | None = None  # estimators.grid_report of the sweep: its range, extension and edge
    train_seconds: float = 0.0
    n_train: int = 0
    format_version: int = HEAD_FORMAT

    @classmethod
    def fitted_on(cls, store: FeatureStore, estimator: Pipeline, config: HeadConfig, C: float,
                  **details) -> TrainedHead:
        """A head fitted on ``store``'s features: class names, width and fingerprint come from the store;
        ``details`` are the optional fields (sweep, c_grid, train_seconds, n_train)."""
        return cls(estimator=estimator, config=config, C=C, class_names=store.class_names,
                   feature_dim=store.feature_dim, fingerprint_hash=store.fingerprint_hash,
                   fingerprint=store.fingerprint, store_path=str(store.path), **details)

    @property
    def backbone(self) -> str:
        return str(self.fingerprint.get("backbone", "unknown"))

    @property
    def name(self) -> str:
        return f"{self.backbone}__{self.config.head}"

    @property
    def classes(self) -> np.ndarray:
        """Indices into ``class_names`` of the classes the estimator was trained on, (K',) int64 ascending."""
        return np.asarray(self.estimator.classes_, dtype=np.int64)

    @property
    def missing_classes(self) -> list[str]:
        """Names of the classes with no training rows: the head gives them probability 0."""
        present = set(self.classes.tolist())
        return [name for index, name in enumerate(self.class_names) if index not in present]

    def check_store(self, store: FeatureStore) -> None:
        """Refuse a store whose fingerprint differs from the one this head was trained on."""
        if store.fingerprint_hash != self.fingerprint_hash:
            raise HeadMismatchError(
                f"{store.path}: features have fingerprint {store.fingerprint_hash} ({describe(store.fingerprint)}) "
                f"but head {self.name} was trained on {self.fingerprint_hash} ({describe(self.fingerprint)}): "
                f"retrain the head on this cache"
            )
        if store.class_names != self.class_names:
            raise HeadMismatchError(
                f"{store.path}: classes {store.class_names} differ from the head's {self.class_names}"
            )

    def _check_features(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.feature_dim:
            raise HeadMismatchError(
                f"head {self.name} expects features of shape (N, {self.feature_dim}), got {X.shape}"
            )
        return X.astype(np.float32, copy=False)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) float64 for features X (N, feature_dim); column k is ``class_names[k]``."""
        return spread_over_classes(self.estimator.predict_proba(self._check_features(X)), self.classes,
                                   len(self.class_names))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class indices (N,) int64 into ``class_names``."""
        return np.asarray(self.estimator.predict(self._check_features(X)), dtype=np.int64)

    def summary(self) -> dict:
        """What the head is, JSON-serialisable. ``c_grid``: the range of C swept, whether the grid was extended
        past its configured end (``extended``: ``"down"``/``"up"``/None) and whether the chosen C is still on its
        edge with the extension's limit reached (``limit_reached``); see ``estimators.grid_report``. Heads
        written before it was recorded get it worked out from their config and sweep."""
        c_grid = self.c_grid
        if c_grid is None and self.sweep:
            from .estimators import grid_report

            c_grid = grid_report(self.config, self.sweep)
        return {
            "name": self.name, "head": self.config.head, "backbone": self.backbone, "C": self.C,
            "normalize": self.config.normalize, "feature_dim": self.feature_dim,
            "fingerprint_hash": self.fingerprint_hash, "train_seconds": round(self.train_seconds, 3),
            "n_train": self.n_train, "classes": len(self.class_names), "missing_classes": self.missing_classes,
            "best_val_accuracy": max((p["val_accuracy"] for p in self.sweep), default=None), "c_grid": c_grid,
        }

    def save(self, path: str | Path) -> Path:
        """Write the head with skops (no pickle), atomically. Returns ``path``."""
        return save_head(self, path)


HEAD_SUFFIX = ".skops"
# Types skops does not trust by default but a featurestore head legitimately holds.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "featurestore.heads.scaling.FeatureScaler",
)
# Where types of older head files live now: their module names are in the files.
MOVED_MODULES = {"featurestore.scaling": "featurestore.heads.scaling"}
METADATA_FIELDS = ("C", "class_names", "feature_dim", "fingerprint_hash", "fingerprint", "store_path", "sweep",
                   "c_grid", "train_seconds", "n_train")


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


def _moved_types(type_names: list[str]) -> list[str]:
    """The trusted types among ``type_names`` that a file names by the module they lived in before the package's
    layout changed; their old module is aliased to the new one so that skops finds them."""
    import importlib
    import sys

    moved = []
    for name in type_names:
        module, _, leaf = name.rpartition(".")
        if module in MOVED_MODULES and f"{MOVED_MODULES[module]}.{leaf}" in TRUSTED_TYPES:
            sys.modules.setdefault(module, importlib.import_module(MOVED_MODULES[module]))
            moved.append(name)
    return moved


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
        unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES) - set(_moved_types(untrusted)))
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
