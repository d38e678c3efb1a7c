"""The backbone registry: a name maps to its family's declared entry (architecture, weights, preprocessing).

Each family module declares its own entries, as timm's model families carry their pretrained configs:
:mod:`.efficientnet_lite` and :mod:`.text_models` list theirs in ``SPECS``; :mod:`.torchvision_models` resolves
``tv:<model>`` and :mod:`.timm_models` ``timm:<model>`` on demand, each with its block split. This module collects
them (giving the Lite entries their block split, :data:`LITE_BLOCKS`), and adds fine-tuned backbones: a fine-tuned
checkpoint is registered under its own name with its base's architecture, and the entry is
written as ``backbone.json`` beside the store of its features, where :func:`get_spec` finds it again.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch.nn.functional as F

from ...errors import UnknownBackboneError
from . import efficientnet_lite, text_models
from .model import BackboneSpec, BlockSplit, pool_flatten
from .text_models import TextBackboneSpec

Spec = BackboneSpec | TextBackboneSpec

DEFAULT_BACKBONE = "efficientnet_lite0"
TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
ENTRY_FILE = "backbone.json"  # a fine-tuned backbone's entry, written beside the store of its features

# EfficientNet-Lite's split into its MBConv blocks (16 in Lite0), exactly as ``EfficientNetLite.forward`` runs them: the
# stem, the blocks, then the head convolution, pooling, dropout and classifier.
LITE_BLOCKS = BlockSplit(blocks=("_blocks.*",), classifier="_fc", stem=("_conv_stem", "_bn0", F.relu6),
                         head=("_conv_head", "_bn1", F.relu6, pool_flatten, "_dropout", "_fc"),
                         family="EfficientNet-Lite")

REGISTRY: dict[str, Spec] = {
    spec.name: replace(spec, blocks=LITE_BLOCKS) if spec.kind == "image" else spec
    for family in (efficientnet_lite, text_models) for spec in family.SPECS
}


def register_finetuned(name: str, base: str | Spec, weights: str | Path) -> Spec:
    """Add a fine-tuned backbone: ``base``'s architecture and preprocessing (or tokenizer) with the checkpoint
    ``weights`` (whose hash enters every fingerprint of its features)."""
    parent = get_spec(base) if isinstance(base, str) else base
    path = Path(weights).resolve()
    common = {"name": name, "description": f"{parent.name} fine-tuned ({path.name})",
              "weights_source": f"fine-tuned checkpoint {path}"}
    if parent.kind == "text":
        spec = replace(parent, weights_file=path, **common)
    else:
        spec = replace(parent, weights_file=lambda: path, imagenet_classifier=False, **common)
    REGISTRY[name] = spec
    return spec


def write_entry(folder: str | Path, name: str, base: str, weights: str) -> Path:
    """Record a fine-tuned backbone as ``folder/backbone.json`` (``weights`` relative to ``folder``)."""
    from ...utils.atomic import write_text_atomic

    return write_text_atomic(Path(folder) / ENTRY_FILE, json.dumps({"name": name, "base": base, "weights": weights}))


def _register_entries(folders: tuple[Path, ...], name: str) -> None:
    for folder in folders:
        entry = Path(folder) / ENTRY_FILE
        if entry.is_file():
            record = json.loads(entry.read_text())
            weights = entry.parent / record["weights"]
            if record["name"] == name and weights.is_file():
                register_finetuned(record["name"], record["base"], weights)
                return


def list_backbones() -> list[Spec]:
    """The built-in entries, images first, and the fine-tuned ones registered in this process (torchvision and
    timm models are resolved on demand as ``tv:<model>`` and ``timm:<model>``)."""
    return sorted(REGISTRY.values(), key=lambda spec: spec.kind != "image")


def get_spec(name: str, search: tuple[str | Path, ...] = ()) -> Spec:
    """Look a backbone up by name (once per command: pass the entry down, not the name). A fine-tuned backbone
    not registered in this process is looked for in ``search``'s folders (its ``backbone.json``). Unknown names
    raise an error that lists the known ones."""
    if name not in REGISTRY and search:
        _register_entries(tuple(Path(folder) for folder in search), name)
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        from . import timm_models  # importing timm costs seconds: only for timm: names

        return timm_models.spec_for(name)  # its errors say what is wrong with that model
    if name.startswith(TORCHVISION_PREFIX):
        from . import torchvision_models  # importing torchvision costs a second: only for tv: names

        try:
            return torchvision_models.spec_for(name)
        except UnknownBackboneError:
            pass
    known = ", ".join(REGISTRY)
    raise UnknownBackboneError(
        f"unknown backbone {name!r}. Known: {known}, tv:<model> for any torchvision classification "
        f"model (`featurestore backbones --torchvision` lists them, e.g. tv:resnet50), or timm:<model> for a timm "
        f"model with a local weights file."
    )
