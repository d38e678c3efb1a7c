"""The head families by name (``HeadConfig.head`` → :class:`~.selection.HeadFamily`), and the built-in ones.

- ``logreg``, ``linear_svm``, ``svm_rbf``: in memory, C swept on a log grid (``estimators.sweep_c``, extended past an
  edge), the chosen C refitted on train+val; their report is the grid's (``estimators.grid_report``).
- ``sgd_logreg``: streamed from the store (``streaming.py``), memory independent of its size; the same C protocol.
- ``knn``: a weighted vote of the k nearest train rows by cosine (``knn.py``), k and the temperature swept together
  from one neighbour search; the refit stores the train+val rows.

- ``multilayer``: logistic regression on several layers of a ``--layers all`` store (``multilayer.py``), the layers
  and C chosen together on validation.

A new kind of head subclasses ``HeadFamily`` and registers itself here; ``train_head``, the reports and the verdict
then use it like any other.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..errors import FeaturestoreError
from .estimators import build_estimator, fit_estimator, grid_report, sweep_c
from .knn import KNNClassifier, choose_knn, knn_report, sweep_knn
from .multilayer import build_multilayer, choose_layers, fit_multilayer, layer_table, sweep_layers
from .selection import Fitted, HeadFamily
from .streaming import train_streaming_head


def check_two_classes(store, y: np.ndarray) -> None:
    """Refuse a train split of fewer than two classes, naming the store."""
    if len(np.unique(y)) < 2:
        raise FeaturestoreError(f"{store.path}: the train split holds {len(np.unique(y))} class; a head needs two")


class InMemoryFamily(HeadFamily):
    """A head swept on the train and val rows loaded into memory (float32): :meth:`sweep` scores every candidate,
    :meth:`build` makes the estimator at the chosen settings, refitted on train+val."""

    def sweep(self, config, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
              progress: bool) -> list[dict]:
        raise NotImplementedError

    def report(self, config, sweep: list[dict]) -> dict | None:
        """The family's account of its search, recorded with the head (None: nothing beyond the sweep)."""
        return None

    def train(self, store, config, progress: bool = False) -> Fitted:
        X, y, _ = store.load("train", dtype=np.float32)
        Xv, yv, _ = store.load("val", dtype=np.float32)
        check_two_classes(store, y)
        sweep = self.sweep(config, X, y, Xv, yv, progress)
        settings = self.choose(sweep)
        estimator = self.refit(config, settings, np.concatenate([X, Xv]), np.concatenate([y, yv]))
        return Fitted(estimator, settings, sweep, len(y) + len(yv), self.report(config, sweep))

    def refit(self, config, settings: dict, X: np.ndarray, y: np.ndarray):
        """:meth:`build` at ``settings``, fitted on X (N, D) float32, y (N,) int, convergence warnings quiet."""
        estimator = self.build(config, settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return estimator.fit(X, y)


class CSweptFamily(InMemoryFamily):
    """Scaler + linear or kernel classifier, its C chosen on validation, refitted by ``estimators.fit_estimator``
    (small problems on one BLAS thread; linear_svm's calibration folds by its sweep's solver)."""

    def refit(self, config, settings, X, y):
        return fit_estimator(config, settings["C"], X, y)

    def sweep(self, config, X, y, Xv, yv, progress):
        return sweep_c(config, X, y, Xv, yv, progress=progress)

    def build(self, config, settings: dict):
        return build_estimator(config, settings["C"])

    def report(self, config, sweep):
        return grid_report(config, sweep)


class KNNFamily(InMemoryFamily):
    """``knn``: k and the temperature chosen together on validation (``knn.sweep_knn``, ties by ``knn.choose_knn``);
    its report is the values swept (``knn.knn_report``)."""

    prefer = ()  # ties: :meth:`choose`

    def sweep(self, config, X, y, Xv, yv, progress):
        return sweep_knn(X, y, Xv, yv, progress=progress)

    def choose(self, sweep):
        return choose_knn(sweep)

    def build(self, config, settings: dict):
        return KNNClassifier(k=int(settings["k"]), temperature=float(settings["temperature"]))

    def report(self, config, sweep):
        return knn_report(sweep)


class MultiLayerFamily(InMemoryFamily):
    """``multilayer``: logistic regression on layers of a ``--layers all`` store, the layers and C chosen together
    on validation (``multilayer.sweep_layers``; ties to the fewest columns, then the smallest C); its report is each
    layer's val accuracy alone, the ranking behind ``top4``."""

    def train(self, store, config, progress: bool = False) -> Fitted:
        table = layer_table(store.fingerprint, str(store.path))
        X, y, _ = store.load("train", dtype=np.float32)
        Xv, yv, _ = store.load("val", dtype=np.float32)
        check_two_classes(store, y)
        sweep, solo = sweep_layers(config, table, X, y, Xv, yv, progress)
        settings = choose_layers(sweep)
        estimator = self.refit(config, settings, np.concatenate([X, Xv]), np.concatenate([y, yv]))
        return Fitted(estimator, settings, sweep, len(y) + len(yv), {"solo_val_accuracy": solo})

    def choose(self, sweep):
        return choose_layers(sweep)

    def build(self, config, settings: dict):
        return build_multilayer(settings["layers"], float(settings["C"]), int(config.max_iter), config.seed)

    def refit(self, config, settings, X, y):
        return fit_multilayer(config, settings, X, y)


class StreamedFamily(HeadFamily):
    """``sgd_logreg``: C swept and refitted by passes over the store (never all in memory)."""

    def train(self, store, config, progress: bool = False) -> Fitted:
        estimator, C, sweep, n_train = train_streaming_head(store, config, progress)
        return Fitted(estimator, {"C": C}, sweep, n_train, grid_report(config, sweep))

    def refits(self) -> bool:
        return False


_FAMILIES: dict[str, HeadFamily] = {}


def register_family(head: str, family: HeadFamily) -> None:
    """Make ``family`` the trainer of heads named ``head`` (``HeadConfig.head``)."""
    _FAMILIES[head] = family


def family_of(head: str) -> HeadFamily:
    """The registered family of a head name; a clear error for an unknown one."""
    if head not in _FAMILIES:
        raise FeaturestoreError(f"no head family {head!r}: known heads are {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[head]


for _name in ("logreg", "linear_svm", "svm_rbf"):
    register_family(_name, CSweptFamily())
register_family("sgd_logreg", StreamedFamily())
register_family("knn", KNNFamily())
register_family("multilayer", MultiLayerFamily())
