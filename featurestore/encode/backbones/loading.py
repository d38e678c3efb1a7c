"""Building a backbone from its registry entry: the pretrained classifier, the frozen image feature model and
the frozen sentence encoder. Each takes an entry (resolved once per command) or a name."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ...errors import BadValueError, UnknownBackboneError, WeightsUnavailableError
from .model import BackboneSpec, FeatureModel
from .registry import DEFAULT_BACKBONE, Spec, get_spec
from .text_models import OFFLINE, TOKENIZER_FILES, TextBackboneSpec, TextFeatureModel, files_sha256
from .weights import file_sha256, load_strict, read_state_dict


def _spec(backbone: str | Spec) -> Spec:
    return get_spec(backbone) if isinstance(backbone, str) else backbone


def load_classifier(backbone: str | BackboneSpec,
                    weights: str | Path | None = None) -> tuple[BackboneSpec, nn.Module, Path]:
    """The full pretrained classifier (ImageNet logits), strictly loaded, in eval mode; its entry and the
    weights file it came from."""
    spec = _spec(backbone)
    if spec.kind != "image":
        raise UnknownBackboneError(f"{spec.name!r} is a text backbone: it has no image classifier")
    path = Path(weights) if weights is not None else spec.weights_file()
    model = spec.build()
    # The packaged ImageNet weights must fit completely; a user checkpoint may lack the classifier.
    exempt = weights is not None or not spec.imagenet_classifier
    load_strict(model, read_state_dict(path), str(path), classifier=spec.classifier if exempt else None)
    return spec, model.eval(), path


def load_backbone(
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
) -> FeatureModel:
    """A frozen :class:`FeatureModel` on the CPU.

    ``weights`` replaces the default pretrained weights with a local checkpoint;
    ``image_size``/``crop_pct`` override the backbone's native preprocessing.
    """
    spec = _spec(backbone)
    native = spec.preprocessing.image_size if spec.kind == "image" else None
    if getattr(spec, "fixed_input_size", False) and image_size is not None and int(image_size) != native:
        raise BadValueError(f"{spec.name} takes {native}×{native} images only (its input size is fixed): "
                            f"pass --image-size {native} or leave it out")
    spec, model, path = load_classifier(spec, weights)
    parent_name, _, leaf = spec.classifier.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, nn.Identity())
    return FeatureModel(
        trunk=model,
        feature_dim=spec.feature_dim,
        preprocessing=spec.preprocessing.with_overrides(image_size, crop_pct),
        name=spec.name,
        weights_path=str(path),
        weights_sha256=file_sha256(path),
        code_modules=spec.code_modules,
    )


def load_text_backbone(backbone: str | TextBackboneSpec, weights: str | Path | None = None) -> TextFeatureModel:
    """The sentence encoder, frozen, on the CPU (loaded with the offline switches on). ``weights`` (or the entry's
    own ``weights_file``) is a state dict of the encoder that replaces the packaged weights, and its hash the
    weights' identity."""
    spec = _spec(backbone)
    if spec.kind != "text":
        raise WeightsUnavailableError(f"{spec.name!r} is an image backbone, not a sentence encoder")
    folder = spec.model_dir()
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoder = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    checkpoint = Path(weights) if weights is not None else spec.weights_file
    if checkpoint is not None:
        load_strict(encoder, read_state_dict(checkpoint), str(checkpoint))
    weights_sha256 = file_sha256(checkpoint if checkpoint is not None else folder / "model.safetensors")
    return TextFeatureModel(encoder, spec, weights_sha256, files_sha256(folder, TOKENIZER_FILES), folder)
