"""How to run an extraction: one options object, checked once, before any file is read, and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..configs import LAYER_CHOICES, ON_DUPLICATE_CHOICES, ON_ERROR_CHOICES, SplitRule, Tokenization
from ..store.hdf5 import DTYPES
from ..utils.devices import resolve_device
from ..utils.validation import check_choice, check_range


@dataclass(frozen=True)
class ExtractOptions:
    """The settings of an extraction (every keyword of ``extract_features`` but the loaded ``model``).

    ``weights``/``image_size``/``crop_pct`` shape an image backbone, ``tokenization`` a text one. ``batch_size``
    items go through the model at a time, decoded by ``workers`` DataLoader processes (None: chosen by the device,
    ``phases.auto_workers``). ``device`` is ``auto``, ``cpu``, ``cuda`` or a resolved :class:`torch.device`;
    ``engine`` ``auto``, ``torch`` or ``onnxruntime``; ``dtype`` the store's (float32 or float16). ``on_error``
    (``skip``/``fail``) decides what an item that cannot be read or decoded does, ``on_duplicate``
    (``warn``/``error``/``keep``) what identical files in two splits or under two labels do. ``wait=False`` fails at
    once when another process holds the store; ``progress`` shows progress bars. ``splits``: the val/test splits to
    make for data that lacks them (:class:`~featurestore.data.splits.SplitRule`, recorded in the store). ``exclude``:
    a corrections file (:mod:`featurestore.store.corrections`) whose items are left out or relabelled before the store
    is written (recorded in it; nothing is re-encoded). ``layers``: ``penultimate`` (the features the classifier
    reads) or ``all`` (the pooled output of every stage of an image backbone,
    :mod:`featurestore.encode.backbones.layers`; a store of its own, recorded in its fingerprint).
    """

    weights: str | Path | None = None
    image_size: int | None = None
    crop_pct: float | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str | torch.device = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    on_error: str = "skip"
    on_duplicate: str = "warn"
    wait: bool = True
    progress: bool = True
    tokenization: Tokenization | None = None
    splits: SplitRule | None = None
    exclude: str | Path | None = None
    layers: str = "penultimate"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        check_choice("on_duplicate", self.on_duplicate, ON_DUPLICATE_CHOICES)
        check_choice("layers", self.layers, LAYER_CHOICES)
        check_range("batch_size", self.batch_size, 1)
        if self.workers is not None:
            check_range("workers", self.workers, 0)

    def torch_device(self) -> torch.device:
        """``device`` as a :class:`torch.device` (``auto``: cuda when torch sees a GPU, else cpu; ``cuda`` without a
        GPU is an error)."""
        return self.device if isinstance(self.device, torch.device) else resolve_device(self.device)

    @classmethod
    def of(cls, options: ExtractOptions | None = None, **keywords) -> ExtractOptions:
        """``options`` (default: the defaults) with ``keywords`` in place of its fields; an unknown keyword is a
        ``TypeError`` naming it, as for any function."""
        unknown = sorted(set(keywords) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected extraction option(s): {', '.join(unknown)}")
        options = options or cls()
        return replace(options, **keywords) if keywords else options
