"""Evaluation of one head on a held-out split: metrics, confusion matrix, C-sweep curve.

Files written under ``out`` per head (outputs of the DVC ``train_head@<store>-<head>`` stage)::

    heads/<name>.json               {top1, top5, mean_per_class_accuracy, macro_f1, n, C, ...}
    confusion/<name>.csv            one row per test image: actual,predicted (for `dvc plots`)
    sweep/<name>.csv                C,log10_C,val_accuracy (for `dvc plots`); a head whose settings are not C
                                    (knn) its settings' columns, then val_accuracy
    figures/<name>_confusion.png    row-normalised confusion matrix with counts
    figures/<name>_sweep.png        validation accuracy against C, chosen C marked (knn: against k, a line
                                    per temperature, the chosen pair marked)

summary.py gathers the heads' metrics into metrics.json and comparison.md. The JSON goes through
``utils.timings.write_json``: in a DVC stage its ``train_seconds`` go to the timings folder, not into the output.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score

from ..errors import FeaturestoreError, LeakError, StoreError
from ..store.hdf5 import FeatureStore
from ..utils.timings import write_json
from .head import TrainedHead
from .selection import validation_accuracy
from .summary import write_summary

TUNING_SPLITS = ("train", "val")


def check_no_overlap(store: FeatureStore, split: str) -> None:
    """Refuse to score ``split`` when it shares items (identical content) with the splits the head was trained
    or tuned on: the score would be inflated by memorised answers."""
    if split in TUNING_SPLITS:
        return
    seen = {cid for other in TUNING_SPLITS if other in store.splits for cid in store.ids(other)}
    ids, paths = store.ids(split), store.paths(split)
    shared = [str(path) for cid, path in zip(ids, paths, strict=True) if cid in seen]
    if shared:
        examples = ", ".join(shared[:3]) + (f" (and {len(shared) - 3} more)" if len(shared) > 3 else "")
        unit = "texts" if store.fingerprint.get("kind") == "text" else "images"
        raise LeakError(f"{store.path}: {len(shared)} of {len(ids)} {split} {unit} also appear in train/val "
                        f"(identical bytes): {examples}. Remove them from {split}, or pass --allow-overlap")


def evaluate_head(head: TrainedHead, store: FeatureStore, split: str = "test",
                  allow_overlap: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``head`` on ``split`` of ``store``, with the true and predicted labels (N,) int64.

    Raises :class:`LeakError` when ``split`` shares items with train/val, unless ``allow_overlap``."""
    head.check_store(store)
    if not allow_overlap:
        check_no_overlap(store, split)
    y = store.labels(split)
    if not len(y):
        raise StoreError(f"{store.path}: split {split!r} is empty: nothing to evaluate")
    proba = np.concatenate([head.predict_proba(X) for X, _ in store.iter_chunks(split)])  # one chunk in memory
    metrics, predicted = classification_metrics(y, proba, {
        "backbone": head.backbone, "head": head.label, "split": split})
    metrics.update({
        "C": head.settings.get("C"),  # None for a head whose settings are not C (knn)
        "settings": head.settings,  # chosen on validation
        "config": {k: v for k, v in asdict(head.config).items() if k != "n_jobs"},  # what the experiment set
        "normalize": head.config.normalize,
        "train_seconds": round(head.train_seconds, 3),
        "n_train": head.n_train,
        "fingerprint_hash": head.fingerprint_hash,
    })
    return metrics, y, predicted


def classification_metrics(y: np.ndarray, proba: np.ndarray, info: dict) -> tuple[dict, np.ndarray]:
    """``info`` plus n, top1, top5 (None for 2 classes), mean per-class accuracy and macro-F1 of probabilities
    ``proba`` (N, K) float against the true classes ``y`` (N,) int; and the predicted classes (N,) int64."""
    predicted = np.argmax(proba, axis=1)
    k = proba.shape[1]
    labels = np.arange(k)
    return {
        **info,
        "n": int(len(y)),
        "top1": float(np.mean(predicted == y)),
        "top5": float(top_k_accuracy_score(y, proba, k=min(5, k), labels=labels)) if k > 2 else None,
        "mean_per_class_accuracy": float(balanced_accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, average="macro", labels=labels, zero_division=0)),
    }, predicted


def deployment_table(decisions: dict[str, dict]) -> str:
    """Markdown: per data set (named by its backbone), the model deployed and why, from each fine-tune stage's
    verdict ``decision["deployed"]`` (``transfer.best``): the incumbent head, the best encoder head, the baseline and
    the hybrid head, each with its validation accuracy (fitted on the same train rows, scored on the same val rows),
    and the split's size; a warning when the split is too small to tell models apart."""
    lines = ["## Deployed: the verdict on validation", "",
             "| data (backbone) | deployed | its val | incumbent (val) | best encoder head (val) | baseline (val) "
             "| hybrid (val) | n val |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for backbone, decision in decisions.items():
        deployed = decision.get("deployed")
        if not deployed:
            continue
        candidates = decision.get("candidates", {})
        hybrid = next((f"{name} ({c['val']:.4f})" for name, c in candidates.items() if c.get("kind") == "hybrid"),
                      "–")
        baseline = ("–" if deployed.get("baseline") is None
                    else f"{deployed['baseline']} ({deployed['baseline_val']:.4f})")
        incumbent = deployed.get("incumbent", deployed["best_encoder"])
        lines.append(f"| {backbone} | **{deployed['name']}** ({deployed['model']}) | {deployed['val_accuracy']:.4f} "
                     f"| {incumbent} ({deployed.get('incumbent_val', deployed['best_encoder_val']):.4f}) "
                     f"| {deployed['best_encoder']} ({deployed['best_encoder_val']:.4f}) | {baseline} | {hybrid} "
                     f"| {deployed['n']} |")
        notes.append(f"- {backbone}: {deployed['reason']}." + (f" Warning: {deployed['warning']}"
                                                             if deployed.get("warning") else ""))
    if not notes:
        return ""
    return "\n".join(lines + [""] + notes) + "\n"


def plot_confusion(y: np.ndarray, predicted: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (colour) with raw counts (text), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion_matrix(y, predicted, labels=np.arange(len(class_names)))
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if len(class_names) <= 30:
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the actual class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(head: TrainedHead, path: Path) -> Path:
    """Validation accuracy against C (log scale) with the chosen C marked, saved as PNG; for a head whose settings
    are not C, :func:`plot_settings_sweep`."""
    if "C" not in head.settings:
        return plot_settings_sweep(head, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Cs = [p["C"] for p in head.sweep]
    accuracy = [p["val_accuracy"] for p in head.sweep]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.semilogx(Cs, accuracy, marker="o", markersize=3)
    ax.axvline(head.C, color="tab:red", linestyle="--", label=f"chosen C = {head.C:.3g}")
    ax.set_xlabel("C (inverse regularisation)")
    ax.set_title(f"{head.name}: C sweep")
    return _save_sweep_figure(fig, ax, path)


def plot_settings_sweep(head: TrainedHead, path: Path) -> Path:
    """Validation accuracy against the head's first setting (log scale; knn: k), one line per value of the others
    (knn: the temperature), the chosen settings marked; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, *others = list(head.settings)
    lines: dict[tuple, list] = {}
    for point in head.sweep:
        lines.setdefault(tuple(point[key] for key in others), []).append((point[x_key], point["val_accuracy"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for rest, series in lines.items():
        label = ", ".join(f"{key}={value:g}" for key, value in zip(others, rest, strict=True))
        ax.semilogx(*zip(*sorted(series), strict=True), marker="o", markersize=3, label=label or None)
    chosen = validation_accuracy(head.sweep, head.settings)
    ax.plot([head.settings[x_key]], [chosen], marker="*", markersize=14, color="tab:red", linestyle="none",
            label="chosen " + ", ".join(f"{key}={value:g}" for key, value in head.settings.items()))
    ax.set_xlabel(x_key)
    ax.set_title(f"{head.name}: settings sweep")
    return _save_sweep_figure(fig, ax, path)


def _save_sweep_figure(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel("validation accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_rows(head: TrainedHead) -> tuple[list[str], list[tuple]]:
    """The sweep CSV's header and rows: ``C,log10_C,val_accuracy`` for a C sweep, else the head's settings (in
    their order) and ``val_accuracy``."""
    if "C" in head.settings:
        return (["C", "log10_C", "val_accuracy"],
                [(p["C"], round(float(np.log10(p["C"])), 4), p["val_accuracy"]) for p in head.sweep])
    keys = list(head.settings)
    return keys + ["val_accuracy"], [(*(p[key] for key in keys), p["val_accuracy"]) for p in head.sweep]


def write_head_report(head: TrainedHead, store: FeatureStore, out: str | Path, split: str = "test",
                      allow_overlap: bool = False) -> dict:
    """Evaluate ``head`` on ``split`` of the store it was trained on; write its files under ``out``."""
    out = Path(out)
    metrics, y, predicted = evaluate_head(head, store, split, allow_overlap)
    names = head.class_names
    for folder in ("heads", "confusion", "sweep"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / "confusion" / f"{head.name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((names[a], names[p]) for a, p in zip(y, predicted, strict=True))
    header, rows = sweep_rows(head)
    with open(out / "sweep" / f"{head.name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    plot_confusion(y, predicted, names, f"{head.name} on {split} (top-1 {metrics['top1']:.3f})",
                   out / "figures" / f"{head.name}_confusion.png")
    plot_sweep(head, out / "figures" / f"{head.name}_sweep.png")
    write_json(out / "heads" / f"{head.name}.json", metrics, sort_keys=True)
    return metrics


def write_reports(heads: list[TrainedHead], stores: dict[str, FeatureStore], out: str | Path,
                  split: str = "test", allow_overlap: bool = False) -> dict[str, dict]:
    """Evaluate each head on the store it was trained on (``stores`` maps backbone → store), write
    every head's files and the summary under ``out``; returns the metrics by head name. Two heads of one name are
    an error (one report would overwrite the other): name head experiments (``train-head --name``)."""
    names: dict[str, int] = {}
    for head in heads:
        names[head.name] = names.get(head.name, 0) + 1
    twice = sorted(name for name, count in names.items() if count > 1)
    if twice:
        raise FeaturestoreError(f"{len(twice)} head name(s) given more than once ({', '.join(twice)}): each head's "
                                f"report would overwrite the other's; give each experiment its own name "
                                f"(train-head --name, or a file name of its own)")
    results = {head.name: write_head_report(head, stores[head.backbone], out, split, allow_overlap)
               for head in heads}
    write_summary(results, out)
    return results
