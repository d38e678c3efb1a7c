"""Fine-tune the top blocks of an EfficientNet-Lite backbone, starting from the linear probe.

The classifier starts as the logistic-regression head trained on the cache (scaler folded into its
weights), so epoch 0 is exactly the linear probe. The top ``unfreeze_blocks`` MBConv blocks and the
1x1 head convolution train at ``head_lr * backbone_lr_factor``; everything below stays frozen, and
BatchNorm running statistics stay frozen unless ``train_batchnorm``. AdamW, cosine schedule per step,
early stopping on validation accuracy, a checkpoint after every epoch that a rerun resumes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_path
from .backbones import get_spec, load_classifier
from .backbones.efficientnet_lite import EfficientNetLite
from .backbones.weights import file_sha256
from .configs import FinetuneConfig
from .console import progress_bar
from .data import Record, nested_subset, scan_source
from .devices import resolve_device
from .errors import FeaturestoreError, WeightsMismatchError
from .heads import TrainedHead, fold_scaler
from .images import load_image
from .preprocess import INTERPOLATIONS, Preprocessing

log = logging.getLogger("featurestore")

class TrainImages(Dataset):
    """Decoded, optionally augmented images: item ``(uint8 (3, S, S), label)``.

    Augmentation: random resized crop (scale ``crop_scale_min``..1, aspect 3/4..4/3) and horizontal
    flip, drawn from torch's RNG (seeded per worker by the DataLoader's generator).
    """

    def __init__(self, records: list[Record], preprocessing: Preprocessing, augment: bool,
                 crop_scale_min: float):
        self.records = records
        self.preprocessing = preprocessing
        self.augment = augment
        self.scale = (crop_scale_min, 1.0)

    def __len__(self) -> int:
        return len(self.records)

    def _random_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            log_ratio = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))
            aspect = math.exp(float(log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (1,)))
                top = int(torch.randint(0, height - h + 1, (1,)))
                return image.crop((left, top, left + w, top + h))
        return image

    def __getitem__(self, index: int):
        record = self.records[index]
        image = load_image(record.path)
        if self.augment:
            image = self._random_crop(image)
            if bool(torch.rand(1) < 0.5):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            size = self.preprocessing.image_size
            image = image.resize((size, size), INTERPOLATIONS[self.preprocessing.interpolation])
        return self.preprocessing(image), record.label


class FinetuneNet(nn.Module):
    """uint8 images (N, 3, S, S) → logits (N, K): normalisation + EfficientNet-Lite with a K-way ``_fc``."""

    def __init__(self, network: EfficientNetLite, preprocessing: Preprocessing):
        super().__init__()
        self.network = network
        self.preprocessing = preprocessing
        self.register_buffer("pixel_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images.float() - self.pixel_mean) / self.pixel_std)


def train_only_probe(head: TrainedHead):
    """The head's pipeline refitted at its chosen C on the train split alone.

    The saved head was refitted on train+val; starting from it would make the validation split,
    which early stopping watches, part of the starting point's training data.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from .heads import build_estimator
    from .store import FeatureStore

    if head.config.head != "logreg":
        raise FeaturestoreError(f"fine-tuning starts from a logreg head; {head.name} is {head.config.head}")
    store = FeatureStore(head.store_path)
    head.check_store(store)
    X, y, _ = store.load("train")
    estimator = build_estimator(head.config, head.C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X.astype(np.float32), y)


def probe_weights(estimator) -> tuple[np.ndarray, np.ndarray, bool]:
    """A fitted scaler + LogisticRegression pipeline as one linear layer: weight (K, D), bias (K,)
    float64, and whether features are L2-normalised first (a Normalizer cannot be folded)."""
    classify = estimator.named_steps["classify"]
    weight, bias = classify.coef_, classify.intercept_
    if weight.shape[0] == 1:  # binary: softmax over [0, d] equals the sigmoid of d
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.array([0.0, bias[0]])
    return fold_scaler(estimator, weight, bias)


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


def trainable_prefixes(network: EfficientNetLite, unfreeze_blocks: int) -> list[str]:
    """Parameter-name prefixes that train: the top blocks, the head convolution and BN, the classifier."""
    total = len(network._blocks)
    if not 0 <= unfreeze_blocks <= total:
        raise FeaturestoreError(f"unfreeze_blocks must be between 0 and {total}")
    return [f"_blocks.{i}." for i in range(total - unfreeze_blocks, total)] + ["_conv_head.", "_bn1.", "_fc."]


def base_network(head: TrainedHead, weights: str | Path | None = None) -> EfficientNetLite:
    """The network whose features the head was trained on: its backbone with the very checkpoint whose hash
    the head's fingerprint records (``weights`` for a local file; default: the registry's weights)."""
    fp = head.fingerprint
    _, network, path = load_classifier(fp["backbone"], weights)
    if file_sha256(path) != fp["weights_sha256"]:
        raise WeightsMismatchError(
            f"{path}: these weights (sha256 {file_sha256(path)[:12]}…) are not the ones head {head.name} was "
            f"trained on (sha256 {fp['weights_sha256'][:12]}…); pass --weights with the checkpoint its features "
            f"came from"
        )
    return network


def build_model(head: TrainedHead, config: FinetuneConfig, probe=None,
                weights: str | Path | None = None) -> tuple[FinetuneNet, list[str]]:
    """The backbone the head's features came from (``weights``: its local checkpoint, checked against the
    head's fingerprint), with ``probe`` (default: :func:`train_only_probe`) as classifier; returns it and
    the names of the parameters that train."""
    fp = head.fingerprint
    if not fp["backbone"].startswith("efficientnet_lite"):
        raise FeaturestoreError(f"fine-tuning supports the efficientnet_lite backbones, not {fp['backbone']}")
    preprocessing = Preprocessing.from_dict(fp["preprocessing"])
    if config.from_scratch:
        torch.manual_seed(config.seed)
        network = get_spec(fp["backbone"]).build()
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                # TF's 0.99 decay suits long runs; a short from-scratch run needs statistics that keep up.
                module.momentum = 0.1
        k, d = len(head.class_names), network.feature_dim
        network._fc = ProbeClassifier(np.random.default_rng(config.seed).normal(0, 0.01, (k, d)), np.zeros(k), False)
        return FinetuneNet(network, preprocessing), [name for name, _ in network.named_parameters()]
    network = base_network(head, weights)
    network._fc = ProbeClassifier(*probe_weights(probe if probe is not None else train_only_probe(head)))
    prefixes = trainable_prefixes(network, config.unfreeze_blocks)
    trainable = []
    for name, parameter in network.named_parameters():
        is_bn = name.split(".")[-2].startswith("_bn")  # e.g. _blocks.14._bn0.weight, _bn1.bias
        train = any(name.startswith(p) for p in prefixes) and (config.train_batchnorm or not is_bn or
                                                                name.startswith("_fc."))
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
    return FinetuneNet(network, preprocessing), trainable


def set_train_mode(model: FinetuneNet, config: FinetuneConfig) -> None:
    """Train mode for dropout and trainable layers; every BatchNorm stays in eval (frozen statistics)
    unless ``train_batchnorm``, and BatchNorms of frozen blocks always stay in eval."""
    model.train()
    if config.from_scratch:
        return
    prefixes = trainable_prefixes(model.network, config.unfreeze_blocks)
    for name, module in model.network.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            in_trainable = any((name + ".").startswith(p) for p in prefixes)
            module.train(config.train_batchnorm and in_trainable)


@dataclass
class FinetuneResult:
    out: str
    best_val_accuracy: float
    start_val_accuracy: float
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def _accuracy(model: FinetuneNet, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def _save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def finetune(head: TrainedHead, data: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(),
             device: str = "auto", progress: bool = True, checkpoint_dir: str | Path | None = None,
             keep_checkpoint: bool = False, train_per_class: int | None = None, probe=None,
             weights: str | Path | None = None) -> FinetuneResult:
    """Fine-tune on ``data``'s train split, early-stop on its val split, write the best weights to ``out``
    (an EfficientNet-Lite state dict usable as ``--weights``), checkpointing every epoch to
    ``checkpoint_dir/last.pt`` (deleted once finished unless ``keep_checkpoint``).

    ``train_per_class`` trains on a nested subset of that many train images per class (as the plateau
    curve does); ``probe`` replaces the starting classifier (default: the head refitted on train);
    ``weights`` is the local checkpoint the head's features came from, if not the registry's."""
    started = time.perf_counter()
    out = Path(out)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.stem + ".checkpoints")
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    source = scan_source(data)
    if source.class_names != head.class_names:
        raise FeaturestoreError(f"{data}: classes {source.class_names} differ from the head's {head.class_names}")
    train = [r for r in source.records if r.split == "train"]
    if train_per_class is not None:
        train = [train[i] for i in nested_subset(np.array([r.label for r in train]), train_per_class, config.seed)]
    val = [r for r in source.records if r.split == "val"]
    if not train or not val:
        raise FeaturestoreError(f"{data}: fine-tuning needs train and val splits")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model, trainable = build_model(head, config, probe=probe, weights=weights)
    model.to(torch_device)
    backbone_params = [p for n, p in model.network.named_parameters() if p.requires_grad and not n.startswith("_fc.")]
    optimizer = torch.optim.AdamW(
        [{"params": list(model.network._fc.parameters()), "lr": config.head_lr},
         {"params": backbone_params,
          "lr": config.head_lr * (1.0 if config.from_scratch else config.backbone_lr_factor)}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    amp = torch_device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    val_loader = DataLoader(TrainImages(val, model.preprocessing, False, 1.0), batch_size=64,
                            num_workers=config.workers)

    run_key = run_identity(head, config, model.network._fc.state_dict(), train, val, amp)
    state = {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": [], "best_state": None}
    last = checkpoints / "last.pt"
    resumed_from = 0
    if last.is_file():
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("%s: unreadable checkpoint ignored, starting over (%s)", last, exc)
            saved = {}
        if saved.get("run") == run_key:
            model.network.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["grad_scaler"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            resumed_from = state["epoch"]
            log.info("resuming fine-tuning after epoch %d (%s)", resumed_from, last)
        elif saved:
            log.warning("%s belongs to another run (config, head, probe, data or precision differ); starting over",
                        last)
    if state["epoch"] == 0:
        start_accuracy = _accuracy(model, val_loader, torch_device)
        state["start_val_accuracy"] = start_accuracy
        state["best"] = start_accuracy
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()}

    stopped_early = False
    while state["epoch"] < config.epochs:
        epoch = state["epoch"] + 1
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loader = DataLoader(TrainImages(train, model.preprocessing, config.augment, config.crop_scale_min),
                            batch_size=config.batch_size, shuffle=True, generator=generator,
                            num_workers=config.workers, drop_last=False)
        set_train_mode(model, config)
        losses = []
        with progress_bar(len(train), f"fine-tune epoch {epoch}/{config.epochs}", enabled=progress) as bar:
            for images, labels in loader:
                images, labels = images.to(torch_device), labels.to(torch_device)
                with torch.autocast(torch_device.type, dtype=torch.float16, enabled=amp):
                    loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(len(labels))
        accuracy = _accuracy(model, val_loader, torch_device)
        state["history"].append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": accuracy})
        if accuracy > state["best"]:
            state["best"], state["bad_epochs"] = accuracy, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        _save_atomic({"run": run_key, "model": model.network.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
                      "torch_rng": torch.get_rng_state(), "state": state}, last)
        log.info("epoch %d: train loss %.4f, val accuracy %.4f", epoch, state["history"][-1]["train_loss"], accuracy)
        if state["bad_epochs"] >= config.patience:
            stopped_early = True
            break

    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(state["best_state"], out)
    if not keep_checkpoint:
        last.unlink(missing_ok=True)  # finished: nothing left to resume
    return FinetuneResult(
        out=str(out), best_val_accuracy=state["best"], start_val_accuracy=state["start_val_accuracy"],
        epochs_run=state["epoch"], stopped_early=stopped_early, history=state["history"],
        seconds=round(time.perf_counter() - started, 2), resumed_from_epoch=resumed_from,
    )
