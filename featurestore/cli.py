"""The ``featurestore`` command: one subcommand per pipeline stage, plus inspection helpers."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .console import setup_logging
from .errors import FeaturestoreError


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import list_backbones
    from .backbones.torchvision_models import cached_weights_path, default_weights, torchvision_names

    if args.torchvision:
        rows = []
        for name in torchvision_names():
            weights = default_weights(name)
            cached = cached_weights_path(weights).is_file()
            rows.append({"name": f"tv:{name}", "weights": str(weights), "cached": cached})
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                print(f"{row['name']:32s} {row['weights']:48s} {'cached' if row['cached'] else 'not cached'}")
        return 0
    rows = [
        {
            "name": spec.name,
            "feature_dim": spec.feature_dim,
            "weights_source": spec.weights_source,
            "preprocessing": spec.preprocessing.as_dict(),
            "description": spec.description,
        }
        for spec in list_backbones()
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        pre = row["preprocessing"]
        print(
            f"{row['name']:22s} dim={row['feature_dim']:<5d} input={pre['image_size']}px "
            f"resize={pre['resize_size']} crop=center {pre['interpolation']} "
            f"mean={[round(v, 3) for v in pre['mean']]} std={[round(v, 3) for v in pre['std']]}\n"
            f"{'':22s} weights: {row['weights_source']}"
        )
    print("tv:<model>             any torchvision classification model with its default weights "
          "(`featurestore backbones --torchvision` lists them)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare_fashion_mnist

    counts = prepare_fashion_mnist(
        args.out, args.labels_per_class, args.val_per_class, args.test_per_class, args.seed, args.source,
        progress=not args.no_progress,
    )
    print(json.dumps({"train": counts.train, "val": counts.val, "test": counts.test}))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract_features

    summary = extract_features(
        args.data,
        args.out,
        args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        engine=args.engine,
        dtype=args.dtype,
        on_error=args.on_error,
        progress=not args.no_progress,
    )
    if args.json:
        print(summary.to_json())
    else:
        print(
            f"{summary.out}: {summary.extracted} extracted, {summary.resumed} resumed, {summary.reused} reused, "
            f"{len(summary.skipped)} skipped in {summary.seconds:.1f} s on {summary.device} ({summary.engine}) "
            f"(fingerprint {summary.fingerprint_hash})"
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .store import FeatureStore

    info = FeatureStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fp = info["fingerprint"]
    pre = fp["preprocessing"]
    print(f"{info['path']} ({info['size_bytes'] / 1e6:.1f} MB, schema {info['schema_version']})")
    print(f"  fingerprint   {info['fingerprint_hash']}")
    print(f"  backbone      {fp['backbone']}  weights sha256 {fp['weights_sha256'][:16]}…")
    print(f"  layer         {fp['layer']}")
    print(f"  features      {info['feature_dim']} × {info['dtype']} (computed in {fp['compute']})")
    print(f"  preprocessing {pre['image_size']}px, resize {pre['resize_size']} {pre['interpolation']}, "
          f"centre crop, mean {[round(v, 3) for v in pre['mean']]}, std {[round(v, 3) for v in pre['std']]}")
    print(f"  classes       {len(info['class_names'])}: {', '.join(info['class_names'])}")
    for name, split in info["splits"].items():
        print(f"  split {name:8s}{split['count']:>7d} images, chunks of {split['chunk_rows']} rows")
    if info["skipped"]:
        print(f"  skipped       {len(info['skipped'])} files:")
        for item in info["skipped"]:
            print(f"    {item['path']}: {item['reason']}")
    return 0


def _cmd_train_head(args: argparse.Namespace) -> int:
    from .heads import HeadConfig, train_head

    config = HeadConfig(
        head=args.head, normalize=args.normalize, c_min=args.c_min, c_max=args.c_max, c_points=args.c_points,
        max_iter=args.max_iter, n_jobs=args.n_jobs, seed=args.seed,
    )
    head = train_head(args.features, config, progress=not args.no_progress)
    head.save(args.out)
    summary = {**head.summary(), "out": str(args.out)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.out}: {head.name}, C={head.C:.3g} (best validation accuracy {summary['best_val_accuracy']:.4f} "
              f"over {len(head.sweep)} values of C), trained in {head.train_seconds:.1f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .heads import load_head
    from .reports import write_reports
    from .store import FeatureStore
    from .summary import comparison_table

    heads = [load_head(path) for path in args.heads]
    stores: dict[str, FeatureStore] = {}
    for path in args.features or []:
        store = FeatureStore(path)
        stores[store.fingerprint["backbone"]] = store
    for head in heads:
        if head.backbone not in stores:
            stores[head.backbone] = FeatureStore(head.store_path)
    results = write_reports(heads, stores, args.out, split=args.split)
    print(json.dumps(results, indent=2) if args.json else comparison_table(results), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    report = export_onnx(args.head, args.out, backbone=args.backbone, weights=args.weights)
    if args.json:
        print(json.dumps(report))
    else:
        check = report["check"]
        print(f"{report['model']}: {report['head']['name']}, {report['size_bytes'] / 1e6:.1f} MB, one graph; "
              f"check on {check['n']} images: max probability difference {check['max_probability_diff']:.2e}, "
              f"labels equal: {check['labels_equal']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_images

    summary = predict_images(args.model, args.data, args.out, batch_size=args.batch_size, workers=args.workers,
                             provider=args.provider, top_k=args.top_k, split=args.split,
                             progress=not args.no_progress)
    if args.json:
        print(summary.to_json())
    else:
        accuracy = "" if summary.accuracy is None else f", accuracy {summary.accuracy:.4f}"
        print(f"{summary.out}: {summary.predicted} images on {summary.provider}, {len(summary.skipped)} skipped "
              f"in {summary.seconds:.1f} s{accuracy}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .finetune import FinetuneConfig, finetune
    from .heads import load_head

    config = FinetuneConfig(
        unfreeze_blocks=args.unfreeze_blocks, head_lr=args.head_lr, backbone_lr_factor=args.backbone_lr_factor,
        weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
        train_batchnorm=args.train_batchnorm, augment=not args.no_augment, seed=args.seed, workers=args.workers,
    )
    result = finetune(load_head(args.head), args.data, args.out, config, device=args.device,
                      progress=not args.no_progress)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{result.out}: validation accuracy {result.start_val_accuracy:.4f} (linear probe) → "
              f"{result.best_val_accuracy:.4f} after {result.epochs_run} epochs in {result.seconds:.0f} s")
    return 0


def _cmd_curve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .curve import accuracy_table, run_curve
    from .finetune import FinetuneConfig
    from .plateau import CURVE_HEAD

    common = {"epochs": args.epochs, "batch_size": args.batch_size, "patience": args.patience,
              "seed": args.seed, "workers": args.workers}
    result = run_curve(
        args.features, args.data, args.out, args.budgets,
        FinetuneConfig(unfreeze_blocks=args.unfreeze_blocks, head_lr=args.head_lr, **common),
        FinetuneConfig(from_scratch=True, head_lr=args.scratch_lr, **common),
        probe_config=replace(CURVE_HEAD, normalize=args.normalize), device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps(result) if args.json else accuracy_table(result["points"]), end="" if not args.json else "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurestore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"featurestore {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backbones", help="list the backbone registry", description="List the backbone registry.")
    p.add_argument("--torchvision", action="store_true", help="list every tv:<model>, with its weights cache state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser(
        "prepare", help="write Fashion-MNIST as an ImageFolder of PNGs",
        description="Materialise Fashion-MNIST into OUT/{train,val,test}/<class>/*.png.",
    )
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--labels-per-class", type=int, default=100, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX .gz files")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "extract", help="run a frozen backbone over images into an HDF5 feature cache",
        description="Extract pooled features of every image into FILE.h5, reusing unchanged images.",
    )
    p.add_argument("--data", required=True, help="ImageFolder root (train/val/test/<class>/...) or a CSV manifest")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name, or tv:<torchvision model>")
    p.add_argument("--out", required=True, help="the HDF5 store to create or update")
    p.add_argument("--weights", help="a local checkpoint instead of the backbone's default weights")
    p.add_argument("--image-size", type=int, help="input size in pixels (default: the backbone's own)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction of the resized image (1.0 = no crop)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes that decode images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="auto: onnxruntime on the CPU (exported once, cached), torch on CUDA")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored feature dtype")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="what a bad image does")
    p.add_argument("--json", action="store_true", help="print one JSON summary line on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "train-head", help="train a scikit-learn head on a feature cache, C chosen on val",
        description="Sweep C on train→val, refit the best C on train+val, save the head with joblib.",
    )
    p.add_argument("--features", required=True, help="an HDF5 store with train and val splits")
    p.add_argument("--head", choices=("logreg", "linear_svm", "svm_rbf"), default="logreg")
    p.add_argument("--out", required=True, help="where to write HEAD.joblib")
    p.add_argument("--normalize", choices=("standard", "l2", "none"), default="standard",
                   help="feature standardisation, L2 normalisation, or none")
    p.add_argument("--c-min", type=float, default=1e-6)
    p.add_argument("--c-max", type=float, default=1e5)
    p.add_argument("--c-points", type=int, default=34, help="log-spaced values of C in the sweep")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--n-jobs", type=int, default=-1, help="parallel segments of the sweep (-1: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_head)

    p = sub.add_parser(
        "evaluate", help="score heads on the test split; metrics, confusion matrices, plots",
        description="Evaluate heads and write metrics.json, confusion CSV/PNG, C-sweep plots and a comparison table.",
    )
    p.add_argument("--heads", nargs="+", required=True, help="HEAD.joblib files")
    p.add_argument("--features", nargs="*", help="stores to use (default: the store each head was trained on)")
    p.add_argument("--out", default="data/reports", help="report folder")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export", help="one ONNX graph for backbone + head, checked against the Python pipeline",
        description="Export images → probabilities as a single ONNX file and verify it with onnxruntime.",
    )
    p.add_argument("--head", required=True, help="HEAD.joblib from train-head")
    p.add_argument("--out", required=True, help="MODEL.onnx to write (a report goes to MODEL.onnx.report.json)")
    p.add_argument("--backbone", help="backbone name (default: the one the head's features came from)")
    p.add_argument("--weights", help="the local checkpoint the head's features came from, if not the default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "predict", help="batch inference with an exported model (onnxruntime)",
        description="Classify images with MODEL.onnx; one CSV (or .jsonl) row per image.",
    )
    p.add_argument("--model", required=True, help="MODEL.onnx from export")
    p.add_argument("--data", required=True, help="ImageFolder, CSV manifest, or a folder of images")
    p.add_argument("--out", required=True, help="PRED.csv or PRED.jsonl")
    p.add_argument("--split", help="only this split of the data (e.g. test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes that decode images")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda fails unless the CUDA provider is really active; auto says which it used")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "finetune", help="fine-tune the top blocks of the backbone, starting from a logreg head",
        description="Unfreeze the top blocks, start the classifier from the linear probe, train with AdamW + "
                    "cosine schedule and early stopping on val; checkpoints every epoch, a rerun resumes.",
    )
    p.add_argument("--head", required=True, help="a logreg HEAD.joblib (the starting classifier)")
    p.add_argument("--data", required=True, help="ImageFolder with train and val splits")
    p.add_argument("--out", required=True, help="fine-tuned weights (.pth), usable as extract --weights")
    p.add_argument("--unfreeze-blocks", type=int, default=2)
    p.add_argument("--head-lr", type=float, default=3e-4)
    p.add_argument("--backbone-lr-factor", type=float, default=0.1, help="backbone LR = head LR × this")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=3, help="epochs without val improvement before stopping")
    p.add_argument("--train-batchnorm", action="store_true", help="let BatchNorm statistics of unfrozen blocks move")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "curve", help="scratch vs linear probe vs probe-then-fine-tune at several label budgets",
        description="Train the three methods per labels-per-class budget; write curve.json, CSV and plots.",
    )
    p.add_argument("--features", required=True, help="FILE.h5: the cache of DATA (train, val and test splits)")
    p.add_argument("--data", required=True, help="the ImageFolder the cache was extracted from")
    p.add_argument("--out", default="data/reports/curve", help="output folder")
    p.add_argument("--normalize", choices=("standard", "l2", "none"), default="standard",
                   help="feature scaling of the linear probe")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 100], help="labels per class")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--unfreeze-blocks", type=int, default=2)
    p.add_argument("--head-lr", type=float, default=3e-4, help="fine-tuning head LR (backbone: × 0.1)")
    p.add_argument("--scratch-lr", type=float, default=2e-3, help="learning rate of the from-scratch baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_curve)

    p = sub.add_parser("info", help="describe a feature store", description="Print a feature store's metadata.")
    p.add_argument("store", help="an HDF5 file written by `featurestore extract`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
