"""The multi-layer head (Head2Toe, Evci et al. 2022): logistic regression on the pooled outputs of several layers of
the backbone, the layers chosen on validation.

It trains on a store extracted with ``--layers all`` (``encode.backbones.layers``: the pooled stem, every block and
the penultimate ``head`` layer, concatenated, their column ranges in the fingerprint's ``layers``). Each candidate
set of layers is standardised per feature and then weighted per layer, every layer's columns divided by
√(its width), so that a 1,280-wide layer does not drown a 16-wide one under the L2 penalty; C is swept on val for
each. The candidates (:data:`SELECTIONS`):

- ``penultimate``: the ``head`` layer alone (the linear probe's features);
- ``all``: every layer;
- ``blocks``: every layer but ``head`` (the penultimate layer sits far from the data on far-domain images);
- ``top4``: the four layers that score best alone on val (one small C sweep per layer).

The best validation accuracy wins; ties go to the fewest columns, then the smallest C. Measured on the default
images (docs/layers.md, ``benchmarks/layer_selection.py``, 3 subset seeds): at 5 labels per class ``all`` tested
0.718 against the penultimate probe's 0.624; at 50, 0.843 against 0.812. The head records the layers it chose
(``settings["layers"]``), and export builds a graph that computes exactly those (``deploy.export``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from ..errors import FeaturestoreError
from .estimators import sweep_c
from .scaling import FeatureScaler

SELECTIONS = ("penultimate", "all", "blocks", "top4")
PENULTIMATE = "head"  # encode.backbones.layers.PENULTIMATE (not imported: that module brings torch)
SOLO_C_POINTS = 7  # the C grid of each layer's solo sweep (ranking only)


def layer_table(fingerprint: dict, where: str) -> list[list]:
    """The store's layers, [[name, first column, width], …] in column order; one line naming the store ``where``
    when it has none."""
    layers = fingerprint.get("layers")
    if not layers:
        raise FeaturestoreError(
            f"{where} holds one layer's features (the penultimate): the multilayer head needs a store extracted with "
            f"`featurestore extract --layers all` (a store of its own, e.g. <name>.layers.h5)")
    table, start = [], 0
    for name, width in layers:
        table.append([str(name), start, int(width)])
        start += int(width)
    return table


def columns_of(layers: Sequence[Sequence]) -> np.ndarray:
    """Column indices (C,) int64 of ``layers`` ([[name, first column, width], …]), in their order."""
    return np.concatenate([np.arange(start, start + width) for _, start, width in layers]).astype(np.int64)


class LayerColumns(TransformerMixin, BaseEstimator):
    """Keep the columns of the chosen layers: X (N, D) → X[:, columns] (N, C), same dtype."""

    def __init__(self, columns: Sequence[int] = ()):
        self.columns = columns

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        return np.asarray(X)[:, np.asarray(self.columns, dtype=np.int64)]


class LayerScaler(FeatureScaler):
    """:class:`FeatureScaler` (standardised per feature), then each layer's columns divided by √(its width):
    ``widths`` are the chosen layers' widths in column order (their sum is the input's width). ``scale_`` carries
    both, so the scaler folds into a linear layer like any other (``estimators.fold_scaler``)."""

    def __init__(self, widths: Sequence[int] = (), *, copy: bool = True, with_mean: bool = True,
                 with_std: bool = True):
        super().__init__(copy=copy, with_mean=with_mean, with_std=with_std)
        self.widths = widths

    def partial_fit(self, X, y=None, sample_weight=None):
        super().partial_fit(X, y, sample_weight)
        widths = np.asarray(self.widths, dtype=np.float64)
        if self.scale_ is not None and len(widths):
            self.scale_ = self.scale_ * np.repeat(np.sqrt(widths), widths.astype(np.int64))
        return self


def build_multilayer(layers: Sequence[Sequence], C: float, max_iter: int, seed: int = 0) -> Pipeline:
    """The unfitted head on ``layers`` ([[name, first column, width], …] of the store's): their columns → per-layer
    scaler → logistic regression."""
    return Pipeline([("select", LayerColumns(tuple(int(c) for c in columns_of(layers)))),
                     ("scale", LayerScaler(tuple(int(width) for _, _, width in layers))),
                     ("classify", LogisticRegression(C=C, max_iter=max_iter, random_state=seed))])


def candidate_sets(table: Sequence[Sequence], solo: dict[str, float]) -> dict[str, list[list]]:
    """{selection: layers of ``table``} of :data:`SELECTIONS` (a store without a ``head`` layer has no
    ``penultimate`` one); ``solo`` is each layer's val accuracy alone."""
    names = [entry[0] for entry in table]
    ranked = sorted(names, key=lambda name: (-solo[name], names.index(name)))
    chosen = {"penultimate": {PENULTIMATE}, "all": set(names), "blocks": set(names) - {PENULTIMATE},
              "top4": set(ranked[:4])}
    sets = {selection: [list(entry) for entry in table if entry[0] in names_]
            for selection, names_ in chosen.items()}
    return {selection: layers for selection, layers in sets.items() if layers}


def _scaled(layers, X, Xv):
    scaler = LayerScaler(tuple(int(width) for _, _, width in layers))
    columns = columns_of(layers)
    scaler.fit(X[:, columns])
    return scaler.transform(X[:, columns]), scaler.transform(Xv[:, columns])


def sweep_layers(config, table: Sequence[Sequence], X: np.ndarray, y: np.ndarray, Xv: np.ndarray,
                 yv: np.ndarray, progress: bool = False) -> tuple[list[dict], dict[str, float]]:
    """Every candidate set (:func:`candidate_sets`) × C on val: sweep points ``{"selection", "layers", "width",
    "C", "val_accuracy", "seconds"}`` (``layers``: [[name, first column, width], …]), and each layer's solo val
    accuracy. X (N, D), Xv (M, D) float32 rows of a multi-layer store (``table``: :func:`layer_table`), y, yv (N,),
    (M,) int labels. ``config`` is the head's (its C grid and max_iter)."""
    linear = replace(config, head="logreg", normalize="none", n_jobs=1)
    solo_config = replace(linear, c_points=SOLO_C_POINTS)
    solo = {}
    for entry in table:
        A, B = _scaled([entry], X, Xv)
        solo[entry[0]] = max(point["val_accuracy"] for point in sweep_c(solo_config, A, y, B, yv, extend=False))
    sweep: list[dict] = []
    seen: dict[tuple[str, ...], str] = {}
    for selection, layers in candidate_sets(table, solo).items():
        key = tuple(entry[0] for entry in layers)
        if key in seen:  # top4 can be blocks' or all's layers on a four-layer store: one sweep each
            continue
        seen[key] = selection
        started = time.perf_counter()
        A, B = _scaled(layers, X, Xv)
        points = sweep_c(linear, A, y, B, yv, progress=progress)
        width = int(A.shape[1])
        for point in points:
            sweep.append({"selection": selection, "layers": list(layers), "width": width, "C": float(point["C"]),
                          "val_accuracy": float(point["val_accuracy"]),
                          "seconds": float(point.get("seconds", time.perf_counter() - started))})
    return sweep, solo


def choose_layers(sweep: Sequence[dict]) -> dict:
    """The chosen settings: the best val accuracy; ties to the fewest columns, then the smallest C."""
    best = max(sweep, key=lambda p: (p["val_accuracy"], -p["width"], -p["C"]))
    return {key: best[key] for key in ("selection", "layers", "width", "C")}


def fit_multilayer(config, settings: dict, X: np.ndarray, y: np.ndarray) -> Pipeline:
    """:func:`build_multilayer` at ``settings`` fitted on X (N, D) float32, y (N,) int."""
    estimator = build_multilayer(settings["layers"], float(settings["C"]), int(config.max_iter), config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


def fit_on_val(config, table: Sequence[Sequence], X: np.ndarray, y: np.ndarray, Xv: np.ndarray,
               yv: np.ndarray) -> tuple[Pipeline, dict]:
    """The multilayer head chosen on (Xv, yv) and fitted on (X, y) alone, with its settings: what the learning curve
    and the plateau rule fit at each label budget (the head itself is refitted on train+val by its family)."""
    sweep, _ = sweep_layers(config, table, X, y, Xv, yv)
    settings = choose_layers(sweep)
    return fit_multilayer(config, settings, X, y), settings


def rows_by_id(store, split: str, ids: np.ndarray) -> np.ndarray:
    """The features (N, D) float32 of ``store``'s ``split`` rows with content ids ``ids`` (N,), in that order: a layer
    store read in another store's row order. One line naming both counts when some are missing."""
    X, _, own = store.load(split, dtype=np.float32)
    position = {cid: row for row, cid in enumerate(own.tolist())}
    missing = [cid for cid in ids.tolist() if cid not in position]
    if missing:
        raise FeaturestoreError(f"{store.path}: {len(missing)} of the {len(ids)} {split} items of the penultimate "
                                f"store are not in this layer store: re-extract it from the same data "
                                f"(extract --layers all)")
    return X[[position[cid] for cid in ids.tolist()]]
