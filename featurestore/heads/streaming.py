"""A head for stores larger than memory: logistic regression by SGD, streamed from the HDF5 store.

``sgd_logreg`` is scikit-learn's ``SGDClassifier(loss="log_loss", average=True)`` (one-vs-rest, averaged
SGD) behind the heads' ``FeatureScaler``, both fitted with ``partial_fit`` over minibatches that
``FeatureStore.iter_shuffled`` reads from a bounded shuffle buffer, so peak memory does not grow with the
number of rows. Its regularisation is chosen on the validation split like the other heads' C, with
``alpha = 1 / (C · N)`` (N training rows), the usual correspondence between the two; validation accuracy is
computed chunk by chunk too. The weights are the average of the SGD iterates (ASGD): measured on Lite0
Fashion-MNIST features (benchmarks/heads.py --sgd-passes), plain SGD's validation accuracy still swung by
1-2 points from one pass to the next after 20 passes (0.85-0.87), while the averaged weights reached 0.86 in
2 passes and stayed within a few tenths of a point of 0.87 from the 4th on, so that a few passes are enough.

The store is what costs: a pass reads every row. So the sweep trains one classifier per C side by side,
feeding every minibatch it reads to each of them: ``max_iter`` passes over train for the whole grid (not
``max_iter`` × ``c_points``), and one pass over val to score them all. A best C on the grid's edge extends
the grid (``estimators.extend_sweep``) to the limit in one round, since the new C values share their passes
too. The chosen C is refitted on train+val, whose chunks are shuffled together (every pass mixes both
splits, rather than ending on val rows).

Only the classes with rows in the fitted splits are classes of the model, as for the in-memory heads: a
class with no rows gets no model and probability 0 (``TrainedHead.missing_classes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline

from ..configs import HeadConfig
from ..errors import FeaturestoreError
from ..store.hdf5 import FeatureStore
from ..utils.console import progress_bar
from .estimators import choose_c, extend_sweep
from .scaling import FeatureScaler

BATCH_ROWS = 4096


def present_classes(store: FeatureStore, splits: tuple[str, ...]) -> np.ndarray:
    """Indices into ``store.class_names`` of the classes with rows in ``splits``, (K',) int64 ascending (labels
    only are read, not features)."""
    return np.unique(np.concatenate([store.labels(split) for split in splits])).astype(np.int64)


def fit_scaler(store: FeatureStore, splits: tuple[str, ...]) -> FeatureScaler:
    """A :class:`FeatureScaler` fitted chunk by chunk on the float32 features of ``splits`` (one read of each)."""
    scaler = FeatureScaler()
    for split in splits:
        for X, _ in store.iter_chunks(split):
            scaler.partial_fit(X.astype(np.float32, copy=False))
    return scaler


def fit_sgd(store: FeatureStore, splits: tuple[str, ...], scaler: FeatureScaler, Cs: np.ndarray, n_rows: int,
            config: HeadConfig, classes: np.ndarray, progress: bool = False,
            on_pass: Callable[[int, list[SGDClassifier]], None] | None = None,
            ) -> tuple[list[SGDClassifier], list[float]]:
    """One classifier per C in ``Cs`` (alpha = 1 / (C · n_rows)), trained side by side: ``config.max_iter`` passes
    over the shuffled minibatches of ``splits`` (mixed together), each minibatch read and scaled once and fed to
    every classifier. ``classes`` (K',) int: the labels the models know. ``on_pass(passes_done, classifiers)``
    runs after each pass (benchmarks/heads.py measures accuracy against passes with it). Returns the classifiers
    and the seconds each spent in its own updates."""
    classifiers = [SGDClassifier(loss="log_loss", alpha=1.0 / (float(C) * n_rows), average=True,
                                 random_state=config.seed) for C in Cs]
    seconds = [0.0] * len(classifiers)
    with progress_bar(config.max_iter, f"sgd_logreg: {len(Cs)} C", unit="pass", enabled=progress,
                      leave=False) as bar:
        for epoch in range(config.max_iter):
            for X, y in store.iter_shuffled(splits, BATCH_ROWS, seed=config.seed * 1000 + epoch):
                Z = scaler.transform(X.astype(np.float32, copy=False))
                for i, classifier in enumerate(classifiers):
                    started = time.perf_counter()
                    classifier.partial_fit(Z, y, classes=classes)
                    seconds[i] += time.perf_counter() - started
            if on_pass is not None:
                on_pass(epoch + 1, classifiers)
            bar.update(1)
    return classifiers, seconds


def chunked_accuracies(store: FeatureStore, split: str, scaler: FeatureScaler, classifiers: list) -> list[float]:
    """Accuracy of each classifier on ``split``, read once chunk by chunk (memory independent of its rows)."""
    correct, total = np.zeros(len(classifiers), dtype=np.int64), 0
    for X, y in store.iter_chunks(split):
        Z = scaler.transform(X.astype(np.float32, copy=False))
        correct += [int((classifier.predict(Z) == y).sum()) for classifier in classifiers]
        total += len(y)
    return (correct / max(total, 1)).tolist()


def train_streaming_head(store: FeatureStore, config: HeadConfig,
                         progress: bool = False) -> tuple[Pipeline, float, list[dict], int]:
    """Sweep C on train → val, refit the best C on train+val; returns (Pipeline, C, sweep, n_train).

    The Pipeline maps features (N, D) float32 to probabilities over the classes present in train+val. Reads of
    the store: one pass over train for the scaler, ``max_iter`` passes for the whole C grid and one over val
    (again for an extension round, if any), then one over train+val for the scaler and ``max_iter`` for the
    refit."""
    n_train, n_val = store.count("train"), store.count("val")
    train_classes = present_classes(store, ("train",))
    if len(train_classes) < 2:
        raise FeaturestoreError(f"{store.path}: the train split holds {len(train_classes)} class; a head needs two")
    scaler = fit_scaler(store, ("train",))

    def evaluate(Cs: np.ndarray) -> list[dict]:
        classifiers, seconds = fit_sgd(store, ("train",), scaler, Cs, n_train, config, train_classes, progress)
        accuracies = chunked_accuracies(store, "val", scaler, classifiers)
        return [{"C": float(C), "val_accuracy": float(accuracy), "seconds": round(spent, 4)}
                for C, accuracy, spent in zip(Cs, accuracies, seconds, strict=True)]

    sweep = extend_sweep(config, evaluate(config.c_grid()), evaluate, round_points=None)
    C = choose_c(sweep)
    splits = ("train", "val")
    scaler = fit_scaler(store, splits)
    (classifier,), _ = fit_sgd(store, splits, scaler, np.array([C]), n_train + n_val, config,
                               present_classes(store, splits), progress)
    return Pipeline([("scale", scaler), ("classify", classifier)]), C, sweep, n_train + n_val
