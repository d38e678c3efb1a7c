"""The front door of extraction: :func:`extract_features` builds the encoder of a backbone (resolved once) and
runs the phases in this process, or this rank's share under torchrun (``distributed.py``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..configs import Tokenization
from ..data.sources import Source
from ..data.splits import make_splits, scan_with_splits
from ..encode.backbones import (
    DEFAULT_BACKBONE,
    FeatureModel,
    TextBackboneSpec,
    get_spec,
    load_backbone,
    load_text_backbone,
)
from ..encode.encoders import ImageEncoder
from ..encode.text_layers import sentence_encoder
from ..encode.texts import TextEncoder
from ..errors import DataError
from ..store.corrections import Corrections, read_corrections
from .distributed import extract_distributed, torchrun_group
from .options import ExtractOptions
from .phases import ExtractSummary, extract_with


def extract_features(data: str | Path | Source, out: str | Path, backbone: str = DEFAULT_BACKBONE, *,
                     options: ExtractOptions | None = None, model: FeatureModel | None = None,
                     **keywords) -> ExtractSummary | None:
    """Extract features of every item (image or text document) in ``data`` into the store ``out``.

    How is ``options`` (:class:`ExtractOptions`), with any of its fields given as ``keywords`` in its place
    (``extract_features(data, out, backbone, batch_size=16, workers=0)``); they are checked here, once, before any
    file is read, and passed down whole. The backbone's kind decides the modality; its name is resolved once, here.
    ``model`` may be passed to reuse a loaded image backbone (``backbone`` and the options ``weights``,
    ``image_size`` and ``crop_pct`` are then ignored); ``weights`` is a local checkpoint (an image backbone's state
    dict, or a fine-tuned sentence encoder's); ``tokenization`` sets how a text backbone sees long documents.
    ``engine`` is ``auto``, ``torch`` or ``onnxruntime`` (see :mod:`featurestore.encode.engines`). Raises
    :class:`ImageDecodeError` on the first bad item when ``on_error="fail"``, after saving every finished batch in
    the journal. ``on_duplicate`` decides what identical files in two splits or under two labels do: ``warn``
    (default), ``error`` or ``keep``; they are listed in the store either way. ``wait=False`` fails at once when
    another process holds the store. Returns the summary (None on a torchrun rank other than 0).
    """
    options = ExtractOptions.of(options, **keywords)
    spec = None if model is not None else get_spec(backbone)  # an unknown name fails before any file is read
    source = make_splits(data, options.splits) if isinstance(data, Source) else scan_with_splits(data, options.splits)
    if options.exclude is not None:  # after the split draw, so that dropping items moves no other item's split
        source = corrected_source(source, read_corrections(options.exclude))
    options = replace(options, device=options.torch_device())  # resolved once: every layer below runs on it
    if spec is not None and spec.kind == "text":
        encoder = text_encoder(spec, options)
    else:
        if options.tokenization is not None:
            raise DataError(f"{backbone} is an image backbone: text tokenization options do not apply to it")
        model = model or load_backbone(spec, weights=options.weights, image_size=options.image_size,
                                       crop_pct=options.crop_pct, layers=options.layers)
        encoder = ImageEncoder(model, options.dtype, options.device, options.engine)
    group = torchrun_group()
    if group is not None:  # launched by torchrun: this rank's share (None off rank 0)
        return extract_distributed(encoder, source, out, group, options)
    return extract_with(encoder, source, out, options)


def text_encoder(spec: TextBackboneSpec, options: ExtractOptions) -> TextEncoder:
    """The :class:`~featurestore.encode.texts.TextEncoder` of a sentence encoder (``options.weights``: a fine-tuned
    encoder's state dict); image-only options are an error."""
    given = [name for name in ("image_size", "crop_pct") if getattr(options, name) is not None]
    if given:
        raise DataError(f"{spec.name} is a text backbone: {', '.join(given)} apply to image backbones only")
    return sentence_encoder(load_text_backbone(spec, options.weights), options.tokenization or Tokenization(),
                            options.dtype, options.engine, options.layers)


def corrected_source(source: Source, corrections: Corrections) -> Source:
    """``source`` without the items ``corrections`` drops and with the labels it gives (``store.corrections``),
    matched by relative path; what was applied is recorded as ``source.corrections``. Raises :class:`DataError` when
    no path of the file is an item of the source, :class:`BadValueError` for a label that is not a class."""
    corrections.check_known({record.rel_path for record in source.records}, str(source.manifest or source.root))
    kept, relabelled = [], 0
    for record in source.records:
        if record.rel_path in corrections.drop:
            continue
        if record.rel_path in corrections.relabel:
            label = corrections.label_index(record.rel_path, source.class_names)
            relabelled += label != record.label
            record = replace(record, label=label)
        kept.append(record)
    applied = corrections.record(len(source.records) - len(kept), relabelled)
    return replace(source, records=kept, corrections=applied)
