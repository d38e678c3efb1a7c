"""Fine-tune the top blocks of an EfficientNet-Lite, starting from the linear probe.

The classifier starts as the logistic-regression head trained on the cache (refitted on the train split,
scaler folded into its weights), so epoch 0 is exactly the linear probe. The top ``unfreeze_blocks`` MBConv
blocks and the head convolution train at ``head_lr × backbone_lr_factor`` (each block below the top × a
further ``layer_lr_decay``); everything below stays frozen, and BatchNorm statistics stay frozen unless
``train_batchnorm``. With ``schedule: gradual`` the top block trains first and one more block joins each
epoch. AdamW, a linear warmup then a cosine schedule per step, early stopping on validation accuracy, a
checkpoint per epoch.

By default the top blocks read the trunk cache (``trunk.py``): the frozen layers run once per image and
augmented view, not once per epoch. ``source: images`` decodes, augments and runs the trunk every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import ViewRecipe
from .backbones import get_spec, load_classifier
from .backbones.efficientnet_lite import EfficientNetLite
from .backbones.weights import file_sha256
from .configs import FinetuneConfig
from .data import Record, Source, nested_subset, scan_source
from .devices import resolve_device
from .errors import FeaturestoreError, WeightsMismatchError
from .heads import TrainedHead, build_estimator, fold_scaler
from .preprocess import Preprocessing
from .training import CachedActivations, ImageBatches, TrainResult, accuracy, checkpoint_folder, save_atomic, train
from .trunk import (
    TrunkCache,
    UpperBlocks,
    activation_shape,
    build_trunk_cache,
    first_trainable_block,
    trunk_model,
)

log = logging.getLogger("featurestore")

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "build_model", "train_only_probe", "probe_weights"]


def train_only_probe(head: TrainedHead):
    """The head's pipeline refitted at its chosen C on the train split alone.

    The saved head was refitted on train+val; starting from it would make the validation split, which early
    stopping watches, part of the starting point's training data.
    """
    from sklearn.exceptions import ConvergenceWarning

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


def base_network(head: TrainedHead, weights: str | Path | None = None) -> tuple[EfficientNetLite, Path]:
    """The network whose features the head was trained on: its backbone with the very checkpoint whose hash
    the head's fingerprint records (``weights`` for a local file; default: the registry's weights)."""
    fp = head.fingerprint
    if not fp["backbone"].startswith("efficientnet_lite"):
        raise FeaturestoreError(f"fine-tuning supports the efficientnet_lite backbones, not {fp['backbone']}")
    _, network, path = load_classifier(fp["backbone"], weights)
    if file_sha256(path) != fp["weights_sha256"]:
        raise WeightsMismatchError(
            f"{path}: these weights (sha256 {file_sha256(path)[:12]}…) are not the ones head {head.name} was "
            f"trained on (sha256 {fp['weights_sha256'][:12]}…); pass --weights with the checkpoint its features "
            f"came from"
        )
    return network, path


def build_model(head: TrainedHead, config: FinetuneConfig, probe=None,
                weights: str | Path | None = None) -> tuple[UpperBlocks, list[str]]:
    """The trainable top of the head's backbone (``weights``: its local checkpoint, checked against the head's
    fingerprint) with ``probe`` (default: :func:`train_only_probe`) as classifier; returns it and the names of
    the parameters that may train (all unfrozen ones; a gradual schedule enables them epoch by epoch)."""
    network, _ = base_network(head, weights)
    return prepare_top(network, head, config, probe)


def prepare_top(network: EfficientNetLite, head: TrainedHead, config: FinetuneConfig,
                probe=None) -> tuple[UpperBlocks, list[str]]:
    """``network`` with the probe as classifier and only the layers ``config`` unfreezes trainable."""
    estimator = probe if probe is not None else train_only_probe(head)
    network._fc = ProbeClassifier(*probe_weights(estimator, len(head.class_names)))
    first = first_trainable_block(network, config.unfreeze_blocks)
    trainable = []
    for name, parameter in network.named_parameters():
        train = _trains(name, first, config)
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
    return UpperBlocks(network, first), trainable


def _trains(name: str, first_block: int, config: FinetuneConfig) -> bool:
    """Whether parameter ``name`` of the network trains: the classifier always; the head convolution and the
    blocks from ``first_block`` up, except BatchNorm affine parameters unless ``train_batchnorm``."""
    if name.startswith("_fc."):
        return True
    is_bn = name.split(".")[-2].startswith("_bn")  # e.g. _blocks.14._bn0.weight, _bn1.bias
    if is_bn and not config.train_batchnorm:
        return False
    if name.startswith("_conv_head.") or name.startswith("_bn1."):
        return True
    return name.startswith("_blocks.") and int(name.split(".")[1]) >= first_block


def _block_depth(name: str, network: EfficientNetLite) -> int:
    """0 for the top block (and the head convolution), 1 for the block below it, …"""
    if name.startswith("_blocks."):
        return len(network._blocks) - 1 - int(name.split(".")[1])
    return 0


def optimizer_for(top: UpperBlocks, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW: the classifier at ``head_lr``; the block at depth d from the top (the head convolution: 0) at
    ``head_lr × backbone_lr_factor × layer_lr_decay**d``."""
    network = top.network
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = config.head_lr if name.startswith("_fc.") else (
            config.head_lr * config.backbone_lr_factor * config.layer_lr_decay ** _block_depth(name, network))
        groups.setdefault(lr, []).append(parameter)
    return torch.optim.AdamW([{"params": params, "lr": lr} for lr, params in groups.items()],
                             weight_decay=config.weight_decay)


def epoch_setup(top: UpperBlocks, config: FinetuneConfig):
    """A callback for :func:`training.train`: train mode for dropout; the blocks that train this epoch (all
    unfrozen ones, or for ``gradual`` the top ``epoch`` of them) get gradients; every BatchNorm stays in eval
    (frozen statistics) unless ``train_batchnorm``, and BatchNorms of frozen layers always do."""
    network = top.network
    unfrozen = [name for name, p in network.named_parameters() if p.requires_grad]

    def setup(epoch: int) -> None:
        top.train()
        active = config.unfreeze_blocks if config.schedule == "fixed" else min(config.unfreeze_blocks, epoch)
        first_active = len(network._blocks) - active
        for name, parameter in network.named_parameters():
            if name in unfrozen:
                blocked = name.startswith("_blocks.") and int(name.split(".")[1]) < first_active
                parameter.requires_grad_(not blocked)
        for name, module in network.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                in_active = name.startswith("_bn1") or (name.startswith("_blocks.")
                                                        and int(name.split(".")[1]) >= first_active)
                module.train(config.train_batchnorm and in_active)

    return setup


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


def trunk_cache_for(head: TrainedHead, data: str | Path | Source, cache: str | Path, config: FinetuneConfig,
                    weights: str | Path | None = None, device: str = "auto", progress: bool = True,
                    batch_size: int = 64, engine: str = "auto"):
    """Build (or update) the trunk cache that fine-tuning ``head`` with ``config`` reads; returns the summary.
    ``engine`` runs the trunk (auto: onnxruntime on the CPU); the engines agree to ~1e-5, so it is not part
    of the cache's fingerprint."""
    source = data if isinstance(data, Source) else scan_source(data)
    network, path = base_network(head, weights)
    preprocessing = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    spec = get_spec(head.fingerprint["backbone"])
    return build_trunk_cache(
        network, preprocessing, first_trainable_block(network, config.unfreeze_blocks), source, cache,
        backbone=head.fingerprint["backbone"], weights_path=str(path), weights_sha256=file_sha256(path),
        code_modules=spec.code_modules, store_fingerprint_hash=head.fingerprint_hash, views=config.views,
        recipe=ViewRecipe(config.crop_scale_min), seed=config.seed, dtype=config.cache_dtype, device=device,
        batch_size=batch_size, workers=config.workers, progress=progress, engine=engine)


def finetune(head: TrainedHead, data: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(),
             device: str = "auto", progress: bool = True, checkpoint_dir: str | Path | None = None,
             keep_checkpoint: bool = False, train_per_class: int | None = None, probe=None,
             weights: str | Path | None = None, cache: str | Path | None = None) -> FinetuneResult:
    """Fine-tune on ``data``'s train split, early-stop on its val split, write the best weights to ``out`` (an
    EfficientNet-Lite state dict usable as ``--weights``), checkpointing every epoch to ``checkpoint_dir/last.pt``
    (deleted once finished unless ``keep_checkpoint``).

    ``cache`` is the trunk cache's path (default ``<out>.trunk.h5``; built or updated first when
    ``config.source`` is "cache"). ``train_per_class`` trains on a nested subset of that many train images per
    class; ``probe`` replaces the starting classifier (default: the head refitted on train); ``weights`` is the
    local checkpoint the head's features came from, if not the registry's.
    """
    out = Path(out)
    checkpoints = checkpoint_folder(out, checkpoint_dir)
    torch_device = resolve_device(device)
    source = scan_source(data)
    train_records, val_records, test_records, rows = split_records(source, head, data, train_per_class, config.seed)
    network, weights_path = base_network(head, weights)
    preprocessing = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    cache_path, cache_seconds = None, 0.0
    if config.source == "cache":
        cache_path = Path(cache) if cache else out.with_name(out.stem + ".trunk.h5")
        cache_seconds = trunk_cache_for(head, source, cache_path, config, weights, device, progress).seconds
        batches = CachedActivations(TrunkCache(cache_path), torch_device, rows, config.views, config.seed)
    else:  # the frozen lower blocks run inside the loop, every epoch, on freshly decoded images
        first = first_trainable_block(network, config.unfreeze_blocks)
        lower = trunk_model(network, preprocessing, first, head.fingerprint["backbone"], str(weights_path),
                            file_sha256(weights_path), ())
        batches = ImageBatches(train_records, {"val": val_records, "test": test_records}, preprocessing, lower,
                               torch_device, shape=activation_shape(network, first, preprocessing.image_size),
                               recipe=ViewRecipe(config.crop_scale_min) if config.views else None,
                               workers=config.workers, seed=config.seed)
    top, _ = prepare_top(network, head, config, probe)
    top.to(torch_device)
    run_key = run_identity(head, config, network._fc.state_dict(), train_records, val_records,
                           torch_device.type == "cuda")
    torch.manual_seed(config.seed)  # here, after every setup step that may draw from it: dropout starts alike
    steps_per_epoch = -(-batches.n_train // config.batch_size)
    result, best_state = train(
        top, network.state_dict, optimizer_for(top, config), batches, epochs=config.epochs,
        batch_size=config.batch_size, patience=config.patience, device=torch_device, run_key=run_key,
        checkpoint=checkpoints / "last.pt", warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        on_epoch=epoch_setup(top, config), progress=progress, desc="fine-tune")
    network.load_state_dict(best_state)
    test_accuracy = accuracy(top, batches.eval_batches("test")) if test_records else None
    save_atomic(out, best_state)
    if not keep_checkpoint:
        (checkpoints / "last.pt").unlink(missing_ok=True)  # finished: nothing left to resume
    return FinetuneResult(**asdict(result), out=str(out), cache=str(cache_path) if cache_path else None,
                          cache_seconds=cache_seconds, test_accuracy=test_accuracy, config=asdict(config))
