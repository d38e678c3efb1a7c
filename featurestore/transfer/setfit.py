"""SetFit for a sentence encoder (Tunstall et al. 2022): its top transformer layers tuned contrastively on pairs of
the few labelled texts, then the logistic-regression probe refitted on the tuned embeddings.

It starts where the text fine-tune starts (``text_finetune.text_run``): the probe's train rows of the head's
store, every val and test row, the encoder with the head's weights.

1. Pairs (:func:`build_pairs`): each of ``iterations`` rounds gives every train text that has a classmate one
   partner of its class (target 1) and one of another class (target 0), so positive and negative pairs are as
   many; ``max_pairs`` caps an epoch's. Each epoch draws its own pairs from (seed, epoch).
2. The top ``unfreeze_blocks`` layers train on them with the cosine-similarity loss, the mean of
   ``(cos(u, v) - target)²`` over a step's pairs (AdamW, warmup then cosine decay, dropout on). The layers below
   run once per text, at ``max_length`` tokens (``text_finetune.CachedHidden``); a step runs the top layers once
   per distinct text of its pairs.
3. After every epoch the train and val texts are embedded by the tuned encoder as the store embeds them (its
   tokenization), and the probe is refitted on the train embeddings at each C of the head's own sweep, C chosen
   on val (as the probe was made). Epoch 0 is the probe itself (the store's features). The best epoch on val is
   kept, its encoder and its refitted probe; a tie keeps the earlier. The decision tests every epoch against the
   probe as it does a fine-tune's (``decision.choose``).

The encoder's state dict is written to ``out``, as a fine-tune's: ``extract --weights`` takes it, and the decision
registers it as ``<backbone>_ft``, whose heads are SetFit's refitted probe. Runs are minutes long on a CPU: there
is no checkpoint to resume from.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import SETFIT_DEFAULTS, SetFitConfig, Tokenization
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator, choose_c, sweep_c
from ..heads.head import TrainedHead
from ..utils.console import progress_bar
from ..utils.devices import resolve_device
from .probe import FinetuneResult, train_only_probe
from .text_finetune import CachedHidden, TextTop, text_run
from .training import adamw, host_copy, save_atomic, warmup_cosine

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


def pair_loss(top: nn.Module, cache: CachedHidden, pairs: np.ndarray, targets: torch.Tensor) -> torch.Tensor:
    """The cosine-similarity loss of a step: ``pairs`` (P, 2) int rows of the cache's train split, ``targets`` (P,)
    float32 on the device → mean of (cos(u, v) − target)², a float32 () tensor. Each distinct text runs once."""
    distinct, inverse = np.unique(pairs, return_inverse=True)
    inputs, _ = cache.batch("train", distinct)
    embeddings = nn.functional.normalize(top(inputs), dim=-1)  # (U, H)
    index = torch.from_numpy(inverse.reshape(pairs.shape)).to(embeddings.device)
    cosine = (embeddings[index[:, 0]] * embeddings[index[:, 1]]).sum(-1)
    return nn.functional.mse_loss(cosine, targets)


def embed(top: nn.Module, batches) -> np.ndarray:
    """Document embeddings in eval mode: ``batches`` of (inputs, labels) → (N, H) float32, in batch order."""
    top.eval()
    with torch.inference_mode():
        parts = [top(inputs).float() for inputs, _ in batches]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros((0, 0), dtype=np.float32)


def refit_probe(head: TrainedHead, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray):
    """The head's estimator refitted on train embeddings X (N, D) float32, labels y (N,) int, with C chosen on
    (Xv, yv) by the head's own sweep: (fitted estimator, C, val predictions (M,) int64)."""
    from sklearn.exceptions import ConvergenceWarning

    config = replace(head.config, n_jobs=1)  # a few hundred rows: in-process
    C = choose_c(sweep_c(config, X, y, Xv, yv))
    estimator = build_estimator(config, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X, y)
    return estimator, C, np.asarray(estimator.predict(Xv), dtype=np.int64)


@dataclass
class SetFitResult(FinetuneResult):
    """A fine-tune's result, plus the C of the kept epoch's refitted probe (the head's C for epoch 0) and the pair
    separation (:func:`pair_separation`) of the train texts' embeddings before tuning; every epoch's is in
    ``history``."""

    C: float = 0.0
    start_separation: float = 0.0


def setfit_text(head: TrainedHead, data: str | Path, out: str | Path, config: SetFitConfig = SETFIT_DEFAULTS,
                device: str = "auto", progress: bool = True, train_per_class: int | None = None, probe=None,
                subset_seed: int | None = None) -> SetFitResult:
    """SetFit on the head's train rows of ``data`` (module docstring); write the kept epoch's encoder state dict to
    ``out`` (a checkpoint for ``--weights``) and return how it went.

    ``train_per_class`` (drawn by ``subset_seed``, default ``config.seed``) and ``probe`` (the probe fitted on those
    rows; default the head refitted on them) are how the curve runs it at a budget.
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
    start_accuracy = float(np.mean(start_predictions == yv))
    start_separation = pair_separation(X, y)

    model.requires_grad_(False)
    layers = model.encoder.encoder.layer
    for layer in layers[first:]:
        layer.requires_grad_(True)
    top = TextTop(model, first, nn.Identity()).to(torch_device)
    trainable = [p for layer in layers[first:] for p in layer.parameters()]
    optimizer = adamw([{"params": trainable, "lr": config.lr}], config.weight_decay)
    epoch_pairs = [build_pairs(y, config.iterations, [config.seed, epoch], config.max_pairs)
                   for epoch in range(1, config.epochs + 1)]
    total_steps = sum(-(-len(pairs) // config.batch_size) for pairs, _ in epoch_pairs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, round(config.warmup_fraction * total_steps)), total_steps))
    torch.manual_seed(config.seed)

    def layer_state() -> dict:
        return host_copy({k: v for k, v in top.model.encoder.state_dict().items() if _trainable_key(k, first)},
                         torch_device)

    best = {"accuracy": start_accuracy, "epoch": 0, "estimator": estimator, "C": float(head.C),
            "predictions": start_predictions, "state": layer_state()}
    history, epoch_predictions, steps = [], [], 0
    for epoch, (pairs, targets) in enumerate(epoch_pairs, start=1):
        epoch_started = time.perf_counter()
        top.train()  # dropout in the trainable layers; the frozen ones only ran on cached states
        targets = torch.from_numpy(targets).to(torch_device)
        losses = []
        with progress_bar(len(pairs), f"setfit epoch {epoch}/{config.epochs}", unit="pair",
                          enabled=progress) as bar:
            for start in range(0, len(pairs), config.batch_size):
                loss = pair_loss(top, tuning, pairs[start:start + config.batch_size],
                                 targets[start:start + config.batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.detach())
                steps += 1
                bar.update(len(pairs[start:start + config.batch_size]))
        train_embeddings = embed(top, scoring.eval_batches("train"))
        val_embeddings = embed(top, scoring.eval_batches("val"))
        refitted, C, predicted = refit_probe(head, train_embeddings, y, val_embeddings, yv)
        accuracy = float(np.mean(predicted == yv))
        history.append({"epoch": epoch, "steps": steps, "pairs": int(len(pairs)),
                        "train_loss": float(torch.stack(losses).mean()), "val_accuracy": accuracy, "C": C,
                        "separation": pair_separation(train_embeddings, y),
                        "seconds": round(time.perf_counter() - epoch_started, 3)})
        epoch_predictions.append(predicted.tolist())
        log.info("setfit epoch %d: pair loss %.4f, train separation %.4f, val accuracy %.4f (C %.3g)", epoch,
                 history[-1]["train_loss"], history[-1]["separation"], accuracy, C)
        if accuracy > best["accuracy"]:
            best = {"accuracy": accuracy, "epoch": epoch, "estimator": refitted, "C": C, "predictions": predicted,
                    "state": layer_state()}
    model.encoder.load_state_dict(best["state"], strict=False)
    test_accuracy = None
    if "test" in run.records:
        if best["epoch"] == 0:  # the probe itself, on the store's features
            Xt, yt, _ = rows.store.load("test", dtype=np.float32)
            test_accuracy = float(np.mean(best["estimator"].predict(Xt) == yt))
        else:  # the lower layers have not changed: their states for test are computed once, here
            test = CachedHidden(model, run.tokenizer, {"train": [], "test": run.records["test"]}, first, torch_device)
            test_embeddings = embed(top, test.eval_batches("test"))
            test_accuracy = float(np.mean(best["estimator"].predict(test_embeddings) == test.labels["test"]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(out, model.encoder.state_dict())  # the encoder: what --weights loads
    return SetFitResult(
        best_val_accuracy=best["accuracy"], start_val_accuracy=start_accuracy, epochs_run=len(history), steps=steps,
        stopped_early=False, history=history, seconds=round(time.perf_counter() - started - cache_seconds, 2),
        val_labels=yv.tolist(), start_val_predictions=start_predictions.tolist(),
        best_val_predictions=np.asarray(best["predictions"]).tolist(), epoch_val_predictions=epoch_predictions,
        best_epoch=best["epoch"], out=str(out), cache_seconds=round(cache_seconds, 3), test_accuracy=test_accuracy,
        config=asdict(config), train_ids=[str(cid) for cid in rows.train.ids], C=best["C"],
        start_separation=start_separation)


def _trainable_key(key: str, first: int) -> bool:
    """Whether an encoder state-dict key belongs to a layer at or above ``first`` (``encoder.layer.<i>.…``)."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["encoder", "layer"] and int(parts[2]) >= first
