"""DVC stage `export@<name>`: the deployed head of `export.<name>` (the fine-tuned backbone's when the fine-tune
stage chose it, else data/heads/<backbone>__<head>.skops) → data/export/<name>.onnx (+ report)."""

import sys

from _params import ROOT, load_params

from featurestore.console import setup_logging
from featurestore.deploy import deployed_head
from featurestore.export import export_onnx

if __name__ == "__main__":
    setup_logging()
    name = sys.argv[1]
    entry = load_params("export")[name]
    source = deployed_head(ROOT, entry["backbone"], entry["head"])
    report = export_onnx(source, ROOT / "data" / "export" / f"{name}.onnx")
    print(f"{name}.onnx from {source}: max probability difference {report['check']['max_probability_diff']:.2e}, "
          f"labels equal {report['check']['labels_equal']}")
