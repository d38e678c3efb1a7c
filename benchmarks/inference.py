"""The exported models (backbone + head, one ONNX graph; float, int8, float16) on the default data, in one process.

    python benchmarks/inference.py [--repeats 2] [--no-text] [--workdir DIR]

Images: Fashion-MNIST (100 train, 50 val, 200 test per class), EfficientNet-Lite0 at 112 px without crop, the
logistic-regression head; batches of 64. Texts: BBC News as `featurestore prepare-text` makes it (the defaults),
all-MiniLM-L6-v2 at 256 tokens, the logistic-regression head; batches of 16. Each is exported with
``quantize="int8", float16=True`` and the figures are, on the CPU provider:

1. file sizes; test accuracy of the float and the int8 graph, their label agreement and largest probability
   difference (from the export report: the check on the test split), and the float16 graph against the float one
   on the test split;
2. model-only items/s on the same pre-decoded (pre-tokenised) test batches: the float graph by session.run and by
   IOBinding, the int8 graph, the float16 graph (for the record: float16 is for CUDA; the CPU has no fast float16
   kernels), and for images eager torch (channels-last, inference_mode; target: onnxruntime >= 1.5x);
3. `predict` end to end (decode or read and tokenise in DataLoader workers, onnxruntime, CSV), float and int8
   (target: >= 0.8x model-only);
4. whether int8 would be the default: test accuracy within 0.5 points of the float graph and faster, end to end;
5. where onnxruntime's CUDA provider really is active (a GPU machine): the float and float16 graphs through
   predict's IOBinding.

Timings are the best of ``--repeats``, float and int8 interleaved, so that a machine shared with other jobs
slows both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featurestore.configs import HeadConfig
from featurestore.data.prepare import prepare_bbc_news, prepare_fashion_mnist
from featurestore.deploy.export import backbone_for, compare_on_split, export_onnx, linear_head_params, split_items
from featurestore.deploy.predict import OnnxClassifier, predict, variant_path
from featurestore.encode.runtime import ProviderError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

DEFAULT_MAX_ACCURACY_DROP = 0.005  # int8 becomes a default only within half a point of the float graph's accuracy


def rates(runs: dict, batches: list, repeats: int) -> dict[str, float]:
    """Best items/s of each ``run(batch)`` over ``repeats`` passes through ``batches``, the runs interleaved."""
    best = dict.fromkeys(runs, 0.0)
    items = sum(len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in batches)
    for run in runs.values():
        run(batches[0])  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            best[name] = max(best[name], items / (time.perf_counter() - started))
    return {name: round(value, 1) for name, value in best.items()}


def pre_decoded(classifier: OnnxClassifier, records: list, batch_size: int) -> list:
    """The test items as the model gets them: uint8 image batches or dicts of int64 token windows."""
    batches = []
    for _, batch, _ in classifier.loader(records, batch_size, workers=1):
        batches.append(classifier.feed(batch) if isinstance(batch, dict) else batch.numpy())
    return batches


def measure(label: str, head, data: Path, work: Path, batch_size: int, repeats: int, eager=None) -> dict:
    """Export float + int8 + float16, then sizes, accuracies and throughputs (see the module docstring)."""
    model = work / f"{label}.onnx"
    report = export_onnx(head, model, quantize="int8", float16=True)
    int8, fp16 = variant_path(model, "int8"), variant_path(model, "fp16")
    test = report["int8"]["test"]
    items = split_items(head, "test")
    fp16_test = compare_on_split(model, fp16, items, batch_size)
    float_cpu, int8_cpu = OnnxClassifier(model, "cpu"), OnnxClassifier(int8, "cpu")
    bound = OnnxClassifier(model, "cpu", io_binding=True)
    fp16_cpu = OnnxClassifier(fp16, "cpu")
    batches = pre_decoded(float_cpu, items.records, batch_size)
    runs = {"float": float_cpu.run_batch, "float_iobinding": bound.run_batch, "int8": int8_cpu.run_batch}
    if eager is not None:
        runs["torch_eager"] = eager
    with torch.inference_mode():
        model_only = rates(runs, batches, repeats)
    model_only["float16_on_cpu"] = rates({"fp16": fp16_cpu.run_batch}, batches[: max(1, len(batches) // 4)], 1)[
        "fp16"]
    end_to_end = dict.fromkeys(("float", "int8"), 0.0)
    for _ in range(repeats):
        for name, path in (("float", model), ("int8", int8)):
            summary = predict(path, data, work / f"{label}.{name}.csv", batch_size=batch_size, workers=1,
                              provider="cpu", split="test", progress=False)
            end_to_end[name] = max(end_to_end[name], round(summary.predicted / summary.seconds, 1))
    figures = {
        "items": test["n"], "batch_size": batch_size,
        "size_mb": {"float": round(report["size_bytes"] / 1e6, 2), "int8": round(report["int8"]["size_bytes"] / 1e6, 2),
                    "float16": round(report["float16"]["size_bytes"] / 1e6, 2)},
        "test_accuracy": {"float": test["reference_accuracy"], "int8": test["accuracy"],
                          "float16": fp16_test["accuracy"]},
        "int8_vs_float": {"label_agreement": test["label_agreement"], "max_probability_diff":
                          round(test["max_probability_diff"], 4), "mean_max_probability_diff":
                          round(test["mean_max_probability_diff"], 5)},
        "float16_vs_float_on_cpu": {"label_agreement": fp16_test["label_agreement"], "max_probability_diff":
                                    round(fp16_test["max_probability_diff"], 5)},
        "int8_calibration": report["int8"]["quantization"].get("calibration"),
        "model_only_items_s": model_only, "predict_end_to_end_items_s": end_to_end,
        "predict_vs_model_only": {name: round(end_to_end[name] / model_only[name], 2) for name in end_to_end},
        "iobinding_vs_session_run_cpu": round(model_only["float_iobinding"] / model_only["float"], 3),
    }
    drop = test["reference_accuracy"] - test["accuracy"]
    faster = end_to_end["int8"] > end_to_end["float"] and model_only["int8"] > model_only["float"]
    figures["int8_default"] = {"accuracy_drop_points": round(100 * drop, 2), "faster": faster,
                               "default": bool(drop <= DEFAULT_MAX_ACCURACY_DROP and faster)}
    figures["cuda"] = cuda_figures(model, batches, repeats)
    return figures


def cuda_figures(model: Path, batches: list, repeats: int) -> dict | None:
    """Items/s through predict's IOBinding on CUDA, float32 and float16 graphs; None where CUDA is not active."""
    try:
        exact = OnnxClassifier(model, "cuda", float16=False)
    except ProviderError as exc:
        print(f"CUDA provider: not active here ({str(exc).split(';')[0]})")
        return None
    half = OnnxClassifier(model, "cuda")
    return {"graph": half.model_path.name, **rates({"float32": exact.run_batch, "float16": half.run_batch}, batches,
                                                   repeats)}


def images(work: Path, repeats: int) -> dict:
    data = work / "fashion"
    prepare_fashion_mnist(data, labels_per_class=100, val_per_class=50, test_per_class=200, progress=False)
    store = work / "lite0.h5"
    extract_features(data, store, "efficientnet_lite0", image_size=112, crop_pct=1.0, progress=False)
    head = train_head(store, HeadConfig(head="logreg"))
    # The fairest eager baseline: channels-last is the faster layout for this network on the CPU.
    eager = backbone_for(head).eval().to(memory_format=torch.channels_last)
    linear = linear_head_params(head)
    weight, bias = (torch.tensor(a[0], dtype=torch.float32) for a in (linear.weight, linear.bias))

    def eager_classifier(batch: np.ndarray) -> torch.Tensor:
        features = eager(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
        return torch.softmax(features @ weight.T + bias, dim=1).argmax(dim=1)

    figures = measure("image", head, data, work, 64, repeats, eager=eager_classifier)
    figures["onnxruntime_vs_eager"] = round(figures["model_only_items_s"]["float"] /
                                            figures["model_only_items_s"]["torch_eager"], 2)
    return figures


def texts(work: Path, repeats: int) -> dict:
    data = work / "bbc"
    prepare_bbc_news(data)  # `featurestore prepare-text`'s defaults
    store = work / "minilm.h5"
    extract_features(data, store, "minilm_l6", progress=False)  # 256 tokens, truncate
    return measure("text", train_head(store, HeadConfig(head="logreg")), data, work, 16, repeats)


def show(name: str, unit: str, f: dict) -> None:
    size, acc, rate, e2e = f["size_mb"], f["test_accuracy"], f["model_only_items_s"], f["predict_end_to_end_items_s"]
    print(f"{name}: {f['items']} test {unit}, batch {f['batch_size']}")
    print(f"  size          float {size['float']:6.1f} MB   int8 {size['int8']:6.1f} MB   "
          f"float16 {size['float16']:.1f} MB")
    print(f"  test accuracy float {acc['float']:.4f}   int8 {acc['int8']:.4f}   float16 {acc['float16']:.4f}; "
          f"int8 labels agree {f['int8_vs_float']['label_agreement']:.1%}, max |dp| "
          f"{f['int8_vs_float']['max_probability_diff']:.3f}; float16 (CPU) max |dp| "
          f"{f['float16_vs_float_on_cpu']['max_probability_diff']:.4f}")
    print(f"  model only    float {rate['float']:7.1f}   int8 {rate['int8']:7.1f}   float IOBinding "
          f"{rate['float_iobinding']:7.1f} ({f['iobinding_vs_session_run_cpu']:.3f}x session.run)   float16 "
          f"{rate['float16_on_cpu']:.1f} {unit}/s")
    if "torch_eager" in rate:
        print(f"  torch eager   {rate['torch_eager']:7.1f} {unit}/s: onnxruntime {f['onnxruntime_vs_eager']:.2f}x "
              f"(target >= 1.5)")
    print(f"  predict       float {e2e['float']:7.1f}   int8 {e2e['int8']:7.1f} {unit}/s end to end "
          f"({f['predict_vs_model_only']['float']:.2f}x / {f['predict_vs_model_only']['int8']:.2f}x model-only, "
          f"target >= 0.8)")
    verdict = f["int8_default"]
    print(f"  int8 default: {verdict['default']} (accuracy {-verdict['accuracy_drop_points']:+.2f} points, "
          f"faster: {verdict['faster']})")
    if f["cuda"]:
        print(f"  CUDA (IOBinding): float32 {f['cuda']['float32']:.1f}, float16 {f['cuda']['float16']:.1f} {unit}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-text", action="store_true", help="images only")
    parser.add_argument("--workdir", help="keep the data, stores and models here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = {"images": images(work, args.repeats)}
        show("images (EfficientNet-Lite0, 112 px)", "img", figures["images"])
        if not args.no_text:
            figures["texts"] = texts(work, args.repeats)
            show("texts (all-MiniLM-L6-v2, 256 tokens)", "texts", figures["texts"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
