"""Deterministic evaluation preprocessing: resize the shorter side, centre-crop, to uint8 CHW.

Normalisation (mean/std) is not applied here but inside the feature model, so worker processes
ship compact uint8 tensors and an exported graph can take raw pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from ..configs import MIN_IMAGE_SIZE
from ..utils.validation import check_choice, check_range

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes model input.

    The shorter side is resized to ``round(image_size / crop_pct)`` with ``interpolation``, then the
    centre ``image_size`` square is cropped. ``mean``/``std`` apply to pixels scaled to [0, 1].
    """

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        check_range("image_size", self.image_size, MIN_IMAGE_SIZE)
        check_range("crop_pct", self.crop_pct, 0.0, 1.0, low_open=True)
        check_choice("interpolation", self.interpolation, sorted(INTERPOLATIONS))

    @property
    def resize_size(self) -> int:
        return int(round(self.image_size / self.crop_pct))

    def with_overrides(self, image_size: int | None = None, crop_pct: float | None = None) -> Preprocessing:
        """A copy with the input size and/or crop fraction replaced (None keeps the current value)."""
        return replace(
            self,
            image_size=self.image_size if image_size is None else int(image_size),
            crop_pct=self.crop_pct if crop_pct is None else float(crop_pct),
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        d["resize_size"] = self.resize_size
        d["crop"] = "center"
        return d

    @classmethod
    def from_dict(cls, saved: dict) -> Preprocessing:
        """The inverse of :meth:`as_dict` (derived keys such as ``resize_size`` are recomputed)."""
        return cls(
            image_size=int(saved["image_size"]),
            crop_pct=float(saved["crop_pct"]),
            interpolation=saved["interpolation"],
            mean=tuple(float(v) for v in saved["mean"]),
            std=tuple(float(v) for v in saved["std"]),
        )

    def as_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    def __call__(self, image: Image.Image, gray_channels: int = 3) -> torch.Tensor:
        """RGB or L PIL image → uint8 tensor (3, image_size, image_size); L becomes 3 equal channels, or with
        ``gray_channels=1`` stays one (1, S, S), for the model side to expand."""
        width, height = image.size
        # As torchvision's Resize(int) and CenterCrop compute them (timm's eval transform is those two): the long
        # side truncated, the crop offset rounded (half to even).
        short, long = sorted((width, height))
        resized_long = max(self.image_size, int(self.resize_size * long / short))
        new_w, new_h = (self.resize_size, resized_long) if width <= height else (resized_long, self.resize_size)
        new_w, new_h = max(self.image_size, new_w), max(self.image_size, new_h)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
        if (new_w, new_h) != (self.image_size, self.image_size):
            left = int(round((new_w - self.image_size) / 2.0))
            top = int(round((new_h - self.image_size) / 2.0))
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            channels = np.empty((gray_channels, *array.shape), dtype=np.uint8)
            channels[:] = array  # a writable copy, each channel the gray image
            return torch.from_numpy(channels)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
