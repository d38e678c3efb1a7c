"""DVC stage `export@<backbone>-<head>`: data/heads/<name>.skops → data/export/<name>.onnx (+ report)."""

import sys

from _params import ROOT

from featurestore.console import setup_logging
from featurestore.export import export_onnx

if __name__ == "__main__":
    setup_logging()
    name = f"{sys.argv[1]}__{sys.argv[2]}"
    report = export_onnx(ROOT / "data" / "heads" / f"{name}.skops", ROOT / "data" / "export" / f"{name}.onnx")
    print(f"{name}.onnx: max probability difference {report['check']['max_probability_diff']:.2e}, "
          f"labels equal {report['check']['labels_equal']}")
