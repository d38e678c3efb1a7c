"""What an image backbone is: its registry entry (:class:`BackboneSpec`), how its network splits into ordered
blocks for fine-tuning (:class:`BlockSplit`), and the frozen feature model built from it (:class:`FeatureModel`:
raw uint8 pixels in, pooled embeddings out)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...utils.provenance import forward_modules
from ..preprocess import Preprocessing

Step = str | Callable[[torch.Tensor], torch.Tensor]  # a dotted module name, or a function without parameters


def pool_flatten(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: activations (N, C, H, W) → (N, C), same dtype."""
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, 1) or (N, …) → (N, C·…), same dtype."""
    return torch.flatten(x, 1)


@dataclass(frozen=True)
class BlockSplit:
    """How an image classifier splits into ordered blocks: what fine-tuning unfreezes from the top, and where the
    trunk cache cuts it.

    The network computes ``head(blocks[-1](… blocks[0](stem(x))))``: ``stem`` maps normalised images
    (N, 3, S, S) float32 to the first block's input, each block maps activations (N, C, H, W) float32 to the next
    block's, and ``head`` maps the last block's output to logits (N, K) through ``classifier``, the dotted name of
    the final linear layer (the one feature extraction drops and the linear probe replaces). ``stem`` and ``head``
    are steps applied in order: a dotted module name of the network, or a function without parameters (an
    activation, a pooling). ``blocks`` are dotted module names, bottom to top; ``name.*`` stands for every child of
    ``name``, in order (torchvision's ``features.*``). Cutting below block k, the frozen trunk is the stem and
    blocks ``[0, k)``; blocks ``[k, n)`` and every parameter of the head's modules (a head convolution, the
    classifier) train.
    """

    blocks: tuple[str, ...]
    classifier: str
    stem: tuple[Step, ...] = ()
    head: tuple[Step, ...] = ()
    family: str = ""  # what the split was declared for, as error messages name it

    def block_names(self, network: nn.Module) -> list[str]:
        """The blocks' dotted names in ``network``, bottom to top (``name.*`` expanded)."""
        names = []
        for entry in self.blocks:
            if entry.endswith(".*"):
                parent = entry[:-2]
                names.extend(f"{parent}.{child}" for child, _ in network.get_submodule(parent).named_children())
            else:
                names.append(entry)
        return names

    def head_modules(self) -> tuple[str, ...]:
        """Dotted names of the head's modules (their parameters train with the top blocks)."""
        return tuple(step for step in self.head if isinstance(step, str))


def run_steps(network: nn.Module, steps: tuple[Step, ...], x: torch.Tensor) -> torch.Tensor:
    """Apply ``steps`` (module names of ``network`` or parameterless functions) to ``x`` in order."""
    for step in steps:
        x = network.get_submodule(step)(x) if isinstance(step, str) else step(x)
    return x


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
    # Modules whose source defines the architecture: with the modules of the network's classes (FeatureModel's
    # code_modules), their digest is part of every fingerprint.
    code_modules: tuple[str, ...] = ()
    kind: str = "image"
    # How the network splits into blocks for fine-tuning (None: its family declares no split; it cannot fine-tune).
    blocks: BlockSplit | None = None
    # The network takes its preprocessing's image size only (a ViT's position embedding fixes it).
    fixed_input_size: bool = False


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
        self.normalize = PixelNormalize(preprocessing)
        # The source modules the forward runs: the declared architecture's and those of every submodule's class.
        self.code_modules = forward_modules(self, code_modules)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(images)).float()
