"""SetFit for a sentence encoder (Tunstall et al. 2022): its top transformer layers tuned contrastively on pairs of
the few labelled texts, then the logistic-regression probe refitted on the tuned embeddings.

It starts where the text fine-tune starts (``text_finetune.text_run``): the probe's train rows of the head's
store, every val and test row, the encoder with the head's weights.

1. Pairs (:func:`build_pairs`): each of ``iterations`` rounds gives every train text that has a classmate one
   partner of its class (target 1) and one of another class (target 0), so positive and negative pairs are as
   many; ``max_pairs`` caps an epoch's. Each epoch draws its own pairs from (seed, epoch).
2. The top ``unfreeze_blocks`` layers train on them with the cosine-similarity loss, the mean of
   ``(cos(u, v) - target)²`` over a step's pairs (AdamW, warmup then cosine decay, dropout on), in the loop every
   fine-tune runs (``finetune.tune``, ``training.train``: a checkpoint per epoch, so a killed run resumes). The
   layers below run once per text, at ``max_length`` tokens (``text_finetune.CachedHidden``); a step runs the
   top layers once per distinct text of its pairs (:class:`PairBatches`).
3. After every epoch the train and val texts are embedded by the tuned encoder as the store embeds them (its
   tokenization), and the probe is refitted on the train embeddings at the head's C (chosen on val once, before
   tuning: choosing it again on val at every epoch would be a selection that the decision's test does not pay
   for). Epoch 0 is the probe itself (the store's features). The best epoch on val is kept, its encoder and its
   refitted probe; a tie keeps the earlier. The decision tests every epoch against the probe as it does a
   fine-tune's (``decision.choose``).

The encoder's state dict is written to ``out``, as a fine-tune's: ``extract --weights`` takes it, and the decision
registers it as ``<backbone>_ft``, whose heads are SetFit's refitted probe.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import SETFIT_DEFAULTS, SetFitConfig, Tokenization
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator
from ..heads.head import TrainedHead
from ..utils.devices import resolve_device
from .finetune import Tuning, tune
from .probe import FinetuneResult, ProbeClassifier, train_only_probe
from .text_finetune import CachedHidden, TextTop, text_run
from .training import TrainOptions, adamw, to_device

log = logging.getLogger("featurestore")


def build_pairs(labels: np.ndarray, iterations: int, seed: int | list[int],
                max_pairs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced pairs of train texts: labels (N,) int → (pairs (P, 2) int64 row indices, targets (P,) float32: 1.0
    for two texts of one class, 0.0 for two classes), in a random order drawn by ``seed``.

    Each of ``iterations`` rounds gives every text that has a classmate one partner drawn from its class (never
    itself) and one drawn from the texts of the other classes: P = 2 × iterations × those texts, half of each
    kind. ``max_pairs`` > 0 keeps that many of them (half of each kind, rounded down to an even number). A class
    with a single text still appears in negative pairs. Errors: fewer than two classes, or no class with two texts.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise FeaturestoreError("SetFit pairs need train texts of at least two classes")
    rng = np.random.default_rng(seed)
    positives, negatives = [], []
    for cls in np.unique(labels):
        members, others = np.flatnonzero(labels == cls), np.flatnonzero(labels != cls)
        if len(members) < 2:
            continue
        anchors = np.tile(members, iterations)  # (iterations · n,) each member once per round
        position = np.tile(np.arange(len(members)), iterations)
        draw = rng.integers(0, len(members) - 1, len(anchors))  # a classmate: skip the anchor's own position
        positives.append(np.stack([anchors, members[draw + (draw >= position)]], axis=1))
        negatives.append(np.stack([anchors, others[rng.integers(0, len(others), len(anchors))]], axis=1))
    if not positives:
        raise FeaturestoreError("SetFit pairs need two train texts of one class at least")
    positives, negatives = np.concatenate(positives), np.concatenate(negatives)
    if max_pairs and max_pairs < 2 * len(positives):
        keep = max(1, max_pairs // 2)
        positives = positives[rng.permutation(len(positives))[:keep]]
        negatives = negatives[rng.permutation(len(negatives))[:keep]]
    pairs = np.concatenate([positives, negatives]).astype(np.int64)
    targets = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))]).astype(np.float32)
    order = rng.permutation(len(pairs))
    return pairs[order], targets[order]


def pair_separation(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """How far apart the classes lie: the mean cosine similarity of same-class pairs minus that of different-class
    pairs, over every pair of distinct rows. embeddings (N, D) float, labels (N,) int → float in [-2, 2]."""
    X = np.asarray(embeddings, dtype=np.float64)
    X = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    labels = np.asarray(labels)
    cosine, same = X @ X.T, labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    if not (same & off_diagonal).any() or not (~same).any():
        raise FeaturestoreError("pair separation needs two texts of one class and texts of two classes")
    return float(cosine[same & off_diagonal].mean() - cosine[~same].mean())


class PairBatches:
    """SetFit's batches for :func:`training.train`: epoch e's pairs are ``build_pairs(labels, iterations,
    [seed, e], max_pairs)`` of the ``tuning`` cache's train texts, cut into steps in order; a batch is ((the
    inputs of its distinct texts, (P, 2) int64 positions of each pair's texts among them), targets (P,) float32),
    on the device. ``n_train``: pairs per epoch (the same every epoch). The evaluation batches are ``scoring``'s."""

    def __init__(self, tuning: CachedHidden, scoring: CachedHidden, labels: np.ndarray, config: SetFitConfig):
        self.tuning, self.scoring, self.labels, self.config = tuning, scoring, labels, config
        self.n_train = len(self.pairs(1)[0])

    def pairs(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return build_pairs(self.labels, self.config.iterations, [self.config.seed, epoch], self.config.max_pairs)

    def train_batches(self, epoch: int, batch_size: int):
        pairs, targets = self.pairs(epoch)
        targets = to_device(targets, self.tuning.device)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            distinct, inverse = np.unique(chunk, return_inverse=True)  # each distinct text runs once
            inputs, _ = self.tuning.batch("train", distinct)
            index = to_device(inverse.reshape(chunk.shape), self.tuning.device)
            yield (inputs, index), targets[start:start + batch_size]

    def eval_batches(self, split: str):
        return self.scoring.eval_batches(split)


def pair_loss(top: nn.Module, x: tuple, targets: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The cosine-similarity loss of a step (a :class:`PairBatches` batch): mean of (cos(u, v) − target)² over its
    pairs, a float32 () tensor; no hit count (``training.TrainOptions.loss``)."""
    inputs, index = x
    embeddings = nn.functional.normalize(top(inputs), dim=-1)  # (U, H)
    cosine = (embeddings[index[:, 0]] * embeddings[index[:, 1]]).sum(-1)
    return nn.functional.mse_loss(cosine, targets), None


def embed(top: nn.Module, batches) -> np.ndarray:
    """Document embeddings in eval mode: ``batches`` of (inputs, labels) → (N, H) float32, in batch order."""
    top.eval()
    with torch.inference_mode():
        parts = [top(inputs).float() for inputs, _ in batches]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros((0, 0), dtype=np.float32)


def refit_probe(head: TrainedHead, X: np.ndarray, y: np.ndarray):
    """The head's estimator at the head's C refitted on train embeddings X (N, D) float32, labels y (N,) int."""
    from sklearn.exceptions import ConvergenceWarning

    estimator = build_estimator(replace(head.config, n_jobs=1), head.C)  # a few hundred rows: in-process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X, y)


@dataclass
class SetFitResult(FinetuneResult):
    """A fine-tune's result, plus the C of the refitted probe (the head's, at every epoch) and the pair
    separation (:func:`pair_separation`) of the train texts' embeddings before tuning; every epoch's is in
    ``history``."""

    C: float = 0.0
    start_separation: float = 0.0


def setfit_text(head: TrainedHead, data: str | Path, out: str | Path, config: SetFitConfig = SETFIT_DEFAULTS,
                device: str = "auto", progress: bool = True, train_per_class: int | None = None, probe=None,
                subset_seed: int | None = None, checkpoint_dir: str | Path | None = None,
                keep_checkpoint: bool = False) -> SetFitResult:
    """SetFit on the head's train rows of ``data`` (module docstring); write the kept epoch's encoder state dict to
    ``out`` (a checkpoint for ``--weights``) and return how it went. Every epoch is checkpointed to
    ``checkpoint_dir/last.pt`` (default ``<out>.checkpoints``; deleted once finished unless ``keep_checkpoint``):
    a killed run resumes there and ends as an uninterrupted one would.

    ``train_per_class`` (drawn by ``subset_seed``, default ``config.seed``) and ``probe`` (the probe fitted on those
    rows at the head's C; default the head refitted on them) are how the curve runs it at a budget.
    """
    if head.config.head != "logreg":
        raise FeaturestoreError(f"SetFit refits a logreg probe; {head.name} is {head.config.head}")
    started = time.perf_counter()
    torch_device = resolve_device(device)
    run = text_run(head, data, config.unfreeze_blocks, train_per_class,
                   config.seed if subset_seed is None else subset_seed)
    model, first, rows = run.model, run.first, run.rows
    train_tokenizer = type(run.tokenizer)(model.model_dir / "tokenizer.json",
                                          Tokenization(max_length=config.max_length))
    tuning = CachedHidden(model, train_tokenizer, {"train": run.records["train"]}, first, torch_device,
                          seed=config.seed)
    scoring = CachedHidden(model, run.tokenizer, {"train": run.records["train"], "val": run.records["val"]}, first,
                           torch_device)
    cache_seconds = time.perf_counter() - started
    estimator = probe if probe is not None else train_only_probe(head, rows.train.rows)
    X, y, _ = rows.store.load("train", dtype=np.float32)
    Xv, yv, _ = rows.store.load("val", dtype=np.float32)
    X, y = X[rows.train.rows], y[rows.train.rows]
    start_predictions = np.asarray(estimator.predict(Xv), dtype=np.int64)
    batches = PairBatches(tuning, scoring, y, config)

    model.requires_grad_(False)
    layers = model.encoder.encoder.layer
    for layer in layers[first:]:
        layer.requires_grad_(True)
    top = TextTop(model, first, nn.Identity()).to(torch_device)
    trainable = [p for layer in layers[first:] for p in layer.parameters()]

    def evaluate(epoch: int) -> tuple[np.ndarray, np.ndarray, dict]:
        if epoch == 0:  # the probe itself, on the store's features
            return start_predictions, yv, {}
        train_embeddings = embed(top, scoring.eval_batches("train"))
        refitted = refit_probe(head, train_embeddings, y)
        predicted = np.asarray(refitted.predict(embed(top, scoring.eval_batches("val"))), dtype=np.int64)
        return predicted, yv, {"pairs": batches.n_train, "C": float(head.C),
                               "separation": pair_separation(train_embeddings, y)}

    def test_accuracy(result) -> float | None:
        if "test" not in run.records:
            return None
        if result.best_epoch == 0:  # the probe itself, on the store's features
            Xt, yt, _ = rows.store.load("test", dtype=np.float32)
            return float(np.mean(estimator.predict(Xt) == yt))
        # The kept epoch's probe, refitted on its embeddings; the lower layers have not changed: their states for
        # test are computed once, here.
        kept = refit_probe(head, embed(top, scoring.eval_batches("train")), y)
        test = CachedHidden(model, run.tokenizer, {"train": [], "test": run.records["test"]}, first, torch_device)
        return float(np.mean(kept.predict(embed(top, test.eval_batches("test"))) == test.labels["test"]))

    parts = Tuning(
        top, ProbeClassifier.of_probe(estimator, len(head.class_names)).state_dict(),
        adamw([{"params": trainable, "lr": config.lr}], config.weight_decay),
        weights_of=lambda: {k: v for k, v in model.encoder.state_dict().items() if _trainable_key(k, first)},
        restore=lambda best: model.encoder.load_state_dict(best, strict=False),
        written=lambda best: model.encoder.state_dict(),  # the encoder: what --weights loads
        test_accuracy=test_accuracy)
    total_steps = config.epochs * -(-batches.n_train // config.batch_size)
    options = TrainOptions(
        epochs=config.epochs, batch_size=config.batch_size, patience=None, device=torch_device,
        warmup_steps=max(1, round(config.warmup_fraction * total_steps)),
        on_epoch=lambda epoch: top.train(),  # dropout in the trainable layers; the frozen ones ran on cached states
        loss=pair_loss, evaluate=evaluate, progress=progress, desc="setfit", unit="pair")
    return tune(parts, batches, options, head, config, rows, Path(out), checkpoint_dir, keep_checkpoint,
                result_type=SetFitResult, cache_seconds=round(cache_seconds, 3), C=float(head.C),
                start_separation=pair_separation(X, y))


def _trainable_key(key: str, first: int) -> bool:
    """Whether an encoder state-dict key belongs to a layer at or above ``first`` (``encoder.layer.<i>.…``)."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["encoder", "layer"] and int(parts[2]) >= first
