"""The front door of extraction: :func:`extract_features` builds the encoder of a backbone (resolved once) and
runs the phases in this process, or this rank's share under torchrun (``distributed.py``)."""

from __future__ import annotations

from pathlib import Path

from ..configs import Tokenization
from ..data.sources import Source, scan_source
from ..encode.backbones import (
    DEFAULT_BACKBONE,
    FeatureModel,
    TextBackboneSpec,
    get_spec,
    load_backbone,
    load_text_backbone,
)
from ..encode.encoders import ImageEncoder
from ..encode.texts import TextEncoder
from ..errors import DataError
from ..utils.devices import resolve_device
from .distributed import extract_distributed, rank_device, torchrun_group
from .phases import ExtractSummary, check_options, extract_with


def extract_features(
    data: str | Path | Source,
    out: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    engine: str = "auto",
    dtype: str = "float32",
    on_error: str = "skip",
    on_duplicate: str = "warn",
    wait: bool = True,
    progress: bool = True,
    model: FeatureModel | None = None,
    tokenization: Tokenization | None = None,
) -> ExtractSummary | None:
    """Extract features of every item (image or text document) in ``data`` into the store ``out``.

    The backbone's kind decides the modality; its name is resolved once, here. ``model`` may be passed to reuse
    a loaded image backbone (``backbone``/``weights``/``image_size``/``crop_pct`` are then ignored);
    ``weights`` is a local checkpoint (an image backbone's state dict, or a fine-tuned sentence encoder's);
    ``tokenization`` sets how a text backbone sees long documents. ``engine`` is ``auto``, ``torch`` or
    ``onnxruntime`` (see :mod:`featurestore.encode.engines`). Raises :class:`ImageDecodeError` on the first bad
    item when ``on_error="fail"``, after saving every finished batch in the journal. ``on_duplicate`` decides
    what identical files in two splits or under two labels do: ``warn`` (default), ``error`` or ``keep``; they
    are listed in the store either way. ``wait=False`` fails at once when another process holds the store.
    """
    check_options(dtype, on_error, on_duplicate, batch_size, workers)
    spec = None if model is not None else get_spec(backbone)  # an unknown name fails before any file is read
    source = data if isinstance(data, Source) else scan_source(data)
    torch_device = resolve_device(device)
    if spec is not None and spec.kind == "text":
        encoder = text_encoder(spec, tokenization, dtype, engine, weights=weights, image_size=image_size,
                               crop_pct=crop_pct)
    else:
        if tokenization is not None:
            raise DataError(f"{backbone} is an image backbone: text tokenization options do not apply to it")
        model = model or load_backbone(spec, weights=weights, image_size=image_size, crop_pct=crop_pct)
        encoder = ImageEncoder(model, dtype, torch_device, engine)
    options = {"dtype": dtype, "batch_size": batch_size, "workers": workers, "on_error": on_error,
               "on_duplicate": on_duplicate, "wait": wait, "progress": progress}
    group = torchrun_group()
    if group is not None:  # launched by torchrun: this rank's share (None off rank 0)
        return extract_distributed(encoder, source, out, group, device=rank_device(group, device), **options)
    return extract_with(encoder, source, out, device=torch_device, **options)


def text_encoder(spec: TextBackboneSpec, tokenization: Tokenization | None, dtype: str, engine: str,
                 weights: str | Path | None = None, **image_options) -> TextEncoder:
    """The :class:`~featurestore.encode.texts.TextEncoder` of a sentence encoder (``weights``: a fine-tuned
    encoder's state dict); image-only options are an error."""
    given = [name for name, value in image_options.items() if value is not None]
    if given:
        raise DataError(f"{spec.name} is a text backbone: {', '.join(given)} apply to image backbones only")
    return TextEncoder(load_text_backbone(spec, weights), tokenization or Tokenization(), dtype, engine)
