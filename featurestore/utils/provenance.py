"""What a feature depends on besides its inputs: the code on the feature path and the library versions.

Both go into every store's fingerprint, so editing the backbone's module, the preprocessing or the
decoding, or upgrading torch, torchvision, onnxruntime or Pillow, never silently reuses features
computed before (``featurestore verify`` measures whether such a change moved them).
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Modules every feature goes through, whatever the backbone: decoding, preprocessing, the frozen wrapper
# (normalisation, pooling) and the checkpoint loader.
COMMON_FEATURE_MODULES = (
    "featurestore.encode.images",
    "featurestore.encode.preprocess",
    "featurestore.encode.backbones.model",
    "featurestore.encode.backbones.weights",
)
# Distributions whose upgrade can change a feature value. onnxruntime ships as onnxruntime-gpu here.
LIBRARIES = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "pillow": ("pillow",),
}


def module_file(name: str) -> Path:
    """The source file of a module, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no source for module {name}")
    return Path(spec.origin)


@lru_cache(maxsize=64)
def code_digest(modules: tuple[str, ...]) -> str:
    """SHA-256 (hex) of the named modules' source files, in the given order."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()


def feature_code_digest(backbone_modules: tuple[str, ...]) -> str:
    """Digest of the code that computes a feature: the backbone's own modules and the common feature path."""
    return code_digest(tuple(backbone_modules) + COMMON_FEATURE_MODULES)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """``{library: version}`` of the libraries in :data:`LIBRARIES` ("absent" when not installed)."""
    found = {}
    for library, distributions in LIBRARIES.items():
        found[library] = "absent"
        for distribution in distributions:
            try:
                found[library] = f"{distribution} {version(distribution)}"
                break
            except PackageNotFoundError:
                continue
    return found
