"""The small CNN from scratch as a network (:class:`SmallCNN`) and as a deployable model (:class:`SmallCNNModel`): a
candidate of the verdict like the baselines, fitted by ``train-head --head small_cnn`` or the pipeline's
``small_cnn`` stage (``transfer.small_cnn.fit_small_cnn_model``), shipped by ``export`` as one ONNX graph
(``deploy.cnn_export``).

The model reads the pixels the pixel baseline and its graph read (``heads.baseline.pixel_features``: decoded as
``predict`` decodes an image, grey, [0, 1]), so its exported graph is the baseline's pixel front end followed by the
network. Unlike a head it is not refitted on train+val: its round is chosen on val. Saved in the one model file (kind
``small_cnn``): its architecture and metadata as JSON, its weights as tensors. Here, beside the model file, so that
export and the verdict load it without the training code (``transfer``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .baseline import gray_pixels
from .model_file import ModelDocument, load_model, save_model

SMALL_CNN_FORMAT = "small_cnn"  # its kind in a model file


class SmallCNN(nn.Module):
    """Pixels (B, 1, S, S) float32 in [0, 1] → logits (B, K) float32.

    The input is standardised by ``mean`` and ``std`` (buffers: the train subset's), then per width ``w`` of
    ``widths`` a block of ``convs`` 3×3 conv-BN-ReLU layers of ``w`` channels and a 2× max-pool; then either
    (``hidden`` > 0) the flattened maps → dropout → ``hidden`` units, ReLU → dropout → classifier, or (``hidden``
    0) global average pooling → dropout → classifier. The defaults (widths 32, 64; one conv each; 128 hidden
    units) at 28 px: 421,738 parameters, most of them in the hidden layer (7 × 7 × 64 → 128)."""

    def __init__(self, classes: int, widths: tuple[int, ...] = (32, 64), convs: int = 1, hidden: int = 128,
                 dropout: float = 0.3, image_size: int = 28, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        layers: list[nn.Module] = []
        channels = 1
        for width in widths:
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size >> len(widths)
        head: list[nn.Module] = (
            [nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * side * side, hidden), nn.ReLU(inplace=True),
             nn.Dropout(dropout), nn.Linear(hidden, classes)] if hidden
            else [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, classes)])
        self.classifier = nn.Sequential(*head)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((pixels - self.mean) / self.std))


@dataclass
class SmallCNNModel:
    """A trained :class:`~.small_cnn.SmallCNN`: uint8 images (N, 3, S, S) as ``predict`` decodes them → probabilities
    over ``class_names``. ``architecture``: SmallCNN's constructor arguments; ``weights``: its state dict as numpy
    arrays. ``val_accuracy``: its kept round's on the ``n_val`` val items; ``val_answers``: content id → right, for
    the verdict's paired test (the same network: it is not refitted)."""

    MODEL_KIND = SMALL_CNN_FORMAT
    kind = "small_cnn"
    architecture: dict
    weights: dict[str, np.ndarray]
    class_names: list[str]
    backbone: str  # the store (data set) it was fitted on, as the baselines name theirs
    val_accuracy: float
    n_val: int
    n_train: int
    lr: float
    store_fingerprint_hash: str = ""
    store_path: str = ""
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    val_answers: dict[str, bool] = field(default_factory=dict)
    corrections: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.backbone}__small_cnn"

    @property
    def modality(self) -> str:
        return "image"

    @property
    def image_size(self) -> int:
        return int(self.architecture["image_size"])

    def network(self) -> SmallCNN:
        """The network in eval mode on the CPU, its weights loaded."""
        network = SmallCNN(**self.architecture)
        network.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in self.weights.items()})
        return network.eval()

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, 3, S, S) → grey pixels (N, S·S) float32 in [0, 1] (the pixel baseline's)."""
        return gray_pixels(images)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) float64 of uint8 images (N, 3, S, S); column k is ``class_names[k]``."""
        pixels = torch.from_numpy(self.features(images)).view(-1, 1, self.image_size, self.image_size)
        with torch.inference_mode():
            return torch.softmax(self.network()(pixels), dim=1).double().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.argmax(self.predict_proba(images), axis=1).astype(np.int64)

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model": "small CNN from scratch", "lr": self.lr,
                "classes": len(self.class_names), "val_accuracy": self.val_accuracy, "n_val": self.n_val,
                "n_train": self.n_train, "train_seconds": round(self.train_seconds, 3)}

    def save(self, path: str | Path) -> Path:
        return save_model(self, path)

    def to_model_document(self) -> ModelDocument:
        metadata = {key: value for key, value in asdict(self).items() if key != "weights"}
        return ModelDocument(kind=SMALL_CNN_FORMAT, metadata=metadata,
                             tensors={f"weight::{name}": np.asarray(value) for name, value in self.weights.items()})

    @classmethod
    def from_model_document(cls, document: ModelDocument) -> SmallCNNModel:
        weights = {name.removeprefix("weight::"): value for name, value in document.tensors.items()}
        return cls(weights=weights, **document.metadata)


def load_small_cnn(path: str | Path) -> SmallCNNModel:
    return load_model(path, kind=SMALL_CNN_FORMAT)
