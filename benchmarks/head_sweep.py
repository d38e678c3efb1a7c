"""A head experiment in a notebook: ``train_head`` on the default stores, today's sweep against the one before issue 26.

    python benchmarks/head_sweep.py [STORE ...] [--heads logreg linear_svm] [--repeats 2]

STORE defaults to ``data/features/fashion_mnist.h5`` and ``data/features/bbc_news.h5`` (what ``make repro``
builds); the heads take params.yaml's ``train_head`` settings. For each store and head it prints the seconds of one
``train_head`` call (best of ``--repeats``, the two formulations interleaved in this process, so that a machine
shared with other jobs slows both alike), split into the sweep and the refit on train+val, their ratio (before /
after), the chosen C of each and how many grid steps apart they are, and the test accuracy of each.

"Before" is the formulation up to issue 26, kept here (:func:`before_train`): logreg swept by scikit-learn's
``LogisticRegression``, warm-started from the previous C, in-process; linear_svm by a cold ``LinearSVC`` per C
(liblinear cannot warm-start) dealt round-robin to joblib processes; the refit with the BLAS library's default
threads and, for linear_svm, three ``LinearSVC`` calibration folds. "After" is ``train_head`` as it is now
(``heads.estimators``: both heads swept by ``PathClassifier``, L-BFGS from a secant prediction of each C's
solution, in-process; the refit on one BLAS thread; linear_svm's calibration folds by the same solver).

Targets (issue 26): on the image store at most 1 s for logreg and 5 s for linear_svm on the 2-core reference
machine when idle; on every store C within one grid step of before and test accuracy within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from featurestore.configs import HeadConfig, config_from_params
from featurestore.heads.estimators import (
    C_EXTENSION_ROUND,
    build_estimator,
    choose_c,
    extend_sweep,
    fit_estimator,
    make_scaler,
    sweep_c,
)
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORES = [ROOT / "data/features/fashion_mnist.h5", ROOT / "data/features/bbc_news.h5"]
TARGET_SECONDS = {"logreg": 1.0, "linear_svm": 5.0}  # on the image store
MAX_ACCURACY_CHANGE = 0.005
BEFORE_IN_PROCESS_LOGREG_MAX_VALUES = 5_000_000  # rows x features: before, only logreg's small sweeps ran in-process


def before_segment(config: HeadConfig, Cs: np.ndarray, X: np.ndarray, y: np.ndarray, Xv: np.ndarray,
                   yv: np.ndarray) -> list[tuple[float, float, float]]:
    """The sweep segment before issue 26: [(C, val accuracy, seconds)], logreg warm-started, LinearSVC cold."""
    from threadpoolctl import threadpool_limits

    points = []
    logreg = LogisticRegression(C=float(Cs[0]), max_iter=config.max_iter, warm_start=True, random_state=config.seed)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in Cs:
            started = time.perf_counter()
            if config.head == "logreg":
                classifier = logreg.set_params(C=float(C))
            else:
                classifier = LinearSVC(C=float(C), max_iter=config.max_iter, random_state=config.seed)
            classifier.fit(X, y)
            points.append((float(C), float(classifier.score(Xv, yv)), time.perf_counter() - started))
    return points


def before_sweep(config: HeadConfig, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray) -> list[dict]:
    """``sweep_c`` before issue 26 (the grid, its extension past an edge, segments in joblib processes)."""
    scaler = make_scaler(config.normalize)
    if scaler != "passthrough":
        scaler.fit(X)
        X, Xv = scaler.transform(X), scaler.transform(Xv)
    small = config.head == "logreg" and X.shape[0] * X.shape[1] <= BEFORE_IN_PROCESS_LOGREG_MAX_VALUES
    n_jobs = (1 if small else joblib.cpu_count()) if config.n_jobs in (-1, 0) else config.n_jobs

    def run(grid: np.ndarray) -> list[dict]:
        parts = max(1, min(n_jobs, len(grid)))
        if config.head == "logreg":
            segments = [s for s in np.array_split(grid, parts) if len(s)]
        else:
            segments = [grid[i::parts] for i in range(parts)]
        results = []
        for points in joblib.Parallel(n_jobs=len(segments))(joblib.delayed(before_segment)(config, s, X, y, Xv, yv)
                                                             for s in segments):
            results.extend(points)
        return [{"C": C, "val_accuracy": acc, "seconds": round(sec, 4)} for C, acc, sec in sorted(results)]

    return extend_sweep(config, run(config.c_grid()), run, C_EXTENSION_ROUND)


def before_train(store: FeatureStore, config: HeadConfig) -> tuple[object, float, dict]:
    """The head's training before issue 26: (fitted pipeline, C, seconds of sweep and refit)."""
    return _train(store, config, before_sweep, _before_refit)


def after_train(store: FeatureStore, config: HeadConfig) -> tuple[object, float, dict]:
    """The same steps as ``CSweptFamily.train`` now, timed apart."""
    return _train(store, config, sweep_c, fit_estimator)


def _before_refit(config: HeadConfig, C: float, X: np.ndarray, y: np.ndarray):
    estimator = build_estimator(config, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


def _train(store: FeatureStore, config: HeadConfig, sweep, refit) -> tuple[object, float, dict]:
    started = time.perf_counter()
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, yv, _ = store.load("val", dtype=np.float32)
    loaded = time.perf_counter()
    C = choose_c(sweep(config, X, y, Xv, yv))
    swept = time.perf_counter()
    estimator = refit(config, C, np.concatenate([X, Xv]), np.concatenate([y, yv]))
    done = time.perf_counter()
    return estimator, C, {"total": done - started, "sweep": swept - loaded, "refit": done - swept}


def accuracy_on_test(estimator, store: FeatureStore) -> float:
    X, y, _ = store.load("test", dtype=np.float32)
    return float(np.mean(estimator.predict(X) == y))


def compare(store: FeatureStore, config: HeadConfig, repeats: int) -> dict:
    """Best-of-``repeats`` seconds before and after (``train_head`` itself for after's total), C and test accuracy."""
    best = {"before": None, "after": None}
    train_head_seconds = float("inf")
    for _ in range(repeats):
        for name, train in (("before", before_train), ("after", after_train)):
            estimator, C, seconds = train(store, config)
            if best[name] is None or seconds["total"] < best[name][2]["total"]:
                best[name] = (estimator, C, seconds)
        started = time.perf_counter()
        head = train_head(store, config)
        train_head_seconds = min(train_head_seconds, time.perf_counter() - started)
    (before, C_before, s_before), (_, C_after, s_after) = best["before"], best["after"]
    step = np.log10(config.c_grid()[1] / config.c_grid()[0])
    return {"store": store.path.name, "head": config.head, "rows": store.count("train"), "dims": store.feature_dim,
            "before_seconds": round(s_before["total"], 2), "after_seconds": round(train_head_seconds, 2),
            "ratio": round(s_before["total"] / train_head_seconds, 1),
            "before_phases": {k: round(v, 2) for k, v in s_before.items()},
            "after_phases": {k: round(v, 2) for k, v in s_after.items()},
            "C_before": C_before, "C_after": C_after, "C_train_head": head.C,
            "grid_steps_apart": round(abs(np.log10(C_after / C_before)) / step, 2),
            "test_before": accuracy_on_test(before, store), "test_after": accuracy_on_test(head.estimator, store),
            "image_store": "image_size" in (store.fingerprint.get("preprocessing") or {})}


def verdict(row: dict) -> str:
    """What the row says against the issue's targets."""
    checks = [f"C {'ok' if row['grid_steps_apart'] <= 1 + 1e-9 else 'MOVED'}",
              f"accuracy {'ok' if abs(row['test_after'] - row['test_before']) <= MAX_ACCURACY_CHANGE else 'CHANGED'}"]
    if row["image_store"]:  # the targets on time are the image store's
        target = TARGET_SECONDS[row["head"]]
        checks.append(f"time {'<=' if row['after_seconds'] <= target else '>'} {target:g} s")
    return ", ".join(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="*", type=Path, default=DEFAULT_STORES)
    parser.add_argument("--heads", nargs="+", default=["logreg", "linear_svm"], choices=["logreg", "linear_svm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())["train_head"]
    rows = []
    for path in args.stores:
        store = FeatureStore(path)
        for head in args.heads:
            row = compare(store, config_from_params(params, head), args.repeats)
            rows.append(row)
            b, a = row["before_phases"], row["after_phases"]
            print(f"{row['store']} ({row['rows']} x {row['dims']}) {head}: before {row['before_seconds']:.2f} s "
                  f"(sweep {b['sweep']:.2f} + refit {b['refit']:.2f}), after {row['after_seconds']:.2f} s "
                  f"(sweep {a['sweep']:.2f} + refit {a['refit']:.2f}), ratio {row['ratio']:.1f}x\n"
                  f"  C {row['C_before']:.3g} -> {row['C_after']:.3g} ({row['grid_steps_apart']:g} grid steps), "
                  f"test accuracy {row['test_before']:.4f} -> {row['test_after']:.4f}: "
                  f"{verdict(row)}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
