"""DVC stage `audit@<store>`: a feature store → its audit under OUT (featurestore.audit.audit_store): label issues
ranked with cleanlab, near-duplicate pairs within and across splits (train/test pairs are leaks), outliers, a UMAP
map, and `summary.json` (seconds per step routed to the timings folder); its counts also to METRICS. Its settings
are `audit` in params.yaml.

What to do with what it finds: list the items to leave out or relabel in `configs/corrections/<store>.csv` (the
extract stage applies it; see featurestore.store.corrections), and `dvc repro` reruns what they change.
"""

import json

from _params import load_params, stage_arguments

from featurestore.audit import audit_store
from featurestore.utils.console import setup_logging
from featurestore.utils.timings import write_json

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("store",), {"features": "the feature store", "out": "the audit's folder",
                                                 "metrics": "its counts, for `dvc metrics show`"})
    settings = load_params("audit")
    summary = audit_store(args.features, args.out, k=settings["k"], folds=settings["folds"], seed=settings["seed"],
                          head=settings["head"])
    counts = {key: summary[key] for key in ("rows", "label_issues", "near_duplicates", "graph")}
    write_json(args.metrics, counts)
    print(json.dumps(counts))
