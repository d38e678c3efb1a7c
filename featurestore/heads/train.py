"""Training a head on a feature store: its family (``families.py``) sweeps its settings on train → val and refits
the chosen ones on train+val (``selection.py``, the protocol every head follows).

The in-memory heads are swept by ``estimators.py`` (optionally on a Dask cluster, ``cluster.py``); ``sgd_logreg``
streams from the store (``streaming.py``), so its memory does not grow with the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from ..configs import HeadConfig
from ..errors import StoreError
from ..store.hdf5 import FeatureStore
from .cluster import dask_backend
from .families import family_of
from .head import TrainedHead

log = logging.getLogger("featurestore")


def train_head(features: str | Path | FeatureStore, config: HeadConfig = HeadConfig(),
               progress: bool = False, scheduler: str | None = None) -> TrainedHead:
    """Sweep the head's settings (C) on train → val, refit the best on train+val, return the :class:`TrainedHead`.

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
            raise StoreError(f"{store.path}: a head needs 'train' and 'val' splits (its settings are chosen on val); "
                             f"found {store.splits}: extract with --val-fraction (and --test-fraction) to draw them "
                             f"from the data, stratified and seeded")
    started = time.perf_counter()
    fitted = family_of(config.head).train(store, config, progress)
    head = TrainedHead.fitted_on(store, fitted.estimator, config, fitted.settings.get("C", float("nan")),
                                 settings=fitted.settings, sweep=fitted.sweep, c_grid=fitted.report,
                                 train_seconds=time.perf_counter() - started, n_train=fitted.n_train)
    if head.missing_classes:
        log.warning("%s: class(es) %s have no train or val rows: head %s never predicts them (probability 0)",
                    store.path, ", ".join(head.missing_classes), head.name)
    return head
