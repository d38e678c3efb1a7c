"""scikit-learn heads on cached features, with C chosen on the validation split.

A sweep fits the head at every C of a log grid on ``train`` and scores it on ``val``. Logistic
regression is warm-started along the grid; the grid is cut into contiguous segments that run in
parallel with joblib. The chosen C is refitted on train+val. The saved head (skops, see head_io.py)
carries the cache's fingerprint, so it refuses features it was not trained on.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import joblib
import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import SVC, LinearSVC

from .configs import HEADS, NORMALIZATIONS, HeadConfig, config_from_params  # noqa: F401  (heads' public API)
from .console import progress_bar
from .errors import FeaturestoreError, HeadMismatchError, StoreError
from .scaling import FeatureScaler
from .store import FeatureStore

log = logging.getLogger("featurestore")

HEAD_FORMAT = 2  # 1: a pickled TrainedHead (joblib); 2: skops (head_io.py)


def _scaler(normalize: str):
    return {"standard": FeatureScaler(), "l2": Normalizer(), "none": "passthrough"}[normalize]


def _classifier(config: HeadConfig, C: float, warm_start: bool = False):
    if config.head == "logreg":
        return LogisticRegression(C=C, max_iter=config.max_iter, warm_start=warm_start, random_state=config.seed)
    if config.head == "linear_svm":
        return LinearSVC(C=C, max_iter=config.max_iter, random_state=config.seed)
    if config.head == "svm_rbf":
        return SVC(C=C, kernel="rbf", gamma="scale", random_state=config.seed)
    raise FeaturestoreError(f"{config.head} is trained by streaming from the store (streaming.py), not in memory")


# Above this many training rows the (N, N) kernel matrix is too large to precompute for the sweep.
PRECOMPUTED_KERNEL_MAX_ROWS = 8000
# Starting joblib's worker processes costs about a second on this 2-core machine, more than a small
# sweep gains from them (measured, 34 C, fresh process, 1 vs 2 jobs: logreg 1,000 x 1,280 1.4 vs 2.2 s,
# 4,000 x 1,280 5.1 vs 5.7 s, 10,000 x 1,280 19.4 vs 16.9 s; svm_rbf 1,000 rows 0.9 vs 1.6 s, 2,000 rows
# 2.5 vs 2.4 s). With n_jobs=-1, sweeps below these sizes run in-process.
IN_PROCESS_LOGREG_MAX_VALUES = 5_000_000  # rows x features
IN_PROCESS_RBF_MAX_ROWS = 2000


def _rbf_kernels(X: np.ndarray, Xv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RBF kernels (N, N) and (M, N) float64 with sklearn's gamma="scale" = 1 / (D * X.var())."""
    from sklearn.metrics.pairwise import rbf_kernel

    X64, Xv64 = X.astype(np.float64), Xv.astype(np.float64)
    gamma = 1.0 / (X.shape[1] * X64.var())
    return rbf_kernel(X64, X64, gamma=gamma), rbf_kernel(Xv64, X64, gamma=gamma)


def _sweep_segment(config: HeadConfig, Cs: np.ndarray, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray):
    """Fit along increasing C (warm-started for logreg); return [(C, val accuracy, seconds)].

    For svm_rbf on up to PRECOMPUTED_KERNEL_MAX_ROWS rows, X and Xv are the precomputed kernels.
    """
    from threadpoolctl import threadpool_limits

    points = []
    classifier = _classifier(config, float(Cs[0]), warm_start=True)
    precomputed = config.head == "svm_rbf" and X.shape[0] == X.shape[1] == Xv.shape[1] and Xv.shape[0] == len(yv)
    # One BLAS thread: these matrices are too small for threads to pay (measured 3x slower with 2).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in Cs:
            started = time.perf_counter()
            if config.head == "logreg":
                classifier.set_params(C=float(C))
            elif precomputed:
                classifier = SVC(C=float(C), kernel="precomputed", random_state=config.seed)
            else:
                classifier = _classifier(config, float(C))
            classifier.fit(X, y)
            points.append((float(C), float(classifier.score(Xv, yv)), time.perf_counter() - started))
    return points


def sweep_jobs(config: HeadConfig, rows: int, dims: int) -> int:
    """Worker processes for a sweep on ``rows`` x ``dims`` features: ``config.n_jobs``, where -1 (or 0)
    means every core, except for warm-started logreg and kernel SVM sweeps too small to pay for them."""
    if config.n_jobs not in (-1, 0):
        return config.n_jobs
    small = ((config.head == "logreg" and rows * dims <= IN_PROCESS_LOGREG_MAX_VALUES)
             or (config.head == "svm_rbf" and rows <= IN_PROCESS_RBF_MAX_ROWS))
    return 1 if small else joblib.cpu_count()


def sweep_c(config: HeadConfig, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
            progress: bool = False) -> list[dict]:
    """Validation accuracy at every C of the grid: ``[{"C", "val_accuracy", "seconds"}]`` sorted by C.

    X (N, D) and Xv (M, D) float arrays, y (N,) and yv (M,) int labels. The scaler is fitted on X.
    """
    scaler = _scaler(config.normalize)
    if scaler != "passthrough":
        scaler.fit(X)
        X, Xv = scaler.transform(X), scaler.transform(Xv)
    if config.head == "svm_rbf" and len(X) <= PRECOMPUTED_KERNEL_MAX_ROWS:
        X, Xv = _rbf_kernels(X, Xv)  # the same kernel for every C: compute it once
    n_jobs = sweep_jobs(config, *X.shape)
    grid, parts = config.c_grid(), max(1, min(n_jobs, config.c_points))
    if config.head == "logreg":  # contiguous runs of C, so that each fit starts from its neighbour's solution
        segments = [s for s in np.array_split(grid, parts) if len(s)]
    else:  # no warm start: deal C values round-robin, since large C costs the SVMs most
        segments = [grid[i::parts] for i in range(parts)]
    with progress_bar(len(segments), f"sweep C ({config.head})", unit="segment", enabled=progress, leave=False) as bar:
        results = []
        parallel = joblib.Parallel(n_jobs=len(segments), return_as="generator")
        for points in parallel(joblib.delayed(_sweep_segment)(config, s, X, y, Xv, yv) for s in segments):
            results.extend(points)
            bar.update(1)
    return [{"C": C, "val_accuracy": acc, "seconds": round(sec, 4)} for C, acc, sec in sorted(results)]


def choose_c(sweep: list[dict]) -> float:
    """The C with the best validation accuracy; among ties, the smallest (most regularised)."""
    best = max(point["val_accuracy"] for point in sweep)
    return min(point["C"] for point in sweep if point["val_accuracy"] == best)


def build_estimator(config: HeadConfig, C: float) -> Pipeline:
    """Scaler + classifier; the SVMs get probabilities from sigmoid calibration (CalibratedClassifierCV)."""
    classifier = _classifier(config, C)
    if config.head != "logreg":
        classifier = CalibratedClassifierCV(classifier, method="sigmoid", cv=config.calibration_folds)
    return Pipeline([("scale", _scaler(config.normalize)), ("classify", classifier)])


def fold_scaler(estimator: Pipeline, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fold the pipeline's scaler into linear decisions ``x @ weight.T + bias`` on scaled features.

    weight (..., K, D) and bias (..., K) float. Returns the weight and bias for raw features, and
    whether an L2 normalisation must still run first (a Normalizer cannot be folded).
    """
    scaler = estimator.named_steps["scale"]
    if scaler == "passthrough":
        return weight, bias, False
    if isinstance(scaler, Normalizer):
        return weight, bias, True
    dim = weight.shape[-1]
    mean = scaler.mean_ if scaler.with_mean else np.zeros(dim)
    scale = scaler.scale_ if scaler.with_std else np.ones(dim)
    folded = weight / scale
    return folded, bias - folded @ mean, False


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
    train_seconds: float = 0.0
    n_train: int = 0
    format_version: int = HEAD_FORMAT

    @classmethod
    def fitted_on(cls, store: FeatureStore, estimator: Pipeline, config: HeadConfig, C: float,
                  **details) -> TrainedHead:
        """A head fitted on ``store``'s features: class names, width and fingerprint come from the store;
        ``details`` are the optional fields (sweep, train_seconds, n_train)."""
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
        proba = self.estimator.predict_proba(self._check_features(X))
        classes = self.classes
        if len(classes) == len(self.class_names):
            return proba
        full = np.zeros((len(proba), len(self.class_names)), dtype=proba.dtype)
        full[:, classes] = proba
        return full

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class indices (N,) int64 into ``class_names``."""
        return np.asarray(self.estimator.predict(self._check_features(X)), dtype=np.int64)

    def summary(self) -> dict:
        return {
            "name": self.name, "head": self.config.head, "backbone": self.backbone, "C": self.C,
            "normalize": self.config.normalize, "feature_dim": self.feature_dim,
            "fingerprint_hash": self.fingerprint_hash, "train_seconds": round(self.train_seconds, 3),
            "n_train": self.n_train, "classes": len(self.class_names), "missing_classes": self.missing_classes,
            "best_val_accuracy": max((p["val_accuracy"] for p in self.sweep), default=None),
        }

    def save(self, path: str | Path) -> Path:
        """Write the head with skops (no pickle; see head_io.py), atomically. Returns ``path``."""
        from .head_io import save_head

        return save_head(self, path)


def load_head(path: str | Path, trust_pickle: bool = False) -> TrainedHead:
    """Read a head saved by :meth:`TrainedHead.save` (see :func:`featurestore.head_io.load_head`)."""
    from .head_io import load_head as load

    return load(path, trust_pickle=trust_pickle)


def train_head(features: str | Path | FeatureStore, config: HeadConfig = HeadConfig(),
               progress: bool = False, scheduler: str | None = None) -> TrainedHead:
    """Sweep C on train → val, refit the best C on train+val, return the :class:`TrainedHead`.

    With a Dask ``scheduler`` address (or ``DASK_SCHEDULER_ADDRESS`` set), the sweep's segments run on that
    cluster's workers through joblib's dask backend, one segment per worker thread (see cluster.py).
    """
    from .cluster import dask_backend

    with dask_backend(scheduler) as threads:
        if threads:
            config = replace(config, n_jobs=threads)
        return _train_head(features, config, progress)


def _train_head(features: str | Path | FeatureStore, config: HeadConfig, progress: bool) -> TrainedHead:
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    for split in ("train", "val"):
        if split not in store.splits:
            raise StoreError(f"{store.path}: a head needs 'train' and 'val' splits (C is chosen on val); "
                             f"found {store.splits}")
    started = time.perf_counter()
    if config.head == "sgd_logreg":  # streamed from the store: memory does not grow with its rows
        from .streaming import train_streaming_head

        estimator, C, sweep, n_train = train_streaming_head(store, config, progress)
        return TrainedHead.fitted_on(store, estimator, config, C, sweep=sweep,
                                     train_seconds=time.perf_counter() - started, n_train=n_train)
    X, y, _ = store.load("train")
    Xv, yv, _ = store.load("val")
    X, Xv = X.astype(np.float32, copy=False), Xv.astype(np.float32, copy=False)
    if len(np.unique(y)) < 2:
        raise FeaturestoreError(f"{store.path}: the train split holds {len(np.unique(y))} class; a head needs two")
    sweep = sweep_c(config, X, y, Xv, yv, progress=progress)
    C = choose_c(sweep)
    estimator = build_estimator(config, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(np.concatenate([X, Xv]), np.concatenate([y, yv]))
    head = TrainedHead.fitted_on(store, estimator, config, C, sweep=sweep,
                                 train_seconds=time.perf_counter() - started, n_train=len(y) + len(yv))
    if head.missing_classes:
        log.warning("%s: class(es) %s have no train or val rows: head %s never predicts them (probability 0)",
                    store.path, ", ".join(head.missing_classes), head.name)
    return head
