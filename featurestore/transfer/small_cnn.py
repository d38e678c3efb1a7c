"""A small convolutional network trained from scratch at the data's own resolution: the from-scratch line a
practitioner would draw on a CPU (a few conv blocks at 28 px for Fashion-MNIST), beside the ``scratch`` line (the
backbone's own architecture from random weights, a GPU job at every budget).

The images are decoded once into memory (grayscale, ``image_size`` square, float32 in [0, 1], as the pixel baseline
reads them) and standardised inside the network by the train subset's mean and standard deviation. For each
learning rate of ``SmallCNNConfig.lrs`` the network trains from the same random weights for ``rounds`` rounds of
whole epochs (at least ``round_images`` images a round, so a round is about the same number of steps at every
label budget), with AdamW, a warmup over the first 5% of the steps and a cosine to zero (random shifts and flips
with ``augment``: on Fashion-MNIST's validation split they did not pay); after each round the validation loss and
accuracy are recorded. Each run keeps its best validation round (highest accuracy, then lowest loss; or its last,
``keep_round``); the learning rate whose kept round is best by the same rule is the one scored on test. Whether each
run converged is judged as for the ``scratch`` line (:func:`.baselines.convergence`). The network itself
(:class:`~featurestore.heads.cnn.SmallCNN`) and the deployable model it becomes (:func:`fit_small_cnn_model`, each
rate's last round kept) live in ``heads.cnn``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ..configs import SMALL_CNN_DEFAULTS, SmallCNNConfig
from ..data.sources import Record, Source, ids_digest, record_content_id, scan_source
from ..errors import FeaturestoreError, ImageDecodeError
from ..heads.cnn import SmallCNN, SmallCNNModel
from ..utils.console import progress_bar
from ..utils.devices import resolve_device
from .baselines import _records, convergence, pixel_features
from .training import adamw, host_copy, warmup_cosine

EVAL_BATCH = 500


def augment(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``pixels`` (B, 1, S, S) float32 in [0, 1] moved by up to ``shift`` pixels along each axis (the
    uncovered border 0, the background of Fashion-MNIST's images) and flipped left-right with probability 1/2; the
    same shape. Draws from ``generator`` only (a CPU generator: the run's augmentation is seeded)."""
    size = pixels.shape[-1]
    offsets = torch.randint(0, 2 * shift + 1, (len(pixels), 2), generator=generator).tolist()
    padded = functional.pad(pixels, (shift,) * 4)
    moved = torch.stack([padded[i, :, top:top + size, left:left + size] for i, (top, left) in enumerate(offsets)])
    flip = (torch.rand(len(pixels), generator=generator) < 0.5).to(pixels.device)
    return torch.where(flip.view(-1, 1, 1, 1), moved.flip(-1), moved)


def evaluate(network: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``network`` in eval mode on ``pixels`` (N, 1, S, S) float32 and
    ``labels`` (N,) int64, both on the network's device."""
    network.eval()
    loss, hits = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(labels), EVAL_BATCH):
            logits = network(pixels[start:start + EVAL_BATCH])
            target = labels[start:start + EVAL_BATCH]
            loss += float(functional.cross_entropy(logits, target, reduction="sum"))
            hits += int((logits.argmax(1) == target).sum())
    return loss / max(len(labels), 1), hits / max(len(labels), 1)


@dataclass
class SmallCNNRun:
    """One learning rate's run: its kept (best validation) round and every round's figures. ``history``: per round
    ``round``, ``epochs`` and ``steps`` so far, ``train_loss`` and ``train_accuracy`` (on the round's augmented
    batches, in train mode), ``val_loss``, ``val_accuracy``, ``seconds``."""

    lr: float
    best_val_accuracy: float
    best_val_loss: float
    best_round: int
    best_epoch: int
    rounds_run: int
    epochs_run: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    converged: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The run without its history: the figures the rate was chosen by."""
        return {key: value for key, value in asdict(self).items() if key != "history"}


def better(candidate: tuple[float, float], incumbent: tuple[float, float] | None) -> bool:
    """Whether (val accuracy, val loss) ``candidate`` beats ``incumbent`` (None: nothing yet): higher accuracy,
    or the same accuracy at a lower loss."""
    return incumbent is None or (candidate[0], -candidate[1]) > (incumbent[0], -incumbent[1])


def choose_rate(runs: list[SmallCNNRun]) -> int:
    """Index of the run whose kept round is best on validation (highest accuracy, then lowest loss; the first
    such run on a tie of both)."""
    best = 0
    for index, run in enumerate(runs[1:], start=1):
        if better((run.best_val_accuracy, run.best_val_loss), (runs[best].best_val_accuracy, runs[best].best_val_loss)):
            best = index
    return best


@contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch CPU threads (0: leave torch's setting), then restore the previous count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_small_cnn(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], classes: int,
                  lr: float, config: SmallCNNConfig = SMALL_CNN_DEFAULTS, device: torch.device | None = None,
                  progress: bool = False) -> tuple[SmallCNN, SmallCNNRun]:
    """Train a :class:`SmallCNN` from random weights (seeded by ``config.seed``) at learning rate ``lr`` on
    ``train`` (pixels (N, 1, S, S) float32 in [0, 1], labels (N,) int64), validating on ``val`` after every round;
    return the network holding its best round's weights, and the run. ``config.threads`` torch threads train it."""
    with torch_threads(config.threads):
        return _fit(train, val, classes, lr, config, device or torch.device("cpu"), progress)


def _fit(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], classes: int, lr: float,
         config: SmallCNNConfig, device: torch.device, progress: bool) -> tuple[SmallCNN, SmallCNNRun]:
    """:func:`fit_small_cnn`, with the threads set."""
    pixels, labels = train
    val_pixels, val_labels = val[0].to(device), val[1].to(device)
    n = len(labels)
    epochs_per_round = max(1, math.ceil(config.round_images / n))
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.rounds * epochs_per_round * steps_per_epoch
    torch.manual_seed(config.seed)  # the starting weights and the dropout masks
    generator = torch.Generator().manual_seed(config.seed)  # batch order and augmentation
    network = SmallCNN(classes, config.widths, config.convs, config.hidden, config.dropout, config.image_size,
                       float(pixels.mean()), float(pixels.std()) or 1.0)
    network.to(device)
    optimizer = adamw([{"params": list(network.parameters()), "lr": lr}], config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, total_steps // 20), total_steps))
    started = time.perf_counter()
    history: list[dict] = []
    best: tuple[float, float] | None = None
    best_state, best_round, steps = None, 0, 0
    with progress_bar(config.rounds, f"small_cnn lr {lr:g}", unit="round", enabled=progress) as bar:
        for round_ in range(1, config.rounds + 1):
            round_started = time.perf_counter()
            network.train()
            losses, hits, seen = [], 0, 0
            for _ in range(epochs_per_round):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, config.batch_size):
                    picked = order[start:start + config.batch_size]
                    batch = pixels[picked]
                    if config.augment:
                        batch = augment(batch, config.shift, generator)
                    target = labels[picked].to(device)
                    logits = network(batch.to(device))
                    loss = functional.cross_entropy(logits, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    steps += 1
                    losses.append(float(loss.detach()) * len(picked))
                    hits += int((logits.argmax(1) == target).sum())
                    seen += len(picked)
            val_loss, val_accuracy = evaluate(network, val_pixels, val_labels)
            history.append({"round": round_, "epochs": round_ * epochs_per_round, "steps": steps,
                            "train_loss": round(sum(losses) / seen, 5), "train_accuracy": round(hits / seen, 5),
                            "val_loss": round(val_loss, 5), "val_accuracy": val_accuracy,
                            "seconds": round(time.perf_counter() - round_started, 3)})
            last = round_ == config.rounds
            if better((val_accuracy, val_loss), best) if config.keep_round == "best" else last:
                best, best_round = (val_accuracy, val_loss), round_
                best_state = host_copy(network.state_dict(), device)
            bar.update(1)
    network.load_state_dict(best_state)
    run = SmallCNNRun(lr=lr, best_val_accuracy=best[0], best_val_loss=round(best[1], 5), best_round=best_round,
                      best_epoch=best_round * epochs_per_round, rounds_run=len(history),
                      epochs_run=len(history) * epochs_per_round, steps=steps,
                      seconds=round(time.perf_counter() - started, 2), history=history,
                      converged=convergence(history))
    return network, run


@dataclass
class SmallCNNResult:
    """The chosen run (``lr``, its kept round's validation accuracy, its test accuracy), every rate's run
    (``runs``, in the order of the grid), the seconds of the whole search (decoding included), and the
    :func:`ids_digest` of the train images it trained on."""

    test_accuracy: float | None
    val_accuracy: float
    lr: float
    seconds: float
    runs: list[SmallCNNRun]
    train_ids: str
    config: dict = field(default_factory=dict)

    @property
    def chosen(self) -> SmallCNNRun:
        return next(run for run in self.runs if run.lr == self.lr)


def grey_pixels(records: list[Record], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' images as pixels (N, 1, size, size) float32 in [0, 1] and labels (N,) int64; a text or an item
    that is not an image is refused in one line (the small CNN trains on images)."""
    texts = [r for r in records if r.text is not None or r.path.suffix.lower() == ".txt"]
    if texts:
        raise FeaturestoreError(f"{texts[0].path}: small_cnn trains on images, and this data holds texts (their "
                                f"from-scratch line is scratch)")
    try:
        flat = pixel_features(records, size)
    except ImageDecodeError as exc:
        raise FeaturestoreError(f"small_cnn trains on images: {exc}") from None
    return (torch.from_numpy(flat).view(-1, 1, size, size),
            torch.from_numpy(np.array([r.label for r in records], dtype=np.int64)))


def search_rate(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], classes: int,
                config: SmallCNNConfig, device: torch.device, progress: bool = False) -> tuple[SmallCNN, list]:
    """A run per learning rate of ``config.lrs`` (:func:`fit_small_cnn`); the network of the rate best on val
    (:func:`choose_rate`, at its kept round) and every run."""
    runs, kept = [], None
    for lr in config.lrs:
        network, run = fit_small_cnn(train, val, classes, lr, config, device, progress)
        runs.append(run)
        if choose_rate(runs) == len(runs) - 1:
            kept = network
    return kept, runs


def train_small_cnn(data: str | Path | Source, config: SmallCNNConfig = SMALL_CNN_DEFAULTS, device: str = "auto",
                    train_per_class: int | None = None, progress: bool = False,
                    chosen: dict[str, list[Record]] | None = None) -> SmallCNNResult:
    """The small CNN's curve point: a run per learning rate of ``config.lrs`` on ``data``'s train split (or a
    nested subset of ``train_per_class`` per class, or ``chosen``'s records: the curve's rows by content id), the
    rate and round best on validation kept and scored on test."""
    started = time.perf_counter()
    source = data if isinstance(data, Source) else scan_source(data)
    train_records, evaluation = _records(source, train_per_class, config.seed, chosen)
    torch_device = resolve_device(device)
    train = grey_pixels(train_records, config.image_size)
    val = grey_pixels(evaluation["val"], config.image_size)
    kept, runs = search_rate(train, val, len(source.class_names), config, torch_device, progress)
    test = None
    if evaluation["test"]:
        pixels, labels = grey_pixels(evaluation["test"], config.image_size)
        test = evaluate(kept, pixels.to(torch_device), labels.to(torch_device))[1]
    best = runs[choose_rate(runs)]
    return SmallCNNResult(test_accuracy=test, val_accuracy=best.best_val_accuracy, lr=best.lr,
                          seconds=round(time.perf_counter() - started, 2), runs=runs,
                          train_ids=ids_digest([record_content_id(r) for r in train_records]), config=asdict(config))


def small_cnn_point(data: str | Path | Source, config: SmallCNNConfig, device: str, progress: bool,
                    chosen: dict[str, list[Record]]) -> dict:
    """The curve's ``small_cnn`` point on ``chosen``'s records: test accuracy, the kept round's val accuracy, the
    seconds of the whole rate search, the rate chosen and every rate's figures (``lr_search``), and the chosen
    run's convergence evidence: ``converged``, ``best_round``/``best_epoch``, ``rounds_run``/``epochs_run``,
    ``steps`` and its per-round ``history`` (train loss and accuracy, val loss and accuracy)."""
    result = train_small_cnn(data, config, device, progress=progress, chosen=chosen)
    run = result.chosen
    return {"method": "small_cnn", "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
            "seconds": result.seconds, "lr": result.lr, "lr_search": [r.summary() for r in result.runs],
            "best_round": run.best_round, "best_epoch": run.best_epoch, "rounds_run": run.rounds_run,
            "epochs_run": run.epochs_run, "steps": run.steps, "converged": run.converged, "history": run.history,
            "train_ids": result.train_ids}


def fit_small_cnn_model(records: dict[str, list], class_names: list[str], name: str,
                        config: SmallCNNConfig = SMALL_CNN_DEFAULTS, device: str = "cpu", progress: bool = False,
                        store_fingerprint_hash: str = "", store_path: str = "",
                        val_ids: list[str] | None = None) -> SmallCNNModel:
    """Train the small CNN on ``records["train"]`` (images), the rate and round chosen on ``records["val"]``; a text
    or an undecodable item is refused in one line. ``val_ids``: the val records' content ids (for ``val_answers``)."""
    started = time.perf_counter()
    if not records["train"] or not records["val"]:
        raise FeaturestoreError("the small CNN needs train and val images")
    train = grey_pixels(records["train"], config.image_size)
    val = grey_pixels(records["val"], config.image_size)
    network, runs = search_rate(train, val, len(class_names), config, resolve_device(device), progress)
    network = network.cpu().eval()
    with torch.inference_mode():
        right = (network(val[0]).argmax(1) == val[1]).numpy()
    best = runs[choose_rate(runs)]
    architecture = {"classes": len(class_names), "widths": list(config.widths), "convs": config.convs,
                    "hidden": config.hidden, "dropout": config.dropout, "image_size": config.image_size,
                    "mean": float(network.mean), "std": float(network.std)}
    return SmallCNNModel(
        architecture=architecture, weights={k: v.numpy().copy() for k, v in network.state_dict().items()},
        class_names=list(class_names), backbone=name, val_accuracy=float(right.mean()), n_val=len(right),
        n_train=len(train[1]), lr=float(best.lr), store_fingerprint_hash=store_fingerprint_hash,
        store_path=store_path, train_seconds=time.perf_counter() - started, config=asdict(config),
        val_answers=dict(zip(val_ids, right.tolist(), strict=True)) if val_ids is not None else {})
