"""What both fine-tunes (images and texts) start from and share: the linear probe as the first classifier.

The classifier of a fine-tune starts as the logistic-regression head refitted on the train split alone, its
scaler folded into the weights (:func:`probe_weights`), so epoch 0 is exactly the probe. A run is identified
by everything that shapes it (:func:`run_identity`), so a checkpoint resumes only its own run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import FinetuneConfig
from ..data.sources import Record, Source, nested_subset
from ..encode.backbones import Spec, get_spec
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator, fold_scaler
from ..heads.head import TrainedHead
from ..store.hdf5 import FeatureStore
from .training import TrainResult


def head_spec(head: TrainedHead) -> Spec:
    """The registry entry of the backbone whose features ``head`` was trained on (resolved once per command); a
    fine-tuned backbone's entry is found beside the head's store."""
    return get_spec(head.backbone, search=(Path(head.store_path).parent,))


def train_only_probe(head: TrainedHead):
    """The head's pipeline refitted at its chosen C on the train split alone.

    The saved head was refitted on train+val; starting from it would make the validation split, which early
    stopping watches, part of the starting point's training data.
    """
    from sklearn.exceptions import ConvergenceWarning

    if head.config.head != "logreg":
        raise FeaturestoreError(f"fine-tuning starts from a logreg head; {head.name} is {head.config.head}")
    store = FeatureStore(head.store_path)
    head.check_store(store)
    X, y, _ = store.load("train")
    estimator = build_estimator(head.config, head.C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X.astype(np.float32), y)


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


class ProbeClassifier(nn.Module):
    """The linear probe as the network's ``_fc``: optional L2 normalisation, then ``linear``."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, l2_normalize: bool):
        super().__init__()
        self.l2_normalize = l2_normalize
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.linear(features)


@dataclass
class FinetuneResult(TrainResult):
    out: str = ""
    cache: str | None = None
    cache_seconds: float = 0.0
    test_accuracy: float | None = None
    config: dict = field(default_factory=dict)


def run_identity(head: TrainedHead, config: FinetuneConfig, probe_state: dict, train: list[Record],
                 val: list[Record], amp: bool) -> str:
    """SHA-256 of everything that shapes a fine-tuning run: the config, the head (fingerprint, C, scaling),
    the starting classifier's exact weights, the images and labels of train and val, and mixed precision.
    A checkpoint resumes only a run with the same identity."""
    digest = hashlib.sha256()
    digest.update(config.key().encode())
    digest.update(json.dumps({"head": head.name, "fingerprint": head.fingerprint_hash, "C": head.C,
                              "normalize": head.config.normalize, "amp": amp}, sort_keys=True).encode())
    for name in sorted(probe_state):
        digest.update(name.encode() + probe_state[name].detach().cpu().numpy().tobytes())
    for record in train + val:
        digest.update(f"{record.split}|{record.rel_path}|{record.label}\n".encode())
    return digest.hexdigest()


def split_records(source: Source, head: TrainedHead, data, train_per_class: int | None, seed: int):
    """(train, val, test) records of ``source`` for fine-tuning ``head``, and the train rows kept (a nested
    subset of ``train_per_class`` per class, or all)."""
    if source.class_names != head.class_names:
        raise FeaturestoreError(f"{data}: classes {source.class_names} differ from the head's {head.class_names}")
    train = [r for r in source.records if r.split == "train"]
    rows = np.arange(len(train))
    if train_per_class is not None:
        rows = nested_subset(np.array([r.label for r in train]), train_per_class, seed)
        train = [train[i] for i in rows]
    val = [r for r in source.records if r.split == "val"]
    test = [r for r in source.records if r.split == "test"]
    if not train or not val:
        raise FeaturestoreError(f"{data}: fine-tuning needs train and val splits")
    return train, val, test, rows
