"""The estimators behind the heads, and the C sweep that chooses their regularisation on validation.

A sweep fits the head at every C of a log grid on ``train`` and scores it on ``val``. Logistic
regression is warm-started along the grid; the grid is cut into contiguous segments that run in
parallel with joblib. ``train.py`` refits the chosen C on train+val.
"""

from __future__ import annotations

import time
import warnings

import joblib
import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import SVC, LinearSVC

from ..configs import HeadConfig
from ..errors import FeaturestoreError
from ..utils.console import progress_bar
from .scaling import FeatureScaler


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
