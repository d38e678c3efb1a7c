"""DVC stage `export@<name>`: the model a data set deploys → OUT, one ONNX graph (+ its report), named for the data
set. The verdict (the finetune stage's deployed.json: name, kind, file, SHA-256; featurestore.transfer.best) names the
model: a head on the frozen or on the fine-tuned backbone, the baseline or the hybrid head. This stage ships exactly
that file, after checking its SHA-256, so what is deployed is what was measured. A head on a backbone extracted from a
local checkpoint (``extract.<backbone>.weights``, a tv: backbone's file) exports with that file."""

from _params import load_params, stage_arguments

from featurestore.deploy import deployed_model, export_model
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("name",), {"deployed": "the verdict's deployed.json", "out": "the ONNX file"})
    source = deployed_model(args.deployed)
    backbone = load_params("export")[args.name]["backbone"]
    weights = load_params("extract").get(backbone, {}).get("weights")
    on_the_store = source.name.startswith(f"{backbone}__")  # a cache-only head: its graph reads that checkpoint
    report = export_model(source, args.out, **({"weights": weights} if weights and on_the_store else {}))
    print(f"{args.name}.onnx ships {report['name']} ({report['kind']}, {source}): max probability difference "
          f"{report['check']['max_probability_diff']:.2e}, labels equal {report['check']['labels_equal']}")
