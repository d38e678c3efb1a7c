"""DVC stage `predict@<backbone>-<head>`: the exported model on data/prepared's test split → CSV."""

import sys

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.predict import predict_images

if __name__ == "__main__":
    setup_logging()
    name = f"{sys.argv[1]}__{sys.argv[2]}"
    p = load_params("predict")
    out = ROOT / "data" / "predictions" / f"{name}.csv"
    summary = predict_images(ROOT / "data" / "export" / f"{name}.onnx", ROOT / "data" / "prepared", out,
                             batch_size=p["batch_size"], workers=p["workers"], provider=p["provider"],
                             top_k=p["top_k"], split=p["split"], progress=False)
    out.with_suffix(".json").write_text(summary.to_json() + "\n")
    print(summary.to_json())
