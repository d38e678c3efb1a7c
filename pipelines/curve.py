"""DVC stage `curve@<store>`: the baselines, the linear probe and probe-then-fine-tune per label budget → OUT.

It reads the cache and the data, not the trained heads: each budget's probe is trained here (its scaling is
`curve.<backbone>.probe_normalize`), so a head experiment does not retrain the baselines. Fine-tuning uses the
`finetune.<backbone>` settings, the from-scratch baseline `curve.<backbone>.scratch` (the store's backbone's
sections, each overridden by the store's own: `stores.<store>.curve`, `stores.<store>.finetune`).

    python pipelines/curve.py <store> --features FILE.h5 --data DIR --out DIR [--layers DIR] [--params FILE]
        [--methods M ...]

``--layers`` is the store's extract_layers folder: where the store keeps its layers, the multilayer line runs.

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
from dataclasses import replace
from pathlib import Path

import yaml
from _params import layer_store, store_entry, store_settings

from featurestore.configs import CurveOptions
from featurestore.transfer.curve import MULTILAYER_METHOD, accuracy_table, merge_curves, run_curve, write_curve
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="the store's name (params.yaml `stores`): its backbone's settings")
    parser.add_argument("--features", type=Path, required=True, help="the feature store of DATA")
    parser.add_argument("--data", type=Path, required=True, help="the data set (train, val and test splits)")
    parser.add_argument("--out", type=Path, required=True, help="the curve's folder")
    parser.add_argument("--layers", type=Path, help="the extract_layers stage's folder: the multilayer line's store")
    parser.add_argument("--params", type=Path, help="a named configuration with curve and finetune sections")
    parser.add_argument("--methods", nargs="+", help="only these of the configuration's methods")
    parser.add_argument("--merge", action="store_true",
                        help="add these methods' points to OUT/curve.json, replacing theirs, keeping the others")
    args = parser.parse_args()
    named = yaml.safe_load(args.params.read_text()) if args.params else {}
    options = CurveOptions.from_params(named.get("curve") or store_settings("curve", args.store),
                                       named.get("finetune") or store_settings("finetune", args.store),
                                       store_settings("extract", args.store))
    if args.methods:
        options = replace(options, methods=tuple(m for m in options.methods or () if m in args.methods))
    layers = layer_store(args.store, args.layers) if args.layers else None
    if layers is not None:
        options = replace(options, layers=layers)
    elif MULTILAYER_METHOD in (options.methods or ()):  # a store that keeps no layers has no multilayer line
        print(f"{args.store}: no layer store (stores.{args.store}.layers is not all): the multilayer line is left out")
        options = replace(options, methods=tuple(m for m in options.methods if m != MULTILAYER_METHOD))
    earlier = None
    if args.merge and (args.out / "curve.json").is_file():
        earlier = json.loads((args.out / "curve.json").read_text())
        planned = {"backbone": store_entry(args.store)["backbone"], "budgets": list(options.budgets), "points": [],
                   "trunk_cache_seconds": 0.0, **options.recorded()}
        merge_curves(earlier, planned)  # a curve that cannot be merged fails before the run, not after it
    merging = earlier is not None
    with tempfile.TemporaryDirectory(prefix=".curve-run-") if merging else contextlib.nullcontext(args.out) as run_dir:
        result = run_curve(args.features, args.data, Path(run_dir), options)
    if merging:
        result = merge_curves(earlier, result)
        write_curve(result, args.out)
    print(accuracy_table(result["points"], result.get("picks", [])), end="")
    for budget, short in result.get("capped_budgets", {}).items():
        print(f"budget {budget} per class is capped: " + ", ".join(f"{c} has {n}" for c, n in short.items()))
