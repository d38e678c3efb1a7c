"""Building a backbone from its registry entry: the pretrained classifier, the frozen image feature model and
the frozen sentence encoder. Each takes an entry (resolved once per command) or a name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ...errors import BadValueError, UnknownBackboneError, WeightsMismatchError, WeightsUnavailableError
from .layers import LayeredFeatureModel, LayerTaps, chosen_layers
from .model import BackboneSpec, FeatureModel
from .registry import DEFAULT_BACKBONE, Spec, get_spec
from .text_models import OFFLINE, TOKENIZER_FILES, TextBackboneSpec, TextFeatureModel, files_sha256
from .weights import file_sha256, known_checkpoint, load_strict, read_state_dict, remember_checkpoint


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
    remember_checkpoint(path, file_sha256(path))  # where a store's fingerprint (its hash) finds it again
    return spec, model.eval(), path


def recorded_weights(backbone: str | BackboneSpec, sha256: str, weights: str | Path | None = None,
                     built: str = "the features") -> Path:
    """The checkpoint whose SHA-256 a store's fingerprint records (``sha256``; a head keeps its store's), for every
    command that rebuilds that backbone (fine-tune, curve, verify, export); never downloads.

    ``weights`` given: that file, refused unless its hash is ``sha256``. Otherwise the file this machine last loaded
    with that hash (what ``extract --weights`` read), when it still holds those bytes, else the backbone's own
    weights when they are on this machine and are those. ``built`` names what was built with them in the one-line
    error (e.g. ``"head tv:mobilenet_v2__logreg"``), which says which file that was and asks for ``--weights``.
    """
    spec = _spec(backbone)
    if spec.kind != "image":
        raise UnknownBackboneError(f"{spec.name!r} is a text backbone: its weights are its folder's or --weights'")
    if weights is not None:
        given = Path(weights)
        if not given.is_file():
            raise WeightsUnavailableError(f"{given}: weights file not found")
        if file_sha256(given) != sha256:
            raise WeightsMismatchError(
                f"{given}: these weights (sha256 {file_sha256(given)[:12]}…) are not the ones {built} was built with "
                f"(sha256 {sha256[:12]}…); pass --weights with that checkpoint")
        return given
    noted = known_checkpoint(sha256)
    if noted is not None and noted.is_file() and file_sha256(noted) == sha256:
        return noted
    try:
        default = spec.weights_file()
    except WeightsUnavailableError as exc:  # not on this machine: the file to ask for is the recorded one, if any
        if noted is None:
            raise WeightsUnavailableError(
                f"{built} was built with weights of sha256 {sha256[:12]}…, not a file featurestore has loaded on "
                f"this machine, and {spec.name}'s own are missing too: {exc}") from None
    else:
        if file_sha256(default) == sha256:
            return default
        if noted is None:
            raise WeightsMismatchError(
                f"{built} was built with weights of sha256 {sha256[:12]}…, which are neither {spec.name}'s own "
                f"({default}) nor a file featurestore has loaded on this machine; pass --weights with that checkpoint")
    state = "no longer there" if not noted.is_file() else f"changed since (sha256 now {file_sha256(noted)[:12]}…)"
    raise WeightsUnavailableError(
        f"{built} was built with {noted} (sha256 {sha256[:12]}…), which is {state}; pass --weights with that "
        f"checkpoint")


def load_backbone(
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    layers: str | Sequence[str] | None = None,
) -> FeatureModel:
    """A frozen :class:`FeatureModel` on the CPU.

    ``weights`` replaces the default pretrained weights with a local checkpoint;
    ``image_size``/``crop_pct`` override the backbone's native preprocessing. ``layers`` (None or ``penultimate``:
    the penultimate features) ``all`` or layer names gives a :class:`~.layers.LayeredFeatureModel` emitting the
    pooled output of those layers (see :mod:`.layers`).
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
    preprocessing = spec.preprocessing.with_overrides(image_size, crop_pct)
    if layers is not None and layers != "penultimate":
        taps = LayerTaps(model, spec.blocks, chosen_layers(spec, model, layers))
        return LayeredFeatureModel(taps, preprocessing, spec.name, str(path), file_sha256(path), spec.code_modules)
    return FeatureModel(
        trunk=model,
        feature_dim=spec.feature_dim,
        preprocessing=preprocessing,
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
