"""DVC stages `baseline@<store>`, `hybrid@<store>` and `small_cnn@<store>`: a challenger of the verdict fitted
without the encoder (baseline: TF-IDF for texts, raw pixels for images, + logistic regression; small_cnn, images: a
small CNN from scratch) or beside it (hybrid, texts: [w x embedding, TF-IDF] + logistic regression), on the items of
the store's train split, its settings chosen on val → OUT/<kind>.skops, its metrics on `evaluate.split`
(OUT/metrics.json) and OUT/status.json (featurestore.transfer.best.run_challenger_stage). ``deploy.<kind>`` turns it
off (the status then says so, and the verdict weighs the heads alone)."""

import json

from _params import load_params, stage_arguments

from featurestore.transfer.best import run_challenger_stage
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("kind", "store"), {"features": "the store's feature store",
                                                       "data": "the prepared data set", "out": "the stage's folder"})
    enabled = bool((load_params("deploy") or {}).get(args.kind, True))
    status = run_challenger_stage(args.kind, args.store, args.features, args.out, args.data, enabled,
                                  split=load_params("evaluate")["split"])
    print(json.dumps(status))
