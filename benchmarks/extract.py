"""Extraction throughput, three ways on the same images and batch size, in one process.

    python benchmarks/extract.py [--images 3000] [--image-size 112] [--batch-size 64] [--workers 1] [--repeats 2]

1. end-to-end: ``extract_features`` into a fresh HDF5 store (hash + decode + preprocess in
   DataLoader workers + model + journal + HDF5 write), with the default engine;
2. model-only: the same engine over tensors decoded beforehand, same batch size;
3. naive: one image at a time in eager PyTorch (decode, preprocess, model on a batch of 1), then
   one HDF5 write: the loop people write by hand.
Also printed for context: eager PyTorch batched, model-only.

Prints images/s for each (best of ``--repeats`` runs, the machine being shared) and the ratios
end-to-end/model-only and end-to-end/naive.
Targets on the 2-core reference machine: ≥ 0.9 and ≥ 3.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.data.sources import scan_source
from featurestore.encode.backbones import load_backbone
from featurestore.encode.engines import TorchEngine, make_engine
from featurestore.encode.images import load_rgb
from featurestore.extract.launch import extract_features


def images_folder(workdir: Path, count: int) -> Path:
    per_class = max(1, count // 10)
    root = workdir / "images"
    prepare_fashion_mnist(root, labels_per_class=per_class, val_per_class=1, test_per_class=1, progress=False)
    return root


def model_only(engine, tensors: list[torch.Tensor], batch_size: int) -> float:
    batches = [torch.stack(tensors[start : start + batch_size]) for start in range(0, len(tensors), batch_size)]
    engine(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        engine(batch)
    return len(tensors) / (time.perf_counter() - started)


def naive(model, paths: list[Path], out: Path) -> float:
    started = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for path in paths:
            pixels = model.preprocessing(load_rgb(path)).unsqueeze(0)
            rows.append(model(pixels)[0].numpy())
    with h5py.File(out, "w") as handle:
        handle["features"] = np.stack(rows)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--naive-images", type=int, default=256, help="the naive loop is slow: time it on fewer")
    parser.add_argument("--repeats", type=int, default=2, help="each figure is the best of this many runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        root = images_folder(workdir, args.images)
        paths = [record.path for record in scan_source(root).records]
        model = load_backbone("efficientnet_lite0", image_size=args.image_size, crop_pct=1.0)
        tensors = [model.preprocessing(load_rgb(path)) for path in paths]
        engine = make_engine(model, torch.device("cpu"))  # exports the ONNX graph once, outside the timings

        end_to_end = model_rate = eager_rate = naive_rate = 0.0
        for repeat in range(args.repeats):
            summary = extract_features(root, workdir / f"e2e{repeat}.h5", model=model, batch_size=args.batch_size,
                                       workers=args.workers, device="cpu", progress=False)
            end_to_end = max(end_to_end, len(paths) / summary.seconds)
            model_rate = max(model_rate, model_only(engine, tensors, args.batch_size))
        for _ in range(args.repeats):
            eager_rate = max(eager_rate, model_only(TorchEngine(model, torch.device("cpu")), tensors, args.batch_size))
            naive_rate = max(naive_rate, naive(model.to(memory_format=torch.contiguous_format),
                                               paths[: args.naive_images], workdir / "naive.h5"))

    figures = {
        "images": len(paths),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "engine": summary.engine,
        "torch_threads": torch.get_num_threads(),
        "end_to_end_img_s": round(end_to_end, 1),
        "model_only_img_s": round(model_rate, 1),
        "naive_img_s": round(naive_rate, 1),
        "eager_batched_img_s": round(eager_rate, 1),
        "end_to_end_vs_model_only": round(end_to_end / model_rate, 2),
        "end_to_end_vs_naive": round(end_to_end / naive_rate, 2),
    }
    print(f"end-to-end  {end_to_end:7.1f} img/s   ({summary.engine}; decode in {args.workers} worker(s); HDF5)")
    print(f"model-only  {model_rate:7.1f} img/s   ({summary.engine}, pre-decoded tensors, batch {args.batch_size})")
    print(f"naive       {naive_rate:7.1f} img/s   (eager torch, one image at a time)")
    print(f"eager torch {eager_rate:7.1f} img/s   (context: batched eager, model-only)")
    print(f"end-to-end / model-only = {figures['end_to_end_vs_model_only']:.2f}  (target >= 0.9)")
    print(f"end-to-end / naive      = {figures['end_to_end_vs_naive']:.2f}  (target >= 3)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
