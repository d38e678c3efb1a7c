"""A head for stores larger than memory: logistic regression by SGD, streamed from the HDF5 store.

``sgd_logreg`` is scikit-learn's ``SGDClassifier(loss="log_loss")`` (one-vs-rest) behind the heads'
``FeatureScaler``, both fitted with ``partial_fit`` over minibatches that ``FeatureStore.iter_shuffled``
reads from a bounded shuffle buffer, so peak memory does not grow with the number of rows. Its
regularisation is chosen on the validation split like the other heads' C, with ``alpha = 1 / (C · N)``
(N training rows), the usual correspondence between the two; validation accuracy is computed chunk by
chunk too. The chosen C is refitted on train+val.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline

from ..configs import HeadConfig
from ..store.hdf5 import FeatureStore
from ..utils.console import progress_bar
from .scaling import FeatureScaler

BATCH_ROWS = 4096


def fit_scaler(store: FeatureStore, splits: tuple[str, ...]) -> FeatureScaler:
    scaler = FeatureScaler()
    for split in splits:
        for X, _ in store.iter_chunks(split):
            scaler.partial_fit(X.astype(np.float32, copy=False))
    return scaler


def fit_sgd(store: FeatureStore, splits: tuple[str, ...], scaler: FeatureScaler, C: float, n_rows: int,
            config: HeadConfig, classes: np.ndarray) -> SGDClassifier:
    """``config.max_iter`` passes of ``partial_fit`` over the splits' shuffled minibatches."""
    classifier = SGDClassifier(loss="log_loss", alpha=1.0 / (C * n_rows), random_state=config.seed)
    for epoch in range(config.max_iter):
        for split in splits:
            for X, y in store.iter_shuffled(split, BATCH_ROWS, seed=config.seed * 1000 + epoch):
                classifier.partial_fit(scaler.transform(X.astype(np.float32, copy=False)), y, classes=classes)
    return classifier


def chunked_accuracy(store: FeatureStore, split: str, scaler: FeatureScaler, classifier) -> float:
    correct = total = 0
    for X, y in store.iter_chunks(split):
        correct += int((classifier.predict(scaler.transform(X.astype(np.float32, copy=False))) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def train_streaming_head(store: FeatureStore, config: HeadConfig, progress: bool = False):
    """Sweep C on train → val, refit the best C on train+val; returns (Pipeline, C, sweep, n_train)."""
    from .estimators import choose_c

    classes = np.arange(len(store.class_names))
    n_train, n_val = store.count("train"), store.count("val")
    scaler = fit_scaler(store, ("train",))
    sweep = []
    with progress_bar(config.c_points, "sweep C (sgd_logreg)", unit="C", enabled=progress, leave=False) as bar:
        for C in config.c_grid():
            started = time.perf_counter()
            classifier = fit_sgd(store, ("train",), scaler, float(C), n_train, config, classes)
            sweep.append({"C": float(C), "val_accuracy": chunked_accuracy(store, "val", scaler, classifier),
                          "seconds": round(time.perf_counter() - started, 4)})
            bar.update(1)
    C = choose_c(sweep)
    scaler = fit_scaler(store, ("train", "val"))
    classifier = fit_sgd(store, ("train", "val"), scaler, C, n_train + n_val, config, classes)
    return Pipeline([("scale", scaler), ("classify", classifier)]), C, sweep, n_train + n_val
