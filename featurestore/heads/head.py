"""A trained head (:class:`TrainedHead`: the fitted estimator and everything needed to use it safely) and
:func:`spread_over_classes`, which every model uses to give probabilities over all classes.

A head is saved in the one model file (:mod:`.model_file`, kind ``"head"``): skops, never pickle, so head files are
safe to receive; its metadata (config, C, classes, fingerprint, C sweep) is plain JSON and the estimator loads only
with featurestore's trusted types. Pickled heads of featurestore 0.1 load only with ``--trust-pickle``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.pipeline import Pipeline

from ..configs import HeadConfig
from ..errors import HeadMismatchError
from ..store.hdf5 import FeatureStore
from .model_file import EstimatorModel, ModelDocument, load_model, save_model


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
class TrainedHead(EstimatorModel):
    """A fitted head and everything needed to use it safely.

    ``estimator`` maps features (N, feature_dim) float32 to class probabilities over the classes it saw in
    training (``estimator.classes_``); :meth:`predict_proba` spreads them over all ``class_names`` (N, K),
    so column k is always the store's class k, also when a class had no training rows.
    """

    MODEL_KIND = "head"
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
    # The settings its family chose on validation (selection.py), e.g. {"C": 0.01}; heads saved before the
    # protocol recorded it have C alone.
    settings: dict = field(default_factory=dict)
    # The head experiment's own name (train-head --name, or its file's name): two heads of one kind with other
    # settings are two rows of a comparison, not one overwriting the other. None: the head's kind.
    experiment: str | None = None
    # The name of the store it was fitted on where one names stores per data set (the pipeline: params.yaml's
    # `stores` key, e.g. fashion_mnist); None: its backbone names it.
    store_name: str | None = None
    # What a corrections file changed in the store it was fitted on (train-head --exclude:
    # store.corrections.Corrections.record); None: the store as written.
    corrections: dict | None = None

    def __post_init__(self) -> None:
        if not self.settings:
            self.settings = {"C": self.C}

    @classmethod
    def fitted_on(cls, store: FeatureStore, estimator: Pipeline, config: HeadConfig, C: float,
                  **details) -> TrainedHead:
        """A head fitted on ``store``'s features: class names, width and fingerprint come from the store;
        ``details`` are the optional fields (settings, sweep, c_grid, train_seconds, n_train)."""
        return cls(estimator=estimator, config=config, C=C, class_names=store.class_names,
                   feature_dim=store.feature_dim, fingerprint_hash=store.fingerprint_hash,
                   fingerprint=store.fingerprint, store_path=str(store.path),
                   corrections=store.corrections_record, **details)

    @property
    def backbone(self) -> str:
        return str(self.fingerprint.get("backbone", "unknown"))

    @property
    def label(self) -> str:
        """The head's name within its backbone: its experiment name, else its kind (``logreg``)."""
        return self.experiment or self.config.head

    @property
    def name(self) -> str:
        """``<store name or backbone>__<label>``: its name in metrics, reports and file names."""
        return f"{self.store_name or self.backbone}__{self.label}"

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

    @property
    def val_accuracy(self) -> float | None:
        """The validation accuracy of the chosen settings (fitted on train alone), None without a sweep."""
        if not self.sweep:
            return None
        from .selection import validation_accuracy

        return validation_accuracy(self.sweep, self.settings)

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
            "name": self.name, "head": self.config.head, "experiment": self.experiment, "backbone": self.backbone,
            "C": self.settings.get("C"),  # None for a head whose settings are not C (knn): strict JSON, no NaN
            "settings": self.settings,
            "normalize": self.config.normalize, "feature_dim": self.feature_dim,
            "fingerprint_hash": self.fingerprint_hash, "train_seconds": round(self.train_seconds, 3),
            "n_train": self.n_train, "classes": len(self.class_names), "missing_classes": self.missing_classes,
            "best_val_accuracy": self.val_accuracy, "c_grid": c_grid,
        }

    def to_model_document(self) -> ModelDocument:
        document = super().to_model_document()
        document.metadata["config"] = asdict(self.config)
        return document

    @classmethod
    def from_model_document(cls, document: ModelDocument) -> TrainedHead:
        metadata = document.metadata | {"config": HeadConfig(**document.metadata["config"])}
        return cls(estimator=document.estimator, **metadata)


HEAD_SUFFIX = ".skops"


def save_head(head: TrainedHead, path: str | Path) -> Path:
    """Write ``head`` to ``path`` as a model file (:func:`.model_file.save_model`). Returns ``path``."""
    return save_model(head, path)


def load_head(path: str | Path, trust_pickle: bool = False) -> TrainedHead:
    """Read a head file (:func:`.model_file.load_model`, which also reads the older head layouts). Raises
    :class:`HeadFileError` naming the file and the problem: missing, corrupt, another format or kind, untrusted
    types inside, or a pickle without ``trust_pickle``."""
    return load_model(path, trust_pickle=trust_pickle, kind="head")
