"""Fine-tune the top blocks of an image backbone, starting from the linear probe.

Any backbone whose entry declares a block split (``BackboneSpec.blocks``) fine-tunes: EfficientNet-Lite's MBConv
blocks, and for ``tv:<model>`` torchvision's ``features`` stages (MobileNet V2/V3, EfficientNet, ConvNeXt, DenseNet),
ResNet's ``layer1..4``, RegNet's and MNASNet's stages, and for ``timm:<model>`` timm's own coarse block grouping
where it reproduces the model's forward. A backbone without one is refused with one line.

The classifier starts as the logistic-regression head trained on the cache (refitted on the train split,
scaler folded into its weights), so epoch 0 is exactly the linear probe. The top ``unfreeze_blocks`` blocks and
the head's layers between them and the classifier (Lite's head convolution, MobileNetV3's pre-logits layer)
train at ``head_lr × backbone_lr_factor`` (each block below the top × a further ``layer_lr_decay``); everything
below stays frozen (in eval mode), and BatchNorm statistics stay frozen unless ``train_batchnorm``. With
``schedule: gradual`` the top block trains first and one more block joins each epoch. AdamW, a linear warmup
then a cosine schedule per step, early stopping on validation accuracy, a checkpoint per epoch.

By default the top blocks read the trunk cache (``trunk.py``): the frozen layers run once per image and
augmented view, not once per epoch. ``source: images`` decodes, augments and runs the trunk every epoch.

:func:`tune` is the part every fine-tune shares (this one, the text fine-tune's and SetFit's): the run's
identity, the seed, :func:`training.train` with a checkpoint per epoch, the best epoch restored and scored on
test, its weights written and the result; each modality hands it its own parts (:class:`Tuning`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..configs import FinetuneConfig
from ..data.sources import Source, scan_source
from ..encode.backbones import BackboneSpec, load_classifier
from ..encode.backbones.loading import recorded_weights
from ..encode.backbones.model import BlockSplit
from ..encode.backbones.weights import file_sha256
from ..encode.preprocess import Preprocessing
from ..errors import FeaturestoreError
from ..heads.head import TrainedHead
from ..heads.records import store_source
from ..utils.devices import resolve_device
from .augment import ViewRecipe
from .probe import (
    FinetuneResult,
    FinetuneRows,
    ProbeClassifier,
    finetune_rows,
    head_spec,
    records_for,
    run_identity,
    train_only_probe,
)
from .training import (
    BatchSource,
    CachedActivations,
    ImageBatches,
    TrainOptions,
    TrainResult,
    accuracy,
    adamw,
    checkpoint_folder,
    save_atomic,
    train,
)
from .trunk import (
    TrunkCache,
    UpperBlocks,
    activation_shape,
    build_trunk_cache,
    first_trainable_block,
    split_of,
    trunk_model,
)

log = logging.getLogger("featurestore")

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "build_model"]


def finetunable(spec) -> BlockSplit:
    """The block split of ``spec``'s network; raises a one-line :class:`FeaturestoreError` naming the backbone when
    its family declares none (fine-tuning needs to know which blocks are the top ones)."""
    blocks = getattr(spec, "blocks", None)
    if blocks is None:
        from ..encode.backbones.torchvision_models import BLOCK_SPLITS

        families = ", ".join(cls.__name__ for cls in BLOCK_SPLITS)
        raise FeaturestoreError(
            f"{spec.name} cannot be fine-tuned: its family ({spec.description}) declares no split into blocks; "
            f"image fine-tuning supports efficientnet_lite*, tv:<model> of torchvision's {families}, and "
            f"timm:<model> where timm's block grouping reproduces the model's forward")
    return blocks


def base_network(head: TrainedHead, weights: str | Path | None = None,
                 spec: BackboneSpec | None = None) -> tuple[nn.Module, Path]:
    """The network whose features the head was trained on: its backbone (``spec``, default: resolved from the
    head) with the very checkpoint whose hash the head's fingerprint records (``weights`` for a local file, checked;
    default: that file where this machine last loaded it, or the registry's weights; see :func:`recorded_weights`).
    Refused first when the backbone declares no block split."""
    spec = spec or head_spec(head)
    finetunable(spec)
    path = recorded_weights(spec, head.fingerprint["weights_sha256"], weights, built=f"head {head.name}")
    log.info("%s: starting from weights %s", spec.name, path)
    _, network, path = load_classifier(spec, path)
    return network, path


def build_model(head: TrainedHead, config: FinetuneConfig, probe=None,
                weights: str | Path | None = None) -> tuple[UpperBlocks, list[str]]:
    """The trainable top of the head's backbone (``weights``: its local checkpoint, checked against the head's
    fingerprint) with ``probe`` (default: :func:`train_only_probe`) as classifier; returns it and the names of
    the parameters that may train (all unfrozen ones; a gradual schedule enables them epoch by epoch)."""
    network, _ = base_network(head, weights)
    return prepare_top(network, head, config, probe, head_spec(head).blocks)


def set_classifier(network: nn.Module, split: BlockSplit, classifier: nn.Module) -> None:
    """Put ``classifier`` in place of ``network``'s final linear layer (``split.classifier``)."""
    _replace(network, split.classifier, classifier)


def _replace(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, leaf, module)


def take_feature_dropout(network: nn.Module, split: BlockSplit) -> float:
    """Replace the dropout layers of ``network``'s head (its ``split.head`` entries and their children: Lite's
    ``_dropout``, torchvision's ``classifier[0]``) with identities; returns their rate (0.0 when there are none),
    which the probe classifier then applies around the features' mean (:class:`probe.ProbeClassifier`)."""
    found = {f"{entry}.{child}" if child else entry: layer.p
             for entry in split.head if isinstance(entry, str)
             for child, layer in network.get_submodule(entry).named_modules() if isinstance(layer, nn.Dropout)}
    for name in found:
        _replace(network, name, nn.Identity())
    return max(found.values(), default=0.0)


def prepare_top(network: nn.Module, head: TrainedHead, config: FinetuneConfig, probe=None,
                split: BlockSplit | None = None) -> tuple[UpperBlocks, list[str]]:
    """``network`` (cut by ``split``, default EfficientNet-Lite's) with the probe as classifier and only the layers
    ``config`` unfreezes trainable; returns the trainable top and the names of the parameters that may train."""
    split = split_of(network, split)
    estimator = probe if probe is not None else train_only_probe(head, scale_floor=config.probe_scale_floor)
    dropout = take_feature_dropout(network, split)
    set_classifier(network, split, ProbeClassifier.of_probe(estimator, len(head.class_names), dropout))
    first = first_trainable_block(network, config.unfreeze_blocks, split)
    top = UpperBlocks(network, first, split=split)
    roles = _Roles(top)
    trainable = []
    for name, parameter in network.named_parameters():
        train = roles.trains(name, first, config.train_batchnorm)
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
    return top, trainable


def _names_in(network: nn.Module, name: str) -> list[str]:
    """The dotted names of the parameters and modules inside ``network``'s module ``name`` (itself included)."""
    module = network.get_submodule(name)
    return [key for key, _ in (*module.named_parameters(prefix=name), *module.named_modules(prefix=name))]


class _Roles:
    """Where each parameter and module of ``top.network`` sits in its split: the classifier, the head (the layers
    between the last block and the classifier), block i (0 at the bottom), or the frozen stem; and which are
    BatchNorm."""

    def __init__(self, top: UpperBlocks):
        network, split = top.network, top.split
        self.n_blocks = len(top.block_names)
        # parameter or module name → its block
        self.block = {key: index for index, name in enumerate(top.block_names) for key in _names_in(network, name)}
        self.head = {key for name in split.head_modules() for key in _names_in(network, name)}
        classifier = network.get_submodule(split.classifier)
        self.classifier = {key for key, _ in classifier.named_parameters(prefix=split.classifier)}
        self.batchnorm = {f"{owner}.{key}" if owner else key
                          for owner, module in network.named_modules() if isinstance(module, _BatchNorm)
                          for key, _ in module.named_parameters(recurse=False)}

    def trains(self, name: str, first_block: int, train_batchnorm: bool) -> bool:
        """Whether parameter ``name`` trains: the classifier always; the head's layers and the blocks from
        ``first_block`` up, except BatchNorm affine parameters unless ``train_batchnorm``."""
        if name in self.classifier:
            return True
        if name in self.batchnorm and not train_batchnorm:
            return False
        return name in self.head or self.block.get(name, -1) >= first_block

    def depth(self, name: str) -> int:
        """0 for the top block (and the head's layers), 1 for the block below it, …"""
        return self.n_blocks - 1 - self.block[name] if name in self.block else 0


def layer_lr(config: FinetuneConfig, depth: int) -> float:
    """The learning rate of the trainable layer (block, transformer layer) at ``depth`` from the top (0: the top
    one): ``head_lr × backbone_lr_factor × layer_lr_decay**depth``."""
    return config.head_lr * config.backbone_lr_factor * config.layer_lr_decay ** depth


def active_blocks(config: FinetuneConfig, epoch: int) -> int:
    """How many of the top blocks train at ``epoch``: all unfrozen ones, or for ``gradual`` one more each epoch."""
    return config.unfreeze_blocks if config.schedule == "fixed" else min(config.unfreeze_blocks, epoch)


def optimizer_for(top: UpperBlocks, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW (:func:`training.adamw`: fused when ``top`` is on CUDA, so call it after moving ``top``): the
    classifier at ``head_lr``; the block at depth d from the top (the head's layers: 0) at
    ``head_lr × backbone_lr_factor × layer_lr_decay**d``."""
    network, roles = top.network, _Roles(top)
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = config.head_lr if name in roles.classifier else layer_lr(config, roles.depth(name))
        groups.setdefault(lr, []).append(parameter)
    return adamw([{"params": params, "lr": lr} for lr, params in groups.items()], config.weight_decay)


def epoch_setup(top: UpperBlocks, config: FinetuneConfig):
    """A callback for :func:`training.train`: train mode for dropout; the blocks that train this epoch (all
    unfrozen ones, or for ``gradual`` the top ``epoch`` of them) get gradients; every BatchNorm stays in eval
    (frozen statistics) unless ``train_batchnorm``, and BatchNorms of frozen layers always do. The frozen part
    below the cut (stem and lower blocks) stays in eval mode whole, its dropout and stochastic depth included: it
    computes what the trunk cache holds, even when it runs every epoch (``source: images``)."""
    network, roles = top.network, _Roles(top)
    unfrozen = [name for name, p in network.named_parameters() if p.requires_grad]
    below = [network.get_submodule(name) for name in top.split.stem if isinstance(name, str)]
    below += [network.get_submodule(name) for name in top.block_names[:top.first_block]]

    def setup(epoch: int) -> None:
        top.train()
        first_active = roles.n_blocks - active_blocks(config, epoch)
        for name, parameter in network.named_parameters():
            if name in unfrozen:
                parameter.requires_grad_(not roles.block.get(name, first_active) < first_active)
        for name, module in network.named_modules():
            if isinstance(module, _BatchNorm):
                in_active = name in roles.head or roles.block.get(name, -1) >= first_active
                module.train(config.train_batchnorm and in_active)
        for module in below:
            module.eval()

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


def _build_trunk_cache(head: TrainedHead, spec: BackboneSpec, network: nn.Module, path: Path,
                       data: str | Path | Source, cache: str | Path, config: FinetuneConfig, device: str,
                       progress: bool, batch_size: int = 64, engine: str = "auto"):
    source = data if isinstance(data, Source) else scan_source(data)
    preprocessing = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    return build_trunk_cache(
        network, preprocessing, first_trainable_block(network, config.unfreeze_blocks, spec.blocks), source, cache,
        backbone=head.fingerprint["backbone"], weights_path=str(path), weights_sha256=file_sha256(path),
        code_modules=spec.code_modules, store_fingerprint_hash=head.fingerprint_hash, views=config.views,
        recipe=ViewRecipe(config.crop_scale_min), seed=config.seed, dtype=config.cache_dtype, device=device,
        batch_size=batch_size, workers=config.workers, progress=progress, engine=engine, split=spec.blocks)


@dataclass(frozen=True)
class Tuning:
    """A modality's parts of a fine-tune, for :func:`tune`: ``top``, the trainable top on the training device;
    ``classifier``, the state dict of its starting classifier (the probe: part of the run's identity);
    ``optimizer`` over its trainable parameters; ``weights_of``, the state :func:`training.train` keeps for the
    best epoch, which ``restore`` loads back and ``written`` turns into the state dict written to ``out``;
    ``test_accuracy(run)``, the restored top's on test, given the run's :class:`TrainResult` (None without a test
    split)."""

    top: nn.Module
    classifier: dict
    optimizer: torch.optim.Optimizer
    weights_of: Callable[[], dict]
    restore: Callable[[dict], None]
    written: Callable[[dict], dict]
    test_accuracy: Callable[[TrainResult], float | None]


def tune(parts: Tuning, source: BatchSource, options: TrainOptions, head: TrainedHead, config, rows: FinetuneRows,
         out: Path, checkpoint_dir: str | Path | None = None, keep_checkpoint: bool = False,
         result_type: type[FinetuneResult] = FinetuneResult, **fields) -> FinetuneResult:
    """The skeleton of every fine-tune: train ``parts.top`` on ``source`` as ``options`` say, with torch seeded by
    ``config.seed`` (a :class:`FinetuneConfig` or SetFit's) and the run keyed on its identity
    (:func:`probe.run_identity`), checkpointing every epoch to ``<checkpoint_dir>/last.pt`` (default
    ``<out>.checkpoints``); restore the best epoch, score it on test, write its weights to ``out`` and delete the
    checkpoint unless ``keep_checkpoint``. Returns a ``result_type``: the run, its test accuracy, ``config``,
    the train ids (``rows``) and ``fields``."""
    checkpoints = checkpoint_folder(out, checkpoint_dir)
    run_key = run_identity(head, config, parts.classifier, rows, options.device.type == "cuda")
    torch.manual_seed(config.seed)  # here, after every setup step that may draw from it: dropout starts alike
    result, best = train(parts.top, parts.weights_of, parts.optimizer, source,
                         replace(options, run_key=run_key, checkpoint=checkpoints / "last.pt"))
    parts.restore(best)
    test_accuracy = parts.test_accuracy(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(out, parts.written(best))
    if not keep_checkpoint:
        (checkpoints / "last.pt").unlink(missing_ok=True)  # finished: nothing left to resume
    return result_type(**asdict(result), out=str(out), test_accuracy=test_accuracy, config=asdict(config),
                       train_ids=[str(cid) for cid in rows.train.ids], **fields)


def finetune_options(config: FinetuneConfig, source: BatchSource, device: torch.device, on_epoch, progress: bool,
                     desc: str, unit: str) -> TrainOptions:
    """:func:`training.train`'s options for a fine-tune with ``config`` on ``source``: its epochs,
    batch size and patience, the warmup of ``warmup_epochs`` epochs of steps, the gradient clipping and the
    back-offs from a diverged epoch."""
    steps_per_epoch = -(-source.n_train // config.batch_size)
    return TrainOptions(epochs=config.epochs, batch_size=config.batch_size, patience=config.patience, device=device,
                        warmup_steps=round(config.warmup_epochs * steps_per_epoch), on_epoch=on_epoch,
                        max_grad_norm=config.max_grad_norm or None, backoffs=config.backoffs, progress=progress,
                        desc=desc, unit=unit)


def finetune(head: TrainedHead, data: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(),
             device: str = "auto", progress: bool = True, checkpoint_dir: str | Path | None = None,
             keep_checkpoint: bool = False, train_per_class: int | None = None, probe=None,
             weights: str | Path | None = None, cache: str | Path | None = None) -> FinetuneResult:
    """Fine-tune on ``data``'s train split, early-stop on its val split, write the best weights to ``out`` (a state
    dict of the head's backbone, its classifier the fine-tuned probe: usable as ``extract --weights`` with that
    backbone), checkpointing every epoch to ``checkpoint_dir/last.pt`` (deleted once finished unless
    ``keep_checkpoint``). A backbone whose family declares no block split is refused before anything is written.

    ``cache`` is the trunk cache's path (default ``<out>.trunk.h5``; built or updated first when
    ``config.source`` is "cache"). ``train_per_class`` trains on a nested subset of that many train images per
    class; ``probe`` replaces the starting classifier (default: the head refitted on train); ``weights`` is the
    local checkpoint the head's features came from (default: found by the hash the head records, never downloaded).
    """
    out = Path(out)
    spec = head_spec(head)
    split = finetunable(spec)
    torch_device = resolve_device(device)
    rows = finetune_rows(head, train_per_class, config.seed)  # the probe's rows, by content id
    source = store_source(rows.store, data)
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
        first = first_trainable_block(network, config.unfreeze_blocks, split)
        lower = trunk_model(network, preprocessing, first, head.fingerprint["backbone"], str(weights_path),
                            file_sha256(weights_path), (), split)
        records = {name: records_for(source, chosen, rows.store) for name, chosen in rows.splits().items()}
        batches = ImageBatches(records.pop("train"), records, preprocessing, lower, torch_device,
                               shape=activation_shape(network, first, preprocessing.image_size, split),
                               recipe=ViewRecipe(config.crop_scale_min) if config.views else None,
                               workers=config.workers, seed=config.seed)
    if probe is None:
        probe = train_only_probe(head, rows.train.rows, config.probe_scale_floor)
    top, _ = prepare_top(network, head, config, probe, split)
    top.to(torch_device)
    parts = Tuning(
        top, network.get_submodule(split.classifier).state_dict(), optimizer_for(top, config), network.state_dict,
        network.load_state_dict, written=lambda best: best,  # the whole network: its classifier is the tuned probe
        test_accuracy=lambda run: accuracy(top, batches.eval_batches("test")) if rows.test is not None else None)
    options = finetune_options(config, batches, torch_device, epoch_setup(top, config), progress, "fine-tune", "img")
    return tune(parts, batches, options, head, config, rows, out, checkpoint_dir, keep_checkpoint,
                cache=str(cache_path) if cache_path else None, cache_seconds=cache_seconds)
