"""Choosing the torch device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FeaturestoreError
from .validation import check_choice

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    check_choice("device", device, DEVICE_CHOICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeaturestoreError(
            "--device cuda was asked for, but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    return torch.device(device)
