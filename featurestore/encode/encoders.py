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
from ..errors import ImageDecodeError
from .backbones import FeatureModel
from .engines import make_engine
from .fingerprint import fingerprint_for
from .images import DecodedImages, collate_decoded, decode_image


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

    def __init__(self, model: FeatureModel, dtype: str, device: torch.device, engine: str = "auto",
                 autocast: bool | None = None):
        self.model = model
        self.name = model.name
        self.feature_dim = model.feature_dim
        self.feature_shape = (model.feature_dim,)
        self.engine = engine
        cuda_torch = device.type == "cuda" and engine != "onnxruntime"
        self.autocast = cuda_torch if autocast is None else (autocast and cuda_torch)  # in the fingerprint
        self.dtype = dtype

    def fingerprint(self) -> dict:
        return fingerprint_for(self.model, self.dtype, self.autocast)

    def items(self, record: Record, content_id: str) -> list[Item]:
        return [Item(content_id, record.path, record.rel_path, record.label, record.split)]

    def dataset(self, items: list[Item]) -> Dataset:
        return DecodedImages([item.path for item in items], self.model.preprocessing)

    def decode(self, raw: bytes, item: Item | Record) -> torch.Tensor:
        """The model's input from an image file's bytes: uint8 (3, S, S), or (1, S, S) for a grayscale image (the
        engine expands it: a third of the bytes through the worker queue and to the device)."""
        return self.model.preprocessing(decode_image(raw, str(item.path)), gray_channels=1)

    collate: Callable = staticmethod(collate_decoded)

    def runner(self, device: torch.device) -> Runner:
        return make_engine(self.model, device, self.engine, self.autocast)

    def order(self, items: list[Item]) -> list[Item]:
        return items


def item_bytes(record: Record) -> bytes:
    """The bytes that identify a record's content: its file's, or its inline text as UTF-8."""
    return record.text.encode("utf-8") if record.text is not None else record.path.read_bytes()


class HashingDataset(Dataset):
    """Record i → (i, content id or None, model input or None, failure reason or None), in DataLoader workers:
    each file is read once, hashed (its identity in the store) and, unless its id is in ``known`` (rows the store
    or the journal already hold), decoded from the same bytes by ``decode(raw, record)``. A file that cannot be
    read has no id; one that does not decode has an id and a reason."""

    def __init__(self, records: list[Record], decode: Callable[[bytes, Record], Any], known: frozenset[str]):
        self.records, self.decode, self.known = records, decode, known

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            raw = item_bytes(record)
        except FileNotFoundError:
            return index, None, None, "file not found"
        except OSError as exc:
            return index, None, None, f"cannot read file ({exc.strerror or exc})"
        cid = hashlib.sha256(raw).hexdigest()
        if cid in self.known:
            return index, cid, None, None
        try:
            return index, cid, self.decode(raw, record), None
        except ImageDecodeError as exc:
            return index, cid, None, exc.reason
        except Exception as exc:  # a decoder bug must cost one item, not the run
            return index, cid, None, f"cannot preprocess ({type(exc).__name__}: {exc})"


class HashedCollate:
    """DataLoader collate for :class:`HashingDataset`: → (ids {index: content id} of every item that read,
    indices of the decoded ones, their batch from the encoder's ``collate`` (or None), [(index, reason)] of those
    that failed)."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items):
        ids = {index: cid for index, cid, _, _ in items if cid is not None}
        decoded = [(index, value, None) for index, cid, value, _ in items if value is not None]
        failed = [(index, reason) for index, _, value, reason in items if value is None and reason is not None]
        indices, batch, more = self.collate(decoded) if decoded else ([], None, [])
        return ids, indices, batch, failed + more
