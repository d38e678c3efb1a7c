"""Transfer at every budget (issue 27's done-when table): the learning curve of the default images with every CPU
method, for several subset seeds, and what the verdict's rule picks on validation per budget.

    python benchmarks/transfer_budgets.py [--seeds 0 1 2] [--budgets 5 10 25 50 100] [--out docs/curves/budgets]

Reads the pipeline's default stores (`make repro`: data/features/fashion_mnist.h5, its layer store
data/layers/fashion_mnist/features.h5 and data/prepared) and runs `run_curve` with configs/curve-images.yaml's
settings, its fine-tuning settings params.yaml's `finetune.efficientnet_lite0`, once per seed (the seed draws each
budget's nested subset and seeds the fine-tune and the small CNN). Per seed, OUT/seed<k>/ holds the curve; the
table (the mean over seeds of each method's test accuracy, and of the pick: the transfer line, linear probe,
multilayer head or probe-then-fine-tune, best on validation) is printed with each figure's margin over the small CNN
and the pixels (test points, the ratio of the pick to each as well), and written to OUT/table.md and OUT/budgets.json.
About 20 minutes a seed on the 2-core reference machine (the small CNN's rate search ~11 of them).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from featurestore.configs import CurveOptions
from featurestore.transfer.curve import PICK_METHOD, run_curve

METHODS = ("pixels", "small_cnn", "linear_probe", "multilayer", "probe_finetune", PICK_METHOD)


def picks_of(run: dict) -> list[dict]:
    """A curve's picks (curve.json's ``picks``; a curve written before they had their own key holds them among its
    points)."""
    return run.get("picks") or [p for p in run["points"] if p["method"] == PICK_METHOD]


def table(runs: dict[int, dict], budgets: list[int]) -> tuple[str, dict]:
    """Markdown (one row per budget: each method's mean test accuracy over seeds, the pick's lines, its margins)
    and the same as JSON-able figures."""
    figures: dict = {}
    lines = ["| labels/class | " + " | ".join(m.replace("_", " ") for m in METHODS)
             + " | pick − small CNN | pick − pixels | fine-tune − probe | lines picked |",
             "| --- |" + " --- |" * (len(METHODS) + 4)]
    for budget in budgets:
        row = {}
        for method in METHODS:
            values = [p["test_accuracy"] for run in runs.values()
                      for p in [q for q in run["points"] if q["method"] != PICK_METHOD] + picks_of(run)
                      if p["labels_per_class"] == budget and p["method"] == method]
            row[method] = float(np.mean(values)) if values else None
        picked = [p["picked"] for run in runs.values() for p in picks_of(run) if p["labels_per_class"] == budget]
        pick, cnn, pixels = row[PICK_METHOD], row["small_cnn"], row["pixels"]
        finetune, probe = row["probe_finetune"], row["linear_probe"]
        figures[budget] = {**row, "picked": picked,
                           "pick_minus_small_cnn": None if None in (pick, cnn) else pick - cnn,
                           "pick_minus_pixels": None if None in (pick, pixels) else pick - pixels,
                           "finetune_minus_probe": None if None in (finetune, probe) else finetune - probe}
        cells = ["–" if row[m] is None else f"{row[m]:.4f}" for m in METHODS]
        margins = [figures[budget][k] for k in ("pick_minus_small_cnn", "pick_minus_pixels", "finetune_minus_probe")]
        cells += ["–" if v is None else f"{100 * v:+.2f}" for v in margins]
        cells.append(", ".join(p.replace("_", " ") for p in picked))
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 25, 50, 100])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != PICK_METHOD])
    parser.add_argument("--features", type=Path, default=Path("data/features/fashion_mnist.h5"))
    parser.add_argument("--layers", type=Path, default=Path("data/layers/fashion_mnist/features.h5"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("docs/curves/budgets"))
    args = parser.parse_args()
    named = yaml.safe_load(Path("configs/curve-images.yaml").read_text())
    params = yaml.safe_load(Path("params.yaml").read_text())
    base = CurveOptions.from_params(named["curve"], params["finetune"]["efficientnet_lite0"],
                                    params["extract"]["efficientnet_lite0"])
    runs = {}
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        done = out / "curve.json"
        if done.is_file() and json.loads(done.read_text()).get("budgets") == args.budgets:
            runs[seed] = json.loads(done.read_text())  # a rerun keeps the seeds already measured
            continue
        options = replace(base, budgets=tuple(args.budgets), methods=tuple(args.methods), layers=args.layers,
                          finetune=replace(base.finetune, seed=seed),
                          small_cnn=replace(base.small_cnn, seed=seed))
        runs[seed] = run_curve(args.features, args.data, out, options, progress=True)
        print(f"seed {seed} done", flush=True)
    text, figures = table(runs, args.budgets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "budgets.json").write_text(json.dumps({"seeds": args.seeds, "budgets": figures}, indent=2) + "\n")
    print(text, end="")


if __name__ == "__main__":
    main()
