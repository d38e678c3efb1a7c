"""The hybrid text head: one logistic regression on ``[w × the L2-normalised embedding, the TF-IDF row]``.

The sentence encoder knows what a text is about; TF-IDF knows which rare words it contains (names, codes, jargon
the encoder's vocabulary splits into pieces). One linear model on both lets the validation split decide how much
each counts: ``w`` (the embedding's weight against the unit-norm TF-IDF row) and C are chosen together on
validation (fitted on train, scored on val), then refitted on train+val. The TF-IDF part is the baseline's
(``baseline.make_tfidf``).

Measured on BBC News (``data/prepared_text``, the MiniLM store; C on val from 1e-2 to 1e4, w in 0.25, 0.5, 1, 2; three
draws of the train subset; val / test accuracy, probe → hybrid): 5 per topic +2.4/+0.6, +1.6/+3.4, +4.4/+1.6 points;
10: +1.2/-0.2, +1.2/+2.0, +2.8/+0.8; 20: +0.4/+0.8, +1.2/+1.4, +0.4/0.0; 50 (every train article): 0.988 = 0.988 on
val, +1.8 on test. It pays on validation at 5-20 labels per topic and ties at 50. On a lexical corpus (mail bodies,
20 per class; shared DESIGN.md) it scored 0.952 on test against TF-IDF's 0.943 and the probe's 0.922, where
validation alone (probe 0.91, TF-IDF 0.90) would have deployed the probe. So the finetune stage fits it for texts by
default (``deploy.hybrid``), and deploys it only where it beats every encoder head on validation.

Input: a list of N strings and their embeddings (N, D) float32 (the store's, or the encoder's on the same texts).
It is saved in the one model file (:mod:`.model_file`, kind ``"hybrid"``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.pipeline import Pipeline

from ..errors import FeaturestoreError
from .baseline import BASELINE_GRID, make_tfidf, read_texts
from .head import spread_over_classes
from .model_file import EstimatorModel, load_model

HYBRID_FORMAT = "hybrid"  # its kind in a model file, as ``baseline.model_format`` names it
HYBRID_WEIGHTS = (0.5, 1.0)  # w: the two that won on BBC News (0.25 and 2 never did better than both)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) float → rows divided by their L2 norm (at least 1e-12), float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def hybrid_rows(vectorizer, texts: list[str], embeddings: np.ndarray, weight: float):
    """CSR (N, D + V): ``[weight × unit_rows(embeddings), vectorizer.transform(texts)]``."""
    from scipy import sparse

    return sparse.hstack([sparse.csr_matrix(weight * unit_rows(embeddings)), vectorizer.transform(texts)]).tocsr()


@dataclass
class HybridModel(EstimatorModel):
    """A fitted hybrid head: ``estimator`` holds the fitted ``tfidf`` vectorizer and the ``classify`` logistic
    regression (a Pipeline used for its named steps); ``weight`` is w. ``fingerprint``: the store whose embeddings
    it was fitted on (export rebuilds that encoder); ``val_accuracy`` as for the baseline (train-only fit, val)."""

    MODEL_KIND = HYBRID_FORMAT
    estimator: Pipeline
    weight: float
    C: float
    class_names: list[str]
    backbone: str  # the name of the store it was fitted on (params.yaml's `stores`): its models are <name>__hybrid
    feature_dim: int
    fingerprint: dict
    fingerprint_hash: str
    store_path: str
    val_accuracy: float
    n_val: int
    n_train: int
    sweep: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    val_answers: dict[str, bool] = field(default_factory=dict)  # as BaselineModel's
    corrections: dict | None = None  # as BaselineModel's

    @property
    def name(self) -> str:
        return f"{self.backbone}__hybrid"

    @property
    def store_fingerprint_hash(self) -> str:
        """The fingerprint hash of the store it was fitted on (as :class:`BaselineModel` names it)."""
        return self.fingerprint_hash

    @property
    def classes(self) -> np.ndarray:
        return np.asarray(self.estimator.named_steps["classify"].classes_, dtype=np.int64)

    def rows(self, texts: Sequence[str], embeddings: np.ndarray):
        if isinstance(texts, str) or len(texts) != len(embeddings):
            raise ValueError(f"a hybrid head takes N texts and their embeddings (N, {self.feature_dim})")
        if np.asarray(embeddings).shape[1:] != (self.feature_dim,):
            raise ValueError(f"embeddings must be (N, {self.feature_dim}), got {np.asarray(embeddings).shape}")
        return hybrid_rows(self.estimator.named_steps["tfidf"], list(texts), embeddings, self.weight)

    def predict_proba(self, texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) float64 over all ``class_names`` (0 for a class with no training rows)."""
        return spread_over_classes(self.estimator.named_steps["classify"].predict_proba(self.rows(texts, embeddings)),
                                   self.classes, len(self.class_names))

    def predict(self, texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        return np.argmax(self.predict_proba(texts, embeddings), axis=1).astype(np.int64)

    def summary(self) -> dict:
        return {"name": self.name, "kind": "hybrid", "model": "[w × L2(embedding), TF-IDF] + logistic regression",
                "weight": self.weight, "C": self.C, "classes": len(self.class_names),
                "val_accuracy": self.val_accuracy, "n_val": self.n_val, "n_train": self.n_train,
                "train_seconds": round(self.train_seconds, 3)}


def load_hybrid(path: str | Path) -> HybridModel:
    """Read a hybrid model file (see :meth:`HybridModel.save`)."""
    return load_model(path, kind=HYBRID_FORMAT)


def fit_hybrid(store, train: Sequence, val: Sequence, backbone: str, weights: Sequence[float] = HYBRID_WEIGHTS,
               config=BASELINE_GRID) -> HybridModel:
    """Fit the hybrid head on ``store``'s train and val rows; ``train``/``val`` are the records of those rows in the
    store's order (their texts). w and C chosen on val (fitted on train), then refitted on train+val."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from .estimators import choose_c

    started = time.perf_counter()
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, yv, _ = store.load("val", dtype=np.float32)
    if len(X) != len(train) or len(Xv) != len(val):
        raise FeaturestoreError(f"{store.path}: the records given are not the store's train and val rows")
    texts, val_texts = read_texts(train), read_texts(val)
    swept = make_tfidf().fit(texts)
    sweep = []
    for weight in weights:
        A, Av = hybrid_rows(swept, texts, X, weight), hybrid_rows(swept, val_texts, Xv, weight)
        for C in config.c_grid():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=float(C), max_iter=config.max_iter, random_state=config.seed).fit(A, y)
            sweep.append({"weight": weight, "C": float(C), "val_accuracy": float(model.score(Av, yv))})
    best_val = max(p["val_accuracy"] for p in sweep)
    weight = next(p["weight"] for p in sweep if p["val_accuracy"] == best_val)  # the first w listed among equals
    C = choose_c([p for p in sweep if p["weight"] == weight])
    all_texts = texts + val_texts
    final = make_tfidf().fit(all_texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classify = LogisticRegression(C=C, max_iter=config.max_iter, random_state=config.seed).fit(
            hybrid_rows(final, all_texts, np.concatenate([X, Xv]), weight), np.concatenate([y, yv]))
    return HybridModel(estimator=Pipeline([("tfidf", final), ("classify", classify)]), weight=float(weight),
                       C=float(C), class_names=list(store.class_names), backbone=backbone,
                       feature_dim=int(store.feature_dim), fingerprint=store.fingerprint,
                       fingerprint_hash=store.fingerprint_hash, store_path=str(store.path), val_accuracy=best_val,
                       n_val=len(yv), n_train=len(y) + len(yv), sweep=sweep,
                       train_seconds=time.perf_counter() - started)
