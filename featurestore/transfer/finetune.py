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

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..configs import FinetuneConfig
from ..data.sources import Source, scan_source
from ..encode.backbones import BackboneSpec, load_classifier
from ..encode.backbones.efficientnet_lite import EfficientNetLite
from ..encode.backbones.weights import file_sha256
from ..encode.preprocess import Preprocessing
from ..errors import FeaturestoreError, WeightsMismatchError
from ..heads.head import TrainedHead
from ..utils.devices import resolve_device
from .augment import ViewRecipe
from .probe import (
    FinetuneResult,
    ProbeClassifier,
    finetune_rows,
    head_spec,
    probe_weights,
    records_for,
    run_identity,
    train_only_probe,
)
from .training import CachedActivations, ImageBatches, accuracy, adamw, checkpoint_folder, save_atomic, train
from .trunk import (
    TrunkCache,
    UpperBlocks,
    activation_shape,
    build_trunk_cache,
    first_trainable_block,
    trunk_model,
)

log = logging.getLogger("featurestore")

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "build_model"]


def base_network(head: TrainedHead, weights: str | Path | None = None,
                 spec: BackboneSpec | None = None) -> tuple[EfficientNetLite, Path]:
    """The network whose features the head was trained on: its backbone (``spec``, default: resolved from the
    head) with the very checkpoint whose hash the head's fingerprint records (``weights`` for a local file;
    default: the registry's weights)."""
    fp = head.fingerprint
    if not fp["backbone"].startswith("efficientnet_lite"):
        raise FeaturestoreError(f"fine-tuning supports the efficientnet_lite backbones, not {fp['backbone']}")
    _, network, path = load_classifier(spec or head_spec(head), weights)
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
    """AdamW (:func:`training.adamw`: fused when ``top`` is on CUDA, so call it after moving ``top``): the
    classifier at ``head_lr``; the block at depth d from the top (the head convolution: 0) at
    ``head_lr × backbone_lr_factor × layer_lr_decay**d``."""
    network = top.network
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = config.head_lr if name.startswith("_fc.") else (
            config.head_lr * config.backbone_lr_factor * config.layer_lr_decay ** _block_depth(name, network))
        groups.setdefault(lr, []).append(parameter)
    return adamw([{"params": params, "lr": lr} for lr, params in groups.items()], config.weight_decay)


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


def trunk_cache_for(head: TrainedHead, data: str | Path | Source, cache: str | Path, config: FinetuneConfig,
                    weights: str | Path | None = None, device: str = "auto", progress: bool = True,
                    batch_size: int = 64, engine: str = "auto"):
    """Build (or update) the trunk cache that fine-tuning ``head`` with ``config`` reads; returns the summary.
    ``engine`` runs the trunk (auto: onnxruntime on the CPU); the engines agree to ~1e-5, so it is not part
    of the cache's fingerprint."""
    spec = head_spec(head)
    network, path = base_network(head, weights, spec)
    return _build_trunk_cache(head, spec, network, path, data, cache, config, device, progress, batch_size, engine)


def _build_trunk_cache(head: TrainedHead, spec: BackboneSpec, network: EfficientNetLite, path: Path,
                       data: str | Path | Source, cache: str | Path, config: FinetuneConfig, device: str,
                       progress: bool, batch_size: int = 64, engine: str = "auto"):
    source = data if isinstance(data, Source) else scan_source(data)
    preprocessing = Preprocessing.from_dict(head.fingerprint["preprocessing"])
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
    rows = finetune_rows(head, train_per_class, config.seed)  # the probe's rows, by content id
    spec = head_spec(head)
    network, weights_path = base_network(head, weights, spec)
    preprocessing = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    cache_path, cache_seconds = None, 0.0
    if config.source == "cache":
        cache_path = Path(cache) if cache else out.with_name(out.stem + ".trunk.h5")
        cache_seconds = _build_trunk_cache(head, spec, network, weights_path, source, cache_path, config, device,
                                           progress).seconds
        trunk = TrunkCache(cache_path)
        batches = CachedActivations(trunk, torch_device, trunk.rows_of("train", rows.train.ids), config.views,
                                    config.seed, labels=rows.train.labels,
                                    eval_rows={name: trunk.rows_of(name, chosen.ids)
                                               for name, chosen in rows.splits().items() if name != "train"})
    else:  # the frozen lower blocks run inside the loop, every epoch, on freshly decoded images
        first = first_trainable_block(network, config.unfreeze_blocks)
        lower = trunk_model(network, preprocessing, first, head.fingerprint["backbone"], str(weights_path),
                            file_sha256(weights_path), ())
        records = {name: records_for(source, chosen, rows.store) for name, chosen in rows.splits().items()}
        batches = ImageBatches(records.pop("train"), records, preprocessing, lower, torch_device,
                               shape=activation_shape(network, first, preprocessing.image_size),
                               recipe=ViewRecipe(config.crop_scale_min) if config.views else None,
                               workers=config.workers, seed=config.seed)
    top, _ = prepare_top(network, head, config, probe if probe is not None else train_only_probe(head, rows.train.rows))
    top.to(torch_device)
    run_key = run_identity(head, config, network._fc.state_dict(), rows, torch_device.type == "cuda")
    torch.manual_seed(config.seed)  # here, after every setup step that may draw from it: dropout starts alike
    steps_per_epoch = -(-batches.n_train // config.batch_size)
    result, best_state = train(
        top, network.state_dict, optimizer_for(top, config), batches, epochs=config.epochs,
        batch_size=config.batch_size, patience=config.patience, device=torch_device, run_key=run_key,
        checkpoint=checkpoints / "last.pt", warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        on_epoch=epoch_setup(top, config), progress=progress, desc="fine-tune")
    network.load_state_dict(best_state)
    test_accuracy = accuracy(top, batches.eval_batches("test")) if rows.test is not None else None
    save_atomic(out, best_state)
    if not keep_checkpoint:
        (checkpoints / "last.pt").unlink(missing_ok=True)  # finished: nothing left to resume
    return FinetuneResult(**asdict(result), out=str(out), cache=str(cache_path) if cache_path else None,
                          cache_seconds=cache_seconds, test_accuracy=test_accuracy, config=asdict(config),
                          train_ids=[str(cid) for cid in rows.train.ids])
