"""The estimators behind the heads, and the C sweep that chooses their regularisation on validation.

A sweep fits the head at every C of a log grid on ``train`` and scores it on ``val``. The linear heads are
swept by :class:`PathClassifier`, L-BFGS on logistic regression's or the linear SVM's own problem, each fit
starting where the previous two C's solutions predict its solution to be (:func:`_predict_start`); the grid is
cut into contiguous segments that run in parallel with joblib (small sweeps in-process, :func:`sweep_jobs`).
The head is the scikit-learn estimator refitted at the chosen C on train+val (:func:`fit_estimator`).
Issue 26 (default image store, 1,000 x 1,280, this 2-core machine; ``benchmarks/head_sweep.py``): a head
experiment took logreg 2.5 s, now 0.7-1.0 s, and linear_svm 11-25 s, now 1.4-1.7 s, with the same C and test
accuracy on both default stores.

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
from scipy import sparse
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
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


def make_scaler(normalize: str):
    return {"standard": FeatureScaler(), "l2": Normalizer(), "none": "passthrough"}[normalize]


class PathClassifier(ClassifierMixin, BaseEstimator):
    """A linear head's problem solved by L-BFGS from the previous fit's solution (``warm_start``): the sweep's solver.

    ``loss="log_loss"``: ``LogisticRegression``'s problem, multinomial (binomial for two classes), the weights
    penalised, the intercept not. ``loss="squared_hinge"``: ``LinearSVC``'s, one-vs-rest (one decision for two
    classes), per decision ``0.5 (|w|^2 + b^2) + C sum_i max(0, 1 - y_i (w x_i + b))^2`` (liblinear penalises
    its intercept, ``intercept_scaling=1``). Both divided by C N and solved as scikit-learn's ``lbfgs`` solves
    logistic regression (``gtol=tol``, ``ftol=64 eps``, in X's float dtype): the same optimum as either
    estimator, to its tolerance (tests/test_head_sweep.py). Why not the estimators themselves (issue 26):
    liblinear cannot start from a solution and at large C runs to ``max_iter`` at seconds a fit, and
    ``LogisticRegression.fit``'s checks cost about a third of a warm-started sweep.

    ``coef_`` (K, D) and ``intercept_`` (K,) float64, K = 1 for two classes (decision for ``classes_[1]``).
    """

    def __init__(self, loss: str = "log_loss", C: float = 1.0, max_iter: int = 300, tol: float = 1e-4,
                 warm_start: bool = True):
        self.loss = loss
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start

    def fit(self, X: np.ndarray, y: np.ndarray) -> PathClassifier:
        """X (N, D) float32 or float64, y (N,) labels; starts from ``coef_``/``intercept_`` when ``warm_start``
        and their shapes fit (the sweep may set them to a predicted solution first)."""
        from scipy.optimize import minimize

        X = _float_rows(X)
        self.classes_ = np.unique(y)
        if len(self.classes_) == 2:
            targets = (y == self.classes_[1])[:, None]
        else:
            targets = y[:, None] == self.classes_[None, :]
        d = X.shape[1]
        start = np.zeros((d + 1, targets.shape[1]))
        if self.warm_start and getattr(self, "coef_", None) is not None and self.coef_.shape == start[:-1].T.shape:
            start = np.vstack([self.coef_.T, self.intercept_[None]])
        objective = {"log_loss": _logistic, "squared_hinge": _squared_hinge}[self.loss]
        result = minimize(objective, start.ravel(), args=(X, targets.astype(X.dtype), float(self.C)), jac=True,
                          method="L-BFGS-B", options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                                                     "ftol": 64 * np.finfo(float).eps})
        W = result.x.reshape(d + 1, targets.shape[1])
        self.coef_, self.intercept_ = W[:-1].T.copy(), W[-1].copy()
        self.n_iter_, self.n_features_in_ = int(result.nit), d
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N, K) float, or (N,) for two classes (positive: ``classes_[1]``)."""
        X = _float_rows(X)
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]


def _float_rows(X):
    """X (N, D) as float32 or float64, dense or a CSR matrix (the TF-IDF baseline's); other dtypes as float64."""
    if sparse.issparse(X):
        X = X.tocsr()
    else:
        X = np.asarray(X)
    return X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)


def _split(w: np.ndarray, X, C: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (D + 1, K) float64 from the raveled ``w`` (intercept last), decisions X W + b (N, K) in X's dtype
    (X (N, D) dense or CSR, :func:`_float_rows`) and the penalty's gradient W / (C N), the intercept's row 0."""
    W = w.reshape(X.shape[1] + 1, -1)
    weights = W.astype(X.dtype, copy=False)
    penalty = W / (C * X.shape[0])
    penalty[-1] = 0.0
    return W, X @ weights[:-1] + weights[-1], penalty


def _with_data_gradient(X, residual: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """``gradient`` plus X^T residual (N, K) for the weights and its column sums for the intercept, raveled."""
    gradient[:-1] += X.T @ residual
    gradient[-1] += residual.sum(axis=0, dtype=np.float64)
    return gradient.ravel()


def _logistic(w: np.ndarray, X, T: np.ndarray, C: float) -> tuple[float, np.ndarray]:
    """Mean log loss + |W|^2 / (2 C N) and its gradient; T (N, K) 0/1 targets, K = 1: binomial for ``classes_[1]``,
    else multinomial (scikit-learn's ``HalfMultinomialLoss`` and ``HalfBinomialLoss``)."""
    W, Z, gradient = _split(w, X, C)
    n = X.shape[0]
    if T.shape[1] == 1:
        loss = np.logaddexp(0, Z) - T * Z
        residual = (expit(Z) - T) / n
    else:
        top = Z.max(axis=1, keepdims=True)
        exp = np.exp(Z - top)
        total = exp.sum(axis=1, keepdims=True)
        loss = np.log(total) + top - (T * Z).sum(axis=1, keepdims=True)
        residual = (exp / total - T) / n
    value = loss.sum(dtype=np.float64) / n + (W[:-1] ** 2).sum() / (2 * C * n)
    return float(value), _with_data_gradient(X, residual, gradient)


def _squared_hinge(w: np.ndarray, X, T: np.ndarray, C: float) -> tuple[float, np.ndarray]:
    """One-vs-rest squared hinge / N + |W, b|^2 / (2 C N) (liblinear penalises the intercept) and its gradient;
    T (N, K) 0/1 targets, each column one decision's positives."""
    W, Z, gradient = _split(w, X, C)
    n = X.shape[0]
    signs = 2 * T - 1
    margin = np.maximum(0, 1 - signs * Z)
    gradient[-1] = W[-1] / (C * n)
    value = (margin * margin).sum(dtype=np.float64) / n + (W ** 2).sum() / (2 * C * n)
    return float(value), _with_data_gradient(X, (-2 / n) * signs * margin, gradient)


# The heads whose sweep warm-starts each fit from the previous C's solution (so segments are contiguous runs of C).
WARM_STARTED_HEADS = ("logreg", "linear_svm")


def _classifier(config: HeadConfig, C: float, warm_start: bool = False):
    """The head's classifier at C; with ``warm_start`` the sweep's (each fit starting from the previous one)."""
    if config.head in WARM_STARTED_HEADS and warm_start:
        return PathClassifier("log_loss" if config.head == "logreg" else "squared_hinge", C=C, max_iter=config.max_iter)
    if config.head == "logreg":
        return LogisticRegression(C=C, max_iter=config.max_iter, random_state=config.seed)
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
# 2.5 vs 2.4 s). With n_jobs=-1, sweeps below these sizes run in-process. linear_svm's path solver costs what
# logreg's does (the same products), so the logreg threshold serves both.
IN_PROCESS_LINEAR_MAX_VALUES = 5_000_000  # rows x features
IN_PROCESS_RBF_MAX_ROWS = 2000


def _rbf_kernels(X: np.ndarray, Xv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RBF kernels (N, N) and (M, N) float64 with sklearn's gamma="scale" = 1 / (D * X.var())."""
    from sklearn.metrics.pairwise import rbf_kernel

    X64, Xv64 = X.astype(np.float64), Xv.astype(np.float64)
    gamma = 1.0 / (X.shape[1] * X64.var())
    return rbf_kernel(X64, X64, gamma=gamma), rbf_kernel(Xv64, X64, gamma=gamma)


def sweep_segment(config: HeadConfig, Cs: np.ndarray, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray):
    """Fit along increasing C (warm-started for logreg and linear_svm); return [(C, val accuracy, seconds)].

    For svm_rbf on up to PRECOMPUTED_KERNEL_MAX_ROWS rows, X and Xv are the precomputed kernels.
    """
    from threadpoolctl import threadpool_limits

    points, path = [], []
    classifier = _classifier(config, float(Cs[0]), warm_start=True)
    precomputed = config.head == "svm_rbf" and X.shape[0] == X.shape[1] == Xv.shape[1] and Xv.shape[0] == len(yv)
    # One BLAS thread: these matrices are too small for threads to pay (measured 3x slower with 2).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in Cs:
            started = time.perf_counter()
            if config.head in WARM_STARTED_HEADS:
                classifier.set_params(C=float(C))
                _predict_start(classifier, path, float(C))
            elif precomputed:
                classifier = SVC(C=float(C), kernel="precomputed", random_state=config.seed)
            else:
                classifier = _classifier(config, float(C))
            classifier.fit(X, y)
            if config.head in WARM_STARTED_HEADS:
                path = [*path[-1:], (np.log(C), classifier.coef_.copy(), classifier.intercept_.copy())]
            points.append((float(C), float(classifier.score(Xv, yv)), time.perf_counter() - started))
    return points


def _predict_start(classifier, path: list[tuple], C: float) -> None:
    """Start a warm-started fit at C from the secant through the last two solutions, ``path`` [(log C, coef_ (K, D),
    intercept_ (K,))], extrapolated in log C: the solutions move smoothly along the grid, and a fit that starts
    where its C's solution is predicted to be needs fewer iterations than one that starts at the previous
    solution (the default image store's sweeps, L-BFGS iterations: logreg 355 -> 222, linear_svm 717 -> 698)."""
    if len(path) < 2:
        return
    (log0, coef0, intercept0), (log1, coef1, intercept1) = path
    step = (np.log(C) - log1) / (log1 - log0)
    classifier.coef_ = coef1 + step * (coef1 - coef0)
    classifier.intercept_ = intercept1 + step * (intercept1 - intercept0)


def sweep_jobs(config: HeadConfig, rows: int, dims: int) -> int:
    """Worker processes for a sweep on ``rows`` x ``dims`` features: ``config.n_jobs``, where -1 (or 0)
    means every core, except for warm-started linear and kernel SVM sweeps too small to pay for them."""
    if config.n_jobs not in (-1, 0):
        return config.n_jobs
    small = ((config.head in WARM_STARTED_HEADS and rows * dims <= IN_PROCESS_LINEAR_MAX_VALUES)
             or (config.head == "svm_rbf" and rows <= IN_PROCESS_RBF_MAX_ROWS))
    return 1 if small else joblib.cpu_count()


def sweep_c(config: HeadConfig, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
            progress: bool = False, extend: bool = True) -> list[dict]:
    """Validation accuracy at every C of the grid: ``[{"C", "val_accuracy", "seconds"}]`` sorted by C.

    X (N, D) and Xv (M, D) float arrays, y (N,) and yv (M,) int labels. The scaler is fitted on X. With
    ``extend`` (default), a best C on the grid's edge extends the grid (module docstring), so the list may hold
    C values beyond ``config.c_min``/``c_max``; :func:`grid_report` describes it.
    """
    scaler = make_scaler(config.normalize)
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
    if config.head in WARM_STARTED_HEADS:  # contiguous runs of C: each fit starts from its neighbour's solution
        segments = [s for s in np.array_split(grid, parts) if len(s)]
    else:  # no warm start: deal C values round-robin, since large C costs the kernel SVM most
        segments = [grid[i::parts] for i in range(parts)]
    with progress_bar(len(segments), f"sweep C ({config.head})", unit="segment", enabled=progress, leave=False) as bar:
        results = []
        parallel = joblib.Parallel(n_jobs=len(segments), return_as="generator")
        for points in parallel(joblib.delayed(sweep_segment)(config, s, X, y, Xv, yv) for s in segments):
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
    return Pipeline([("scale", make_scaler(config.normalize)), ("classify", classifier)])


def fit_estimator(config: HeadConfig, C: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
    """:func:`build_estimator` fitted on X (N, D) float, y (N,) labels: the head's refit on train+val.

    Up to IN_PROCESS_LINEAR_MAX_VALUES values it runs on one BLAS thread: with the library's two threads the
    default image store's logreg refit (1,500 x 1,280, 70 L-BFGS iterations of small products) took 1.4 s on
    this 2-core machine beside another job, 9-13 s while that job kept both cores busy, against 0.25 s.
    linear_svm's calibration folds are solved by :class:`PathClassifier`, the sweep's solver, and kept as the
    ``LinearSVC`` whose problem they solve (the same weights to the solvers' tolerance, tests/test_head_sweep.py):
    liblinear's three fold fits took 2.1-2.7 s at the default image store's C, L-BFGS 0.3 s.
    """
    from threadpoolctl import threadpool_limits

    estimator = build_estimator(config, C)
    threads = 1 if X.shape[0] * X.shape[1] <= IN_PROCESS_LINEAR_MAX_VALUES else None
    if config.head == "linear_svm":
        estimator.set_params(classify__estimator=_classifier(config, C, warm_start=True))
    with warnings.catch_warnings(), threadpool_limits(limits=threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X, y)
    if config.head == "linear_svm":
        calibrated = estimator.named_steps["classify"]
        for fold in calibrated.calibrated_classifiers_:
            fold.estimator = _as_linear_svc(fold.estimator, _classifier(config, C))
        calibrated.set_params(estimator=_classifier(config, C))
    return estimator


def _as_linear_svc(solved: PathClassifier, unfitted: LinearSVC) -> LinearSVC:
    """``unfitted`` holding ``solved``'s solution of its problem (coef_, intercept_, classes_, n_features_in_,
    n_iter_): a plain LinearSVC, so head files, export and predictions see no other type."""
    for name in ("coef_", "intercept_", "classes_", "n_features_in_", "n_iter_"):
        setattr(unfitted, name, getattr(solved, name))
    return unfitted


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
