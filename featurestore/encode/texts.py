"""Texts: reading documents, tokenising them into windows, and the sentence-encoder Encoder.

A document is a UTF-8 file (or a manifest's ``text`` cell). Other encodings are a failure with the
reason (the byte and its position), and so is an empty document; both are skipped like unreadable images.

Long documents (more tokens than the encoder's ``max_length``) are handled as the tokenisation says,
and that is part of the store's fingerprint:

- ``truncate``: the first ``max_length`` tokens ([CLS] and [SEP] included; ``side: left`` keeps the last);
- ``chunk-mean``: overlapping windows of ``max_length`` tokens (``stride`` tokens shared by neighbours, at
  most ``max_windows``), each encoded, their normalised embeddings averaged (``TextFeatureModel``).

Batches are sorted by length before encoding, so padding wastes little.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..configs import Tokenization
from ..data.sources import Record
from ..errors import ImageDecodeError
from ..store.hdf5 import SCHEMA_VERSION
from ..utils.provenance import feature_code_digest, library_versions
from .backbones.text_models import TextFeatureModel
from .encoders import Item, Runner


def read_text(path: Path) -> str:
    """A document's text. Raises :class:`ImageDecodeError` (path, reason) for non-UTF-8 or empty files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(str(path), f"cannot read file ({exc.strerror or exc})") from None
    return decode_text(raw, str(path))


def decode_text(raw: bytes, name: str) -> str:
    """A document file's bytes (those extraction already read to hash them) as text: UTF-8, a BOM stripped.
    Raises :class:`ImageDecodeError` (name, reason) for bytes that are not UTF-8 or hold no text."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImageDecodeError(name, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start}); "
                                     f"convert it to UTF-8") from None
    if not text.strip():
        raise ImageDecodeError(name, "empty document")
    return text


class Tokenizer:
    """The model's ``tokenizers`` tokenizer (its tokenizer.json, as a file or its text) configured for a
    :class:`Tokenization`: it truncates each text to ``max_length`` tokens ([CLS] and [SEP] included, on the
    tokenization's ``side``), hands the rest back as overflowing windows that share ``stride`` tokens with their
    neighbour (``chunk-mean``; ``stride`` 0 for ``truncate``), and pads on the right to a batch's longest text.

    :attr:`json` is that configured tokenizer and :attr:`windowing` how its encodings become the model's input:
    export embeds both, so ``tokenizers.Tokenizer.from_str(json).encode_batch(texts)`` gives a client exactly these
    windows. Call: list of texts → (ids (D, W, L) int64, mask (D, W, L) int64, truncated count)."""

    def __init__(self, tokenizer_file: Path | None, tokenization: Tokenization, tokenizer_json: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer = (HFTokenizer.from_str(tokenizer_json) if tokenizer_json is not None
                     else HFTokenizer.from_file(str(tokenizer_file)))
        chunk = tokenization.long_documents == "chunk-mean"
        tokenizer.enable_truncation(tokenization.max_length, stride=tokenization.stride if chunk else 0,
                                    direction="right" if chunk else tokenization.side)
        padding = tokenizer.padding or {}  # the model's own pad token, if its file names one
        pad_token = padding.get("pad_token", "[PAD]")
        self.pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
        # no fixed length (all-MiniLM-L6-v2's file pads every text to 128); right: position ids start at [CLS]
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=padding.get("pad_type_id", 0),
                                 pad_token=pad_token)
        self.tokenizer, self.tokenization = tokenizer, tokenization
        self.max_windows = tokenization.max_windows if chunk else 1
        self.json = tokenizer.to_str()
        self.cls_id = tokenizer.token_to_id("[CLS]")
        self.sep_id = tokenizer.token_to_id("[SEP]")

    @property
    def windowing(self) -> dict:
        """How encodings of :attr:`json` become the (D, W, L) input (export's ``featurestore_text_windows``)."""
        t = self.tokenization
        chunk = t.long_documents == "chunk-mean"
        return {"mode": t.long_documents, "max_length": t.max_length, "side": "right" if chunk else t.side,
                "stride": t.stride if chunk else 0, "max_windows": self.max_windows, "pad_id": self.pad_id,
                "windows": "a text's windows: [encoding, *encoding.overflowing][:max_windows] of encode_batch(texts)",
                "input": "input_ids, attention_mask int64 (N, W, L): W the most windows of a text in the batch, L the "
                         "batch's padded length; a text's missing windows are input_ids pad_id, attention_mask 0, "
                         "and the model leaves them out of the mean of its windows"}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        # one text at a time: encode_batch's thread pool would be forked into DataLoader workers; the padded
        # length is the same (every window of a text is padded to its first window, the longest)
        encodings = [self.tokenizer.encode(text) for text in texts]
        per_document = [[encoding, *encoding.overflowing][:self.max_windows] for encoding in encodings]
        shape = (len(texts), max(len(windows) for windows in per_document), max(len(e.ids) for e in encodings))
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        mask = np.zeros(shape, dtype=np.int64)
        for d, windows in enumerate(per_document):
            for w, encoding in enumerate(windows):
                ids[d, w, :len(encoding.ids)] = encoding.ids
                mask[d, w, :len(encoding.ids)] = encoding.attention_mask
        truncated = sum(len(encoding.overflowing) >= self.max_windows for encoding in encodings)
        return torch.from_numpy(ids), torch.from_numpy(mask), truncated


def item_text(item: Item | Record) -> str:
    """The text of an item: its manifest cell, or its file read as UTF-8."""
    text = getattr(item, "text", None)
    if text is not None:
        if not text.strip():
            raise ImageDecodeError(item.rel_path, "empty document")
        return text
    return read_text(item.path)


class TextDocuments(Dataset):
    """Item i → (i, text or None, failure reason or None)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, item_text(self.items[index]), None
        except ImageDecodeError as exc:
            return index, None, exc.reason


class TokenizingCollate:
    """DataLoader collate: texts → {"input_ids", "attention_mask"} (D, W, L) int64 and the truncated count."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        ok = [(index, text) for index, text, _ in items if text is not None]
        failed = [(index, reason) for index, text, reason in items if text is None]
        batch = None
        if ok:
            ids, mask, truncated = self.tokenizer([text for _, text in ok])
            batch = {"input_ids": ids, "attention_mask": mask, "truncated": truncated}
        return [index for index, _ in ok], batch, failed


class TextRunner:
    """Runs a :class:`TextFeatureModel` (eager torch, or its exported graph on onnxruntime) over batches from
    :class:`TokenizingCollate`; counts the documents it saw truncated. Call → (D, feature_dim) float32."""

    def __init__(self, model: TextFeatureModel, device: torch.device, engine: str = "auto"):
        from .text_engines import make_text_session

        self.model, self.device = model, device
        self.session = make_text_session(model, engine) if device.type == "cpu" else None
        self.name = "onnxruntime" if self.session is not None else "torch"
        self.truncated = 0
        if self.session is None:
            self.model.to(device)

    def __call__(self, batch: dict) -> np.ndarray:
        self.truncated += batch["truncated"]
        if self.session is not None:
            return self.session.run(None, {"input_ids": batch["input_ids"].numpy(),
                                           "attention_mask": batch["attention_mask"].numpy()})[0]
        with torch.inference_mode():
            return self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)).cpu().numpy()


class TextEncoder:
    """Encoder (see encoders.py) of a sentence encoder: one normalised embedding per document."""

    unit = "text"

    def __init__(self, model: TextFeatureModel, tokenization: Tokenization, dtype: str, engine: str = "auto"):
        self.model, self.tokenization, self.dtype, self.engine = model, tokenization, dtype, engine
        self.name = model.name
        self.feature_dim = model.feature_dim
        self.feature_shape = (model.feature_dim,)
        self.tokenizer = Tokenizer(model.model_dir / "tokenizer.json", tokenization)

    def fingerprint(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "text",
            "backbone": self.model.name,
            "weights_sha256": self.model.weights_sha256,
            "tokenizer_sha256": self.model.tokenizer_sha256,
            "layer": "last hidden state, mean-pooled over tokens, L2-normalised",
            "feature_dim": self.feature_dim,
            "tokenization": self.tokenization.as_dict(),
            "text_decoding": "UTF-8 (BOM stripped); empty documents skipped",
            "dtype": self.dtype,
            "compute": "float32",
            "code_sha256": feature_code_digest(self.model.code_modules),
            "libraries": {**library_versions(), **text_library_versions()},
        }

    def items(self, record: Record, content_id: str) -> list[Item]:
        return [Item(content_id, record.path, record.rel_path, record.label, record.split, text=record.text)]

    def dataset(self, items: list[Item]) -> Dataset:
        return TextDocuments(items)

    def decode(self, raw: bytes, item: Item | Record) -> str:
        """The model's input from an item's bytes: its text (a manifest's inline text as it is)."""
        if item.text is not None:
            if not item.text.strip():
                raise ImageDecodeError(item.rel_path, "empty document")
            return item.text
        return decode_text(raw, str(item.path))

    @property
    def collate(self):
        return TokenizingCollate(self.tokenizer)

    def runner(self, device: torch.device) -> Runner:
        return TextRunner(self.model, device, self.engine)

    def order(self, items: list[Item]) -> list[Item]:
        """Shortest first (by characters or file size): documents of similar length share a batch."""
        return sorted(items, key=_length)


def _length(item: Item | Record) -> int:
    """A document's characters or file size; 0 for a file that cannot be read, whose reader says why."""
    if item.text is not None:
        return len(item.text)
    try:
        return item.path.stat().st_size
    except OSError:
        return 0


def text_library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "tokenizers"):
        try:
            found[name] = f"{name} {version(name)}"
        except PackageNotFoundError:
            found[name] = "absent"
    return found
