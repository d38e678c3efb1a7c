"""Transfer learning's promise, measured: scratch vs linear probe vs probe-then-fine-tune per label budget.

For each budget (labels per class, nested subsets of the train split):
- linear probe: logistic regression on the cached features, C chosen on val;
- probe then fine-tune: that probe as the classifier, top blocks fine-tuned (see finetune.py);
- scratch: the same architecture from random weights, same images, augmentation and epoch budget.
Test accuracy and training wall-clock of each go to curve.json, CSV for `dvc plots`, and two PNGs.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from pathlib import Path

import torch
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import DataLoader

from .data import nested_subset, scan_source
from .devices import resolve_device
from .finetune import FinetuneConfig, TrainImages, _accuracy, build_model, finetune
from .heads import HeadConfig, TrainedHead, build_estimator, choose_c, sweep_c
from .plateau import CURVE_HEAD
from .store import FeatureStore

METHODS = ("scratch", "linear_probe", "probe_finetune")


def _test_accuracy(head: TrainedHead, config: FinetuneConfig, weights: Path, data: Path, device: str) -> float:
    """Accuracy of fine-tuned (or scratch) weights on the test split of ``data``."""
    model, _ = build_model(head, config, probe=head.estimator)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.network.load_state_dict(state)
    torch_device = resolve_device(device)
    model.to(torch_device)
    test = [r for r in scan_source(data).records if r.split == "test"]
    loader = DataLoader(TrainImages(test, model.preprocessing, False, 1.0), batch_size=64,
                        num_workers=config.workers)
    return _accuracy(model, loader, torch_device)


def run_curve(store: str | Path | FeatureStore, data: str | Path, out: str | Path, budgets: list[int],
              finetune_config: FinetuneConfig, scratch_config: FinetuneConfig, probe_config: HeadConfig = CURVE_HEAD,
              device: str = "auto", progress: bool = False) -> dict:
    """Train the three methods at every budget; write ``out``/curve.json, curve.csv and PNGs.

    ``store`` holds the cached features of the images in ``data`` (train, val and test splits);
    ``probe_config`` (a logreg config) says how each budget's linear probe is trained.
    """
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    X, y, _ = store.load("train")
    Xv, yv, _ = store.load("val")
    Xt, yt, _ = store.load("test")
    points = []
    for budget in budgets:
        rows = nested_subset(y, budget, finetune_config.seed)
        started = time.perf_counter()
        C = choose_c(sweep_c(probe_config, X[rows], y[rows], Xv, yv))
        probe = build_estimator(probe_config, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(X[rows], y[rows])
        probe_seconds = time.perf_counter() - started
        points.append({"labels_per_class": budget, "method": "linear_probe", "n_train": int(len(rows)),
                       "test_accuracy": float(probe.score(Xt, yt)), "seconds": round(probe_seconds, 2), "C": C})
        budget_head = TrainedHead.fitted_on(store, probe, probe_config, C, n_train=int(len(rows)))
        for method, config in (("probe_finetune", finetune_config), ("scratch", scratch_config)):
            weights = out / f"{method}_{budget}.pth"
            result = finetune(budget_head, data, weights, config, device=device, progress=progress,
                              checkpoint_dir=out / f"{method}_{budget}.checkpoints", train_per_class=budget,
                              probe=probe)
            seconds = result.seconds + (probe_seconds if method == "probe_finetune" else 0.0)
            points.append({
                "labels_per_class": budget, "method": method, "n_train": int(len(rows)),
                "test_accuracy": _test_accuracy(budget_head, config, weights, data, device),
                "seconds": round(seconds, 2), "epochs": result.epochs_run,
                "best_val_accuracy": result.best_val_accuracy,
            })
            weights.unlink()
            shutil.rmtree(out / f"{method}_{budget}.checkpoints", ignore_errors=True)
    result = {"backbone": store.fingerprint["backbone"], "budgets": budgets, "points": points,
              "probe": probe_config.__dict__,
              "finetune": finetune_config.__dict__, "scratch": scratch_config.__dict__}
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "labels_per_class", "test_accuracy", "seconds"])
        writer.writeheader()
        writer.writerows({k: p[k] for k in writer.fieldnames} for p in points)
    plot_curves(points, out)
    return result


def plot_curves(points: list[dict], out: Path) -> None:
    """curve_labels.png (test accuracy vs labels per class) and curve_seconds.png (vs training seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, name, label in (("labels_per_class", "curve_labels.png", "labels per class"),
                               ("seconds", "curve_seconds.png", "training wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        styles = {"scratch": ("o", "-"), "linear_probe": ("s", "-"), "probe_finetune": ("^", "--")}
        for method in METHODS:  # distinct markers and dashes: the probe and its fine-tune can coincide
            series = sorted((p[x_key], p["test_accuracy"]) for p in points if p["method"] == method)
            if series:
                marker, line = styles[method]
                ax.plot(*zip(*series, strict=True), marker=marker, linestyle=line, label=method.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def accuracy_table(points: list[dict]) -> str:
    budgets = sorted({p["labels_per_class"] for p in points})
    lines = ["| labels/class | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
    for b in budgets:
        cells = []
        for m in METHODS:
            p = next((p for p in points if p["labels_per_class"] == b and p["method"] == m), None)
            cells.append("–" if p is None else f"{p['test_accuracy']:.4f} ({p['seconds']:.0f} s)")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

