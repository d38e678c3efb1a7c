"""DVC stage `predict@<name>`: data/export/<name>.onnx on its data set's test split → data/predictions/<name>.csv."""

import sys

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.predict import predict

if __name__ == "__main__":
    setup_logging()
    name = sys.argv[1]
    p, entry = load_params("predict"), load_params("export")[name]
    out = ROOT / "data" / "predictions" / f"{name}.csv"
    summary = predict(ROOT / "data" / "export" / f"{name}.onnx", ROOT / "data" / entry["data"], out,
                      batch_size=p["batch_size"], workers=p["workers"], provider=p["provider"], top_k=p["top_k"],
                      split=p["split"], progress=False)
    out.with_suffix(".json").write_text(summary.to_json() + "\n")
    print(summary.to_json())
