"""A real configuration where the cache-only curve has plateaued: `auto` fine-tunes, and test accuracy rises.

    python benchmarks/plateau_demo.py [--labels-per-class 1600] [--val-per-class 200] [--min-gain G] [--epochs N]
                                      [--workdir DIR]

More labels from the same Debian Fashion-MNIST: ``--labels-per-class`` training images per class (nested
budgets 200, 400, 800, 1600), 200 validation and 200 test images per class, EfficientNet-Lite0 at 112 px.
The plateau rule of params.yaml (last doubling's gain, paired bootstrap interval over the validation images,
plateau when its upper bound is below min_gain), then the fine-tune stage in ``auto`` mode with the defaults
of params.yaml (the decision: fine-tuned only when it beats the probe by more than the validation noise), and
the test accuracy of the deployed logistic-regression head against the cache-only one. ``--min-gain`` overrides
the rule's (what a doubling of the labels must buy for more labels to be worth it). ``--epochs`` caps the
fine-tuning epochs (16 times the default's images make an epoch 16 times longer: 3 epochs there are 4 times the
default's optimiser steps). Prints the default
configuration's verdict (data/plateau/efficientnet_lite0.json, if ``make repro`` ran) beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from featurestore.configs import FinetuneConfig, FinetuneStageOptions, HeadConfig, extract_options
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.reports import evaluate_head
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore
from featurestore.transfer.decision import run_finetune_stage
from featurestore.transfer.plateau import PlateauRule, detect_plateau

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels-per-class", type=int, default=1600)
    parser.add_argument("--val-per-class", type=int, default=200)
    parser.add_argument("--min-gain", type=float, help="the plateau rule's min_gain (default: params.yaml's)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: params.yaml's)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fs-plateau-"))
    data, store = work / "prepared", work / "features" / "efficientnet_lite0.h5"
    started = time.perf_counter()
    if not data.exists():
        prepare_fashion_mnist(data, args.labels_per_class, args.val_per_class, 200, seed=0, progress=False)
    options = extract_options(params["extract"]["efficientnet_lite0"])
    extract_features(data, store, "efficientnet_lite0", progress=False, **options)
    rule_params = params["plateau"]["efficientnet_lite0"]
    budgets = tuple(args.labels_per_class // 2 ** k for k in (3, 2, 1, 0))
    min_gain = args.min_gain if args.min_gain is not None else rule_params["min_gain"]
    rule = PlateauRule(budgets, min_gain, rule_params["level"], rule_params["seed"])
    plateau = detect_plateau(store, rule, out=work / "plateau.json")
    print(json.dumps({k: plateau[k] for k in ("plateaued", "gain", "interval", "reason")}), flush=True)

    head = train_head(store, HeadConfig(head="logreg"))
    head_path = head.save(work / "heads" / "efficientnet_lite0__logreg.skops")
    settings = params["finetune"]["efficientnet_lite0"]
    config = FinetuneConfig(**{k: v for k, v in settings.items() if k not in ("mode", "device")})
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    decision = run_finetune_stage("efficientnet_lite0", head_path, data, work / "finetune", plateau,
                                  FinetuneStageOptions(config=config, heads={"logreg": HeadConfig(head="logreg")},
                                                       extract=options))
    cache_only, _, _ = evaluate_head(head, FeatureStore(store))
    report = {"labels_per_class": args.labels_per_class, "val_per_class": args.val_per_class, "epochs": config.epochs,
              "min_gain": min_gain,
              "plateau": {k: plateau[k] for k in ("plateaued", "gain", "interval")}, "finetuned": decision["finetuned"],
              "chosen": decision["chosen"], "choice": decision.get("choice"), "test_cache_only": cache_only["top1"]}
    if decision["chosen"] == "finetuned":
        finetuned = load_head(work / "finetune" / "heads" / "efficientnet_lite0_ft__logreg.skops")
        metrics, _, _ = evaluate_head(finetuned, FeatureStore(work / "finetune" / "features.h5"))
        report["test_finetuned"] = metrics["top1"]
    report["seconds"] = round(time.perf_counter() - started)
    default = ROOT / "data" / "plateau" / "efficientnet_lite0.json"
    if default.is_file():
        verdict = json.loads(default.read_text())
        report["default_verdict"] = {k: verdict.get(k) for k in ("plateaued", "gain", "interval")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
