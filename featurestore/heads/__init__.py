"""scikit-learn heads on cached features, C chosen on the validation split, saved safely, evaluated.

:mod:`.estimators` (the estimators and the C sweep), :mod:`.head` (:class:`TrainedHead` and its skops file),
:mod:`.train` (the driver), :mod:`.streaming` (a head for stores larger than memory), :mod:`.scaling`,
:mod:`.cluster` (sweeps on Dask), :mod:`.reports` and :mod:`.summary` (evaluation).
"""

from ..utils.lazy import lazy_exports

# Imported on first use: these modules pull in scikit-learn.
_HOMES = {
    "HeadConfig": ".configs",
    "build_estimator": "estimators",
    "choose_c": "estimators",
    "fold_scaler": "estimators",
    "sweep_c": "estimators",
    "TrainedHead": "head",
    "load_head": "head",
    "evaluate_head": "reports",
    "write_head_report": "reports",
    "write_reports": "reports",
    "FeatureScaler": "scaling",
    "comparison_table": "summary",
    "write_summary": "summary",
    "train_head": "train",
}
__getattr__ = lazy_exports(__name__, _HOMES)
__all__ = list(_HOMES)
