"""DVC stage `evaluate_head@<store>-<head>`: one head on the test split → its files under OUT."""

import json

from _params import load_params, stage_arguments

from featurestore.heads import load_head, write_head_report
from featurestore.store import FeatureStore

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store", "head"), {"head_file": "the head", "features": "its feature store",
                                                          "out": "the reports folder"})
    metrics = write_head_report(load_head(args.head_file), FeatureStore(args.features), args.out,
                                split=load_params("evaluate")["split"])
    print(json.dumps(metrics))
