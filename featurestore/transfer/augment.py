"""The training augmentation: a random resized crop and a horizontal flip, drawn from a given generator.

Cached views (``trunk.py``) draw each view from a generator seeded by (seed, view id), so view k of an
image is the same pixels in every run, on every worker and after a resume; training from images draws
from a per-epoch generator instead. Both call :func:`random_view`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..encode.preprocess import INTERPOLATIONS, Preprocessing

ASPECT_RANGE = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewRecipe:
    """How an augmented view is made: crop area fraction in [``crop_scale_min``, 1], aspect ratio in
    [3/4, 4/3] (log-uniform), a flip with probability ``flip``, then a resize to the model's input size."""

    crop_scale_min: float = 0.6
    flip: float = 0.5

    def as_dict(self) -> dict:
        return {**asdict(self), "aspect": list(ASPECT_RANGE), "attempts": 10}


def view_rng(seed: int, item_id: str) -> np.random.Generator:
    """A generator for one view, from the run's seed and the view's id (independent of order and worker)."""
    digest = hashlib.sha256(f"{seed}/{item_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_crop_box(width: int, height: int, recipe: ViewRecipe, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop; the whole image when 10 draws do not fit."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(recipe.crop_scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return 0, 0, width, height


def random_view(image: Image.Image, preprocessing: Preprocessing, recipe: ViewRecipe,
                rng: np.random.Generator) -> Image.Image:
    """A random resized crop of ``image``, maybe flipped, resized to the model's input (size × size)."""
    image = image.crop(random_crop_box(*image.size, recipe, rng))
    if rng.random() < recipe.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = preprocessing.image_size
    return image.resize((size, size), INTERPOLATIONS[preprocessing.interpolation])
