"""Fine-tune the top transformer layers of a sentence encoder, starting from the linear probe.

As for images (``finetune.py``), the classifier starts as the logistic-regression head (scaler folded in),
so epoch 0 is exactly the probe, and the same loop trains (``training.train``: AdamW, warmup + cosine,
early stopping on val, checkpoints). ``unfreeze_blocks`` counts transformer layers here.

The frozen part (embeddings and the layers below the cut) runs once per document, before the first epoch,
and its hidden states are kept in memory (float16): the text counterpart of the trunk cache. They are
(windows, tokens, 384) per document — about 200 KB per 256-token window — so they are not worth a file;
computing them costs one forward pass of the lower layers. The documents are tokenised exactly as the
head's store says (truncation or chunk-mean windows), so epoch 0 reproduces the probe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import FinetuneConfig, Tokenization
from ..data.sources import Record
from ..encode.backbones import load_text_backbone
from ..encode.backbones.text_models import TextFeatureModel
from ..encode.texts import Tokenizer, item_text
from ..errors import FeaturestoreError, WeightsMismatchError
from ..heads.head import TrainedHead
from ..heads.records import store_source
from ..utils.devices import resolve_device
from ..utils.validation import check_range
from .finetune import Tuning, active_blocks, finetune_options, layer_lr, tune
from .probe import (
    FinetuneResult,
    FinetuneRows,
    ProbeClassifier,
    finetune_rows,
    head_spec,
    records_for,
    train_only_probe,
)
from .training import accuracy, adamw, to_device

log = logging.getLogger("featurestore")


def _attention_mask(encoder, embeddings: torch.Tensor, mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=embeddings, attention_mask=mask)


def lower_hidden(model: TextFeatureModel, ids: torch.Tensor, mask: torch.Tensor, first_layer: int) -> torch.Tensor:
    """Hidden states entering layer ``first_layer``: ids, mask (B, L) int64 → (B, L, H) float32."""
    encoder = model.encoder
    hidden = encoder.embeddings(input_ids=ids)
    attention = _attention_mask(encoder, hidden, mask)
    for layer in encoder.encoder.layer[:first_layer]:
        hidden = layer(hidden, attention)
    return hidden


class TextTop(nn.Module):
    """Layers from ``first_layer`` up, pooling and window mean, and the classifier: input a pair (hidden
    (D, W, L, H) float32, attention mask (D, W, L) int64) → logits (D, K)."""

    def __init__(self, model: TextFeatureModel, first_layer: int, classifier: nn.Module):
        super().__init__()
        self.model, self.first_layer, self.classifier = model, first_layer, classifier

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask = inputs
        documents, windows, length, width = hidden.shape
        flat, flat_mask = hidden.reshape(-1, length, width), mask.reshape(-1, length)
        encoder = self.model.encoder
        attention = _attention_mask(encoder, flat, flat_mask)
        for layer in encoder.encoder.layer[self.first_layer:]:
            flat = layer(flat, attention)
        pooled = TextFeatureModel.pool(flat, flat_mask).reshape(documents, windows, -1)
        return self.classifier(TextFeatureModel.combine(pooled, mask))


class CachedHidden:
    """Batches of documents' lower hidden states, computed once (float16, in memory), padded per batch: inputs
    (hidden (D, W, L, H) float32, mask (D, W, L) int64), labels (D,) int64, on the device (copied from pinned
    memory without waiting on a GPU, where the evaluation batches are padded once and stay)."""

    def __init__(self, model: TextFeatureModel, tokenizer: Tokenizer, splits: dict[str, list[Record]],
                 first_layer: int, device: torch.device, seed: int = 0, batch_documents: int = 16):
        self.device, self.seed = device, seed
        self.resident: dict[str, list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]] = {}
        self.documents: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.labels: dict[str, np.ndarray] = {}
        model.to(device).eval()
        for split, records in splits.items():
            # The records are the store's rows, checked against their content ids: each reads.
            texts, labels = [item_text(record) for record in records], [record.label for record in records]
            hidden = []
            with torch.inference_mode():
                for start in range(0, len(texts), batch_documents):
                    ids, mask, _ = tokenizer(texts[start:start + batch_documents])
                    d, w, length = ids.shape
                    out = lower_hidden(model, ids.reshape(-1, length).to(device), mask.reshape(-1, length).to(device),
                                       first_layer).reshape(d, w, length, -1)
                    for i in range(d):
                        windows = int((mask[i].amax(-1) > 0).sum())
                        tokens = int(mask[i].sum(-1).max())
                        hidden.append((out[i, :windows, :tokens].half().cpu(), mask[i, :windows, :tokens].clone()))
            self.documents[split], self.labels[split] = hidden, np.array(labels, dtype=np.int64)
        self.n_train = len(self.documents["train"])

    def batch(self, split: str, indices) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The documents ``indices`` (positions in ``split``, in that order) padded to one batch, on the device."""
        docs = [self.documents[split][i] for i in indices]
        windows = max(h.shape[0] for h, _ in docs)
        tokens = max(h.shape[1] for h, _ in docs)
        hidden = torch.zeros(len(docs), windows, tokens, docs[0][0].shape[-1])
        mask = torch.zeros(len(docs), windows, tokens, dtype=torch.int64)
        for j, (h, m) in enumerate(docs):
            hidden[j, :h.shape[0], :h.shape[1]] = h.float()
            mask[j, :m.shape[0], :m.shape[1]] = m
        labels = self.labels[split][list(indices)]
        return (to_device(hidden, self.device), to_device(mask, self.device)), to_device(labels, self.device)

    def train_batches(self, epoch: int, batch_size: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
        for start in range(0, self.n_train, batch_size):
            yield self.batch("train", order[start:start + batch_size])

    def eval_batches(self, split: str):
        if split in self.resident:  # on a GPU: padded once, kept on the device for every epoch
            yield from self.resident[split]
            return
        batches = []
        for start in range(0, len(self.documents[split]), 32):
            batch = self.batch(split, range(start, min(start + 32, len(self.documents[split]))))
            batches.append(batch)
            yield batch
        if self.device.type == "cuda":
            self.resident[split] = batches


def text_optimizer(top: TextTop, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW (:func:`training.adamw`: fused when ``top`` is on CUDA): the classifier at ``head_lr``, the layer at
    depth d from the top at ``head_lr × backbone_lr_factor × layer_lr_decay**d``."""
    layers = top.model.encoder.encoder.layer
    groups = [{"params": list(top.classifier.parameters()), "lr": config.head_lr}]
    for index in range(top.first_layer, len(layers)):
        groups.append({"params": [p for p in layers[index].parameters() if p.requires_grad],
                       "lr": layer_lr(config, len(layers) - 1 - index)})
    return adamw(groups, config.weight_decay)


def _epoch_setup(top: TextTop, config: FinetuneConfig):
    layers = top.model.encoder.encoder.layer

    def setup(epoch: int) -> None:
        top.train()  # dropout in the trainable layers; the frozen ones only run on cached states
        first_active = len(layers) - active_blocks(config, epoch)
        for index in range(top.first_layer, len(layers)):
            layers[index].requires_grad_(index >= first_active)

    return setup


@dataclass(frozen=True)
class TextRun:
    """What a text fine-tune (this module's or SetFit's, ``setfit.py``) starts from: the probe's rows of the head's
    store (``rows``), their checked records per split, the encoder with the head's weights, the index of its first
    trainable layer (``first``) and the tokenizer of the store's tokenization."""

    rows: FinetuneRows
    records: dict[str, list[Record]]
    model: TextFeatureModel
    first: int
    tokenizer: Tokenizer


def text_run(head: TrainedHead, data: str | Path, unfreeze_blocks: int, train_per_class: int | None,
             seed: int) -> TextRun:
    """The start of a fine-tune of the top ``unfreeze_blocks`` layers of ``head``'s sentence encoder on ``data``:
    the probe's train rows (all, or ``train_per_class`` per class drawn by ``seed``), every val and test row,
    selected by content id. Errors: not a text head, weights not the head's, too many layers."""
    fp = head.fingerprint
    if fp.get("kind") != "text":
        raise FeaturestoreError(f"{head.name} is not a text head")
    rows = finetune_rows(head, train_per_class, seed)  # the probe's rows, by content id
    source = store_source(rows.store, data)
    records = {name: records_for(source, chosen, rows.store) for name, chosen in rows.splits().items()}
    model = load_text_backbone(head_spec(head))
    if model.weights_sha256 != fp["weights_sha256"]:
        raise WeightsMismatchError(f"{model.name}: its weights are not the ones head {head.name} was trained on")
    layers = len(model.encoder.encoder.layer)
    check_range("unfreeze_blocks (transformer layers)", unfreeze_blocks, 1, layers)
    tokenizer = Tokenizer(model.model_dir / "tokenizer.json", Tokenization(**fp["tokenization"]))
    return TextRun(rows, records, model, layers - unfreeze_blocks, tokenizer)


def finetune_text(head: TrainedHead, data: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(),
                  device: str = "auto", progress: bool = True, checkpoint_dir: str | Path | None = None,
                  keep_checkpoint: bool = False, train_per_class: int | None = None, probe=None) -> FinetuneResult:
    """Fine-tune the top ``config.unfreeze_blocks`` layers of the head's sentence encoder on ``data``'s train
    split, early-stopped on val; write the encoder's state dict to ``out`` (a checkpoint for ``--weights``)."""
    if config.views:
        raise FeaturestoreError("augmented views are for images; set views to 0 for a text backbone")
    torch_device = resolve_device(device)
    run = text_run(head, data, config.unfreeze_blocks, train_per_class, config.seed)
    rows, records, model, first, tokenizer = run.rows, run.records, run.model, run.first, run.tokenizer
    started = time.perf_counter()
    cache = CachedHidden(model, tokenizer, {"train": records["train"], "val": records["val"]}, first, torch_device,
                         seed=config.seed)
    cache_seconds = time.perf_counter() - started  # this run's own: the lower layers, once per document
    estimator = probe if probe is not None else train_only_probe(head, rows.train.rows, config.probe_scale_floor)
    classifier = ProbeClassifier.of_probe(estimator, len(head.class_names))
    model.requires_grad_(False)
    for layer in model.encoder.encoder.layer[first:]:
        layer.requires_grad_(True)
    top = TextTop(model, first, classifier).to(torch_device)

    def test_accuracy(_) -> float | None:
        if "test" not in records:
            return None
        # The lower layers have not changed: their states for test are computed once, here.
        test = CachedHidden(model, tokenizer, {"train": [], "test": records["test"]}, first, torch_device)
        return accuracy(top, test.eval_batches("test"))

    # The best epoch is the encoder *and* the classifier of that epoch: restoring the encoder alone would
    # score it with the last epoch's classifier.
    parts = Tuning(top, classifier.state_dict(), text_optimizer(top, config), top.state_dict, top.load_state_dict,
                   written=lambda best: model.encoder.state_dict(),  # the encoder: what --weights loads
                   test_accuracy=test_accuracy)
    options = finetune_options(config, cache, torch_device, _epoch_setup(top, config), progress, "fine-tune text",
                               "text")
    return tune(parts, cache, options, head, config, rows, Path(out), checkpoint_dir, keep_checkpoint,
                cache_seconds=round(cache_seconds, 3))
