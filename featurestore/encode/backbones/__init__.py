"""Backbones: every family declares its entries, the registry collects them, the loaders build them.

Image backbones (:class:`BackboneSpec`: EfficientNet-Lite, any torchvision classification model as
``tv:<model>`` and any timm model as ``timm:<model>``) and sentence encoders (:class:`TextBackboneSpec`,
``kind == "text"``). :func:`load_backbone` returns a frozen image :class:`FeatureModel`, :func:`load_text_backbone`
the text one.
"""

from .loading import load_backbone, load_classifier, load_text_backbone
from .model import BackboneSpec, FeatureModel, PixelNormalize
from .registry import (
    DEFAULT_BACKBONE,
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    Spec,
    get_spec,
    list_backbones,
    register_finetuned,
    write_entry,
)
from .text_models import TextBackboneSpec, TextFeatureModel

__all__ = ["BackboneSpec", "TextBackboneSpec", "Spec", "FeatureModel", "TextFeatureModel", "PixelNormalize",
           "DEFAULT_BACKBONE", "TIMM_PREFIX", "TORCHVISION_PREFIX", "get_spec", "list_backbones", "register_finetuned",
           "write_entry", "load_backbone", "load_classifier", "load_text_backbone"]
