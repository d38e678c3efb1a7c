"""DVC stage `curve@<backbone>`: the baselines, the linear probe and probe-then-fine-tune per label budget →
data/reports/curve/<backbone>/.

It reads the cache and the data, not the trained heads: each budget's probe is trained here (its scaling is
`curve.<backbone>.probe_normalize`), so a head experiment does not retrain the baselines. Fine-tuning uses the
`finetune.<backbone>` settings, the from-scratch baseline `curve.<backbone>.scratch`.

    python pipelines/curve.py <backbone> [--params FILE --out DIR] [--methods M ...]

runs a named configuration instead (configs/curve-*.yaml, `make curves`): the same sections, read from FILE;
``--methods`` keeps only those of its methods (`make curves-cpu`: every method but the from-scratch network,
which takes hours on a 2-core CPU).
"""

import argparse
from dataclasses import replace
from pathlib import Path

import yaml
from _params import ROOT, load_params

from featurestore.configs import FinetuneConfig, ScratchConfig
from featurestore.console import setup_logging
from featurestore.curve import accuracy_table, run_curve
from featurestore.plateau import CURVE_HEAD

if __name__ == "__main__":
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("backbone")
    parser.add_argument("--params", type=Path, help="a named configuration with curve and finetune sections")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--methods", nargs="+", help="only these of the configuration's methods")
    args = parser.parse_args()
    named = yaml.safe_load(args.params.read_text()) if args.params else {}
    p = named.get("curve") or load_params("curve")[args.backbone]
    ft = named.get("finetune") or load_params("finetune")[args.backbone]
    result = run_curve(
        ROOT / "data" / "features" / f"{args.backbone}.h5", ROOT / "data" / load_params("stores")[args.backbone],
        args.out or ROOT / "data" / "reports" / "curve" / args.backbone, p["budgets"],
        FinetuneConfig(**{k: v for k, v in ft.items() if k not in ("mode", "device")}),
        ScratchConfig(**(p.get("scratch") or {})), probe_config=replace(CURVE_HEAD, normalize=p["probe_normalize"]),
        methods=tuple(m for m in p["methods"] if not args.methods or m in args.methods), device=p["device"])
    print(accuracy_table(result["points"]), end="")
