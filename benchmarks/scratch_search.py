"""How the from-scratch baseline's settings were chosen: its own learning rate and input size, on validation.

    python benchmarks/scratch_search.py [--data data/prepared] [--budget 100] [--steps 1200] [--device auto]

The same EfficientNet-Lite0 architecture from random weights, every layer training, on ``--budget`` labels
per class of the prepared Fashion-MNIST split, for the step budget the curve uses. Grid: learning rate
{1e-3, 3e-3} × input size {56, 112} px. Prints one JSON line per run (best validation accuracy, whether and
how it converged, seconds) and the chosen setting (best validation accuracy; the test split is not used).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from featurestore.configs import ScratchConfig
from featurestore.transfer.baselines import train_from_scratch

GRID = [{"lr": lr, "image_size": size} for size in (56, 112) for lr in (1e-3, 3e-3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--steps", type=int, default=ScratchConfig().steps)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for setting in GRID:
        config = replace(ScratchConfig(), steps=args.steps, workers=args.workers, **setting)
        result = train_from_scratch(args.data, config, device=args.device, train_per_class=args.budget,
                                    progress=False)
        row = {**setting, "steps": result.steps, "best_val_accuracy": result.best_val_accuracy,
               "converged": result.converged, "seconds": result.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: (r["best_val_accuracy"], -r["image_size"]))
    print(json.dumps({"chosen": {k: best[k] for k in ("lr", "image_size")},
                      "config": asdict(replace(ScratchConfig(), lr=best["lr"], image_size=best["image_size"],
                                               steps=args.steps))}))


if __name__ == "__main__":
    main()
