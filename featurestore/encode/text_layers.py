"""Features from every layer of a sentence encoder: the hidden state after the embeddings and after each
transformer layer, each mean-pooled over a window's tokens and averaged over a document's windows, concatenated.

Layer names: ``embeddings``, ``layer1`` … ``layer<n-1>`` (unnormalised means: their scale is information), and
``head``, the last layer exactly as the sentence embedding makes it (mean-pooled, L2-normalised per window and per
document): the penultimate store's features. all-MiniLM-L6-v2 gives 7 layers of 384 (2,688 values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..configs import Tokenization
from .backbones.layers import resolve_layers
from .backbones.text_models import TextFeatureModel
from .fingerprint import LAYERS_DESCRIPTION
from .texts import TextEncoder

PENULTIMATE = "head"


def text_layer_names(model: TextFeatureModel) -> list[str]:
    """``embeddings``, ``layer1`` … and ``head``: the layers ``model``'s encoder offers, bottom to top."""
    count = int(model.encoder.config.num_hidden_layers)
    return ["embeddings", *(f"layer{index}" for index in range(1, count)), PENULTIMATE]


class LayeredTextFeatureModel(TextFeatureModel):
    """Token windows (D, W, L) int64 → the chosen layers' pooled states (D, Σ H) float32, bottom to top.
    ``layers`` is ((name, width), …) in column order, as for image backbones (``backbones.layers``)."""

    def __init__(self, base: TextFeatureModel, layers: str | Sequence[str]):
        super().__init__(base.encoder, base.spec, base.weights_sha256, base.tokenizer_sha256, base.model_dir)
        known = text_layer_names(base)
        names = resolve_layers(base.name, known, layers)
        self.indices = tuple(known.index(name) for name in names)  # into the encoder's hidden states
        width = int(base.encoder.config.hidden_size)
        self.layers = tuple((name, width) for name in names)
        self.feature_dim = width * len(names)
        self.code_modules = tuple(base.code_modules) + (__name__,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        documents, windows, length = input_ids.shape
        ids, mask = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
        states = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = len(states) - 1
        parts = []
        for index in self.indices:
            normalize = index == last  # the sentence embedding itself
            pooled = self.pool(states[index], mask, normalize).reshape(documents, windows, -1)
            parts.append(self.combine(pooled, attention_mask, normalize))
        return torch.cat(parts, dim=1)


class LayeredTextEncoder(TextEncoder):
    """The :class:`~.texts.TextEncoder` of a :class:`LayeredTextFeatureModel`: its fingerprint adds the layers."""

    def __init__(self, model: LayeredTextFeatureModel, tokenization: Tokenization, dtype: str, engine: str = "auto"):
        super().__init__(model, tokenization, dtype, engine)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "layer": LAYERS_DESCRIPTION,
                "layers": [[name, width] for name, width in self.model.layers]}


def sentence_encoder(model: TextFeatureModel, tokenization: Tokenization, dtype: str, engine: str = "auto",
                     layers: str | Sequence[str] | None = None) -> TextEncoder:
    """The encoder extraction, verify and export run for a sentence encoder: its penultimate features (``layers``
    None or ``penultimate``), or the layers named (``all``, or names of :func:`text_layer_names`)."""
    if layers is None or layers == "penultimate":
        return TextEncoder(model, tokenization, dtype, engine)
    return LayeredTextEncoder(LayeredTextFeatureModel(model, layers), tokenization, dtype, engine)
