"""Extraction on 1 and N processes (torchrun, gloo on the CPU), and what 8 GPUs should do on paper.

Extracts the same Fashion-MNIST images (112 px) with ``featurestore extract`` in one process and with
``--nproc N`` (torchrun, N ranks on this machine's cores), each into an empty store, and prints images/s
inside the extraction (hashing, decoding, the model, journal, assembly) and including the launch, their
ratio, and whether the two stores hold the same rows and fingerprint.

With ``--gpu-figures docs/gpu-h200.json`` (what ``benchmarks/gpu.py --out`` wrote on a CUDA machine) it
also prints the expected throughput of 8 such GPUs: each GPU's model-only rate, the decode rate of one
CPU core, and so how many decode workers keep the 8 GPUs busy, and the rate when they are fewer.

    python benchmarks/distributed.py [--images 3000] [--nproc 2] [--gpu-figures docs/gpu-h200.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def extract(data: Path, out: Path, nproc: int, workers: int) -> dict:
    command = [sys.executable, "-m", "featurestore.cli", "extract", "--data", str(data), "--out", str(out),
               "--image-size", "112", "--crop-pct", "1.0", "--batch-size", "64", "--workers", str(workers),
               "--nproc", str(nproc), "--json", "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"extract --nproc {nproc} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"processes": nproc, "images": summary["extracted"],
            "images_per_second": round(summary["extracted"] / summary["seconds"], 1),
            "images_per_second_with_launch": round(summary["extracted"] / wall, 1)}


def same_store(a: Path, b: Path) -> dict:
    from featurestore import FeatureStore

    one, many = FeatureStore(a), FeatureStore(b)
    same_rows, max_diff = True, 0.0
    for split in one.splits:
        xa, ya, ia = one.load(split)
        xb, yb, ib = many.load(split)
        same_rows &= list(ia) == list(ib) and np.array_equal(ya, yb)
        max_diff = max(max_diff, float(np.abs(xa - xb).max()))
    return {"same_rows": same_rows, "same_fingerprint": one.fingerprint_hash == many.fingerprint_hash,
            "max_feature_diff": max_diff}


def eight_gpus(figures: dict, gpus: int = 8) -> dict:
    """Expected images/s for ``gpus`` GPUs like the measured one: the GPUs' model-only rate, unless decoding
    (measured images/s per core) cannot keep up with the decode workers available."""
    measured = figures["extraction"]
    per_gpu = measured["model_only_float16_autocast_images_per_second"]
    per_core = measured["decode_images_per_second_one_core"]
    cores_needed = gpus * per_gpu / per_core
    rows = [{"decode_cores": cores, "images_per_second": round(min(gpus * per_gpu, cores * per_core))}
            for cores in (16, 32, 64, 128) if cores < cores_needed] + [
        {"decode_cores": round(cores_needed, 1), "images_per_second": round(gpus * per_gpu)}]
    return {"device": figures["environment"]["device"], "gpus": gpus, "model_only_per_gpu": per_gpu,
            "decode_per_core": per_core, "decode_cores_to_keep_them_busy": round(cores_needed, 1),
            "measured_end_to_end_one_gpu": measured["end_to_end_images_per_second"],
            "measured_decode_workers_one_gpu": measured["decode_workers"], "expected": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="decode workers per process")
    parser.add_argument("--gpu-figures", type=Path, help="JSON written by benchmarks/gpu.py --out")
    args = parser.parse_args()
    results = {"cpu_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="fs-dist-") as tmp:
        work = Path(tmp)
        from featurestore.data.prepare import prepare_fashion_mnist

        data = work / "prepared"
        prepare_fashion_mnist(data, max(1, args.images // 10 - 25), 5, 20, progress=False)
        # Exporting the ONNX graph once is not part of either figure.
        extract(data, work / "warm.h5", 1, args.workers)
        one = extract(data, work / "one.h5", 1, args.workers)
        many = extract(data, work / "many.h5", args.nproc, args.workers)
        results["scaling"] = [one, many]
        results["speedup"] = round(many["images_per_second"] / one["images_per_second"], 2)
        results["store"] = same_store(work / "one.h5", work / "many.h5")
    if args.gpu_figures:
        results["eight_gpus_on_paper"] = eight_gpus(json.loads(args.gpu_figures.read_text()))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
