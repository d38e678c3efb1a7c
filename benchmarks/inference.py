"""The exported model (backbone + head, one ONNX graph) against the Python pipeline, in one process.

    python benchmarks/inference.py [--images 3000] [--image-size 112] [--batch-size 64] [--repeats 2]

1. model-only images/s on the same pre-decoded uint8 batches: onnxruntime (CPU provider) vs torch
   eager (the same backbone + the logistic-regression head's softmax in torch, channels-last, under
   inference_mode). Target: >= 1.5x.
2. `predict` end-to-end (decode in DataLoader workers, onnxruntime, CSV) vs onnxruntime model-only.
   Target: >= 0.8x.
3. When onnxruntime's CUDA provider really is active (a GPU machine), its model-only throughput.
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
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.data.sources import scan_source
from featurestore.deploy.export import backbone_for, export_onnx, linear_head_params
from featurestore.deploy.predict import predict
from featurestore.encode.images import load_image
from featurestore.encode.runtime import ProviderError, make_session
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head


def rate(run, batches: list[np.ndarray], repeats: int) -> float:
    run(batches[0])  # warm-up
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        best = max(best, sum(len(b) for b in batches) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"
        prepare_fashion_mnist(images, labels_per_class=20, val_per_class=10, test_per_class=max(1, args.images // 10),
                              progress=False)
        store = work / "lite0.h5"
        extract_features(images, store, "efficientnet_lite0", image_size=args.image_size, crop_pct=1.0, progress=False)
        head = train_head(store, HeadConfig(head="logreg", c_points=12))
        model_path = work / "model.onnx"
        export_onnx(head, model_path)

        paths = [r.path for r in scan_source(images).records if r.split == "test"]
        backbone = backbone_for(head)
        tensors = [backbone.preprocessing(load_image(p)) for p in paths]
        size = args.batch_size
        batches = [torch.stack(tensors[i : i + size]).numpy() for i in range(0, len(tensors), size)]

        session, _ = make_session(str(model_path), "cpu")
        ort_rate = rate(lambda b: session.run(None, {"images": b}), batches, args.repeats)
        # The fairest eager baseline: channels-last is the faster layout for this network on the CPU.
        eager = backbone.eval().to(memory_format=torch.channels_last)
        linear = linear_head_params(head)
        weight, bias = (torch.tensor(a[0], dtype=torch.float32) for a in (linear.weight, linear.bias))

        def eager_classifier(batch: np.ndarray) -> torch.Tensor:
            features = eager(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
            return torch.softmax(features @ weight.T + bias, dim=1).argmax(dim=1)

        with torch.inference_mode():
            eager_rate = rate(eager_classifier, batches, args.repeats)

        end_to_end = 0.0
        for _ in range(args.repeats):
            summary = predict(model_path, images, work / "pred.csv", batch_size=args.batch_size,
                                     workers=args.workers, provider="cpu", split="test", progress=False)
            end_to_end = max(end_to_end, summary.predicted / summary.seconds)

        cuda = None
        try:
            cuda_session, used = make_session(str(model_path), "cuda")
            cuda = rate(lambda b: cuda_session.run(None, {"images": b}), batches, args.repeats)
        except ProviderError as exc:
            print(f"CUDA provider: not active here ({str(exc).split(';')[0]})")

    figures = {
        "images": len(paths), "image_size": args.image_size, "batch_size": args.batch_size,
        "onnxruntime_cpu_img_s": round(ort_rate, 1), "torch_eager_img_s": round(eager_rate, 1),
        "onnxruntime_vs_eager": round(ort_rate / eager_rate, 2),
        "predict_end_to_end_img_s": round(end_to_end, 1),
        "predict_vs_model_only": round(end_to_end / ort_rate, 2),
        "onnxruntime_cuda_img_s": None if cuda is None else round(cuda, 1),
    }
    print(f"onnxruntime CPU {ort_rate:7.1f} img/s vs torch eager {eager_rate:7.1f} img/s: "
          f"{figures['onnxruntime_vs_eager']:.2f}x (target >= 1.5)")
    print(f"predict end-to-end {end_to_end:7.1f} img/s vs onnxruntime model-only: "
          f"{figures['predict_vs_model_only']:.2f}x (target >= 0.8)")
    if cuda is not None:
        print(f"onnxruntime CUDA {cuda:7.1f} img/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
