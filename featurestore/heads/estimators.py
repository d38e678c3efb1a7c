"""The estimators behind the heads, and the C sweep that chooses their regularisation on validation.

A sweep fits the head at every C of a log grid on ``train`` and scores it on ``val``. Logistic
regression is warm-started along the grid; the grid is cut into contiguous segments that run in
parallel with joblib. ``train.py`` refits the chosen C on train+val.

A best C on the grid's edge is no answer: the best may lie beyond it (on two held-back data sets the
chosen C was the default grid's floor, 1e-6). Such a sweep extends its grid in that direction by the
grid's own log step, :data:`C_EXTENSION_ROUND` points at a time, until the best C is inside the swept
range or :data:`C_EXTENSION_DECADES` decades beyond the configured end have been swept; then it warns.
Among tied accuracies the smallest C is chosen, so a tie plateau that reaches the floor counts as the
floor. :func:`grid_report` says what happened (the head's summary carries it as ``c_grid``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

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
from .selection import choose_point

log = logging.getLogger("featurestore")

# How far past the configured grid a sweep may extend when its best C is on an edge, in decades of C. Three decades
# are a factor of 1,000 in regularisation for at most 9 more fits on the default grid (3 steps a decade, 3 rounds
# of 3); a best C still on the edge after that is usually a tie plateau (e.g. every small C predicting the
# majority class alike) rather than an optimum further out, and is reported (a warning, ``limit_reached``)
# rather than chased.
C_EXTENSION_DECADES = 3.0
# Points per extension round (in-memory heads): for the default grid one decade. The streaming head extends to
# the limit in one round, since its cost is the passes over the store, shared by every C of a round.
C_EXTENSION_ROUND = 3
# Among equal validation accuracies, the smallest C: the most regularised fit.
C_PREFERENCE = (("C", "min"),)


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
            progress: bool = False, extend: bool = True) -> list[dict]:
    """Validation accuracy at every C of the grid: ``[{"C", "val_accuracy", "seconds"}]`` sorted by C.

    X (N, D) and Xv (M, D) float arrays, y (N,) and yv (M,) int labels. The scaler is fitted on X. With
    ``extend`` (default), a best C on the grid's edge extends the grid (module docstring), so the list may hold
    C values beyond ``config.c_min``/``c_max``; :func:`grid_report` describes it.
    """
    scaler = _scaler(config.normalize)
    if scaler != "passthrough":
        scaler.fit(X)
        X, Xv = scaler.transform(X), scaler.transform(Xv)
    if config.head == "svm_rbf" and len(X) <= PRECOMPUTED_KERNEL_MAX_ROWS:
        X, Xv = _rbf_kernels(X, Xv)  # the same kernel for every C: compute it once
    n_jobs = sweep_jobs(config, *X.shape)

    def run(grid: np.ndarray) -> list[dict]:
        return _sweep_grid(config, grid, X, y, Xv, yv, n_jobs, progress)

    sweep = run(config.c_grid())
    return extend_sweep(config, sweep, run, C_EXTENSION_ROUND) if extend else sweep


def _sweep_grid(config: HeadConfig, grid: np.ndarray, X: np.ndarray, y: np.ndarray, Xv: np.ndarray,
                yv: np.ndarray, n_jobs: int, progress: bool) -> list[dict]:
    """The points of ``grid`` (C values, ascending), fitted in up to ``n_jobs`` parallel segments."""
    parts = max(1, min(n_jobs, len(grid)))
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
    """The C with the best validation accuracy; among ties, the smallest (most regularised): the head protocol's
    choice (``selection.choose_point``) for a sweep of C alone."""
    return float(choose_point(sweep, C_PREFERENCE)["C"])


def edge_of(sweep: list[dict]) -> str | None:
    """``"down"`` if the chosen C (:func:`choose_c`) is the smallest swept, ``"up"`` if the largest, else None
    (also for a sweep of one C: a fixed C, not a grid)."""
    Cs = sorted(point["C"] for point in sweep)
    if len(Cs) < 2:
        return None
    chosen = choose_c(sweep)
    return "down" if chosen == Cs[0] else "up" if chosen == Cs[-1] else None


def _grid_step(config: HeadConfig) -> float | None:
    """The grid's log10 step, None for a one-point grid."""
    if config.c_points < 2 or config.c_max <= config.c_min:
        return None
    return (np.log10(config.c_max) - np.log10(config.c_min)) / (config.c_points - 1)


def extension_limits(config: HeadConfig) -> tuple[float, float]:
    """The smallest and largest C an extended sweep may reach: C_EXTENSION_DECADES beyond the grid's ends."""
    return (float(f"{config.c_min / 10 ** C_EXTENSION_DECADES:.12g}"),
            float(f"{config.c_max * 10 ** C_EXTENSION_DECADES:.12g}"))


def extension_values(config: HeadConfig, direction: str) -> np.ndarray:
    """Every C the grid may extend to in ``direction`` (``down``/``up``), nearest first: the grid's own log step
    continued up to :func:`extension_limits`. Empty for a one-point grid."""
    step = _grid_step(config)
    if step is None:
        return np.zeros(0)
    count = int(np.floor(C_EXTENSION_DECADES / step + 1e-9))
    steps = np.arange(1, count + 1) * step
    exponents = np.log10(config.c_min) - steps if direction == "down" else np.log10(config.c_max) + steps
    return np.array([float(f"{C:.12g}") for C in 10 ** exponents])  # 1e-05, not 9.999999999999999e-06


def _beyond(config: HeadConfig, sweep: list[dict], direction: str) -> np.ndarray:
    """The extension values in ``direction`` not swept yet (beyond the sweep's current end), nearest first."""
    values = extension_values(config, direction)
    Cs = [point["C"] for point in sweep]
    if direction == "down":
        return values[values < min(Cs) * (1 - 1e-9)]
    return values[values > max(Cs) * (1 + 1e-9)]


def extend_sweep(config: HeadConfig, sweep: list[dict], evaluate: Callable[[np.ndarray], list[dict]],
                 round_points: int | None = C_EXTENSION_ROUND) -> list[dict]:
    """Extend ``sweep`` while its chosen C is on an edge: ``evaluate(Cs)`` (Cs ascending, float64) returns the new
    points; ``round_points`` of them a round (None: all up to the limit at once). Returns all points sorted by C.
    Logs where it extends, and a warning when the limit is reached with the best C still on the edge."""
    sweep = sorted(sweep, key=lambda point: point["C"])
    while (direction := edge_of(sweep)) is not None:
        candidates = _beyond(config, sweep, direction)
        if not len(candidates):
            break
        picked = candidates if round_points is None else candidates[:round_points]
        log.info("%s: the best C (%g) is on the %s edge of the swept grid [%g, %g]: extending it %s to %g",
                 config.head, choose_c(sweep), "lower" if direction == "down" else "upper", sweep[0]["C"],
                 sweep[-1]["C"], direction, picked[-1])
        sweep = sorted(sweep + evaluate(np.sort(picked)), key=lambda point: point["C"])
    report = grid_report(config, sweep)
    if report["limit_reached"]:
        log.warning("%s: the best C (%g) is still on the %s edge of the sweep after extending it to the limit "
                    "(%g decades beyond the configured grid [%g, %g]): the best C may lie beyond %g; widen "
                    "c_min/c_max or check the features", config.head, choose_c(sweep),
                    "lower" if report["on_edge"] == "down" else "upper", C_EXTENSION_DECADES, config.c_min,
                    config.c_max, sweep[0]["C"] if report["on_edge"] == "down" else sweep[-1]["C"])
    return sweep


def grid_report(config: HeadConfig, sweep: list[dict]) -> dict:
    """What the sweep covered (JSON-serialisable): ``min``/``max`` C swept; the ``configured`` grid's ends;
    ``limits`` (how far an extension may go); ``extended`` (``"down"``, ``"up"`` or None: beyond which configured
    end points were added); ``on_edge`` (``"down"``/``"up"`` if the chosen C is still the smallest/largest
    swept, else None); ``limit_reached`` (on an edge with no extension left in that direction)."""
    Cs = [point["C"] for point in sweep]
    extended = ("down" if min(Cs) < config.c_min * (1 - 1e-9) else
                "up" if max(Cs) > config.c_max * (1 + 1e-9) else None)
    on_edge = edge_of(sweep)
    low, high = extension_limits(config)
    return {"min": float(min(Cs)), "max": float(max(Cs)), "configured": [float(config.c_min), float(config.c_max)],
            "limits": [float(low), float(high)], "extended": extended, "on_edge": on_edge,
            "limit_reached": bool(on_edge is not None and _grid_step(config) is not None
                                  and not len(_beyond(config, sweep, on_edge)))}


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
