"""DVC stages `train_head@<store>-<head>` and `train_multilayer@<store>`: a feature store → a head file (skops), the
head named `<store>__<head>`, its settings chosen on validation; and its report on the `evaluate.split` split of the
store under REPORTS (metrics, confusion matrix and C sweep: featurestore.heads.reports.write_head_report), as each
challenger's stage evaluates its model, so that a head experiment runs one stage per head and data set.

The multilayer head (`train_multilayer`) reads the store's layer store, the folder `extract_layers` wrote (FEATURES);
OUT is then a folder too, holding `multilayer.skops` and its reports, or only `status.json` for a store that keeps no
layers (`stores.<store>.layers`)."""

import json

from _params import layer_store, load_params, stage_arguments

from featurestore.configs import config_from_params
from featurestore.heads import train_head, write_head_report
from featurestore.store import FeatureStore
from featurestore.utils.atomic import write_status

MULTILAYER = "multilayer"

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store", "head"), {"features": "the feature store", "out": "the head file",
                                                          "reports": "the reports folder"})
    features, out = args.features, args.out
    if args.head == MULTILAYER:
        features, out = layer_store(args.store, args.features), args.out / f"{MULTILAYER}.skops"
        out.unlink(missing_ok=True)
        if features is None:
            write_status(args.out, {"store": args.store, "fitted": False,
                                    "reason": f"stores.{args.store}.layers is not all: no layer store to train on"})
            raise SystemExit(0)
    head = train_head(features, config_from_params(load_params("train_head"), args.head))
    head.store_name = args.store  # its name: <store>__<head>
    head.save(out)
    write_head_report(head, FeatureStore(features), args.reports, split=load_params("evaluate")["split"])
    if args.head == MULTILAYER:
        write_status(args.out, {"store": args.store, "fitted": True, "file": out.name, "name": head.name})
    print(json.dumps(head.summary()))
