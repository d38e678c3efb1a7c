"""DVC stage `curve@<backbone>`: scratch vs linear probe vs probe-then-fine-tune → data/reports/curve/<backbone>/.

It reads the cache and the images, not the trained heads: each budget's probe is trained here (its
scaling is `curve.probe_normalize`), so a head experiment does not retrain the baselines.
"""

import sys
from dataclasses import replace

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.curve import accuracy_table, run_curve
from featurestore.finetune import FinetuneConfig
from featurestore.plateau import CURVE_HEAD

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    p = load_params("curve")
    common = {k: p[k] for k in ("epochs", "batch_size", "patience", "seed", "workers")}
    result = run_curve(
        ROOT / "data" / "features" / f"{backbone}.h5", ROOT / "data" / "prepared",
        ROOT / "data" / "reports" / "curve" / backbone, p["budgets"],
        FinetuneConfig(unfreeze_blocks=p["unfreeze_blocks"], head_lr=p["head_lr"], **common),
        FinetuneConfig(from_scratch=True, head_lr=p["scratch_lr"], **common),
        probe_config=replace(CURVE_HEAD, normalize=p["probe_normalize"]), device=p["device"],
    )
    print(accuracy_table(result["points"]), end="")
