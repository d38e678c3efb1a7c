"""The baselines as deployable models: TF-IDF + logistic regression on raw texts, raw pixels + logistic regression
on images. No encoder: what a pretrained backbone must beat, and what is deployed when it does not.

Both are fitted like a head: C chosen on the validation split (fitted on train, scored on val), then the chosen C
refitted on train+val. The recipes are the curve's (``transfer/baselines.py`` uses the same vectorizer, pixels and
grid):

- ``tfidf``: word unigrams and bigrams, sublinear term frequency, L2-normalised rows (scikit-learn's
  ``TfidfVectorizer`` with its default token pattern ``(?u)\\b\\w\\w+\\b`` and lower-casing), fitted on the
  training texts, then logistic regression on the sparse rows (no scaling). Input: a list of N strings.
- ``pixels``: each image decoded as ``predict`` decodes it (RGB; the shorter side resized to 28, bilinear, and the
  centre 28 × 28 kept, as an encoder's input is made), then turned to grey with PIL's integer formula
  (``L = (19595 R + 38470 G + 7471 B + 32768) >> 16``: an image that is grey already keeps its values), scaled to
  [0, 1] (:func:`pixel_features`), standardised, logistic regression. Input: uint8 (N, 3, 28, 28). Resizing comes
  before grey because the exported graph takes what ``predict`` decodes for every image model; the two orders
  differ only by rounding (at most one grey level on scikit-image's photos).

A baseline is saved in the one model file (:mod:`.model_file`, kind ``"baseline"``), like a head.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.pipeline import Pipeline

from ..configs import HeadConfig
from ..errors import FeaturestoreError
from ..utils.validation import check_choice
from .head import spread_over_classes
from .model_file import EstimatorModel, load_model, model_kind

if TYPE_CHECKING:
    from ..store.hdf5 import FeatureStore

BASELINE_FORMAT = "baseline"  # its kind in a model file, as :func:`model_format` names it
BASELINE_KINDS = ("tfidf", "pixels")
# The grid of the baselines' C sweep (13 values from 1e-4 to 1e2); the curve's baselines use it too.
BASELINE_GRID = HeadConfig(head="logreg", c_min=1e-4, c_max=1e2, c_points=13)
PIXEL_SIZE = 28
GRAY_WEIGHTS = (19595, 38470, 7471)  # PIL's RGB → L, in 1/65536, rounded: ``(sum + 32768) >> 16``
# The token pattern as onnxruntime's tokenizer (RE2) writes scikit-learn's ``(?u)\b\w\w+\b``: Python's \w is the
# Unicode letters and numbers and "_". Measured: the counts of the whole BBC corpus (1,000 articles, 210,405 word
# and bigram columns) equal scikit-learn's exactly; lower-casing differs only where Python's rules are not one
# character to one ("İ" becomes "i̇").
ONNX_TOKEN_PATTERN = r"[\pL\pN_][\pL\pN_]+"


def make_tfidf():
    """The baselines' vectorizer: word unigrams and bigrams, sublinear tf, min_df 1 (fitted on train only)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)


def pixel_preprocessing(size: int = PIXEL_SIZE):
    """How ``predict`` decodes an image for the pixel baseline: RGB, the shorter side resized to ``size`` (bilinear),
    the centre ``size`` × ``size`` kept, uint8."""
    from ..encode.preprocess import Preprocessing

    return Preprocessing(image_size=size, crop_pct=1.0, interpolation="bilinear", mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0))


def gray_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 3, S, S) → grey pixels in [0, 1], (N, S·S) float32, with PIL's integer formula."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, S, S), got {images.dtype} {images.shape}")
    r, g, b = (images[:, c].astype(np.int32) for c in range(3))  # sums reach 255 * 65536 + 32768
    gray = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b + 32768) >> 16
    return (gray.reshape(len(images), -1) / 255.0).astype(np.float32)


def decode_pixels(records: Sequence, size: int = PIXEL_SIZE) -> np.ndarray:
    """The records' images decoded as ``predict`` decodes them: uint8 (N, 3, size, size). An unreadable image
    raises."""
    from ..encode.images import load_image

    preprocessing = pixel_preprocessing(size)
    return np.stack([preprocessing(load_image(record.path)).numpy() for record in records]).astype(np.uint8)


def pixel_features(records: Sequence, size: int = PIXEL_SIZE) -> np.ndarray:
    """The pixel baseline's features of the records' images, (N, size²) float32 in [0, 1]: :func:`decode_pixels`
    then :func:`gray_pixels`, what the fitted baseline, its exported graph and the curve's "pixels" line read.
    Decoded 1,024 at a time, so a large split never holds its uint8 RGB copy in memory. An unreadable image raises."""
    rows = np.empty((len(records), size * size), dtype=np.float32)
    for start in range(0, len(records), 1024):
        chunk = records[start:start + 1024]
        rows[start:start + len(chunk)] = gray_pixels(decode_pixels(chunk, size))
    return rows


def read_texts(records: Sequence) -> list[str]:
    """The records' documents as strings (UTF-8); an unreadable one raises, as it has no row in a store."""
    from ..encode.texts import item_text

    return [item_text(record) for record in records]


@dataclass
class BaselineModel(EstimatorModel):
    """A fitted baseline: ``estimator`` maps the raw input (texts, or grey pixel rows) to probabilities over the
    classes it saw; :meth:`predict_proba` spreads them over all ``class_names`` (N, K).

    ``val_accuracy``: the chosen C fitted on the train rows alone, scored on the ``n_val`` validation rows (the
    figure the decision compares); the estimator itself is refitted on train+val (``n_train`` rows).
    ``backbone``: the name of the store (data set) the rows came from, as ``params.yaml``'s ``stores`` names it;
    ``store_path`` and ``store_fingerprint_hash``: that store.
    """

    MODEL_KIND = BASELINE_FORMAT
    kind: str
    estimator: Pipeline
    C: float
    class_names: list[str]
    backbone: str
    val_accuracy: float
    n_val: int
    n_train: int
    store_fingerprint_hash: str = ""
    store_path: str = ""
    sweep: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    # validation content id → right or wrong, of the chosen settings refitted on the train rows alone (what the
    # verdict's paired test reads; transfer.best.fit_challenger fills it). Empty: the verdict refits.
    val_answers: dict[str, bool] = field(default_factory=dict)
    corrections: dict | None = None  # as TrainedHead's: what train-head --exclude changed in the store

    def __post_init__(self) -> None:
        check_choice("baseline", self.kind, BASELINE_KINDS)

    @property
    def name(self) -> str:
        """``<store>__tfidf_logreg`` or ``<store>__pixels_logreg``: its name in metrics and reports."""
        return f"{self.backbone}__{self.kind}_logreg"

    @property
    def modality(self) -> str:
        return "text" if self.kind == "tfidf" else "image"

    @property
    def classes(self) -> np.ndarray:
        return np.asarray(self.estimator.classes_, dtype=np.int64)

    def features(self, inputs) -> object:
        """What the estimator reads: the texts as they are, or uint8 images (N, 3, 28, 28) as grey rows."""
        if self.kind == "tfidf":
            if isinstance(inputs, str) or not all(isinstance(text, str) for text in inputs):
                raise TypeError("a TF-IDF model takes a list of strings")
            return list(inputs)
        return gray_pixels(inputs)

    def predict_proba(self, inputs) -> np.ndarray:
        """Probabilities (N, K) float64; column k is ``class_names[k]`` (0 for a class with no training rows)."""
        return spread_over_classes(self.estimator.predict_proba(self.features(inputs)), self.classes,
                                   len(self.class_names))

    def predict(self, inputs) -> np.ndarray:
        """Class indices (N,) int64 into ``class_names``."""
        return np.argmax(self.predict_proba(inputs), axis=1).astype(np.int64)

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model": f"{self.kind} + logistic regression", "C": self.C,
                "classes": len(self.class_names), "val_accuracy": self.val_accuracy, "n_val": self.n_val,
                "n_train": self.n_train, "train_seconds": round(self.train_seconds, 3)}


# The kind of model a file holds ("head", "baseline", "hybrid"), None for a file that is not a model archive.
model_format = model_kind


def load_baseline(path: str | Path) -> BaselineModel:
    """Read a baseline model file (see :meth:`BaselineModel.save`)."""
    return load_model(path, kind=BASELINE_FORMAT)


def sweep_and_refit(config: HeadConfig, X, y: np.ndarray, Xv, yv: np.ndarray, X_all, y_all: np.ndarray,
                    estimator_steps=None) -> tuple[Pipeline, float, float, list[dict]]:
    """Sweep C on (X, y) → (Xv, yv), refit the chosen C on (X_all, y_all); returns (estimator, C, val accuracy at
    C, sweep). ``estimator_steps``: steps put before the classifier in the returned pipeline (a fitted
    vectorizer); by default the config's scaler + classifier."""
    from sklearn.exceptions import ConvergenceWarning

    from .estimators import build_estimator, choose_c, sweep_c

    sweep = sweep_c(config, X, y, Xv, yv)
    C = choose_c(sweep)
    estimator = build_estimator(config, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X_all, y_all)
    if estimator_steps:
        estimator = Pipeline([*estimator_steps, *estimator.steps])
    val = float(next(point["val_accuracy"] for point in sweep if point["C"] == C))
    return estimator, C, val, sweep


def fit_baseline(kind: str, train: Sequence, val: Sequence, class_names: list[str], backbone: str,
                 store_fingerprint_hash: str = "", config: HeadConfig = BASELINE_GRID,
                 store_path: str = "") -> BaselineModel:
    """Fit the ``kind`` baseline on ``train`` records (C chosen on ``val``, then refitted on train+val).

    ``train``/``val``: records (``path``, ``label``; texts may carry ``text``) of the same rows the encoder's head
    uses (the caller picks them in the feature store by content id), labels indices into ``class_names``.
    """
    from dataclasses import replace

    check_choice("baseline", kind, BASELINE_KINDS)
    started = time.perf_counter()
    y = np.array([r.label for r in train], dtype=np.int64)
    yv = np.array([r.label for r in val], dtype=np.int64)
    if not len(y) or not len(yv):
        raise FeaturestoreError("a baseline needs train and val rows")
    y_all = np.concatenate([y, yv])
    if kind == "tfidf":
        texts, val_texts = read_texts(train), read_texts(val)
        swept = make_tfidf().fit(texts)
        final = make_tfidf().fit(texts + val_texts)
        X_all = final.transform(texts + val_texts)
        estimator, C, val_accuracy, sweep = sweep_and_refit(
            replace(config, normalize="none"), swept.transform(texts), y, swept.transform(val_texts), yv, X_all,
            y_all, estimator_steps=[("tfidf", final)])
        estimator.steps = [step for step in estimator.steps if step[0] != "scale"]
    else:
        X, Xv = pixel_features(train), pixel_features(val)
        estimator, C, val_accuracy, sweep = sweep_and_refit(replace(config, normalize="standard"), X, y, Xv, yv,
                                                            np.concatenate([X, Xv]), y_all)
    return BaselineModel(kind=kind, estimator=estimator, C=float(C), class_names=list(class_names), backbone=backbone,
                         val_accuracy=val_accuracy, n_val=len(yv), n_train=len(y_all),
                         store_fingerprint_hash=store_fingerprint_hash, store_path=store_path, sweep=sweep,
                         train_seconds=time.perf_counter() - started)


def evaluate_model(model, store: FeatureStore, records: list, split: str = "test") -> dict:
    """Metrics (as :func:`evaluate_head`'s, ``head`` naming the model) of a baseline (``heads.baseline``), hybrid
    head (``heads.hybrid``) or small CNN (``heads.cnn``) on ``split`` of ``store``: ``records`` are that
    split's rows in the store's order (the raw texts or images; the hybrid head also reads the store's embeddings).
    Refuses a split shared with train/val. Here rather than in ``reports.py``, which the per-head evaluation imports
    without decoding anything."""
    from .reports import check_no_overlap, classification_metrics

    check_no_overlap(store, split)
    y = store.labels(split)
    if len(records) != len(y):
        raise FeaturestoreError(f"{store.path}: {len(records)} records given for the {len(y)} rows of split {split!r}")
    if model.MODEL_KIND == "hybrid":  # texts and their embeddings (heads.hybrid, which imports this module)
        proba = model.predict_proba(read_texts(records), store.load(split, dtype=np.float32)[0])
        head, backbone = "hybrid", str(model.fingerprint.get("backbone", "unknown"))  # + TF-IDF
    else:  # a baseline, or a small CNN from scratch (heads.cnn), which reads the same decoded images
        inputs = read_texts(records) if model.kind == "tfidf" else \
            decode_pixels(records, getattr(model, "image_size", PIXEL_SIZE))
        proba = model.predict_proba(inputs)
        head = "small_cnn" if model.kind == "small_cnn" else f"{model.kind}_logreg"
        backbone = f"none ({model.kind})"
    metrics, _ = classification_metrics(y, proba, {"backbone": backbone, "head": head, "split": split})
    metrics.update(C=getattr(model, "C", None), train_seconds=round(model.train_seconds, 3), n_train=model.n_train,
                   val_accuracy=model.val_accuracy)
    return metrics
