"""What an image backbone is: its registry entry (:class:`BackboneSpec`) and the frozen feature model built
from it (:class:`FeatureModel`: raw uint8 pixels in, pooled embeddings out)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..preprocess import Preprocessing


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build an image backbone and reproduce its features.

    ``build`` returns the classifier architecture with random weights; ``weights_file`` resolves the
    pretrained weights to a local file (raising :class:`WeightsUnavailableError` when absent);
    ``classifier`` is the dotted name of the final linear layer dropped for feature extraction.
    """

    name: str
    description: str
    weights_source: str
    preprocessing: Preprocessing
    feature_dim: int
    build: Callable[[], nn.Module]
    weights_file: Callable[[], Path]
    classifier: str
    # Default weights carry the ImageNet classifier (and must fit it); fine-tuned ones carry their own.
    imagenet_classifier: bool = True
    # Modules whose source defines the architecture: their digest is part of every fingerprint.
    code_modules: tuple[str, ...] = ()
    kind: str = "image"


class PixelNormalize(nn.Module):
    """uint8 or float pixels in [0, 255], (N, 3, H, W) → float32 ``(x/255 − mean) / std`` per channel."""

    def __init__(self, preprocessing: Preprocessing):
        super().__init__()
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std


class FeatureModel(nn.Module):
    """Normalisation + a pretrained trunk whose classifier was replaced by identity.

    Input: images (N, 3, H, W), uint8 or float in [0, 255]. Output: features (N, feature_dim) float32.
    Always in eval mode; the extraction code runs it under ``torch.inference_mode``.
    """

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        preprocessing: Preprocessing,
        name: str,
        weights_path: str,
        weights_sha256: str,
        code_modules: tuple[str, ...] = (),
    ):
        super().__init__()
        self.trunk = trunk
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing
        self.name = name
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.code_modules = tuple(code_modules)  # the architecture's source modules (see provenance.py)
        self.normalize = PixelNormalize(preprocessing)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(images)).float()
