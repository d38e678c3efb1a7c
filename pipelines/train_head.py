"""DVC stage `train_head@<store>-<head>`: a feature store → a head file (skops), the head named `<store>__<head>`,
its settings chosen on validation; and its report on the `evaluate.split` split of the store under REPORTS (metrics,
confusion matrix and C sweep: featurestore.heads.reports.write_head_report), as each challenger's stage evaluates
its model, so that a head experiment runs one stage per head and data set."""

import json

from _params import load_params, stage_arguments

from featurestore.configs import config_from_params
from featurestore.heads import train_head, write_head_report
from featurestore.store import FeatureStore

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store", "head"), {"features": "the feature store", "out": "the head file",
                                                          "reports": "the reports folder"})
    head = train_head(args.features, config_from_params(load_params("train_head"), args.head))
    head.store_name = args.store  # its name: <store>__<head>
    head.save(args.out)
    write_head_report(head, FeatureStore(args.features), args.reports, split=load_params("evaluate")["split"])
    print(json.dumps(head.summary()))
