"""One training loop for the trainable top of a network, fed from the trunk cache or from images.

- :class:`CachedActivations` reads the trunk cache (``trunk.py``): each epoch draws one cached view per
  train image; no image is decoded and no frozen layer runs.

- :class:`ImageBatches` decodes (and augments) images every epoch and runs the frozen lower part under
  ``no_grad``: the reference the trunk cache is measured against, and, with nothing frozen, the
  from-scratch baseline. Its DataLoaders are made once per run (persistent workers); each epoch's order
  and augmentation seeds travel with the indices, so they are the same as with a new loader per epoch.

Both visit the train images in the same seeded order each epoch, so without augmentation the two
sources give the same batches.

:func:`train` runs epochs with AdamW (:func:`adamw`: fused on CUDA) and a per-step cosine schedule, early
stopping on validation accuracy (or a fixed step budget), keeps the best epoch's weights, and checkpoints
after every epoch so that a killed run resumes and ends as an uninterrupted one would. On a GPU a step never
waits for the device: the step's loss and hits stay on the device and are read once per epoch, and
validation's predictions are copied to the host in one piece.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.sources import Record
from ..encode.images import load_image
from ..encode.preprocess import Preprocessing
from ..errors import BadValueError
from ..utils.atomic import atomic_path
from ..utils.console import progress_bar
from .augment import ViewRecipe, random_view
from .trunk import TrunkCache

log = logging.getLogger("featurestore")
EVAL_BATCH = 256


class TrainImages(Dataset):
    """Item i → (uint8 (3, S, S), label): the decoded image, or with ``recipe`` a random view drawn from a
    generator seeded by (``seed``, i), so every epoch's augmentation is reproducible on any worker. An item may
    also be asked for as (seed, i): the seed then comes with the index (:class:`EpochOrder`), so a loader whose
    workers outlive the epoch still draws each epoch's own views."""

    def __init__(self, records: list[Record], preprocessing: Preprocessing, recipe: ViewRecipe | None = None,
                 seed: int = 0):
        self.records, self.preprocessing, self.recipe, self.seed = records, preprocessing, recipe, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | tuple[int, int]):
        seed, index = index if isinstance(index, tuple) else (self.seed, index)
        record = self.records[index]
        image = load_image(record.path)
        if self.recipe is not None:
            image = random_view(image, self.preprocessing, self.recipe, np.random.default_rng([seed, index]))
        return self.preprocessing(image), record.label


class EpochOrder(Sampler):
    """The train order of the epoch last set (:meth:`set_epoch`, before each iteration): the permutation
    ``np.random.default_rng([seed, epoch]).permutation(n)``, as (augmentation seed ``seed × 1000 + epoch``,
    index) pairs for :class:`TrainImages`. Sampling runs in the main process, so one persistent loader
    serves every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        views = self.seed * 1000 + self.epoch
        return iter([(views, index) for index in order.tolist()])


class BatchSource(Protocol):
    """Batches for the trainable top: inputs float32 (B, …) on the device, labels int64 (B,)."""

    n_train: int

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class CachedActivations:
    """Batches from a :class:`TrunkCache`: ``rows`` of its train split (default all), one of the clean view and the
    first ``views`` augmented views drawn per image and epoch (seeded by ``seed`` and the epoch), with ``labels``
    (default the cache's); the evaluation splits are ``eval_rows[split]`` of theirs (default all). Every array
    lives on the training device from the first use on, in the stored dtype: a batch is an index, not a copy (the
    epoch's order goes to a GPU from pinned memory, without waiting). Batches: float32 (B, C, H, W), int64 (B,)."""

    def __init__(self, cache: TrunkCache, device: torch.device, rows: np.ndarray | None = None, views: int = 0,
                 seed: int = 0, labels: np.ndarray | None = None, eval_rows: dict[str, np.ndarray] | None = None):
        if views > cache.views:
            raise BadValueError(f"{cache.store.path} holds {cache.views} augmented views, {views} asked for")
        rows = np.arange(cache.train_views.shape[1]) if rows is None else np.asarray(rows)
        self.train = torch.from_numpy(np.ascontiguousarray(cache.train_views[: views + 1, rows])).to(device)
        labels = cache.train_labels[rows] if labels is None else np.asarray(labels, dtype=np.int64)
        self.labels = torch.from_numpy(labels).to(device)
        self.cache, self.device, self.seed, self.eval_rows = cache, device, seed, eval_rows or {}
        self.resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n_train = len(rows)

    def train_batches(self, epoch: int, batch_size: int):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_train)
        view = to_device(rng.integers(0, self.train.shape[0], self.n_train), self.device)
        order = to_device(order, self.device)
        for start in range(0, self.n_train, batch_size):
            picked = order[start:start + batch_size]
            yield self.train[view[picked], picked].float(), self.labels[picked]

    def eval_batches(self, split: str):
        if split not in self.resident:  # read once, then kept on the device for every epoch
            features, labels = self.cache.split(split, self.eval_rows.get(split))
            self.resident[split] = (torch.from_numpy(features).to(self.device),
                                    torch.from_numpy(labels).to(self.device))
        features, labels = self.resident[split]
        for start in range(0, len(labels), EVAL_BATCH):
            yield features[start:start + EVAL_BATCH].float(), labels[start:start + EVAL_BATCH]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``array`` (a CPU array or tensor, any shape and dtype) as a tensor on ``device``; to a GPU through pinned
    memory without waiting (a copy from pageable memory would synchronise with the device)."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator: without one, each iteration draws its worker seed from torch's global
    generator and shifts the dropout masks of training, so the same run would differ by its data source."""
    return torch.Generator().manual_seed(seed * 1000 + epoch)


class ImageBatches:
    """Batches decoded from images every epoch, passed through the frozen ``lower`` module (uint8 images →
    inputs of the top; e.g. normalisation + the trunk, reshaped to ``shape``) under ``no_grad``.

    One DataLoader per split for the whole run: with ``workers`` > 0 its worker processes persist from epoch
    to epoch instead of starting anew for each, and the epoch's order and augmentation seeds come from
    :class:`EpochOrder` (the same batches as a new loader per epoch over ``order`` would give)."""

    def __init__(self, train: list[Record], evaluation: dict[str, list[Record]], preprocessing: Preprocessing,
                 lower: nn.Module, device: torch.device, shape: tuple[int, ...] | None = None,
                 recipe: ViewRecipe | None = None, workers: int = 1, seed: int = 0):
        self.train, self.evaluation, self.preprocessing = train, evaluation, preprocessing
        self.lower, self.device, self.shape, self.recipe = lower.to(device).eval(), device, shape, recipe
        self.workers, self.seed = workers, seed
        self.n_train = len(train)
        self.order = EpochOrder(self.n_train, seed)
        self.loaders: dict[str, DataLoader] = {}

    def _loader(self, split: str, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        """The split's loader, made on first use (again only if the batch size changes)."""
        loader = self.loaders.get(split)
        if loader is None or loader.batch_size != batch_size:
            loader = self.loaders[split] = DataLoader(
                dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                persistent_workers=self.workers > 0, pin_memory=self.device.type == "cuda",
                generator=_loader_generator(self.seed, 0))
        return loader

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.lower(images.to(self.device, non_blocking=True))
        return x.view(len(x), *self.shape) if self.shape else x

    def train_batches(self, epoch: int, batch_size: int):
        loader = self._loader("train", TrainImages(self.train, self.preprocessing, self.recipe), batch_size,
                              self.order)
        self.order.set_epoch(epoch)  # before iter(): a persistent loader draws its first indices at once
        for images, labels in loader:
            yield self._inputs(images), labels.to(self.device, non_blocking=True)

    def eval_batches(self, split: str):
        loader = self._loader(split, TrainImages(self.evaluation[split], self.preprocessing), EVAL_BATCH)
        for images, labels in loader:
            yield self._inputs(images), labels.to(self.device, non_blocking=True)


def predict(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, true labels), both (N,) int64, in eval mode. The batches' answers stay on the device
    until the end and come back in one copy (one wait for a GPU, not one per batch)."""
    model.eval()
    predicted, truth = [], []
    with torch.inference_mode():
        for x, y in batches:
            predicted.append(model(x).argmax(1))
            truth.append(y)
        if not predicted:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        answers = torch.cat(predicted)
        both = torch.stack([answers, torch.cat(truth).to(answers.device, torch.int64)]).cpu().numpy()
    return both[0], both[1]


def accuracy(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of the batches' examples whose top logit is their label (0.0 for no examples)."""
    predicted, truth = predict(model, batches)
    return float(np.mean(predicted == truth)) if len(truth) else 0.0


def adamw(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over parameter ``groups`` (``[{"params": [...], "lr": ...}, ...]``). When every parameter is on CUDA,
    the fused implementation: one kernel for all tensors, and with a GradScaler it unscales and skips inf/NaN
    steps on the device (the plain one reads the inf check back with ``.item()`` every step). Elsewhere torch's
    default implementation, unchanged (so CPU runs keep their numbers)."""
    parameters = [p for group in groups for p in group["params"]]
    if parameters and all(p.device.type == "cuda" for p in parameters):
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def host_copy(tree, device: torch.device):
    """``tree`` (nested dicts, lists and tuples; tensors and plain values) with every tensor copied to the CPU.
    From a GPU every copy is queued without waiting and the stream is synchronised once, not once per tensor."""
    def copy(node):
        if isinstance(node, torch.Tensor):
            node = node.detach()
            return node.to("cpu", non_blocking=True) if node.device.type == "cuda" else node.clone()
        if isinstance(node, dict):
            return {key: copy(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(copy(value) for value in node)
        return node

    copied = copy(tree)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return copied


@dataclass
class TrainResult:
    """How a run went. ``history``: one entry per epoch (train loss and accuracy on its own batches, val
    accuracy, steps so far). ``*_predictions``: val predictions of the starting and the best weights."""

    best_val_accuracy: float
    start_val_accuracy: float
    epochs_run: int
    steps: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0
    val_labels: list[int] = field(default_factory=list)
    start_val_predictions: list[int] = field(default_factory=list)
    best_val_predictions: list[int] = field(default_factory=list)
    epoch_val_predictions: list[list[int]] = field(default_factory=list)  # every round's, in order
    best_epoch: int = 0  # 0: the starting weights
    # Rounds that diverged and were run again at a lower rate: {"epoch", "train_loss", "val_accuracy", "lr_scale"
    # (the rate's scale it ran at), "why"}.
    diverged_rounds: list[dict] = field(default_factory=list)


def checkpoint_folder(out: Path, checkpoint_dir: str | Path | None) -> Path:
    """Where a run writing ``out`` keeps its resumable checkpoint (default ``<out>.checkpoints``), created."""
    folder = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.stem + ".checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_atomic(path: Path, payload) -> None:
    """``torch.save`` under a unique temporary name, renamed into place."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _rounds(source: BatchSource, batch_size: int, round_steps: int | None):
    """Round r's batches: epoch r of the source, or (``round_steps``) the next ``round_steps`` batches of the
    source's epochs one after the other (a stream that cannot be resumed mid-way)."""
    if round_steps is None:
        return lambda r: source.train_batches(r, batch_size)
    stream = itertools.chain.from_iterable(source.train_batches(e, batch_size) for e in itertools.count(1))
    return lambda r: itertools.islice(stream, round_steps)


def classification_loss(top: nn.Module, x, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default loss of a step: cross-entropy of ``top(x)`` (logits (B, K)) against labels ``y`` (B,) int64, and
    the batch's hits (an int64 () tensor on the device)."""
    logits = top(x)
    return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).sum()


def _no_setup(epoch: int) -> None:
    pass


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train` runs, resolved once.

    A round is an epoch, or with ``round_steps`` that many steps (validation then runs every ``round_steps``
    steps, whatever the epoch length: used by step budgets on small label budgets; not resumable).
    ``on_epoch(round)`` runs before each round (it sets train mode, which layers train and which BatchNorms
    stay frozen). Training stops after ``patience`` rounds without a gain over the best trained round (None:
    never); ``max_steps`` ends the run after that many optimiser steps. The learning rate rises linearly over
    ``warmup_steps`` (Adam's first steps move every weight by about the full rate, which otherwise knocks a good
    starting classifier off), then follows a cosine to zero. ``checkpoint``: the file written after every round;
    one whose ``run_key`` differs is ignored (another run wrote it).

    ``loss(top, x, y)`` → (loss, hits or None) is a step's objective (default: cross-entropy of the logits
    ``top(x)``; a hit count gives the history's ``train_accuracy``). ``evaluate(round)`` → (val predictions (M,)
    int64, val labels (M,) int64, extra fields for the round's history) scores the starting point (round 0) and
    every round; default: the top's argmax on the source's val batches. ``desc`` and ``unit`` label the progress
    bar (``unit``: what one training example is: img, text, pair).

    ``max_grad_norm`` clips each step's gradients (all trainable parameters together) to that norm. With
    ``backoffs`` > 0 a round that diverged (:func:`diverged`: its loss not finite, or risen to ``DIVERGED_RISE`` ×
    the lowest before it while validation did not improve, or its validation accuracy collapsed) is undone
    (weights, optimiser, schedule) and run again at ``BACKOFF_FACTOR`` × the learning rate, at most ``backoffs``
    times in a run; after that the run stops, keeping the best round so far. The result lists the rounds undone.
    """

    epochs: int
    batch_size: int
    patience: int | None
    device: torch.device
    run_key: str = ""
    checkpoint: Path | None = None
    max_steps: int | None = None
    round_steps: int | None = None
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    backoffs: int = 0
    on_epoch: Callable[[int], None] = _no_setup
    loss: Callable[[nn.Module, object, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] = \
        classification_loss
    evaluate: Callable[[int], tuple[np.ndarray, np.ndarray, dict]] | None = None
    progress: bool = True
    desc: str = "train"
    unit: str = "img"

    def __post_init__(self) -> None:
        if self.round_steps is not None and self.checkpoint is not None:
            raise BadValueError("runs in rounds of steps cannot resume from a checkpoint")


def train(top: nn.Module, weights_of: Callable[[], dict], optimizer: torch.optim.Optimizer, source: BatchSource,
          options: TrainOptions | None = None, **settings) -> tuple[TrainResult, dict]:
    """Train ``top`` (whose trainable parameters ``optimizer`` holds) on ``source`` as ``options`` say (or the
    :class:`TrainOptions` fields given as keywords); return the result and the best round's weights
    (``weights_of()``; the starting weights when no round beats them). The weights kept are the best of the
    starting point and every round on validation (a tie keeps the earlier).
    """
    if options is None:
        options = TrainOptions(**settings)
    elif settings:
        raise BadValueError(f"train() takes its options or keywords, not both ({', '.join(settings)})")
    o = options
    evaluate = o.evaluate or (lambda epoch: (*predict(top, source.eval_batches("val")), {}))
    started = time.perf_counter()
    steps_per_epoch = o.round_steps or math.ceil(source.n_train / o.batch_size)
    total_steps = min(o.epochs * steps_per_epoch, o.max_steps or o.epochs * steps_per_epoch)
    state = {"epoch": 0, "steps": 0, "best": -1.0, "best_trained": -1.0, "bad_epochs": 0, "history": [],
             "best_state": None, "epoch_predictions": [], "best_epoch": 0, "lr_scale": 1.0, "diverged": []}
    schedule = warmup_cosine(o.warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) * state["lr_scale"])
    device, amp = o.device, o.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def save_checkpoint() -> None:
        if o.checkpoint is not None:
            payload = {"run": o.run_key, **_run_state(top, optimizer, scheduler, scaler), **rng_states(device),
                       "state": state}
            # From a GPU: one wait for every tensor's copy instead of torch.save's one per tensor.
            save_atomic(o.checkpoint, host_copy(payload, device) if device.type == "cuda" else payload)

    resumed_from = _resume(o.checkpoint, o.run_key, top, optimizer, scheduler, scaler, state)
    if state["epoch"] == 0:
        predicted, truth, _ = evaluate(0)
        state.update(start_val_accuracy=float(np.mean(predicted == truth)), best=float(np.mean(predicted == truth)),
                     val_labels=truth.tolist(), start_predictions=predicted.tolist(),
                     best_predictions=predicted.tolist(), best_state=host_copy(weights_of(), device))
    # A run killed after the epoch at which it stopped early does not train on when resumed.
    stopped_early = bool(state.get("stopped")) or (o.patience is not None and state["bad_epochs"] >= o.patience)
    batches_of = _rounds(source, o.batch_size, o.round_steps)
    while not stopped_early and state["epoch"] < o.epochs and state["steps"] < total_steps:
        epoch = state["epoch"] + 1
        o.on_epoch(epoch)
        # What undoing this round restores (copied: the live objects move on): weights, optimiser, schedule, steps.
        round_start = ({**host_copy(_run_state(top, optimizer, scheduler, scaler), device), "steps": state["steps"]}
                       if o.backoffs else None)
        # The step's loss and hits stay on the device, read once after the round: a step never waits for the GPU.
        losses: list[torch.Tensor] = []  # one float32 () per step
        correct, seen, counted = torch.zeros((), dtype=torch.int64, device=device), 0, False
        epoch_started = time.perf_counter()
        size = o.round_steps * o.batch_size if o.round_steps else source.n_train
        with progress_bar(size, f"{o.desc} {'round' if o.round_steps else 'epoch'} {epoch}/{o.epochs}",
                          unit=o.unit, enabled=o.progress) as bar:
            for x, y in batches_of(epoch):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    loss, hits = o.loss(top, x, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if o.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, o.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                losses.append(loss.detach())
                if hits is not None:
                    correct += hits
                    counted = True
                seen += len(y)
                state["steps"] += 1
                bar.update(len(y))
                if state["steps"] >= total_steps:
                    break
        train_loss, hits = _read_round(losses, correct)
        predicted, truth, extra = evaluate(epoch)
        val_accuracy = float(np.mean(predicted == truth))
        why = diverged(train_loss, val_accuracy, state) if round_start is not None else None
        if why is not None:
            state["diverged"].append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_accuracy,
                                      "lr_scale": state["lr_scale"], "why": why})
            _load_run_state(round_start, top, optimizer, scheduler, scaler)
            state["steps"] = round_start["steps"]
            if len(state["diverged"]) > o.backoffs:
                log.warning("%s epoch %d diverged (%s) after %d back-offs: stopping with the best epoch so far",
                            o.desc, epoch, why, o.backoffs)
                stopped_early = state["stopped"] = True
                break
            state["lr_scale"] *= BACKOFF_FACTOR
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * schedule(scheduler.last_epoch) * state["lr_scale"]
            log.warning("%s epoch %d diverged (%s): undone, run again at %.3g × the learning rate", o.desc, epoch,
                        why, state["lr_scale"])
            save_checkpoint()
            continue
        accuracy_field = {"train_accuracy": hits / max(seen, 1)} if counted else {}
        rate_field = {"lr_scale": state["lr_scale"]} if state["lr_scale"] != 1.0 else {}
        state["history"].append({"epoch": epoch, "steps": state["steps"], "train_loss": train_loss, **accuracy_field,
                                 "val_accuracy": val_accuracy, **extra, **rate_field,
                                 "seconds": round(time.perf_counter() - epoch_started, 3)})
        # Patience asks whether training still improves, so it is counted against the best trained round, not
        # the starting point: fine-tuning often dips below the probe for a few epochs before it climbs past it.
        if val_accuracy > state["best_trained"]:
            state.update(best_trained=val_accuracy, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch_predictions"].append(predicted.tolist())
        if val_accuracy > state["best"]:  # what is kept: the best of the start and every round
            state.update(best=val_accuracy, best_predictions=predicted.tolist(), best_epoch=epoch,
                         best_state=host_copy(weights_of(), device))
        state["epoch"] = epoch
        # Decided before the checkpoint is written, so that a run killed after this epoch stops here too.
        stopped_early = state["stopped"] = o.patience is not None and state["bad_epochs"] >= o.patience
        save_checkpoint()
        log.info("%s epoch %d: train loss %.4f, val accuracy %.4f", o.desc, epoch, train_loss, val_accuracy)
    result = TrainResult(
        best_val_accuracy=state["best"], start_val_accuracy=state["start_val_accuracy"], epochs_run=state["epoch"],
        steps=state["steps"], stopped_early=stopped_early, history=state["history"],
        seconds=round(time.perf_counter() - started, 2), resumed_from_epoch=resumed_from,
        val_labels=state["val_labels"], start_val_predictions=state["start_predictions"],
        best_val_predictions=state["best_predictions"], epoch_val_predictions=state["epoch_predictions"],
        best_epoch=state["best_epoch"], diverged_rounds=list(state["diverged"]),
    )
    return result, state["best_state"]


# A round whose train loss rose to this many times the lowest round's before it, while its validation accuracy did
# not improve, diverged: with a decaying rate a healthy run's loss does not climb by half.
DIVERGED_RISE = 1.5
# A round whose validation accuracy fell below this share of the start's collapsed: a dip of a few points before a
# climb is common when fine-tuning, a fall by half is not.
COLLAPSED_SHARE = 0.5
# Each back-off multiplies the learning rate by this.
BACKOFF_FACTOR = 0.5


def diverged(train_loss: float, val_accuracy: float, state: dict) -> str | None:
    """Why a round with ``train_loss`` and ``val_accuracy`` diverged, given the run's ``state`` (its history of
    earlier rounds, the start's and their best validation accuracy); None when it did not. The loss is compared
    with earlier rounds' only: the starting probe's loss, without dropout and on the rows it was fitted on, is not
    a round's."""
    if not math.isfinite(train_loss):
        return "its train loss is not finite"
    start = state["start_val_accuracy"]
    if val_accuracy < COLLAPSED_SHARE * start:
        return f"its validation accuracy {val_accuracy:.3g} fell below {COLLAPSED_SHARE} × the start's ({start:.3g})"
    lowest = min((entry["train_loss"] for entry in state["history"]), default=math.inf)
    if train_loss > DIVERGED_RISE * lowest and val_accuracy <= state["best_trained"]:
        return (f"its train loss {train_loss:.3g} rose above {DIVERGED_RISE} × the lowest before it ({lowest:.3g}) "
                f"and validation did not improve")
    return None


def _run_state(top: nn.Module, optimizer, scheduler, scaler) -> dict:
    """The state a run continues from (live references, not copies): the top's weights, the optimiser's, the
    schedule's and the GradScaler's state. A checkpoint holds it; undoing a round restores a copy of it."""
    return {"model": top.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "grad_scaler": scaler.state_dict()}


def _load_run_state(saved: dict, top: nn.Module, optimizer, scheduler, scaler) -> None:
    """The reverse of :func:`_run_state`."""
    top.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["grad_scaler"])


def _read_round(losses: list[torch.Tensor], correct: torch.Tensor) -> tuple[float, int]:
    """(mean loss, hits) of a round from its per-step losses (float32 () tensors on the device) and its hit count
    (int64 () tensor): one copy to the host. The mean is numpy's float64 mean of the float32 values, as when
    each step's loss was read on its own."""
    if not losses:
        return float("nan"), int(correct)
    values = torch.cat([torch.stack(losses).double(), correct.double().view(1)]).cpu().numpy()
    return float(np.mean(values[:-1])), int(values[-1])


def rng_states(device: torch.device) -> dict:
    """The random generators a resumed run must continue from: torch's CPU generator, and on CUDA every GPU's
    (``torch_rng``, ``cuda_rng``)."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def _resume(checkpoint: Path | None, run_key: str, top: nn.Module, optimizer, scheduler, scaler, state: dict) -> int:
    """Load ``checkpoint`` into the run if it belongs to it; return the epoch it resumes after (0: none)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("%s: unreadable checkpoint ignored, starting over (%s)", checkpoint, exc)
        return 0
    if saved.get("run") != run_key:
        log.warning("%s belongs to another run (config, head, probe, data or precision differ); starting over",
                    checkpoint)
        return 0
    _load_run_state(saved, top, optimizer, scheduler, scaler)
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():  # dropout masks on the GPU come from these
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    state.update(saved["state"])
    log.info("resuming after epoch %d (%s)", state["epoch"], checkpoint)
    return state["epoch"]
