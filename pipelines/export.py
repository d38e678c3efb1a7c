"""DVC stage `export@<name>`: the model a data set deploys → OUT, one ONNX graph (+ its report), named for the data
set. The verdict (the finetune stage's deployed.json: name, kind, file, SHA-256; featurestore.transfer.best) names the
model: a head on the frozen or on the fine-tuned backbone, the baseline or the hybrid head. This stage ships exactly
that file, after checking its SHA-256, so what is deployed is what was measured. A head on a backbone extracted from a
local checkpoint (``extract.<backbone>.weights``, a tv: backbone's file) exports with that file."""

from pathlib import Path

from _params import stage_arguments, store_settings

from featurestore.data.sources import content_id as file_sha256
from featurestore.deploy import deployed_model, export_model
from featurestore.heads.model_file import load_model, model_kind
from featurestore.utils.console import setup_logging


def extracted_from(model: Path, weights: str | None) -> str | None:
    """``weights`` (the backbone's local checkpoint in params.yaml) when the deployed model is a head on a store
    extracted from that very file (its fingerprint records the file's SHA-256), else None: a head on the fine-tuned
    backbone reads its own weights, and a baseline none."""
    if not weights or not Path(weights).is_file() or model_kind(model) != "head":
        return None
    recorded = load_model(model).fingerprint.get("weights_sha256")
    return weights if recorded == file_sha256(weights) else None


if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("name",), {"deployed": "the verdict's deployed.json", "out": "the ONNX file"})
    source = deployed_model(args.deployed)
    weights = store_settings("extract", args.name).get("weights")
    report = export_model(source, args.out, weights=extracted_from(source, weights))
    print(f"{args.name}.onnx ships {report['name']} ({report['kind']}, {source}): max probability difference "
          f"{report['check']['max_probability_diff']:.2e}, labels equal {report['check']['labels_equal']}")
