"""What the cache buys: head experiments in seconds instead of a pass over the images.

    python benchmarks/heads.py [--skip-pipeline]

1. The full default logistic-regression C sweep (34 values of C from 1e-6 to 1e5, warm-started,
   parallel segments) on 10,000 × 1,280 float32 EfficientNet-Lite0 features of real Fashion-MNIST
   training images (10 classes), scored on 1,000 validation images. Target: under 60 s.
2. In a throwaway copy of this project with the default params.yaml: a cold `dvc repro evaluate`
   (prepare → extract → train_head → evaluate; empty ONNX cache, nothing extracted), then the same
   command after editing one head's params (train_head.logreg.normalize): the head-only rerun.
   Prints both times and their ratio. Target: under 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from featurestore.extract import extract_features
from featurestore.heads import HeadConfig, sweep_c
from featurestore.prepare import prepare_fashion_mnist
from featurestore.store import FeatureStore

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


def run_dvc(project: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def pipeline_benchmark(workdir: Path) -> dict:
    project = workdir / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pipelines", "featurestore", ".dvc"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(source, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FEATURESTORE_CACHE": str(workdir / "cold-cache")}
    cold = run_dvc(project, env)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_head"]["logreg"]["normalize"] = "l2"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    head_only = run_dvc(project, env)
    return {"cold_repro_seconds": round(cold, 1), "head_only_rerun_seconds": round(head_only, 1),
            "head_only_vs_cold": round(head_only / cold, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-pipeline", action="store_true", help="only the sweep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = sweep_benchmark(Path(tmp))
        print(f"logreg C sweep: {figures['sweep_points']} values of C on {figures['sweep_rows']} × "
              f"{figures['sweep_dim']} {figures['sweep_dtype']} in {figures['sweep_seconds']:.1f} s (target < 60 s)")
        if not args.skip_pipeline:
            figures.update(pipeline_benchmark(Path(tmp)))
            print(f"cold dvc repro {figures['cold_repro_seconds']:.1f} s, head-only rerun "
                  f"{figures['head_only_rerun_seconds']:.1f} s: ratio {figures['head_only_vs_cold']:.3f}"
                  " (target < 0.05)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
