"""DVC stage `curve@<backbone>`: the baselines, the linear probe and probe-then-fine-tune per label budget → OUT.

It reads the cache and the data, not the trained heads: each budget's probe is trained here (its scaling is
`curve.<backbone>.probe_normalize`), so a head experiment does not retrain the baselines. Fine-tuning uses the
`finetune.<backbone>` settings, the from-scratch baseline `curve.<backbone>.scratch`.

    python pipelines/curve.py <backbone> --features FILE.h5 --data DIR --out DIR [--params FILE] [--methods M ...]

With ``--params`` it runs a named configuration instead (configs/curve-*.yaml, `make curves`): the same sections,
read from FILE; ``--methods`` keeps only those of its methods (`make curves-cpu`: every method but the
from-scratch network, which takes hours on a 2-core CPU). ``--merge`` adds the methods it runs to the curve
already in OUT (if there is one) instead of replacing it (say, the from-scratch line trained on a GPU beside the
rest run on a CPU).
"""

import argparse
import contextlib
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from _params import load_params

from featurestore.configs import FinetuneConfig, ScratchConfig, SetFitConfig, SmallCNNConfig
from featurestore.transfer.curve import accuracy_table, merge_curves, run_curve, write_curve
from featurestore.transfer.plateau import CURVE_HEAD
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone")
    parser.add_argument("--features", type=Path, required=True, help="the feature store of DATA")
    parser.add_argument("--data", type=Path, required=True, help="the data set (train, val and test splits)")
    parser.add_argument("--out", type=Path, required=True, help="the curve's folder")
    parser.add_argument("--params", type=Path, help="a named configuration with curve and finetune sections")
    parser.add_argument("--methods", nargs="+", help="only these of the configuration's methods")
    parser.add_argument("--merge", action="store_true",
                        help="add these methods' points to OUT/curve.json, replacing theirs, keeping the others")
    args = parser.parse_args()
    named = yaml.safe_load(args.params.read_text()) if args.params else {}
    p = named.get("curve") or load_params("curve")[args.backbone]
    ft = named.get("finetune") or load_params("finetune")[args.backbone]
    configs = {"probe_config": replace(CURVE_HEAD, normalize=p["probe_normalize"]),
               "finetune_config": FinetuneConfig(**{k: v for k, v in ft.items()
                                                    if k not in ("mode", "device", "methods", "setfit")}),
               "setfit_config": SetFitConfig(**(ft.get("setfit") or {})),
               "scratch_config": ScratchConfig(**(p.get("scratch") or {})),
               "small_cnn_config": SmallCNNConfig(**(p.get("small_cnn") or {}))}
    earlier = None
    if args.merge and (args.out / "curve.json").is_file():
        earlier = json.loads((args.out / "curve.json").read_text())
        planned = {"backbone": args.backbone, "budgets": p["budgets"], "points": [], "trunk_cache_seconds": 0.0,
                   **{key.removesuffix("_config"): asdict(value) for key, value in configs.items()}}
        merge_curves(earlier, planned)  # a curve that cannot be merged fails before the run, not after it
    merging = earlier is not None
    with tempfile.TemporaryDirectory(prefix=".curve-run-") if merging else contextlib.nullcontext(args.out) as run_dir:
        result = run_curve(args.features, args.data, Path(run_dir), p["budgets"], **configs,
                           methods=tuple(m for m in p["methods"] if not args.methods or m in args.methods),
                           device=p["device"], weights=load_params("extract").get(args.backbone, {}).get("weights"))
    if merging:
        result = merge_curves(earlier, result)
        write_curve(result, args.out)
    print(accuracy_table(result["points"]), end="")
