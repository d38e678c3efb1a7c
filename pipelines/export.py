"""DVC stage `export@<name>`: the deployed model → OUT, one ONNX graph (+ its report). The deployed model is the
best on validation (the finetune stage's decision.json): the baseline (TF-IDF or pixels + logistic regression) or
the hybrid head when it beat every encoder head, else the fine-tuned backbone's head when the stage chose it, else
the cache-only head. The cache-only head of a backbone extracted from a local checkpoint
(``extract.<backbone>.weights``, a tv: backbone's file) exports with that file."""

from _params import load_params, stage_arguments

from featurestore.deploy import deployed_model, export_model
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("name",), {
        "head": "the cache-only head", "decision": "the finetune stage's decision.json",
        "finetuned_head": "the same head on the fine-tuned backbone, if the stage made it", "out": "the ONNX file"})
    source = deployed_model(args.decision, args.head, args.finetuned_head)
    backbone = load_params("export")[args.name]["backbone"]
    weights = load_params("extract").get(backbone, {}).get("weights") if source == args.head else None
    report = export_model(source, args.out, **({"weights": weights} if weights else {}))
    print(f"{args.name}.onnx from {source}: max probability difference {report['check']['max_probability_diff']:.2e}, "
          f"labels equal {report['check']['labels_equal']}")
