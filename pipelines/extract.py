"""DVC stage `extract@<backbone>`: data/prepared → data/features/<backbone>.h5 (+ a summary JSON)."""

import sys

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.extract import extract_features

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    p = load_params("extract")
    out = ROOT / "data" / "features" / f"{backbone}.h5"
    summary = extract_features(
        ROOT / "data" / "prepared",
        out,
        backbone,
        image_size=p.get("image_size"),
        crop_pct=p.get("crop_pct"),
        batch_size=p["batch_size"],
        workers=p["workers"],
        device=p["device"],
        dtype=p["dtype"],
        on_error=p["on_error"],
    )
    out.with_name(f"{backbone}.summary.json").write_text(summary.to_json() + "\n")
    print(summary.to_json())
