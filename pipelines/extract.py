"""DVC stage `extract@<backbone>`: data/<its data set> → data/features/<backbone>.h5 (+ a summary JSON).

Image backbones take `extract.<backbone>`'s image settings, text backbones its tokenization.
"""

import sys

from _params import ROOT, load_params

from featurestore.configs import extract_options
from featurestore.console import setup_logging
from featurestore.extract import extract_features

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    data = ROOT / "data" / load_params("stores")[backbone]
    out = ROOT / "data" / "features" / f"{backbone}.h5"
    summary = extract_features(data, out, backbone, **extract_options(load_params("extract")[backbone]))
    out.with_name(f"{backbone}.summary.json").write_text(summary.to_json() + "\n")
    print(summary.to_json())
