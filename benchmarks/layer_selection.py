"""How the multilayer head's candidates were chosen (docs/layers.md): which sets of layers, and whether to weight
each layer by 1/√(its width), on the default images' layer store, per budget and subset seed.

    python benchmarks/layer_selection.py [--store data/layers/fashion_mnist/features.h5] [--seeds 0 1 2]

For each budget (labels per class, nested subsets as the curve draws them) and seed, one logistic regression per
variant, C chosen on val from 13 values (1e-4 to 1e2), standardised per feature: the penultimate layer alone, all
layers, the blocks without the head, each of those two with the per-layer weighting, and the top 2 / 4 / 8 layers
by their own val accuracy (weighted). Prints the mean val / test accuracy per budget and variant, the penultimate
probe being the baseline each variant is read against.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from featurestore.heads.multilayer import layer_table
from featurestore.store.hdf5 import FeatureStore
from featurestore.transfer.probe import probe_rows

GRID = np.logspace(-4, 2, 13)


def fit(X, y, Xv, yv, Xt, yt, names, columns, weighted: bool) -> tuple[float, float]:
    """(val, test) accuracy of logistic regression on the layers ``names``, C on val."""
    index = np.concatenate([np.arange(*columns[name]) for name in names])
    A, B, T = X[:, index], Xv[:, index], Xt[:, index]
    mean, std = A.mean(0), A.std(0)
    std[std < 1e-6 * std.max()] = 1.0
    weight = np.concatenate([np.full(columns[n][1] - columns[n][0], 1 / np.sqrt(columns[n][1] - columns[n][0]))
                             for n in names]) if weighted else 1.0
    A, B, T = ((Z - mean) / std * weight for Z in (A, B, T))
    best_val, best = -1.0, None
    for C in GRID:
        model = LogisticRegression(C=C, max_iter=300).fit(A, y)
        score = model.score(B, yv)
        if score > best_val + 1e-12:
            best_val, best = score, model
    return best_val, best.score(T, yt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="data/layers/fashion_mnist/features.h5")
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 25, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    store = FeatureStore(args.store)
    columns = {name: (start, start + width) for name, start, width in layer_table(store.fingerprint, args.store)}
    names = list(columns)
    blocks = [name for name in names if name != "head"]
    (X, y, _), (Xv, yv, _), (Xt, yt, _) = (store.load(split, dtype=np.float32) for split in ("train", "val", "test"))
    variants = ["penultimate", "all", "all, per layer", "blocks", "blocks, per layer", "top 2", "top 4", "top 8"]
    print("| per class | " + " | ".join(variants) + " |\n| --- |" + " --- |" * len(variants))
    with threadpool_limits(1):
        for budget in args.budgets:
            scores = {variant: [] for variant in variants}
            for seed in args.seeds:
                rows = probe_rows(y, budget, seed)
                data = (X[rows], y[rows], Xv, yv, Xt, yt)
                solo = {name: fit(*data, [name], columns, False)[0] for name in names}
                ranked = sorted(names, key=lambda name: -solo[name])
                sets = {"penultimate": (["head"], False), "all": (names, False), "all, per layer": (names, True),
                        "blocks": (blocks, False), "blocks, per layer": (blocks, True)}
                sets.update({f"top {k}": ([n for n in names if n in ranked[:k]], True) for k in (2, 4, 8)})
                for variant, (chosen, weighted) in sets.items():
                    scores[variant].append(fit(*data, chosen, columns, weighted))
            cells = [f"{np.mean([v for v, _ in s]):.3f} / {np.mean([t for _, t in s]):.4f}" for s in scores.values()]
            print(f"| {budget} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
