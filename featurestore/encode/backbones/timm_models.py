"""Any timm model as a backbone, named ``timm:<model>`` (e.g. ``timm:resnet18``, ``timm:convnext_atto``).

Each model carries its own ``pretrained_cfg``: the entry takes its input size, crop fraction, interpolation, mean and
std from it, and the dotted name of its classifier. timm ships no weights: they come from a local file
(``--weights``, a PyTorch or safetensors state dict in timm's naming), or from the Hugging Face Hub cache when a
connected machine put them there. featurestore never downloads them; without either, the entry's ``weights_file``
names the Hub repository and file to fetch.

The block split for fine-tuning comes from timm's own coarse block grouping (``model.group_matcher(coarse=True)``:
the stem, numbered blocks such as ResNet's ``layer1..4`` or EfficientNet's ``blocks.0..6``, and what follows them).
It is accepted only when stem, blocks and head run in order reproduce the model's own ``forward`` (checked once, on
random weights, when the entry is built); a model whose forward does more than call its modules in order (a ViT adds
its position embedding between them) declares no split and cannot be fine-tuned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ...errors import UnknownBackboneError, WeightsUnavailableError
from ..preprocess import INTERPOLATIONS, Preprocessing
from .model import BackboneSpec, BlockSplit, run_steps

PREFIX = "timm:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm repository on the Hub holds, preferred first
HEAD_GROUP = 99999  # timm's group number for the layers after the last block (EfficientNet's conv_head, ViT's norm)


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency; kept for a trimmed install
        raise UnknownBackboneError("timm: backbones need the timm package: pip install timm") from exc
    return timm


def build_classifier(model_name: str) -> nn.Module:
    """The timm architecture with random weights and its ImageNet classifier (never downloads)."""
    timm = _timm()
    if not timm.is_model(model_name):
        raise UnknownBackboneError(f"unknown timm model {model_name!r} (timm.list_models() names them)")
    try:
        return timm.create_model(model_name, pretrained=False)
    except RuntimeError as exc:  # a known architecture with an unknown pretrained tag
        raise UnknownBackboneError(f"unknown timm model {model_name!r}: {exc}") from exc


def preprocessing_of(model_name: str, config: dict) -> Preprocessing:
    """The evaluation preprocessing of a timm ``pretrained_cfg``; refuses one this product cannot reproduce."""
    channels, height, width = config["input_size"]
    crop_mode = config.get("crop_mode", "center")
    if channels != 3 or height != width or crop_mode != "center":
        raise UnknownBackboneError(
            f"timm:{model_name} preprocesses {channels}×{height}×{width} inputs with crop_mode {crop_mode!r}; "
            f"featurestore reproduces square 3-channel centre crops only")
    if config.get("interpolation") not in INTERPOLATIONS:
        raise UnknownBackboneError(f"timm:{model_name}: interpolation {config.get('interpolation')!r} is not one "
                                   f"of {', '.join(INTERPOLATIONS)}")
    # timm resizes the shorter side to floor(size / crop_pct); Preprocessing rounds, so the fraction it keeps is the
    # one that gives timm's resize exactly.
    resize = math.floor(height / float(config.get("crop_pct", 0.875)))
    return Preprocessing(image_size=int(height), crop_pct=height / resize, interpolation=config["interpolation"],
                         mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]))


def hub_weights(name: str, config: dict, cache_dir: str | Path | None = None) -> Path:
    """The weights file of ``config``'s Hub repository in the local Hugging Face cache (``cache_dir``, default the
    Hub's own); raises :class:`WeightsUnavailableError` saying what to fetch and how to pass a local file instead."""
    from huggingface_hub import try_to_load_from_cache

    repository = config.get("hf_hub_id")
    for filename in HUB_FILES if repository else ():
        found = try_to_load_from_cache(repository, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    source = (f"fetch {repository}'s {HUB_FILES[0]} on a connected machine (huggingface-cli download "
              f"{repository} {HUB_FILES[0]})" if repository else "its pretrained_cfg names no Hub repository")
    raise WeightsUnavailableError(
        f"pretrained weights for {name!r} are not on this machine: timm ships none and featurestore never "
        f"downloads; {source}, then pass the file with --weights PATH")


def _matcher(network: nn.Module) -> tuple[re.Pattern, list[re.Pattern], list[re.Pattern]]:
    """timm's coarse grouping as (stem pattern, block patterns, patterns of the layers after the blocks)."""
    grouping = network.group_matcher(coarse=True)
    entries = grouping["blocks"]
    entries = [(entries, None)] if isinstance(entries, str) else list(entries)
    blocks = [re.compile(pattern) for pattern, suffix in entries if suffix is None]
    after = [re.compile(pattern) for pattern, suffix in entries if suffix == (HEAD_GROUP,)]
    if len(blocks) + len(after) != len(entries):
        raise ValueError("a grouping this module does not read")
    return re.compile(grouping["stem"]), blocks, after


def _role(name: str, matcher) -> str | None:
    stem, blocks, after = matcher
    if any(pattern.match(name) for pattern in blocks):
        return "block"
    if any(pattern.match(name) for pattern in after):
        return "head"
    return "stem" if stem.match(name) else None


def _walk(module: nn.Module, matcher, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """``(dotted name, role)`` of the modules the grouping names, in registration order: a module is taken whole
    when it matches (or nothing inside it does), else its children are."""
    if list(module.named_parameters(recurse=False)) and prefix:
        raise ValueError(f"{prefix[:-1]} holds parameters outside its children")
    for child_name, child in module.named_children():
        name = prefix + child_name
        role = _role(name, matcher)
        inner = [n for n, _ in child.named_modules(prefix=name) if n != name and _role(n, matcher)]
        if role is None and inner:
            yield from _walk(child, matcher, name + ".")
        else:
            yield name, role


def grouped_split(network: nn.Module, classifier: str) -> BlockSplit:
    """The stem, blocks and head of ``network`` from timm's coarse grouping (raises ``ValueError`` when the grouping
    does not cut the module tree into stem, consecutive blocks and head)."""
    if list(network.named_parameters(recurse=False)):
        raise ValueError("the network holds parameters of its own (position embeddings, class tokens)")
    named = list(_walk(network, _matcher(network)))
    positions = [i for i, (_, role) in enumerate(named) if role == "block"]
    if not positions:
        raise ValueError("no blocks")
    first, last = positions[0], positions[-1]
    stem, blocks, head = named[:first], named[first:last + 1], named[last + 1:]
    if any(role == "head" for _, role in stem) or any(role != "block" for _, role in blocks) \
            or any(role in ("stem", "block") for _, role in head):
        raise ValueError("stem, blocks and head are not consecutive")
    if not any(classifier == name or classifier.startswith(name + ".") for name, _ in head):
        raise ValueError(f"the classifier {classifier} is not in the head")
    return BlockSplit(blocks=tuple(name for name, _ in blocks), classifier=classifier,
                      stem=tuple(name for name, _ in stem), head=tuple(name for name, _ in head),
                      family=f"timm {type(network).__name__}")


def block_split(network: nn.Module, classifier: str, image_size: int) -> BlockSplit | None:
    """``network``'s split by timm's grouping when it reproduces ``network``'s forward on two random
    ``image_size`` images to 1e-4 of the logits' scale (``network`` in eval mode); None otherwise."""
    try:
        split = grouped_split(network, classifier)
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = network(x)
            y = run_steps(network, split.stem, x)
            for name in split.blocks:
                y = network.get_submodule(name)(y)
            got = run_steps(network, split.head, y)
    except (ValueError, RuntimeError, TypeError, AttributeError, KeyError):
        return None
    scale = max(1.0, float(expected.abs().max()))
    return split if got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-4 * scale else None


def spec_for(name: str) -> BackboneSpec:
    """The registry entry of ``timm:<model>`` (raises :class:`UnknownBackboneError` for an unknown model or one whose
    classifier or preprocessing this product cannot handle)."""
    model_name = name[len(PREFIX):]
    probe = build_classifier(model_name).eval()
    config = dict(probe.pretrained_cfg)
    classifier = config.get("classifier")
    if not isinstance(classifier, str):
        raise UnknownBackboneError(f"{name}: it has {len(classifier or ())} classifiers ({classifier}), so no single "
                                   f"layer to drop for pooled features; featurestore takes one linear classifier")
    layer = probe.get_submodule(classifier)
    if not isinstance(layer, nn.Linear):
        raise UnknownBackboneError(f"{name}: its classifier {classifier!r} is not a linear layer, so it has no "
                                   f"pooled features to cache")
    preprocessing = preprocessing_of(model_name, config)
    return BackboneSpec(
        name=name,
        description=f"timm {model_name}",
        weights_source=f"local file (timm ships none; its Hub weights: {config.get('hf_hub_id') or 'none named'})",
        preprocessing=preprocessing,
        feature_dim=layer.in_features,
        build=lambda: build_classifier(model_name),
        weights_file=lambda: hub_weights(name, config),
        classifier=classifier,
        code_modules=(__name__, type(probe).__module__),
        blocks=block_split(probe, classifier, preprocessing.image_size),
        fixed_input_size=bool(config.get("fixed_input_size", False)),
    )
