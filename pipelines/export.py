"""DVC stage `export@<name>`: the deployed head (the fine-tuned backbone's when the fine-tune stage chose it, else
the cache-only one) → OUT, one ONNX graph (+ its report)."""

from _params import stage_arguments

from featurestore.deploy import deployed_head, export_onnx
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("name",), {
        "head": "the cache-only head", "decision": "the finetune stage's decision.json",
        "finetuned_head": "the same head on the fine-tuned backbone, if the stage made it", "out": "the ONNX file"})
    source = deployed_head(args.decision, args.head, args.finetuned_head)
    report = export_onnx(source, args.out)
    print(f"{args.name}.onnx from {source}: max probability difference {report['check']['max_probability_diff']:.2e}, "
          f"labels equal {report['check']['labels_equal']}")
