"""DVC stage `train_head@<backbone>-<head>`: a feature store → a head file (skops), C chosen on validation."""

import json

from _params import load_params, stage_arguments

from featurestore.configs import config_from_params
from featurestore.heads import train_head

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("backbone", "head"), {"features": "the feature store", "out": "the head file"})
    head = train_head(args.features, config_from_params(load_params("train_head"), args.head))
    head.save(args.out)
    print(json.dumps(head.summary()))
