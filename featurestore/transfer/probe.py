"""What both fine-tunes (images and texts) start from and share: the linear probe as the first classifier.

The classifier of a fine-tune starts as the logistic-regression head refitted on the train split alone, its
scaler folded into the weights (:func:`probe_weights`), so epoch 0 is exactly the probe. A run is identified
by everything that shapes it (:func:`run_identity`), so a checkpoint resumes only its own run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import FinetuneConfig
from ..data.sources import Record, Source, budget_shortfall, nested_subset
from ..encode.backbones import Spec, get_spec
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator, fold_scaler
from ..heads.head import TrainedHead
from ..heads.records import match_records
from ..store.hdf5 import FeatureStore
from .training import TrainResult

log = logging.getLogger("featurestore")


def head_spec(head: TrainedHead) -> Spec:
    """The registry entry of the backbone whose features ``head`` was trained on (resolved once per command); a
    fine-tuned backbone's entry is found beside the head's store."""
    return get_spec(head.backbone, search=(Path(head.store_path).parent,))


def train_only_probe(head: TrainedHead, rows: np.ndarray | None = None, scale_floor: float = 0.0):
    """The head's pipeline refitted at its chosen C on the train split alone (``rows`` of it; default all).

    The saved head was refitted on train+val; starting from it would make the validation split, which early
    stopping watches, part of the starting point's training data. ``scale_floor`` > 0 (a standardised head):
    each feature is divided by at least ``scale_floor`` × the median feature's standard deviation. Folded into
    raw features, a standardised probe's weight on a feature of tiny spread is huge (305 of EfficientNet-Lite0's
    1,280 features have σ below 1e-3 of the largest; on upscaled digits the probe put 68 on one with σ ≈ 1e-4), and
    the first update of the blocks below, moving that feature by far more than its σ, sent the logits to infinity.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    if head.config.head != "logreg":
        raise FeaturestoreError(f"fine-tuning starts from a logreg head; {head.name} is {head.config.head}")
    store = FeatureStore(head.store_path)
    head.check_store(store)
    X, y, _ = store.load("train", dtype=np.float32)
    if rows is not None:
        X, y = X[rows], y[rows]
    estimator = build_estimator(head.config, head.C)
    scaler = estimator.named_steps["scale"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if scale_floor <= 0 or not isinstance(scaler, StandardScaler):
            return estimator.fit(X, y)
        scaler.fit(X)
        scaler.scale_ = np.maximum(scaler.scale_, scale_floor * np.median(scaler.scale_))
        estimator.named_steps["classify"].fit(scaler.transform(X), y)
        return estimator


def probe_weights(estimator, n_classes: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """A fitted scaler + LogisticRegression pipeline as one linear layer over all ``n_classes``: weight (K, D),
    bias (K,) float64, and whether features are L2-normalised first. A class the probe never saw gets a
    zero weight row and a very negative bias (probability ~0, as in the head)."""
    classify = estimator.named_steps["classify"]
    weight, bias = classify.coef_, classify.intercept_
    if weight.shape[0] == 1:  # binary: softmax over [0, d] equals the sigmoid of d
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.array([0.0, bias[0]])
    weight, bias, l2 = fold_scaler(estimator, weight, bias)
    classes = np.asarray(classify.classes_, dtype=np.int64)
    if len(classes) != n_classes:
        full_weight, full_bias = np.zeros((n_classes, weight.shape[1])), np.full(n_classes, -1e4)
        full_weight[classes], full_bias[classes] = weight, bias
        weight, bias = full_weight, full_bias
    return weight, bias, l2


def probe_center(estimator, dim: int) -> np.ndarray:
    """The mean (D,) float64 a fitted probe pipeline's scaler subtracts (zeros for an L2 or no scaler)."""
    scaler = estimator.named_steps["scale"]
    return np.asarray(getattr(scaler, "mean_", None) if getattr(scaler, "with_mean", False) else np.zeros(dim),
                      dtype=np.float64)


class ProbeClassifier(nn.Module):
    """The linear probe as the network's classifier: optional L2 normalisation, then ``linear`` (the probe with its
    scaler folded in). ``dropout`` (the rate of the network's own dropout before its classifier, which
    :func:`finetune.prepare_top` moves here) drops features around ``center`` (the scaler's mean), as dropout on
    the standardised features the probe was fitted on would: dropping a raw feature to zero moves it by its mean,
    which a standardised probe multiplies by 1/σ. (On the upscaled digits the move changed the fine-tune little;
    the σ floor and the back-offs did the rest, docs/fine-tuning.md.) In eval mode the classifier is exactly the
    probe."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, l2_normalize: bool, center: np.ndarray | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.l2_normalize = l2_normalize
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.dropout = nn.Dropout(dropout)
        center = np.zeros(weight.shape[1]) if center is None else center
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))

    @classmethod
    def of_probe(cls, estimator, n_classes: int, dropout: float = 0.0) -> ProbeClassifier:
        """The classifier of a fitted probe pipeline (:func:`probe_weights`) over ``n_classes``."""
        weight, bias, l2 = probe_weights(estimator, n_classes)
        return cls(weight, bias, l2, None if l2 else probe_center(estimator, weight.shape[1]), dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.dropout.p:
            features = self.center + self.dropout(features - self.center)
        return self.linear(features)


@dataclass
class FinetuneResult(TrainResult):
    out: str = ""
    cache: str | None = None
    cache_seconds: float = 0.0
    test_accuracy: float | None = None
    config: dict = field(default_factory=dict)
    train_ids: list[str] = field(default_factory=list)  # the content ids it trained on: the probe's rows


def run_identity(head: TrainedHead, config: FinetuneConfig, probe_state: dict, rows: FinetuneRows,
                 amp: bool) -> str:
    """SHA-256 of everything that shapes a fine-tuning run: the config, the head (fingerprint, C, scaling),
    the starting classifier's exact weights, the content ids and labels of the train and val rows, and mixed
    precision. A checkpoint resumes only a run with the same identity."""
    digest = hashlib.sha256()
    digest.update(config.key().encode())
    digest.update(json.dumps({"head": head.name, "fingerprint": head.fingerprint_hash, "C": head.C,
                              "normalize": head.config.normalize, "amp": amp}, sort_keys=True).encode())
    for name in sorted(probe_state):
        digest.update(name.encode() + probe_state[name].detach().cpu().numpy().tobytes())
    for split, chosen in (("train", rows.train), ("val", rows.val)):
        for cid, label in zip(chosen.ids, chosen.labels, strict=True):
            digest.update(f"{split}|{cid}|{label}\n".encode())
    return digest.hexdigest()


def probe_rows(labels: np.ndarray, train_per_class: int | None, seed: int) -> np.ndarray:
    """Rows of a store's train split that a probe, and the fine-tune that starts from it, train on: every row, or
    a nested subset of ``train_per_class`` per class drawn by ``seed`` from the store's labels (N,) int →
    sorted rows (M,) int64. Rows are positions in the store, never in a folder listing: an image that did not
    decode has no row."""
    if train_per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    short = budget_shortfall(labels, train_per_class)
    if short:
        log.warning("a budget of %d labels per class is capped: %d class(es) have fewer train items (%s), all of "
                    "which are used", train_per_class, len(short),
                    ", ".join(f"class {c}: {n}" for c, n in sorted(short.items())))
    return nested_subset(np.asarray(labels), train_per_class, seed).astype(np.int64)


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split of the head's feature store that a fine-tune uses: their positions in the store
    ``rows`` (N,) int64, content ids ``ids`` (N,) str and labels ``labels`` (N,) int64, in store order."""

    split: str
    rows: np.ndarray
    ids: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class FinetuneRows:
    """What a fine-tune trains on (``train``: the probe's rows), early-stops on (``val``) and scores (``test``,
    None without a test split), all selected in the head's feature store by content id."""

    store: FeatureStore
    train: SplitRows
    val: SplitRows
    test: SplitRows | None

    def splits(self) -> dict[str, SplitRows]:
        return {r.split: r for r in (self.train, self.val, self.test) if r is not None}


def split_rows(store: FeatureStore, split: str, rows: np.ndarray | None = None) -> SplitRows:
    """``rows`` (default all) of ``split`` of ``store``, with their content ids and labels."""
    labels, ids = store.labels(split), store.ids(split)
    rows = np.arange(len(labels), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    return SplitRows(split, rows, ids[rows], labels[rows])


def finetune_rows(head: TrainedHead, train_per_class: int | None, seed: int) -> FinetuneRows:
    """The rows of the head's feature store a fine-tune uses: the probe's train rows (all, or the nested subset of
    ``train_per_class`` per class), and every val and test row."""
    store = FeatureStore(head.store_path)
    head.check_store(store)
    chosen = {split: split_rows(store, split) for split in ("val", "test") if split in store.splits}
    if "train" in store.splits:
        chosen["train"] = split_rows(store, "train", probe_rows(store.labels("train"), train_per_class, seed))
    if "train" not in chosen or not len(chosen["train"].rows) or "val" not in chosen:
        raise FeaturestoreError(f"{store.path}: fine-tuning needs rows in the train and val splits")
    return FinetuneRows(store, chosen["train"], chosen["val"], chosen.get("test"))


def records_for(source: Source, rows: SplitRows, store: FeatureStore) -> list[Record]:
    """The source's records of ``rows`` (in their order), each checked against its content id and given the
    store's label: an item edited, renamed away or relabelled since extraction is an error, not a silent shift
    (:func:`~featurestore.heads.records.match_records`)."""
    return match_records(source, store, rows.split, rows.rows)
