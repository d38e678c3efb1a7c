"""Baselines that use no pretrained weights: the same network trained from scratch, and a linear model on the
raw input (pixels for images, TF-IDF for texts) with C chosen on validation. They are what a sceptical reader
compares transfer learning against.

The from-scratch network trains for a fixed step budget (the same at every label budget; AdamW, a warmup
over the first 5% of the steps, then a cosine decay), validates every ``ceil(steps / 20)`` steps, keeps
its best validation round, and records whether it converged: its training accuracy reached ≥ 0.98 (it fits
its training data), or its validation accuracy peaked in the first half of the run and stayed within a point
of the peak since. (An annealed learning rate flattens every curve at the end, so flatness alone is not it.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configs import HeadConfig, ScratchConfig
from ..data.sources import Record, Source, nested_subset, scan_source
from ..encode.backbones import TextFeatureModel, get_spec
from ..encode.backbones.model import PixelNormalize
from ..errors import FeaturestoreError
from ..heads.baseline import BASELINE_GRID, make_tfidf, pixel_features  # the deployable baselines' recipes
from ..utils.devices import resolve_device
from .augment import ViewRecipe
from .training import ImageBatches, accuracy, train
from .trunk import UpperBlocks

VALIDATION_ROUNDS = 20


@dataclass
class ScratchResult:
    best_val_accuracy: float
    test_accuracy: float | None
    steps: int
    seconds: float
    converged: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def convergence(history: list[dict]) -> dict:
    """Whether the run converged, and by which measure: ``{"by": "train_accuracy" | "val_accuracy" | None,
    "final_train_accuracy", "best_val_accuracy", "best_val_step"}`` (see the module docstring).

    A learning rate annealed to zero flattens every curve at the end, so flat alone proves nothing: the
    training accuracy must have reached 0.98 (the network fits its training data), or the validation curve must
    have peaked before the last half of the run and stayed within a point of that peak since."""
    if not history:
        return {"by": None}
    train_accuracy = [h["train_accuracy"] for h in history]
    val = [h["val_accuracy"] for h in history]
    last = float(np.mean(train_accuracy[-max(1, len(history) // 10):]))
    best = int(np.argmax(val))
    by = None
    if last >= 0.98:
        by = "train_accuracy"
    elif best < len(val) // 2 and max(val) - min(val[len(val) // 2:]) < 0.01:
        by = "val_accuracy"
    return {"by": by, "final_train_accuracy": round(float(last), 4), "best_val_accuracy": float(max(val)),
            "best_val_step": history[best]["steps"]}


def _records(source: Source, train_per_class: int | None, seed: int,
             chosen: dict[str, list[Record]] | None = None) -> tuple[list[Record], dict[str, list[Record]]]:
    """The train records (all of ``source``'s, or a nested subset of ``train_per_class`` per class) and the val and
    test ones; ``chosen`` gives them instead (the curve passes the rows its probe trained on, picked in the feature
    store by content id, so that every method of a budget sees the same images)."""
    if chosen is not None:
        train, evaluation = chosen["train"], {split: chosen.get(split, []) for split in ("val", "test")}
    else:
        train = [r for r in source.records if r.split == "train"]
        if train_per_class is not None:
            train = [train[i] for i in nested_subset(np.array([r.label for r in train]), train_per_class, seed)]
        evaluation = {split: [r for r in source.records if r.split == split] for split in ("val", "test")}
    if not train or not evaluation["val"]:
        raise FeaturestoreError(f"{source.root}: a baseline needs train and val items")
    return train, evaluation


def train_from_scratch(data: str | Path | Source, config: ScratchConfig = ScratchConfig(),
                       backbone: str = "efficientnet_lite0", device: str = "auto", train_per_class: int | None = None,
                       progress: bool = True, chosen: dict[str, list[Record]] | None = None) -> ScratchResult:
    """Train ``backbone``'s architecture from random weights on ``data``'s train split (or a nested subset of
    ``train_per_class`` images per class) for ``config.steps`` steps; score its best validation round on test."""
    source = data if isinstance(data, Source) else scan_source(data)
    train_records, evaluation = _records(source, train_per_class, config.seed, chosen)
    torch_device = resolve_device(device)
    spec = get_spec(backbone)
    torch.manual_seed(config.seed)
    network = spec.build()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1  # TF's 0.99 decay suits long runs; statistics here must keep up with training
    network._fc = nn.Linear(spec.feature_dim, len(source.class_names))
    preprocessing = spec.preprocessing.with_overrides(image_size=config.image_size, crop_pct=1.0)
    batches = ImageBatches(train_records, evaluation, preprocessing, PixelNormalize(preprocessing), torch_device,
                           recipe=ViewRecipe(config.crop_scale_min) if config.augment else None,
                           workers=config.workers, seed=config.seed)
    top = UpperBlocks(network, 0, with_stem=True).to(torch_device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    round_steps = math.ceil(config.steps / VALIDATION_ROUNDS)
    result, best_state = train(top, network.state_dict, optimizer, batches, epochs=VALIDATION_ROUNDS,
                               batch_size=config.batch_size, patience=None, device=torch_device,
                               run_key="scratch", max_steps=config.steps, round_steps=round_steps,
                               warmup_steps=config.steps // 20, on_epoch=lambda _: top.train(), progress=progress,
                               desc="scratch")
    network.load_state_dict(best_state)
    test = accuracy(top, batches.eval_batches("test")) if evaluation["test"] else None
    return ScratchResult(best_val_accuracy=result.best_val_accuracy, test_accuracy=test, steps=result.steps,
                         seconds=result.seconds, converged=convergence(result.history), history=result.history,
                         config=asdict(config))


class TokenBatches:
    """Batches of tokenised documents for a network that trains its embeddings: ((ids, mask) (B, 1, L) int64,
    labels (B,)), in the same seeded order per epoch as the other batch sources."""

    def __init__(self, splits: dict[str, list[Record]], tokenizer, device: torch.device, seed: int = 0):
        self.device, self.seed, self.data = device, seed, {}
        for split, records in splits.items():
            texts, labels = _readable_texts(records)
            ids, mask, _ = tokenizer(texts) if texts else (torch.zeros(0, 1, 1), torch.zeros(0, 1, 1), 0)
            self.data[split] = (ids.long(), mask.long(), torch.from_numpy(labels))
        self.n_train = len(self.data["train"][2])

    def _batch(self, split: str, indices):
        ids, mask, labels = self.data[split]
        picked = torch.as_tensor(indices, dtype=torch.long)
        return (ids[picked].to(self.device), mask[picked].to(self.device)), labels[picked].to(self.device)

    def train_batches(self, epoch: int, batch_size: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
        for start in range(0, self.n_train, batch_size):
            yield self._batch("train", order[start:start + batch_size])

    def eval_batches(self, split: str):
        total = len(self.data[split][2])
        for start in range(0, total, 64):
            yield self._batch(split, range(start, min(start + 64, total)))


class TextScratchNet(nn.Module):
    """A sentence encoder's architecture from random weights, mean pooling over tokens and windows, a linear
    layer: ((ids, mask) (D, W, L) int64) → logits (D, K) float32.

    The pooling is the frozen encoder's (``TextFeatureModel.pool`` and ``combine``) without its L2 normalisation:
    on unit vectors a logit can be no larger than its class's weight norm, and from random weights that held the
    run at chance (10 per topic) or at a training loss of 0.36-0.46 after 300 steps (2 and 5 per topic)."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder, self.classifier = encoder, nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, inputs):
        ids, mask = inputs
        documents, windows, length = ids.shape
        flat_mask = mask.reshape(-1, length)
        hidden = self.encoder(input_ids=ids.reshape(-1, length), attention_mask=flat_mask).last_hidden_state
        pooled = TextFeatureModel.pool(hidden, flat_mask, normalize=False).reshape(documents, windows, -1)
        return self.classifier(TextFeatureModel.combine(pooled, mask, normalize=False))


def train_text_from_scratch(data: str | Path | Source, config: ScratchConfig = ScratchConfig(),
                            backbone: str = "minilm_l6", device: str = "auto", train_per_class: int | None = None,
                            progress: bool = True, chosen: dict[str, list[Record]] | None = None) -> ScratchResult:
    """The from-scratch line for texts: ``backbone``'s architecture and tokenizer, random weights, every layer
    training on the train split (or ``train_per_class`` per class) for ``config.steps`` steps; documents
    truncated to ``config.max_length`` tokens. Its best validation round is scored on test."""
    from transformers import BertConfig, BertModel

    from ..configs import Tokenization
    from ..encode.texts import Tokenizer

    source = data if isinstance(data, Source) else scan_source(data)
    train_records, evaluation = _records(source, train_per_class, config.seed, chosen)
    torch_device = resolve_device(device)
    folder = get_spec(backbone).model_dir()
    tokenizer = Tokenizer(folder / "tokenizer.json", Tokenization(max_length=config.max_length))
    torch.manual_seed(config.seed)
    network = TextScratchNet(BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=False),
                             len(source.class_names)).to(torch_device)
    batches = TokenBatches({"train": train_records, **evaluation}, tokenizer, torch_device, seed=config.seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result, best_state = train(network, network.state_dict, optimizer, batches, epochs=VALIDATION_ROUNDS,
                               batch_size=config.batch_size, patience=None, device=torch_device,
                               run_key="scratch-text", max_steps=config.steps,
                               round_steps=math.ceil(config.steps / VALIDATION_ROUNDS),
                               warmup_steps=config.steps // 20, on_epoch=lambda _: network.train(),
                               progress=progress, desc="scratch", unit="text")
    network.load_state_dict(best_state)
    test = accuracy(network, batches.eval_batches("test")) if evaluation["test"] else None
    return ScratchResult(best_val_accuracy=result.best_val_accuracy, test_accuracy=test, steps=result.steps,
                         seconds=result.seconds, converged=convergence(result.history), history=result.history,
                         config=asdict(config))


@dataclass
class LinearBaselineResult:
    val_accuracy: float
    test_accuracy: float | None
    C: float
    seconds: float


def _fit_linear(X, y, Xv, yv, Xt, yt, config: HeadConfig, started: float) -> LinearBaselineResult:
    from ..heads.baseline import sweep_and_refit

    estimator, C, val, _ = sweep_and_refit(config, X, y, Xv, yv, X, y)  # refitted on the train subset alone
    test = float(estimator.score(Xt, yt)) if Xt is not None else None
    return LinearBaselineResult(val_accuracy=val, test_accuracy=test, C=C,
                                seconds=round(time.perf_counter() - started, 2))


def pixel_logreg(data: str | Path | Source, train_per_class: int | None = None, seed: int = 0,
                 config: HeadConfig = BASELINE_GRID,
                 chosen: dict[str, list[Record]] | None = None) -> LinearBaselineResult:
    """Logistic regression on raw pixels (standardised), C chosen on val, trained on the train subset: the
    deployable pixel baseline's recipe, on the same pixels (``heads.baseline.pixel_features``)."""
    started = time.perf_counter()
    source = data if isinstance(data, Source) else scan_source(data)
    train, evaluation = _records(source, train_per_class, seed, chosen)
    test = evaluation["test"]
    return _fit_linear(pixel_features(train), _labels(train), pixel_features(evaluation["val"]),
                       _labels(evaluation["val"]), pixel_features(test) if test else None,
                       _labels(test) if test else None, config, started)


def _labels(records: list[Record]) -> np.ndarray:
    return np.array([r.label for r in records], dtype=np.int64)


def _readable_texts(records: list[Record]) -> tuple[list[str], np.ndarray]:
    """The texts that read (UTF-8, not empty) and their labels; the others are left out, as extraction does."""
    from ..encode.texts import item_text
    from ..errors import ImageDecodeError

    texts, labels = [], []
    for record in records:
        try:
            texts.append(item_text(record))
            labels.append(record.label)
        except ImageDecodeError:
            continue
    return texts, np.array(labels, dtype=np.int64)


def tfidf_logreg(data: str | Path | Source, train_per_class: int | None = None, seed: int = 0,
                 config: HeadConfig = replace(BASELINE_GRID, normalize="none"),
                 chosen: dict[str, list[Record]] | None = None) -> LinearBaselineResult:
    """TF-IDF (word unigrams and bigrams, sublinear term frequency, fitted on the train subset only) + logistic
    regression, C chosen on val: the bag-of-words baseline a sentence encoder must beat."""
    started = time.perf_counter()
    source = data if isinstance(data, Source) else scan_source(data)
    train, evaluation = _records(source, train_per_class, seed, chosen)
    texts, y = _readable_texts(train)
    vectorizer = make_tfidf()  # the deployable baseline's vectorizer (heads.baseline)
    X = vectorizer.fit_transform(texts)
    val_texts, yv = _readable_texts(evaluation["val"])
    test_texts, yt = _readable_texts(evaluation["test"])
    Xt = vectorizer.transform(test_texts) if test_texts else None
    return _fit_linear(X, y, vectorizer.transform(val_texts), yv, Xt, yt if test_texts else None, config, started)
