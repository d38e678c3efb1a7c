"""What the cache buys: head experiments in seconds instead of a pass over the images.

    python benchmarks/heads.py [--skip-pipeline]

1. The full default logistic-regression C sweep (34 values of C from 1e-6 to 1e5, warm-started,
   parallel segments) on 10,000 × 1,280 float32 EfficientNet-Lite0 features of real Fashion-MNIST
   training images (10 classes), scored on 1,000 validation images. Target: under 60 s.
2. In a throwaway copy of this project with the default params.yaml: a cold `dvc repro` (the whole
   default pipeline, as `make repro` runs it; empty ONNX cache, nothing extracted), then the same
   command after editing one head's params (train_head.logreg.normalize): the head-only rerun, which
   runs that head's stages (train, evaluate, export, predict), the fine-tune decision and the summary.
   Prints both times, their ratio (target: under 5%) and the stages the rerun ran.
3. The same on the part of the pipeline the head experiment loop needs, `dvc repro evaluate`
   (prepare → extract → heads → plateau → finetune decision → evaluate): reported, no target.

    python benchmarks/heads.py --sgd-passes STORE [--passes 20] [--train-rows N ...]

How ``sgd_logreg``'s defaults (passes over the store, C grid; ``configs.HEAD_DEFAULTS``) were chosen: on a
real store (e.g. EfficientNet-Lite0 features of Fashion-MNIST), one classifier per C of the wide grid (34 values
from 1e-6 to 1e5) trained side by side as the head trains them, validation accuracy after every pass, against
the in-memory ``logreg`` head's best validation accuracy on the same splits. ``--train-rows`` repeats it on
seeded subsets of the train split (how the passes needed change with the store's size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from featurestore.configs import HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.extract.launch import extract_features
from featurestore.heads.estimators import sweep_c
from featurestore.store.hdf5 import FeatureStore, SplitArrays, write_store

ROOT = Path(__file__).resolve().parent.parent


def sweep_benchmark(workdir: Path) -> dict:
    images = workdir / "images"
    prepare_fashion_mnist(images, labels_per_class=1000, val_per_class=100, test_per_class=1, progress=False)
    store_path = workdir / "lite0.h5"
    extract_features(images, store_path, "efficientnet_lite0", image_size=112, crop_pct=1.0, progress=False)
    store = FeatureStore(store_path)
    X, y, _ = store.load("train")
    Xv, yv, _ = store.load("val")
    config = HeadConfig(head="logreg")
    started = time.perf_counter()
    sweep = sweep_c(config, X, y, Xv, yv)
    seconds = time.perf_counter() - started
    return {
        "sweep_rows": int(X.shape[0]), "sweep_dim": int(X.shape[1]), "sweep_dtype": str(X.dtype),
        "sweep_points": len(sweep), "sweep_seconds": round(seconds, 2),
        "best_val_accuracy": max(p["val_accuracy"] for p in sweep),
    }


def run_dvc(project: Path, env: dict, *targets: str) -> tuple[float, list[str]]:
    """Seconds of one `dvc repro [targets]` and the stages it ran."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=project, env=env, check=True,
                            capture_output=True, text=True)
    return time.perf_counter() - started, re.findall(r"Running stage '([^']+)'", result.stdout)


def copy_project(workdir: Path) -> Path:
    project = workdir / "project"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "pipelines", "featurestore", ".dvc"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(source, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    return project


def head_rerun_benchmark(workdir: Path, *targets: str) -> dict:
    """Cold `dvc repro [targets]` in a fresh copy (empty caches), then the rerun after a head-param edit."""
    project = copy_project(workdir)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FEATURESTORE_CACHE": str(workdir / "cold-cache")}
    cold, cold_stages = run_dvc(project, env, *targets)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_head"]["logreg"]["normalize"] = "l2"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    head_only, rerun_stages = run_dvc(project, env, *targets)
    return {"command": " ".join(["dvc repro", *targets]), "cold_repro_seconds": round(cold, 1),
            "cold_stages": len(cold_stages), "head_only_rerun_seconds": round(head_only, 1),
            "head_only_vs_cold": round(head_only / cold, 3), "rerun_stages": rerun_stages}


def train_subset(store: FeatureStore, rows: int, out: Path, seed: int = 0) -> FeatureStore:
    """A copy of ``store`` whose train split is ``rows`` rows drawn without replacement (val as it is)."""
    splits = {}
    for split in ("train", "val"):
        X, y, ids = store.load(split)
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:rows]) if split == "train" else slice(None)
        paths = store.paths(split)
        splits[split] = SplitArrays(X[keep], y[keep], list(ids[keep]), list(paths[keep]))
    return FeatureStore(write_store(out, store.fingerprint, store.class_names, splits, dtype=store.dtype))


def sgd_passes_benchmark(store: FeatureStore, passes: int) -> dict:
    """Validation accuracy of sgd_logreg against passes over train, for every C of the wide grid."""
    from featurestore.heads.streaming import chunked_accuracies, fit_scaler, fit_sgd, present_classes

    config = HeadConfig(head="sgd_logreg", c_min=1e-6, c_max=1e5, c_points=34, max_iter=passes)
    grid = config.c_grid()
    scaler = fit_scaler(store, ("train",))
    curve, started = [], time.perf_counter()

    def on_pass(done: int, classifiers: list) -> None:
        accuracies = chunked_accuracies(store, "val", scaler, classifiers)
        best = int(np.argmax(accuracies))
        curve.append({"passes": done, "seconds": round(time.perf_counter() - started, 1),
                      "best_C": float(grid[best]), "best_val_accuracy": round(accuracies[best], 4),
                      "val_accuracy": [round(a, 4) for a in accuracies]})
        print(f"  pass {done:3d}: best C {grid[best]:.3g} val {accuracies[best]:.4f} "
              f"({curve[-1]['seconds']} s)", flush=True)

    fit_sgd(store, ("train",), scaler, grid, store.count("train"), config, present_classes(store, ("train",)),
            on_pass=on_pass)
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, yv, _ = store.load("val", dtype=np.float32)
    logreg = sweep_c(HeadConfig(head="logreg", n_jobs=1), X, y, Xv, yv)
    best = max(logreg, key=lambda p: p["val_accuracy"])
    return {"store": str(store.path), "train_rows": store.count("train"), "val_rows": store.count("val"),
            "grid": grid.tolist(), "curve": curve, "logreg_best_C": best["C"],
            "logreg_val_accuracy": best["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-pipeline", action="store_true", help="only the sweep")
    parser.add_argument("--sgd-passes", type=Path, metavar="STORE", help="only sgd_logreg's accuracy against passes "
                                                                        "on STORE (see above)")
    parser.add_argument("--passes", type=int, default=20, help="with --sgd-passes: passes over train")
    parser.add_argument("--train-rows", type=int, nargs="*", default=[], help="with --sgd-passes: also on subsets "
                                                                              "of train of these sizes")
    args = parser.parse_args()
    if args.sgd_passes:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            stores = [FeatureStore(args.sgd_passes)] + [train_subset(FeatureStore(args.sgd_passes), rows,
                                                                     Path(tmp) / f"train{rows}.h5")
                                                        for rows in args.train_rows]
            for store in stores:
                print(f"sgd_logreg on {store.count('train')} train rows, {store.count('val')} val rows:", flush=True)
                results.append(sgd_passes_benchmark(store, args.passes))
                print(f"  logreg (in memory): best C {results[-1]['logreg_best_C']:.3g} val "
                      f"{results[-1]['logreg_val_accuracy']:.4f}", flush=True)
        print(json.dumps(results))
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = sweep_benchmark(Path(tmp))
        print(f"logreg C sweep: {figures['sweep_points']} values of C on {figures['sweep_rows']} × "
              f"{figures['sweep_dim']} {figures['sweep_dtype']} in {figures['sweep_seconds']:.1f} s (target < 60 s)")
        if not args.skip_pipeline:
            for key, targets, target in (("pipeline", (), " (target < 0.05)"), ("evaluate", ("evaluate",), "")):
                run = figures[key] = head_rerun_benchmark(Path(tmp) / key, *targets)
                print(f"cold `{run['command']}` {run['cold_repro_seconds']:.1f} s ({run['cold_stages']} stages), "
                      f"head-only rerun {run['head_only_rerun_seconds']:.1f} s: ratio "
                      f"{run['head_only_vs_cold']:.3f}{target}\n  rerun ran: {', '.join(run['rerun_stages'])}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
