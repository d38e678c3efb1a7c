"""Choosing the torch device."""

from __future__ import annotations

import torch

from .configs import DEVICE_CHOICES
from .errors import FeaturestoreError


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    if device not in DEVICE_CHOICES:
        raise FeaturestoreError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeaturestoreError(
            "--device cuda was asked for, but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    return torch.device(device)
