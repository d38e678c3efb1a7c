"""Images: decoding any file to 8-bit RGB (or L), and the decoded-image Dataset that extraction and
prediction feed through DataLoader workers.

This module is part of the feature path: its source is in every store's fingerprint (see
``provenance.py``), so an edit here never reuses features decoded by the old code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ImageDecodeError
from .preprocess import Preprocessing

RGB_CONVERSION = "alpha over white; 16-bit scaled by 255/65535; CMYK, palette, grayscale via PIL"


def to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit "RGB", or "L" for single-channel images (cheaper to resize; the
    preprocessing replicates it to three equal channels, which is what RGB conversion gives).
    16-bit data is scaled (not clipped); transparency is laid on white."""
    if image.mode in ("RGB", "L"):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit grayscale (I;16*, or I holding 16-bit values): scale 0..65535 to 0..255.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode an image file fully, as "RGB" or (single-channel sources) "L".

    Raises :class:`ImageDecodeError` with the path and the reason.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    return decode_image(raw, str(path))


def decode_image(raw: bytes, name: str) -> Image.Image:
    """Decode an image file's bytes fully (the bytes extraction already read to hash them), as "RGB" or "L".

    Raises :class:`ImageDecodeError` with ``name`` and the reason.
    """
    if not raw:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return to_rgb_or_gray(image)
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (format not recognised)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(name, f"corrupt or truncated image ({exc})") from None


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file as 8-bit RGB (see :func:`load_image` for errors)."""
    return load_image(path).convert("RGB")


class DecodedImages(Dataset):
    """Decodes and preprocesses images in DataLoader workers.

    Item: ``(index, uint8 tensor (3, S, S) or None, failure reason or None)``.
    """

    def __init__(self, paths: list[Path], preprocessing: Preprocessing):
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocessing(load_image(self.paths[index])), None
        except ImageDecodeError as exc:
            return index, None, exc.reason
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return index, None, f"cannot preprocess ({type(exc).__name__}: {exc})"


def collate_decoded(items):
    """→ (indices of decoded images, uint8 batch (B, C, S, S) or None, [(index, reason)] failures).

    Grayscale images may come as one channel (``Preprocessing(..., gray_channels=1)``): a batch of only those
    stays (B, 1, S, S), and the model side expands it (bit-identical to three equal channels, a third of the
    bytes through the worker queue and to the device); in a mixed batch they are expanded here."""
    ok = [(index, tensor) for index, tensor, _ in items if tensor is not None]
    failed = [(index, reason) for index, tensor, reason in items if tensor is None]
    if not ok:
        return [], None, failed
    tensors = [tensor for _, tensor in ok]
    if len({t.shape[0] for t in tensors}) > 1:
        tensors = [t.expand(3, -1, -1) for t in tensors]
    return [index for index, _ in ok], torch.stack(tensors), failed


def lower_worker_priority(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: run decoding only on CPU time the model leaves idle.

    Decoding is cheap next to the model, but on a small CPU a decoder competing with the model's
    threads stalls them (each parallel step waits for its slowest thread). SCHED_IDLE lets the
    worker fill the model's gaps; the prefetch queue absorbs the timing.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted
        try:
            os.nice(19)
        except OSError:
            pass
