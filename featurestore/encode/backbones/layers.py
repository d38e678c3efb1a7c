"""Features from every layer (Head2Toe, Evci et al. 2022): the pooled output of each stage of an image backbone's
:class:`~.model.BlockSplit` (the stem, every block, and the head up to the classifier: the penultimate features),
concatenated in that order.

Layer names: ``stem``, ``block00`` … ``block<n-1>`` (the split's blocks, bottom to top) and ``head`` (the pooled
features the classifier reads, exactly the penultimate store's). A block's output is pooled by its layout: a
convolutional map (N, C, H, W) by its mean over H × W (a timm model whose ``output_fmt`` is NHWC: (N, H, W, C), the
same mean); a token grid (N, T, C) by its mean over the T tokens (a class token included); an output (N, C) is kept.
Any other shape is refused, naming the layer. A network that declares no block split (a ViT whose position embedding
sits outside its blocks) has no layers to offer and is refused in one line by :func:`layer_names`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...configs import LAYER_CHOICES as LAYER_CHOICES
from ...errors import BadValueError
from ..preprocess import Preprocessing
from .model import BackboneSpec, BlockSplit, FeatureModel, run_steps

PENULTIMATE = "head"  # the layer the classifier reads: the penultimate store's features


def layer_names(spec: BackboneSpec, network: nn.Module) -> list[str]:
    """``stem`` (where the split has one), ``block00`` … and ``head``: every layer ``spec``'s split offers, bottom to
    top (refused in one line for a backbone that declares no split)."""
    if spec.blocks is None:
        raise BadValueError(
            f"{spec.name}: multi-layer features need the backbone's split into blocks, and this one declares none "
            f"(a ViT's position embedding and class token sit outside its blocks); extract it with --layers "
            f"penultimate")
    count = len(spec.blocks.block_names(network))
    stem = ["stem"] if spec.blocks.stem else []  # torchvision's `features.*` splits start with a block: no stem
    return [*stem, *(f"block{index:02d}" for index in range(count)), PENULTIMATE]


def resolve_layers(model: str, known: Sequence[str], layers: str | Sequence[str]) -> tuple[str, ...]:
    """``layers`` (``all``, or names of ``known``, the layers of backbone ``model`` bottom to top) as the names to
    emit, in that order; an unknown name is refused with the known ones. Images and texts alike."""
    if isinstance(layers, str):
        if layers != "all":
            raise BadValueError(f"layers must be 'penultimate', 'all' or a list of layer names, got {layers!r}")
        return tuple(known)
    unknown = [name for name in layers if name not in known]
    if unknown or not layers:
        raise BadValueError(f"{model} has no layer(s) {', '.join(unknown) or '(none given)'}: its layers are "
                            f"{', '.join(known)}")
    return tuple(name for name in known if name in set(layers))


def chosen_layers(spec: BackboneSpec, network: nn.Module, layers: str | Sequence[str]) -> tuple[str, ...]:
    """:func:`resolve_layers` against ``spec``'s split of ``network`` (:func:`layer_names`)."""
    return resolve_layers(spec.name, layer_names(spec, network), layers)


def pool_layer(x: torch.Tensor, name: str, channels_last: bool = False) -> torch.Tensor:
    """One layer's output → (N, C) float: the mean over H × W of a map (N, C, H, W) ((N, H, W, C) when
    ``channels_last``), over the tokens of a grid (N, T, C); (N, C) as it is."""
    if x.dim() == 4:
        return x.mean(dim=(1, 2) if channels_last else (2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 2:
        return x
    raise BadValueError(f"layer {name}: output of shape {tuple(x.shape)} is neither a map, a token grid nor a "
                        f"vector; it cannot be pooled")


class LayerTaps(nn.Module):
    """The network run stage by stage as its split declares, emitting the pooled outputs of ``layers``: normalised
    images (N, 3, S, S) float32 → (N, Σ C_l) float32, the layers concatenated bottom to top. Stops after the highest
    layer asked for, so lower layers alone cost less than the whole network. The classifier of ``network`` must
    already be an identity (``head`` is then the penultimate features)."""

    def __init__(self, network: nn.Module, split: BlockSplit, layers: Sequence[str]):
        super().__init__()
        self.network = network
        self.split = split
        self.block_names = split.block_names(network)
        self.layers = tuple(layers)
        self.channels_last = getattr(network, "output_fmt", "NCHW") == "NHWC"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wanted = set(self.layers)
        out: list[torch.Tensor] = []
        x = run_steps(self.network, self.split.stem, x)
        if "stem" in wanted:
            out.append(pool_layer(x, "stem", self.channels_last))
        for index, name in enumerate(self.block_names):
            if len(out) == len(wanted):
                break
            x = self.network.get_submodule(name)(x)
            if f"block{index:02d}" in wanted:
                out.append(pool_layer(x, f"block{index:02d}", self.channels_last))
        if PENULTIMATE in wanted:
            out.append(pool_layer(run_steps(self.network, self.split.head, x), PENULTIMATE))
        return torch.cat(out, dim=1)


def layer_widths(taps: LayerTaps, image_size: int) -> tuple[tuple[str, int], ...]:
    """((name, width), …) of each emitted layer, from one forward of a blank ``image_size`` image."""
    widths = []
    with torch.inference_mode():
        for name in taps.layers:
            single = LayerTaps(taps.network, taps.split, (name,))
            widths.append((name, int(single(torch.zeros(1, 3, image_size, image_size)).shape[1])))
    return tuple(widths)


class LayeredFeatureModel(FeatureModel):
    """A :class:`~.model.FeatureModel` whose trunk is :class:`LayerTaps`: uint8 images (N, 3, H, W) → the pooled
    layers (N, Σ C_l) float32. ``layers`` is ((name, width), …) in column order: the store records it (its
    fingerprint), heads choose among its column ranges, and export rebuilds exactly the layers a head chose."""

    def __init__(self, taps: LayerTaps, preprocessing: Preprocessing, name: str, weights_path: str,
                 weights_sha256: str, code_modules: tuple[str, ...] = ()):
        widths = layer_widths(taps, preprocessing.image_size)
        super().__init__(taps, sum(width for _, width in widths), preprocessing, name, weights_path, weights_sha256,
                         code_modules)
        self.layers = widths
