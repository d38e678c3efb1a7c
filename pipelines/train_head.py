"""DVC stage `train_head@<store>-<head>`: a feature store → a head file (skops), the head named `<store>__<head>`,
its settings chosen on validation."""

import json

from _params import load_params, stage_arguments

from featurestore.configs import config_from_params
from featurestore.heads import train_head

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store", "head"), {"features": "the feature store", "out": "the head file"})
    head = train_head(args.features, config_from_params(load_params("train_head"), args.head))
    head.store_name = args.store  # its name: <store>__<head>
    head.save(args.out)
    print(json.dumps(head.summary()))
