"""Training a head on a feature store: sweep C on train → val, refit the chosen C on train+val.

The in-memory heads are swept by ``estimators.py`` (optionally on a Dask cluster, ``cluster.py``); ``sgd_logreg``
streams from the store (``streaming.py``), so its memory does not grow with the store.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..configs import HeadConfig
from ..errors import FeaturestoreError, StoreError
from ..store.hdf5 import FeatureStore
from .cluster import dask_backend
from .estimators import build_estimator, choose_c, grid_report, sweep_c
from .head import TrainedHead
from .streaming import train_streaming_head

log = logging.getLogger("featurestore")


def train_head(features: str | Path | FeatureStore, config: HeadConfig = HeadConfig(),
               progress: bool = False, scheduler: str | None = None) -> TrainedHead:
    """Sweep C on train → val, refit the best C on train+val, return the :class:`TrainedHead`.

    With a Dask ``scheduler`` address (or ``DASK_SCHEDULER_ADDRESS`` set), the sweep's segments run on that
    cluster's workers through joblib's dask backend, one segment per worker thread (see cluster.py).
    """
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
        estimator, C, sweep, n_train = train_streaming_head(store, config, progress)
    else:
        X, y, _ = store.load("train", dtype=np.float32)
        Xv, yv, _ = store.load("val", dtype=np.float32)
        if len(np.unique(y)) < 2:
            raise FeaturestoreError(f"{store.path}: the train split holds {len(np.unique(y))} class; a head needs two")
        sweep = sweep_c(config, X, y, Xv, yv, progress=progress)
        C = choose_c(sweep)
        estimator = build_estimator(config, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(np.concatenate([X, Xv]), np.concatenate([y, yv]))
        n_train = len(y) + len(yv)
    head = TrainedHead.fitted_on(store, estimator, config, C, sweep=sweep, c_grid=grid_report(config, sweep),
                                 train_seconds=time.perf_counter() - started, n_train=n_train)
    if head.missing_classes:
        log.warning("%s: class(es) %s have no train or val rows: head %s never predicts them (probability 0)",
                    store.path, ", ".join(head.missing_classes), head.name)
    return head
