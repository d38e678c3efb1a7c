"""Has the cache-only head stopped improving with more labels? A learning curve and a rule that accounts
for the noise of the validation split.

The curve: the logistic-regression probe (C chosen on val) trained on nested subsets of the train split,
``labels_per_class`` images per class, scored on val. The rule: take the last doubling of the label budget
(the largest budget against the largest one at most half of it) and its validation gain with a paired
bootstrap interval over the validation images (``stats.paired_gain``). The cache-only curve has plateaued
only when the interval's upper bound is below ``min_gain``: the data say that more labels would gain less
than that. A gain that is merely not significant is not called a plateau (with 500 validation images the
interval of one doubling spans about ±2.5 points); a larger validation split narrows it.

A split too small to show a gain below ``min_gain`` at all is never called a plateau (:func:`smallest_split`): the
bootstrap interval is only as wide as the disagreements it resamples, so on 18 images one lost image gave
[-0.11, 0] and a "plateau" that started a fine-tune on noise (issue 25). The exact bound says what those images can
show: even two probes that agree on all n of them leave the share of images more labels could fix anywhere below
``1 - ((1 - level) / 2) ** (1 / n)`` (Clopper-Pearson, 0 of n), which is below ``min_gain`` only from
:func:`smallest_split` images on (230 at the defaults). Below it the verdict says so, with a warning naming the
split's size (logged and in the verdict's ``warning``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..configs import CURVE_HEAD, CURVE_MULTILAYER, HeadConfig
from ..data.sources import nested_subset
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator, choose_c, sweep_c
from ..heads.multilayer import fit_on_val, layer_table, rows_by_id
from ..store.hdf5 import FeatureStore
from ..utils.timings import write_json
from .stats import paired_gain

log = logging.getLogger("featurestore")

@dataclass(frozen=True)
class PlateauRule:
    budgets: tuple[int, ...] = (10, 25, 50, 100)
    min_gain: float = 0.01
    level: float = 0.8  # central interval: its upper bound is a one-sided 90% bound
    seed: int = 0


def fit_probe(head: HeadConfig, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray) -> tuple[object, dict]:
    """The linear probe at the C chosen on (Xv, yv), fitted on (X, y): (estimator, {"C"})."""
    from sklearn.exceptions import ConvergenceWarning

    C = choose_c(sweep_c(head, X, y, Xv, yv))
    probe = build_estimator(head, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.fit(X, y), {"C": C}


def learning_curve(store: FeatureStore, rule: PlateauRule, head: HeadConfig,
                   layers: FeatureStore | None = None) -> tuple[list[dict], list[np.ndarray]]:
    """``[{labels_per_class, n_train, val_accuracy, C}]`` for every budget the train split can fill, and for
    each the per-image correctness on val, (N_val,) bool: the linear probe's, or with ``layers`` (the store's
    ``--layers all`` store) the multilayer head's on the same rows (``heads.multilayer.fit_on_val``, its points also
    naming the layers chosen).

    Features are read as float32 whatever the store holds (a float16 store is converted as it is read), as
    ``train_head`` does: the scaler and the solvers then see the same numbers for the rule as for the head."""
    X, y, ids = store.load("train", dtype=np.float32)
    Xv, yv, val_ids = store.load("val", dtype=np.float32)
    fit = partial(fit_probe, head)
    if layers is not None:
        table = layer_table(layers.fingerprint, str(layers.path))
        X, Xv = rows_by_id(layers, "train", ids), rows_by_id(layers, "val", val_ids)
        fit = partial(fit_on_val, CURVE_MULTILAYER, table)
    smallest_class = int(np.bincount(y).min())
    curve, correct = [], []
    for budget in sorted(set(rule.budgets)):
        if budget > smallest_class:
            continue
        rows = nested_subset(y, budget, rule.seed)
        model, settings = fit(X[rows], y[rows], Xv, yv)
        right = model.predict(Xv) == yv
        point = {"labels_per_class": budget, "n_train": int(len(rows)), "val_accuracy": float(right.mean()),
                 "C": settings["C"]}
        if "selection" in settings:
            point["layers"] = settings["selection"]
        curve.append(point)
        correct.append(right)
    if len(curve) < 2:
        raise FeaturestoreError(
            f"{store.path}: need at least two label budgets the train split can fill (smallest class has "
            f"{smallest_class} images; budgets {list(rule.budgets)})"
        )
    return curve, correct


def smallest_split(rule: PlateauRule) -> int:
    """The fewest validation images on which ``rule`` can call a plateau: the smallest n whose exact one-sided
    ``(1 + level) / 2`` upper bound on the share of images more labels could fix, with no disagreement at all
    between the two probes, ``1 - ((1 - level) / 2) ** (1 / n)``, is below ``min_gain`` (230 at level 0.8 and
    min_gain 0.01). 1 when ``min_gain`` is not in (0, 1): no bound on a share of the images decides it then."""
    if not 0 < rule.min_gain < 1:
        return 1
    return int(np.floor(np.log((1 - rule.level) / 2) / np.log1p(-rule.min_gain))) + 1


def verdict(curve: list[dict], correct: list[np.ndarray], rule: PlateauRule) -> dict:
    """Compare the largest budget with the largest budget at most half of it, with a paired interval; on fewer
    validation images than :func:`smallest_split` no plateau can be shown, and ``warning`` says so (else None)."""
    last = len(curve) - 1
    halves = [i for i in range(last) if curve[i]["labels_per_class"] * 2 <= curve[last]["labels_per_class"]]
    before = halves[-1] if halves else last - 1
    gain = paired_gain(correct[before], correct[last], level=rule.level, seed=rule.seed)
    needed = smallest_split(rule)
    too_few = gain["n"] < needed
    plateaued = gain["high"] < rule.min_gain and not too_few
    frm, to = curve[before]["labels_per_class"], curve[last]["labels_per_class"]
    warning = None
    if too_few:
        bound = 1 - ((1 - rule.level) / 2) ** (1 / gain["n"])
        warning = (f"the validation split has {gain['n']} images: too few to show a plateau; even two probes that "
                   f"agree on all of them leave up to {bound:.1%} of them for more labels to fix (one-sided "
                   f"{(1 + rule.level) / 2:.0%} bound), above min_gain {rule.min_gain}: it takes {needed} images, so "
                   f"the cache-only curve is not called plateaued and no fine-tune starts on this evidence")
        log.warning(warning)
        why = f"{warning}; more labels may still pay"
    elif plateaued:
        why = f"even its upper bound is below min_gain {rule.min_gain}, so more labels no longer pay"
    else:
        why = f"its upper bound reaches min_gain {rule.min_gain}, so more labels may still pay"
    return {
        "plateaued": bool(plateaued),
        "gain": gain["gain"],
        "interval": [gain["low"], gain["high"]],
        "interval_level": rule.level,
        "min_gain": rule.min_gain,
        "from": curve[before],
        "to": curve[last],
        "smallest_split": needed,
        "warning": warning,
        "reason": (
            f"going from {frm} to {to} labels per class gained {gain['gain']:+.4f} validation accuracy, "
            f"{rule.level:.0%} interval [{gain['low']:+.4f}, {gain['high']:+.4f}] over {gain['n']} validation "
            f"images ({gain['disagreements']} on which the two probes disagree): {why}"
        ),
    }


def plot_curve(curves: dict[str, list[dict]], title: str, path: Path) -> Path:
    """Validation accuracy against labels per class, one line per cache-only head (``{name: curve}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.semilogx([p["labels_per_class"] for p in curve], [p["val_accuracy"] for p in curve], marker="o",
                    label=name.replace("_", " "))
    ax.legend()
    ax.set_xlabel("labels per class")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def detect_plateau(store: str | Path | FeatureStore, rule: PlateauRule = PlateauRule(),
                   head: HeadConfig = CURVE_HEAD, out: str | Path | None = None,
                   layers: str | Path | FeatureStore | None = None) -> dict:
    """The curve and its verdict; written as JSON to ``out`` (with a PNG beside it) when given.

    With ``layers`` (the store's ``--layers all`` store) the multilayer head's curve is drawn too, and the rule judges
    the line of the better cache-only head: the one with the higher validation accuracy at the largest budget (ties:
    the probe). ``line`` names it, ``curves`` holds both."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    curves = {"linear_probe": learning_curve(store, rule, head)}
    if layers is not None:
        layers = layers if isinstance(layers, FeatureStore) else FeatureStore(layers)
        curves["multilayer"] = learning_curve(store, rule, head, layers)
    line = max(curves, key=lambda name: (curves[name][0][-1]["val_accuracy"], name == "linear_probe"))
    curve, correct = curves[line]
    result = {"store": str(store.path), "rule": asdict(rule), **verdict(curve, correct, rule), "line": line,
              "curve": curve, "curves": {name: points for name, (points, _) in curves.items()}}
    if out is not None:
        out = Path(out)
        write_json(out, result)
        plot_curve(result["curves"], f"{store.fingerprint['backbone']}: cache-only learning curve",
                   out.with_suffix(".png"))
    return result
