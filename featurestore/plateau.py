"""Has the cache-only head stopped improving with more labels? A learning curve and a rule.

The curve: the logistic-regression head (C chosen on val) trained on nested subsets of the train
split, ``labels_per_class`` images per class, scored on val. The rule: the last doubling of the
label budget (largest budget against the largest one at most half of it) gained less than
``min_gain`` validation accuracy → plateau → fine-tuning may pay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import nested_subset
from .errors import FeaturestoreError
from .heads import HeadConfig, choose_c, sweep_c
from .store import FeatureStore


@dataclass(frozen=True)
class PlateauRule:
    budgets: tuple[int, ...] = (10, 25, 50, 100)
    min_gain: float = 0.01
    seed: int = 0


def learning_curve(store: FeatureStore, rule: PlateauRule, head: HeadConfig) -> list[dict]:
    """``[{labels_per_class, n_train, val_accuracy, C}]`` for every budget the train split can fill."""
    X, y, _ = store.load("train")
    Xv, yv, _ = store.load("val")
    smallest_class = int(np.bincount(y).min())
    curve = []
    for budget in sorted(set(rule.budgets)):
        if budget > smallest_class:
            continue
        rows = nested_subset(y, budget, rule.seed)
        sweep = sweep_c(head, X[rows], y[rows], Xv, yv)
        C = choose_c(sweep)
        accuracy = next(p["val_accuracy"] for p in sweep if p["C"] == C)
        curve.append({"labels_per_class": budget, "n_train": int(len(rows)), "val_accuracy": accuracy, "C": C})
    if len(curve) < 2:
        raise FeaturestoreError(
            f"{store.path}: need at least two label budgets the train split can fill (smallest class has "
            f"{smallest_class} images; budgets {list(rule.budgets)})"
        )
    return curve


def verdict(curve: list[dict], min_gain: float) -> dict:
    """Compare the largest budget with the largest budget at most half of it."""
    last = curve[-1]
    halves = [p for p in curve[:-1] if p["labels_per_class"] * 2 <= last["labels_per_class"]]
    before = halves[-1] if halves else curve[-2]
    gain = last["val_accuracy"] - before["val_accuracy"]
    plateaued = gain < min_gain
    return {
        "plateaued": bool(plateaued),
        "gain": round(float(gain), 6),
        "min_gain": min_gain,
        "from": before,
        "to": last,
        "reason": (
            f"going from {before['labels_per_class']} to {last['labels_per_class']} labels per class "
            f"{'gained only' if plateaued else 'still gained'} {gain:+.4f} validation accuracy "
            f"({'<' if plateaued else '>='} min_gain {min_gain})"
        ),
    }


def plot_curve(curve: list[dict], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx([p["labels_per_class"] for p in curve], [p["val_accuracy"] for p in curve], marker="o")
    ax.set_xlabel("labels per class")
    ax.set_ylabel("validation accuracy (linear probe)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CURVE_HEAD = HeadConfig(head="logreg", c_points=12)  # a coarser C grid: one sweep per budget


def detect_plateau(store: str | Path | FeatureStore, rule: PlateauRule = PlateauRule(),
                   head: HeadConfig = CURVE_HEAD, out: str | Path | None = None) -> dict:
    """The curve and its verdict; written as JSON to ``out`` (with a PNG beside it) when given."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    curve = learning_curve(store, rule, head)
    result = {"store": str(store.path), "rule": asdict(rule), **verdict(curve, rule.min_gain), "curve": curve}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot_curve(curve, f"{store.fingerprint['backbone']}: cache-only learning curve", out.with_suffix(".png"))
    return result
