"""What a feature depends on besides its inputs: the code on the feature path and the library versions.

Both go into every store's fingerprint, so editing the backbone's module, any module its forward runs, the
preprocessing or the decoding, or upgrading torch, torchvision, onnxruntime, Pillow or a library the model's forward
runs (timm, transformers), never silently reuses features computed before (``featurestore verify`` measures whether
such a change moved them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from functools import cache, lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# Modules every feature goes through, whatever the backbone: decoding, preprocessing, the frozen wrapper
# (normalisation, pooling) and the checkpoint loader.
COMMON_FEATURE_MODULES = (
    "featurestore.encode.images",
    "featurestore.encode.preprocess",
    "featurestore.encode.backbones.model",
    "featurestore.encode.backbones.weights",
)
# Distributions whose upgrade can change any feature value. onnxruntime ships as onnxruntime-gpu here.
LIBRARIES = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "pillow": ("pillow",),
}
OWN_PACKAGE = "featurestore"  # its code is digested, so its version is no library version


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


def forward_modules(network: nn.Module, declared: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules whose code ``network``'s forward runs, sorted: ``declared`` (an architecture's own module, for the
    functions its classes call) and the module of every class, base classes included, of every submodule (timm's
    layers and blocks, torch's convolution, ``nn.Module``'s own call). The standard library is left out: it computes
    no feature value, and a Python upgrade should not re-extract. What runs outside these modules (a function in
    another module of the same library) is covered by the library's version (:func:`library_versions`)."""
    found = set(declared)
    for module in network.modules():
        found.update(cls.__module__ for cls in type(module).__mro__)
    return tuple(sorted(name for name in found if name.partition(".")[0] not in sys.stdlib_module_names))


def feature_code_digest(backbone_modules: tuple[str, ...]) -> str:
    """Digest of the code that computes a feature: the backbone's modules (see :func:`forward_modules`) and the common
    feature path."""
    return code_digest(tuple(backbone_modules) + COMMON_FEATURE_MODULES)


@lru_cache(maxsize=1)
def _distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _version(distribution: str) -> str | None:
    try:
        return f"{distribution} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return None


def module_libraries(modules: Iterable[str]) -> dict[str, str]:
    """``{package: "distribution version"}`` of the installed distributions the modules' top-level packages come from
    (``["timm.layers.norm_act", "torch.nn.modules.conv"]`` → ``{"timm": "timm 1.0.31", "torch": "torch 2.14.1"}``);
    featurestore's own modules, and those no installed distribution ships, are left out (their source is digested)."""
    found = {}
    for package in sorted({name.partition(".")[0] for name in modules} - {OWN_PACKAGE}):
        value = next((v for v in map(_version, _distributions().get(package, ())) if v), None)
        if value is not None:
            found[package] = value
    return found


def library_versions(modules: Iterable[str] = ()) -> dict[str, str]:
    """``{library: "distribution version"}`` of the libraries in :data:`LIBRARIES` ("absent" when not installed) and
    of those the ``modules`` come from (:func:`module_libraries`: timm for a timm model's forward modules)."""
    found = {library: next((v for v in map(_version, distributions) if v), "absent")
             for library, distributions in LIBRARIES.items()}
    recorded = {distribution.lower() for distributions in LIBRARIES.values() for distribution in distributions}
    for package, value in module_libraries(modules).items():
        if value.partition(" ")[0].lower() not in recorded:
            found[package] = value
    return found
