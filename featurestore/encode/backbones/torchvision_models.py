"""Any torchvision classification model as a backbone, named ``tv:<model>`` (e.g. ``tv:resnet50``).

The family resolves names on demand (:func:`spec_for`): building the entry builds the network once, to find
its classifier. Weights come from the model's default torchvision weights enum. They are read from the local torch
hub cache; when absent, the real download is attempted and, offline, fails with a message that
names the missing file and how to point at a local copy with ``--weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ...errors import UnknownBackboneError, WeightsUnavailableError
from ..preprocess import Preprocessing
from .model import BackboneSpec

PREFIX = "tv:"


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
    """Path of the cached weights file, downloading it only if the network allows."""
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r} ({weights}) are not on this machine: expected {path}, "
            f"and downloading {weights.url} failed ({exc}). featurestore does not need the network: "
            f"fetch that file elsewhere, then copy it to {path} or pass it with --weights PATH."
        ) from exc
    return path


def build_classifier(model_name: str) -> nn.Module:
    """The architecture with random weights (never downloads)."""
    return get_model(model_name, weights=None)


def final_linear_name(model: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear`` in the module tree: the ImageNet classifier."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UnknownBackboneError(f"{type(model).__name__} has no linear classifier to remove")
    return names[-1]


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
    )
