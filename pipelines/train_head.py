"""DVC stage `train_head@<backbone>-<head>`: data/features/<backbone>.h5 → data/heads/<backbone>__<head>.skops."""

import json
import sys

from _params import ROOT, load_params

from featurestore.heads import config_from_params, train_head

if __name__ == "__main__":
    backbone, head_name = sys.argv[1], sys.argv[2]
    config = config_from_params(load_params("train_head"), head_name)
    head = train_head(ROOT / "data" / "features" / f"{backbone}.h5", config)
    head.save(ROOT / "data" / "heads" / f"{backbone}__{head_name}.skops")
    print(json.dumps(head.summary()))
