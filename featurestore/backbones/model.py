"""The frozen feature model: raw uint8 pixels in, pooled embeddings out."""

from __future__ import annotations

import torch
from torch import nn

from ..preprocess import Preprocessing


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
