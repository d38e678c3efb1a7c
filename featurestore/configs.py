"""Choices and configuration dataclasses shared by the library, the stage scripts and the CLI.

Nothing heavy is imported here, so ``featurestore --help`` and the argument checks cost no torch or
scikit-learn import; the modules that do the work import their configs from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import FeaturestoreError

HEADS = ("logreg", "linear_svm", "svm_rbf")
NORMALIZATIONS = ("standard", "l2", "none")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ENGINE_CHOICES = ("auto", "torch", "onnxruntime")
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
STORE_DTYPES = ("float32", "float16")
ON_ERROR_CHOICES = ("skip", "fail")
ON_DUPLICATE_CHOICES = ("warn", "error", "keep")
FINETUNE_MODES = ("auto", "always", "never")
MIN_IMAGE_SIZE = 8


def option(default, help: str, choices: tuple | None = None):
    """A config field with the help text (and choices) its command-line option shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class HeadConfig:
    """How to train a head. The C grid is ``c_points`` values from ``c_min`` to ``c_max`` (log-spaced)."""

    head: str = option("logreg", "the head: multinomial logistic regression, linear SVM or RBF SVM", HEADS)
    normalize: str = option("standard", "feature standardisation, L2 normalisation, or none", NORMALIZATIONS)
    c_min: float = option(1e-6, "smallest C of the sweep")
    c_max: float = option(1e5, "largest C of the sweep")
    c_points: int = option(34, "log-spaced values of C in the sweep")
    max_iter: int = option(300, "solver iterations per fit")
    n_jobs: int = option(-1, "parallel segments of the sweep (-1: all cores; small sweeps run in-process)")
    calibration_folds: int = option(3, "cross-validation folds of the SVMs' probability calibration")
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise FeaturestoreError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.normalize not in NORMALIZATIONS:
            raise FeaturestoreError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if not (0 < self.c_min <= self.c_max) or self.c_points < 1:
            raise FeaturestoreError("need 0 < c_min <= c_max and c_points >= 1")

    def c_grid(self) -> np.ndarray:
        return np.logspace(np.log10(self.c_min), np.log10(self.c_max), self.c_points)


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (all part of the checkpoint's identity)."""

    unfreeze_blocks: int = option(2, "top MBConv blocks that train (plus the head convolution and classifier)")
    head_lr: float = option(3e-4, "learning rate of the classifier")
    backbone_lr_factor: float = option(0.1, "unfrozen blocks learn at head_lr × this")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    epochs: int = option(8, "epochs at most")
    batch_size: int = option(32, "images per step")
    patience: int = option(3, "epochs without a validation gain before stopping")
    train_batchnorm: bool = option(False, "let the BatchNorm statistics of unfrozen blocks move")
    augment: bool = option(True, "random resized crops and horizontal flips")
    crop_scale_min: float = option(0.6, "smallest area fraction of a random crop")
    seed: int = option(0, "random seed")
    workers: int = option(1, "DataLoader processes that decode images")
    # The baseline: the same architecture from random weights, every layer and BN statistic training
    # at head_lr (unfreeze_blocks, backbone_lr_factor and train_batchnorm are then ignored).
    from_scratch: bool = option(False, "train the same architecture from random weights (the baseline)")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
