"""DVC stage `curve@<backbone>`: scratch vs linear probe vs probe-then-fine-tune → data/reports/curve/<backbone>/."""

import sys

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.curve import accuracy_table, run_curve
from featurestore.finetune import FinetuneConfig
from featurestore.heads import load_head

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    p = load_params("curve")
    common = {k: p[k] for k in ("epochs", "batch_size", "patience", "seed", "workers")}
    result = run_curve(
        load_head(ROOT / "data" / "heads" / f"{backbone}__logreg.joblib"), ROOT / "data" / "prepared",
        ROOT / "data" / "reports" / "curve" / backbone, p["budgets"],
        FinetuneConfig(unfreeze_blocks=p["unfreeze_blocks"], head_lr=p["head_lr"], **common),
        FinetuneConfig(from_scratch=True, head_lr=p["scratch_lr"], **common),
        device=p["device"],
    )
    print(accuracy_table(result["points"]), end="")
