"""The GPU check: one script, under 5 minutes on a single CUDA GPU, that prints what the CUDA paths do.

    python benchmarks/gpu.py [--data DIR] [--out FILE.json] [--images 3000]

Sections (each prints one JSON line; a section that fails says why and the next one runs):

1. ``environment``: the card, torch, onnxruntime and its providers.
2. ``extraction``: images/s on ``cuda`` end to end (``extract_features``: hash, decode in DataLoader workers,
   model, journal, HDF5 write) against model-only (the same engine on pre-decoded batches), float16 autocast
   against float32, and single-core decode + preprocess images/s (how many decode workers one GPU needs).
3. ``predict``: whether onnxruntime's CUDA provider is really active in a session, and if so its throughput
   and outputs against the CPU provider's (max difference).
4. ``finetune``: a fine-tune epoch's seconds on cuda, from the trunk cache and from images.
5. ``torchrun``: extraction with ``torchrun --nproc-per-node <visible GPUs>``, its images/s, and its store
   against the single-process one (same rows; max feature difference).

Without a GPU it says so and exits 0 (the CUDA paths are then tested only for their errors).
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
import torch

RESULTS: dict[str, dict] = {}


def section(name: str):
    def wrap(function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                RESULTS[name] = function(*args, **kwargs)
            except Exception as exc:  # report and go on: one broken path must not hide the others
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            RESULTS[name]["section_seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps({name: RESULTS[name]}), flush=True)
        return run
    return wrap


@section("environment")
def environment() -> dict:
    import onnxruntime as ort

    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def rate(count: int, function) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


@section("extraction")
def extraction(data: Path, work: Path, batch_size: int, workers: int) -> dict:
    from featurestore.data.sources import scan_source
    from featurestore.encode.backbones import load_backbone
    from featurestore.encode.engines import TorchEngine
    from featurestore.encode.images import load_image
    from featurestore.extract.launch import extract_features

    model = load_backbone("efficientnet_lite0", image_size=112, crop_pct=1.0)
    extract_features(data, work / "warm.h5", model=model, device="cuda", engine="torch", batch_size=batch_size,
                     workers=workers, progress=False)  # cuDNN autotuning, CUDA context, decoder forks
    summary = extract_features(data, work / "cuda.h5", model=model, device="cuda", engine="torch",
                               batch_size=batch_size, workers=workers, progress=False)
    paths = [r.path for r in scan_source(data).records]
    started = time.perf_counter()
    tensors = [model.preprocessing(load_image(p)) for p in paths]
    decode_rate = len(paths) / (time.perf_counter() - started)
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    engine = TorchEngine(model, torch.device("cuda"))
    results = {}
    for name, autocast in (("float16_autocast", True), ("float32", False)):
        engine.autocast = autocast
        for batch in batches[:3]:
            engine(batch)
        results[f"model_only_{name}_images_per_second"] = round(rate(len(tensors),
                                                                     lambda: [engine(b) for b in batches]))
    end_to_end = summary.extracted / summary.seconds
    return {"images": len(paths), "batch_size": batch_size, "decode_workers": workers,
            "end_to_end_images_per_second": round(end_to_end), **results,
            "end_to_end_vs_model_only": round(end_to_end / results["model_only_float16_autocast_images_per_second"], 3),
            "decode_images_per_second_one_core": round(decode_rate),
            "decode_cores_to_feed_the_gpu": round(results["model_only_float16_autocast_images_per_second"]
                                                  / decode_rate, 1)}


@section("predict")
def predict_provider(data: Path, work: Path) -> dict:
    from featurestore.configs import HeadConfig
    from featurestore.deploy.export import export_onnx
    from featurestore.encode.runtime import make_session
    from featurestore.errors import ProviderError
    from featurestore.heads.train import train_head

    head = train_head(work / "cuda.h5", HeadConfig(c_points=6, n_jobs=1)) if (work / "cuda.h5").exists() else None
    if head is None:
        return {"error": "no store from the extraction section"}
    model = work / "model.onnx"
    export_onnx(head, model)
    try:
        session, used = make_session(str(model), "cuda")
    except ProviderError as exc:
        return {"cuda_provider_active": False, "why": str(exc)}
    cpu, _ = make_session(str(model), "cpu")
    images = np.random.default_rng(0).integers(0, 256, (512, 3, 112, 112), dtype=np.uint8)
    outputs = {name: s.run(["probabilities"], {"images": images})[0] for name, s in (("cuda", session), ("cpu", cpu))}
    started = time.perf_counter()
    for _ in range(5):
        session.run(["probabilities"], {"images": images})
    return {"cuda_provider_active": used == "cuda",
            "images_per_second": round(5 * 512 / (time.perf_counter() - started)),
            "max_probability_diff_vs_cpu": float(np.abs(outputs["cuda"] - outputs["cpu"]).max())}


@section("finetune")
def finetune_epochs(data: Path, work: Path) -> dict:
    import yaml

    from featurestore.configs import FinetuneConfig, HeadConfig
    from featurestore.extract.launch import extract_features
    from featurestore.heads.train import train_head
    from featurestore.transfer.finetune import finetune

    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    settings = params["finetune"]["efficientnet_lite0"]
    config = FinetuneConfig(**{k: v for k, v in settings.items() if k not in ("mode", "device")})
    config = FinetuneConfig(**{**config.__dict__, "epochs": 2, "patience": 5, "workers": 4})
    extract_features(data, work / "cpu-features.h5", "efficientnet_lite0", image_size=112, crop_pct=1.0,
                     device="cuda", engine="torch", progress=False)
    head = train_head(work / "cpu-features.h5", HeadConfig(c_points=6, n_jobs=1))
    cached = finetune(head, data, work / "a.pth", config, device="cuda", progress=False, checkpoint_dir=work / "a")
    images = finetune(head, data, work / "b.pth", FinetuneConfig(**{**config.__dict__, "source": "images"}),
                      device="cuda", progress=False, checkpoint_dir=work / "b")

    def per_epoch(result) -> float:
        return round(sum(h["seconds"] for h in result.history) / len(result.history), 3)

    return {"unfreeze_blocks": config.unfreeze_blocks,
            "epoch_seconds_cache": per_epoch(cached), "epoch_seconds_images": per_epoch(images),
            "trunk_cache_seconds": cached.cache_seconds, "val_probe": cached.start_val_accuracy,
            "val_best": cached.best_val_accuracy}


@section("torchrun")
def torchrun_extraction(data: Path, work: Path, batch_size: int, workers: int) -> dict:
    from featurestore import FeatureStore

    gpus = torch.cuda.device_count()
    out = work / "torchrun.h5"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "featurestore.cli", "extract", "--data", str(data), "--out", str(out), "--image-size", "112",
               "--crop-pct", "1.0", "--device", "cuda", "--engine", "torch", "--batch-size", str(batch_size),
               "--workers", str(workers), "--json", "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    single, group = FeatureStore(work / "cuda.h5"), FeatureStore(out)
    same_rows, max_diff = True, 0.0
    for split in single.splits:
        a, ya, ia = single.load(split)
        b, yb, ib = group.load(split)
        same_rows &= list(ia) == list(ib) and np.array_equal(ya, yb)
        max_diff = max(max_diff, float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()))
    return {"gpus": gpus, "images_per_second_with_launch": round(summary["extracted"] / seconds),
            "images_per_second_in_extraction": round(summary["extracted"] / summary["seconds"]),
            "same_rows_as_single_process": same_rows,
            "same_fingerprint": single.fingerprint_hash == group.fingerprint_hash,
            "max_feature_diff_vs_single_process": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared ImageFolder (default: prepare Fashion-MNIST)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--images", type=int, default=3500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"environment": {"cuda": False, "note": "no CUDA GPU: nothing to measure"}}))
        return
    work = Path(tempfile.mkdtemp(prefix="fs-gpu-"))
    data = args.data
    if data is None:
        from featurestore.data.prepare import prepare_fashion_mnist

        data = work / "prepared"
        prepare_fashion_mnist(data, max(1, args.images // 10 - 25), 5, 20, progress=False)
    environment()
    extraction(data, work, args.batch_size, args.workers)
    predict_provider(data, work)
    finetune_epochs(data, work)
    torchrun_extraction(data, work, args.batch_size, args.workers)
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2) + "\n")


if __name__ == "__main__":
    main()
