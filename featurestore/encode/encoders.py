"""What extraction runs: items (one row each) and an encoder that turns a batch of items into features.

The extraction core (``extract.py``: identities, incremental reuse, the journal, the store) knows nothing
about images or texts. An :class:`Encoder` says everything modality-specific:

- ``fingerprint()``: what changes a feature value (the store's fingerprint);
- ``items(record, content_id)``: the rows one source record gives (one; or one per augmented view);
- ``dataset(items)``: a Dataset decoding item i to the model's input, in DataLoader workers;
- ``collate``: a batch of decoded items, with the failures set aside;
- ``runner(device)``: a callable batch → features (B, D) float32 numpy, with a ``name``;
- ``order(items)``: the order to run them in (texts: by length, to avoid padding waste).

:class:`ImageEncoder` is the frozen image backbone; ``trunk.py`` adds augmented views of the frozen trunk,
``text.py`` sentence encoders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.sources import Record
from .backbones import FeatureModel
from .engines import make_engine
from .fingerprint import fingerprint_for
from .images import DecodedImages, collate_decoded


@dataclass(frozen=True)
class Item:
    """One row to compute: ``id`` is the content hash of the file (or, for an augmented view, a hash derived
    from it and the view number), ``split`` the store split the row goes to."""

    id: str
    path: Path
    rel_path: str
    label: int
    split: str
    view: int = 0
    text: str | None = None  # a manifest's inline document (None: read the file)


def view_id(content_id: str, view: int) -> str:
    """The id of augmented view ``view`` (≥ 1) of a file: hex SHA-256, distinct per file and view."""
    return hashlib.sha256(f"{content_id}/view{view}".encode()).hexdigest()


class Runner(Protocol):
    name: str

    def __call__(self, batch: Any) -> np.ndarray: ...


class Encoder(Protocol):
    name: str
    feature_dim: int
    feature_shape: tuple[int, ...]

    def fingerprint(self) -> dict: ...

    def items(self, record: Record, content_id: str) -> list[Item]: ...

    def dataset(self, items: list[Item]) -> Dataset: ...

    def collate(self, batch: list) -> tuple[list[int], Any, list[tuple[int, str]]]: ...

    def runner(self, device: torch.device) -> Runner: ...

    def order(self, items: list[Item]) -> list[Item]: ...


class ImageEncoder:
    """A frozen image backbone (:class:`FeatureModel`): one pooled feature vector per image."""

    def __init__(self, model: FeatureModel, dtype: str, device: torch.device, engine: str = "auto"):
        self.model = model
        self.name = model.name
        self.feature_dim = model.feature_dim
        self.feature_shape = (model.feature_dim,)
        self.engine = engine
        self.autocast = device.type == "cuda" and engine != "onnxruntime"
        self.dtype = dtype

    def fingerprint(self) -> dict:
        return fingerprint_for(self.model, self.dtype, self.autocast)

    def items(self, record: Record, content_id: str) -> list[Item]:
        return [Item(content_id, record.path, record.rel_path, record.label, record.split)]

    def dataset(self, items: list[Item]) -> Dataset:
        return DecodedImages([item.path for item in items], self.model.preprocessing)

    collate: Callable = staticmethod(collate_decoded)

    def runner(self, device: torch.device) -> Runner:
        return make_engine(self.model, device, self.engine)

    def order(self, items: list[Item]) -> list[Item]:
        return items
