"""A store's fingerprint: everything that changes a feature value. Two stores share rows only if equal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..store.hdf5 import SCHEMA_VERSION
from ..utils.provenance import feature_code_digest, library_versions
from .images import RGB_CONVERSION

if TYPE_CHECKING:
    from .backbones.model import FeatureModel


LAYERS_DESCRIPTION = "every stage's output pooled (backbones.layers), concatenated in the order of 'layers'"


def fingerprint_for(model: FeatureModel, dtype: str, autocast: bool) -> dict:
    """Everything that changes a feature value; two stores share rows only if these are equal.

    A multi-layer model's (:class:`~.backbones.layers.LayeredFeatureModel`) adds ``layers``: [[name, width], …] in
    column order, the layers being part of what a row is.

    Besides the model's identity and preprocessing, this covers the source of the code on the feature path
    (every module the model's forward runs, decoding, preprocessing, the frozen wrapper) and the versions of the
    libraries that compute it (timm's for a timm model), so an edit or an upgrade never silently reuses old
    features. "float32" is exact IEEE float32 on every device (the torch engine turns CUDA's TF32 off).
    """
    layers = getattr(model, "layers", None)  # a LayeredFeatureModel's ((name, width), …)
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "backbone": model.name,
        "weights_sha256": model.weights_sha256,
        "layer": LAYERS_DESCRIPTION if layers else "penultimate (classifier removed), global average pooled",
        "feature_dim": model.feature_dim,
        "preprocessing": model.preprocessing.as_dict(),
        "rgb_conversion": RGB_CONVERSION,
        "dtype": dtype,
        "compute": "autocast-float16" if autocast else "float32",
        "code_sha256": feature_code_digest(model.code_modules),
        "libraries": library_versions(model.code_modules),
    }
    if layers:
        fingerprint["layers"] = [[name, width] for name, width in layers]
    return fingerprint


def changed_keys(old: dict, new: dict) -> list[str]:
    """Top-level fingerprint keys whose values differ (e.g. ``['code_sha256', 'libraries']``)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
