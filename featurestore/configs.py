"""Choices and configuration dataclasses shared by the library, the stage scripts and the CLI.

Nothing heavy is imported here, so ``featurestore --help`` and the argument checks cost no torch or
scikit-learn import; the modules that do the work import their configs from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import BadValueError, FeaturestoreError
from .utils.validation import check_choice, check_range

HEADS = ("logreg", "linear_svm", "svm_rbf", "sgd_logreg", "knn", "multilayer")
# The verdict's models fitted on a store's items without (or beside) its encoder: `train-head --head` fits them too.
CHALLENGERS = ("baseline", "hybrid", "small_cnn")
NORMALIZATIONS = ("standard", "l2", "none")
ENGINE_CHOICES = ("auto", "torch", "onnxruntime")
LAYER_CHOICES = ("penultimate", "all")  # extract --layers: encode.backbones.layers
KEEP_ROUNDS = ("best", "last")  # SmallCNNConfig.keep_round
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
STORE_DTYPES = ("float32", "float16")
ON_ERROR_CHOICES = ("skip", "fail")
ON_DUPLICATE_CHOICES = ("warn", "error", "keep")
FINETUNE_MODES = ("auto", "always", "never")
CURVE_METHODS = ("scratch", "small_cnn", "pixels", "linear_probe", "knn", "multilayer", "probe_finetune")
TEXT_CURVE_METHODS = ("tfidf", "linear_probe", "knn", "multilayer", "probe_finetune", "setfit", "scratch")
ALL_CURVE_METHODS = tuple(dict.fromkeys(CURVE_METHODS + TEXT_CURVE_METHODS))
# What a curve runs unless told otherwise: everything but the from-scratch network, which takes hours on a CPU.
DEFAULT_CURVE_METHODS = {"image": ("pixels", "linear_probe", "probe_finetune"),
                         "text": ("tfidf", "linear_probe", "probe_finetune")}
LONG_DOCUMENT_MODES = ("truncate", "chunk-mean")
MIN_IMAGE_SIZE = 8


def option(default, help: str, choices: tuple | None = None):
    """A config field with the help text (and choices) its command-line option shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


# The sweep and solver defaults of each head: a field of HeadConfig left at None takes its head's value here, so an
# explicit value always wins. sgd_logreg's are its own, measured (docs/scale.md, benchmarks/heads.py
# --sgd-passes, Lite0 features of 2,000-8,000 Fashion-MNIST images): each of its passes reads the whole store, and
# its validation accuracy (averaged SGD) levels off after about 5 passes over 8,000 rows (0.874; in-memory logreg
# 0.880) where the in-memory solvers need hundreds of iterations; it is flat within noise from C = 0.1 to 10 (the
# best was 1-22) and 1-2 points lower at C <= 1e-3, so a grid of one value per decade from 1e-2 to 1e2 suffices
# (an edge extends it, estimators.extend_sweep). Its cost: 5 passes for the 5 values of C together, 5 for the refit.
HEAD_SWEEP_DEFAULTS = {"c_min": 1e-6, "c_max": 1e5, "c_points": 34, "max_iter": 300}
HEAD_DEFAULTS: dict[str, dict] = {
    "sgd_logreg": {"c_min": 1e-2, "c_max": 1e2, "c_points": 5, "max_iter": 5},
    # per candidate set of layers (heads/multilayer.py); the per-layer weighting puts the best C inside this range
    "multilayer": {"c_min": 1e-4, "c_max": 1e2, "c_points": 13},
}


def _per_head(name: str) -> str:
    """The defaults of one HeadConfig field as help text, e.g. ``default 300; sgd_logreg 5``."""
    special = "; ".join(f"{head} {values[name]:g}" for head, values in HEAD_DEFAULTS.items() if name in values)
    return f"default {HEAD_SWEEP_DEFAULTS[name]:g}" + (f"; {special}" if special else "")


@dataclass(frozen=True)
class HeadConfig:
    """How to train a head. The C grid is ``c_points`` values from ``c_min`` to ``c_max`` (log-spaced).

    ``c_min``, ``c_max``, ``c_points`` and ``max_iter`` left at None take the head's defaults
    (:data:`HEAD_DEFAULTS`, else :data:`HEAD_SWEEP_DEFAULTS`) when the config is made, so a config always holds
    numbers and an explicit value always wins.
    """

    head: str = option("logreg", "the head: multinomial logistic regression, linear SVM, RBF SVM, logistic "
                                 "regression by SGD streamed from the store (memory independent of its size), or a "
                                 "weighted vote of the k nearest train rows by cosine (k and temperature on val), or "
                                 "logistic regression on the layers of an `extract --layers all` store chosen on val",
                       HEADS)
    normalize: str = option("standard", "feature standardisation, L2 normalisation, or none", NORMALIZATIONS)
    c_min: float | None = option(None, f"smallest C of the sweep ({_per_head('c_min')})")
    c_max: float | None = option(None, f"largest C of the sweep ({_per_head('c_max')})")
    c_points: int | None = option(None, f"log-spaced values of C in the sweep ({_per_head('c_points')})")
    max_iter: int | None = option(None, f"solver iterations per fit, for sgd_logreg passes over the store "
                                        f"({_per_head('max_iter')})")
    n_jobs: int = option(-1, "parallel segments of the sweep (-1: all cores; small sweeps run in-process)")
    calibration_folds: int = option(3, "cross-validation folds of the SVMs' probability calibration")
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        check_choice("head", self.head, HEADS)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        for name, value in {**HEAD_SWEEP_DEFAULTS, **HEAD_DEFAULTS.get(self.head, {})}.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, here
        check_range("c_min", self.c_min, 0, low_open=True)
        check_range("c_max", self.c_max, self.c_min)
        check_range("c_points", self.c_points, 1)
        check_range("max_iter", self.max_iter, 1)

    def c_grid(self) -> np.ndarray:
        """The configured C values, (c_points,) float64 ascending."""
        return np.logspace(np.log10(self.c_min), np.log10(self.c_max), self.c_points)


# The learning curve's probe (and the plateau rule's): a coarser C grid, one sweep per budget.
CURVE_HEAD = HeadConfig(head="logreg", c_points=12)
# Their multilayer head (heads/multilayer.py): its own grid (HEAD_DEFAULTS), per candidate set of layers.
CURVE_MULTILAYER = HeadConfig(head="multilayer")


FINETUNE_SCHEDULES = ("fixed", "gradual")
FINETUNE_SOURCES = ("cache", "images")


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (all part of the checkpoint's identity).

    Defaults chosen by a search on the validation split of the default data (docs/fine-tuning.md).
    """

    unfreeze_blocks: int = option(6, "top MBConv blocks that train (with the head convolution and classifier)")
    schedule: str = option("fixed", "fixed: every unfrozen block trains from epoch 1; gradual: the top block "
                                    "first, one more block each epoch", FINETUNE_SCHEDULES)
    head_lr: float = option(1e-3, "learning rate of the classifier")
    backbone_lr_factor: float = option(1.0, "the unfrozen blocks learn at head_lr × this")
    layer_lr_decay: float = option(1.0, "each block below the top learns at this × the rate of the block above")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_epochs: float = option(1.0, "the learning rate rises linearly over this many epochs, then decays "
                                       "along a cosine")
    epochs: int = option(12, "epochs at most")
    batch_size: int = option(32, "images per step")
    patience: int = option(4, "epochs without a validation gain before stopping")
    train_batchnorm: bool = option(False, "let the BatchNorm statistics of unfrozen blocks move")
    views: int = option(0, "augmented views per train image (random resized crop + flip; 0: the clean image "
                           "only); with the trunk cache they are computed once and one is drawn per epoch")
    crop_scale_min: float = option(0.6, "smallest area fraction of a random crop")
    source: str = option("cache", "cache: the top blocks read the trunk cache; images: decode, augment and run "
                                  "the frozen trunk every epoch", FINETUNE_SOURCES)
    cache_dtype: str = option("float16", "stored dtype of the trunk cache", STORE_DTYPES)
    seed: int = option(0, "random seed")
    workers: int = option(1, "DataLoader processes that decode images")
    max_grad_norm: float = option(1.0, "each step's gradients are clipped to this norm (0: not clipped)")
    backoffs: int = option(4, "a diverged epoch is undone and run again at half the learning rate, at most this "
                              "many times (0: never)")
    probe_scale_floor: float = option(0.1, "the starting probe standardises each feature by at least this × the "
                                           "median feature's standard deviation (0: plain standardisation)")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The defaults of each modality, chosen on validation (docs/fine-tuning.md and docs/texts.md): the code's, the CLI's
# and params.yaml's (a test keeps the three equal).
FINETUNE_DEFAULTS = {
    "image": FinetuneConfig(),
    "text": FinetuneConfig(unfreeze_blocks=2, backbone_lr_factor=0.1, epochs=8, batch_size=16, patience=3,
                           workers=0),
}


def finetune_defaults(kind: str) -> FinetuneConfig:
    """The fine-tuning defaults of a modality: ``image`` or ``text`` (a store fingerprint's ``kind``)."""
    return FINETUNE_DEFAULTS[check_choice("modality", kind, tuple(FINETUNE_DEFAULTS))]


# How a backbone can be fine-tuned, per modality: ``probe_finetune`` (the top blocks or layers trained from the probe
# with cross-entropy: finetune.py, text_finetune.py) and, for sentence encoders, ``setfit`` (contrastive tuning on
# pairs, then the probe refitted: setfit.py). The first of each is what `featurestore finetune` runs by default.
FINETUNE_METHODS = {"image": ("probe_finetune",), "text": ("probe_finetune", "setfit")}


@dataclass(frozen=True)
class SetFitConfig:
    """SetFit's settings (``transfer/setfit.py``): the top transformer layers tuned on balanced pairs of the train
    texts with the cosine-similarity loss, then the probe refitted on the tuned embeddings (C on val).

    Defaults chosen on validation on BBC News (:data:`SETFIT_DEFAULTS`)."""

    iterations: int = option(20, "rounds of pairs per epoch: each gives every train text one partner of its own "
                                 "class and one of another")
    max_pairs: int = option(2000, "at most this many pairs per epoch, drawn from the rounds' (0: no cap)")
    unfreeze_blocks: int = option(4, "top transformer layers that train")
    lr: float = option(2e-5, "AdamW learning rate of the unfrozen layers")
    epochs: int = option(1, "passes over freshly drawn pairs; the probe is refitted and scored on val after each")
    batch_size: int = option(16, "pairs per step")
    max_length: int = option(128, "tokens per text while tuning (the refitted probe embeds as the store does)")
    warmup_fraction: float = option(0.1, "the learning rate rises linearly over this share of the steps, then "
                                         "decays along a cosine")
    weight_decay: float = option(0.01, "AdamW weight decay")
    seed: int = option(0, "random seed (pairs, dropout)")

    def __post_init__(self) -> None:
        for name in ("iterations", "unfreeze_blocks", "epochs", "batch_size"):
            check_range(f"setfit {name}", getattr(self, name), 1)
        check_range("setfit max_pairs", self.max_pairs, 0)
        check_range("setfit lr", self.lr, 0, low_open=True)
        check_range("setfit max_length", self.max_length, 8, 512)
        check_range("setfit warmup_fraction", self.warmup_fraction, 0, 1)
        check_range("setfit weight_decay", self.weight_decay, 0)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# Chosen on validation on BBC News at 5 labels/topic (25 train articles, 250 val; the probe: val 0.928), one epoch of
# 1,000 pairs each, seed 0 (docs/texts.md): top 2 layers at lr 2e-5 0.936, at 1e-4 0.936; top 4 at 2e-5 **0.952**,
# at 1e-4 0.948 (seed 1: 0.940), at 1e-4 with 64-pair steps 0.936, at 3e-4 with 64-pair steps 0.932; all 6 at 2e-5
# 0.940 (twice the time). At 2 labels/topic (val probe 0.748): top 2 at 2e-5 0.796, at 1e-4 0.824. max_pairs bounds an
# epoch from 10 labels/topic on (2 × 20 rounds × 50 texts); a pair cost 0.1-0.2 s on these shared 2 cores.
SETFIT_DEFAULTS = SetFitConfig()


@dataclass(frozen=True)
class ScratchConfig:
    """The from-scratch baseline: the same architecture from random weights, every layer training, for a fixed
    step budget (the same at every label budget), keeping the weights of its best validation epoch."""

    lr: float = option(2e-3, "AdamW learning rate (chosen on validation)")
    image_size: int = option(56, "images: input size in pixels (chosen on validation)")
    max_length: int = option(128, "texts: tokens per document (truncated)")
    steps: int = option(1200, "optimisation steps, whatever the number of labels")
    batch_size: int = option(32, "images per step")
    weight_decay: float = option(5e-5, "AdamW weight decay")
    augment: bool = option(True, "random resized crops and flips")
    crop_scale_min: float = option(0.6, "smallest area fraction of a random crop")
    seed: int = option(0, "random seed")
    workers: int = option(1, "DataLoader processes that decode images")


@dataclass(frozen=True)
class SmallCNNConfig:
    """The small from-scratch image network (``transfer/small_cnn.py``): conv blocks at the data's own resolution,
    trained for ``rounds`` validation rounds (each whole epochs of at least ``round_images`` images) on a warmup +
    cosine schedule, once per learning rate of ``lrs``; the rate and round with the best validation accuracy are
    kept. Defaults chosen on validation on Fashion-MNIST (docs/curves.md)."""

    lrs: tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "AdamW learning rates tried; the best on validation is kept")
    image_size: int = option(28, "input size in pixels (grayscale; Fashion-MNIST's own 28)")
    widths: tuple[int, ...] = option((32, 64), "channels of each block (conv-BN-ReLU layers, then a 2× max-pool)")
    convs: int = option(1, "3×3 conv-BN-ReLU layers per block")
    hidden: int = option(128, "units of the hidden layer on the flattened maps (0: global average pooling, "
                              "then the classifier)")
    dropout: float = option(0.3, "dropout before each linear layer")
    weight_decay: float = option(5e-4, "AdamW weight decay")
    batch_size: int = option(32, "images per step")
    rounds: int = option(30, "validation rounds; the learning rate follows a cosine to zero over them")
    round_images: int = option(1000, "a round is the fewest whole epochs that see at least this many images")
    augment: bool = option(False, "random shifts (zero padding) and horizontal flips")
    shift: int = option(2, "largest random shift in pixels")
    seed: int = option(0, "random seed (initial weights, batch order, augmentation)")
    keep_round: str = option("best", "best: each rate's best validation round is kept (the curve's line); last: its "
                                     "last (the deployable model, train-head --head small_cnn: a validation score "
                                     "chosen among 3 rates, not 90 rounds)", KEEP_ROUNDS)
    threads: int = option(0, "torch CPU threads while it trains (0: torch's default); on a 2-core machine shared "
                             "with other jobs one thread was 3-7× faster than two")

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))  # YAML and the CLI give lists
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.lrs or not self.widths:
            raise BadValueError("small_cnn needs at least one learning rate and one block")
        check_choice("keep_round", self.keep_round, KEEP_ROUNDS)
        for lr in self.lrs:
            check_range("small_cnn lr", lr, 0, low_open=True)
        for width in self.widths:
            check_range("small_cnn width", width, 1)
        check_range("small_cnn image_size", self.image_size, MIN_IMAGE_SIZE)
        check_range("small_cnn dropout", self.dropout, 0, 1, high_open=True)
        check_range("small_cnn weight_decay", self.weight_decay, 0)
        check_range("small_cnn hidden", self.hidden, 0)
        if self.image_size >> len(self.widths) < 1:
            raise BadValueError(f"small_cnn: {len(self.widths)} blocks halve {self.image_size} px to nothing")
        check_range("small_cnn threads", self.threads, 0)
        for name in ("convs", "batch_size", "rounds", "round_images"):
            check_range(f"small_cnn {name}", getattr(self, name), 1)
        check_range("small_cnn shift", self.shift, 0)


SMALL_CNN_DEFAULTS = SmallCNNConfig()


# params.yaml keys of a finetune section that are not FinetuneConfig's: the stage's own, and SetFit's sub-section.
FINETUNE_STAGE_KEYS = ("mode", "device", "methods", "setfit")
CURVE_KEYS = ("budgets", "methods", "probe_normalize", "device", "scratch", "small_cnn")


@dataclass(frozen=True)
class CurveOptions:
    """Everything a learning curve (``transfer/curve.py``, ``run_curve``) is told: the label budgets (labels per
    class), the methods (None or empty: the modality's :data:`DEFAULT_CURVE_METHODS`), each method's settings,
    the device, whether a test split that shares items with train or val is scored, and the local checkpoint an
    image store was extracted with (``weights``: where image fine-tuning starts; None: the registry's), and the
    store's layer store (``layers``: the ``multilayer`` method's features, the same items extracted with
    ``--layers all``).

    Built once by its caller: from the command line (``commands.cmd_curve``) or from params.yaml
    (:meth:`from_params`, ``pipelines/curve.py``)."""

    budgets: tuple[int, ...] = (10, 100)
    methods: tuple[str, ...] | None = None
    finetune: FinetuneConfig = FinetuneConfig()
    scratch: ScratchConfig = ScratchConfig()
    probe: HeadConfig = CURVE_HEAD
    small_cnn: SmallCNNConfig = SMALL_CNN_DEFAULTS
    setfit: SetFitConfig = SETFIT_DEFAULTS
    device: str = "auto"
    allow_overlap: bool = False
    weights: str | Path | None = None
    layers: str | Path | None = None  # the store's `extract --layers all` store: the multilayer line's features

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))  # YAML and the CLI give lists
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        for budget in self.budgets:
            check_range("curve budget", budget, 1)

    def recorded(self) -> dict:
        """The settings curve.json records, by its keys: probe, finetune, scratch, small_cnn, setfit (each asdict)."""
        return {"probe": asdict(self.probe), "finetune": asdict(self.finetune), "scratch": asdict(self.scratch),
                "small_cnn": asdict(self.small_cnn), "setfit": asdict(self.setfit)}

    @classmethod
    def from_params(cls, curve: dict, finetune: dict, extract: dict | None = None) -> CurveOptions:
        """The options of one backbone's params.yaml sections (or a named configuration's): ``curve`` (budgets,
        methods, probe_normalize, device, scratch, small_cnn), ``finetune`` (FinetuneConfig's fields, SetFit's under
        ``setfit``; the stage's mode, device and methods are not the curve's) and ``extract`` (its ``weights``).
        Unknown curve keys are errors, not silently ignored."""
        unknown = set(curve) - set(CURVE_KEYS)
        if unknown:
            raise FeaturestoreError(f"unknown curve params {sorted(unknown)}; known: {sorted(CURVE_KEYS)}")
        if "budgets" not in curve:
            raise FeaturestoreError("the curve params need budgets (labels per class)")
        return cls(budgets=curve["budgets"], methods=curve.get("methods"),
                   finetune=FinetuneConfig(**{k: v for k, v in finetune.items() if k not in FINETUNE_STAGE_KEYS}),
                   scratch=ScratchConfig(**(curve.get("scratch") or {})),
                   probe=replace(CURVE_HEAD, normalize=curve.get("probe_normalize", CURVE_HEAD.normalize)),
                   small_cnn=SmallCNNConfig(**(curve.get("small_cnn") or {})),
                   setfit=SetFitConfig(**(finetune.get("setfit") or {})), device=curve.get("device", "auto"),
                   weights=(extract or {}).get("weights"))


CURVE_DEFAULTS = CurveOptions()


def config_from_params(params: dict, head: str) -> HeadConfig:
    """A :class:`HeadConfig` from params.yaml's ``train_head`` section: its ``sweep`` keys, then the
    keys of the ``head``'s own sub-section. Unknown keys are errors, not silently ignored."""
    allowed = set(asdict(HeadConfig())) - {"head"}
    options = {**params.get("sweep", {}), **(params.get(head) or {})}
    unknown = set(options) - allowed
    if unknown:
        raise FeaturestoreError(f"unknown train_head params {sorted(unknown)} for {head}; known: {sorted(allowed)}")
    return HeadConfig(head=head, **{k: (float(v) if k in ("c_min", "c_max") else v) for k, v in options.items()})


@dataclass(frozen=True)
class Tokenization:
    """How a document becomes token windows (see ``encode/texts.py``): the first ``max_length`` tokens
    (``truncate``; ``side: left`` keeps the last), or overlapping windows of ``max_length`` tokens, ``stride``
    shared by neighbours, at most ``max_windows`` (``chunk-mean``)."""

    max_length: int = 256
    long_documents: str = "truncate"
    side: str = "right"
    stride: int = 64
    max_windows: int = 8

    def __post_init__(self) -> None:
        check_choice("long_documents", self.long_documents, LONG_DOCUMENT_MODES)
        check_choice("side", self.side, ("right", "left"))
        check_range("max_length", self.max_length, 8, 512)
        if self.long_documents == "chunk-mean":
            check_range("stride", self.stride, 0, self.max_length - 2, high_open=True)
            check_range("max_windows", self.max_windows, 1)

    def as_dict(self) -> dict:
        """The settings that shape the windows (stride and max_windows only for chunk-mean, side only for
        truncate), so a setting that changes nothing changes no fingerprint."""
        relevant = asdict(self)
        for name in (("stride", "max_windows") if self.long_documents == "truncate" else ("side",)):
            del relevant[name]
        return relevant


@dataclass(frozen=True)
class SplitRule:
    """The splits to make: the fraction of each class's items drawn into ``val`` and ``test`` (0: that split is
    not made), with ``seed`` ordering the draw (``data/splits.py``, recorded in the store's source)."""

    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("val_fraction", self.val_fraction, 0.0, 1.0)
        check_range("test_fraction", self.test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise BadValueError(f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leave no "
                                f"training items; keep their sum below 1")

    @property
    def makes_any(self) -> bool:
        return self.val_fraction > 0 or self.test_fraction > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict | None) -> SplitRule | None:
        return None if not record else cls(**record)


IMAGE_EXTRACT_KEYS = ("image_size", "crop_pct")
TEXT_EXTRACT_KEYS = ("max_length", "long_documents", "stride", "max_windows")
# weights: a local checkpoint (a tv: or timm: backbone's file), relative to the project; default the registry's weights
COMMON_EXTRACT_KEYS = ("batch_size", "workers", "device", "engine", "dtype", "on_error", "weights")
# val/test splits made for data that lacks them (data/splits.py), recorded in the store
SPLIT_KEYS = ("val_fraction", "test_fraction", "split_seed")


def extract_options(params: dict) -> dict:
    """``extract_features`` keyword arguments from one backbone's ``extract`` section of params.yaml: the
    common settings, and either the image preprocessing overrides or the text tokenization."""
    options = {k: params[k] for k in COMMON_EXTRACT_KEYS if k in params}
    if any(k in params for k in SPLIT_KEYS):
        options["splits"] = SplitRule(params.get("val_fraction", 0.0), params.get("test_fraction", 0.0),
                                      params.get("split_seed", 0))
    if any(k in params for k in TEXT_EXTRACT_KEYS):
        options["tokenization"] = Tokenization(**{k: params[k] for k in TEXT_EXTRACT_KEYS if k in params})
    else:
        options.update({k: params.get(k) for k in IMAGE_EXTRACT_KEYS})
    unknown = (set(params) - set(COMMON_EXTRACT_KEYS) - set(IMAGE_EXTRACT_KEYS) - set(TEXT_EXTRACT_KEYS)
               - set(SPLIT_KEYS))
    if unknown:
        raise FeaturestoreError(f"unknown extract params {sorted(unknown)}")
    return options


@dataclass(frozen=True)
class FinetuneStageOptions:
    """Everything the fine-tune stage (``transfer/decision.py``, ``run_finetune_stage``) is told besides its files.

    ``mode``: whether to fine-tune (auto: only when the cache-only curve has plateaued); ``config`` the fine-tuning
    run's settings; ``methods`` the fine-tuning methods that compete (texts may add ``setfit``, run with ``setfit``);
    ``weights`` the local checkpoint the store was extracted with, where an image fine-tune starts (None: the
    registry's); ``extract`` how the fine-tuned store is extracted (``extract_features`` keyword arguments). Built
    once: :meth:`from_params` for the DVC stage."""

    mode: str = "auto"
    config: FinetuneConfig = FinetuneConfig()
    methods: tuple[str, ...] = ("probe_finetune",)
    setfit: SetFitConfig = SETFIT_DEFAULTS
    device: str = "auto"
    weights: str | Path | None = None
    extract: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("fine-tune mode", self.mode, FINETUNE_MODES)
        object.__setattr__(self, "methods", tuple(self.methods or ("probe_finetune",)))

    @classmethod
    def from_params(cls, finetune: dict, extract: dict) -> FinetuneStageOptions:
        """The options of one backbone's params.yaml sections: ``finetune.<backbone>`` (FinetuneConfig's fields and
        the stage's mode, device, methods and setfit) and ``extract.<backbone>`` (how the fine-tuned store is
        extracted; its ``weights`` are where the fine-tune starts)."""
        extract = extract_options(extract)
        weights = extract.pop("weights", None)
        extract.pop("on_error", None)  # the fine-tuned store reads the items the frozen one already read
        return cls(mode=finetune.get("mode", "auto"),
                   config=FinetuneConfig(**{k: v for k, v in finetune.items() if k not in FINETUNE_STAGE_KEYS}),
                   methods=tuple(finetune.get("methods") or ("probe_finetune",)),
                   setfit=SetFitConfig(**(finetune.get("setfit") or {})), device=finetune.get("device", "auto"),
                   weights=weights, extract=extract)
