"""DVC stage `evaluate_head@<backbone>-<head>`: one head on the test split → its files under data/reports/."""

import json
import sys

from _params import ROOT, load_params

from featurestore.heads import load_head
from featurestore.reports import write_head_report
from featurestore.store import FeatureStore

if __name__ == "__main__":
    backbone, head_name = sys.argv[1], sys.argv[2]
    head = load_head(ROOT / "data" / "heads" / f"{backbone}__{head_name}.skops")
    metrics = write_head_report(head, FeatureStore(ROOT / "data" / "features" / f"{backbone}.h5"),
                                ROOT / "data" / "reports", split=load_params("evaluate")["split"])
    print(json.dumps(metrics))
