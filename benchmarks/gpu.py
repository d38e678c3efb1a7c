"""The GPU check: one prepared run of at most 4 minutes on one CUDA GPU, printing what every CUDA path does.

    python benchmarks/gpu.py [--device cuda|cpu] [--images 50000] [--out FILE.json]

``--device cpu`` is the smoke mode: a few hundred images, every section through the same code on the CPU (the test
suite runs it, so that the script a GPU machine gets has run before it gets there). Its figures mean nothing.

Sections (each prints one JSON line; a section that fails says why and the next one runs):

1. ``environment``: the card, torch, onnxruntime and its providers.
2. ``extraction``: Fashion-MNIST at 112 px, ``--images`` images (50,000 by default: 4,000 train, 500 val, 500 test
   per class). End to end (``extract_features``: hashing and decoding in the workers, the model, the background
   journal, the HDF5 write) at two sizes, a fifth of the images and all of them, each into a new store after a
   warm-up extraction: the difference gives the steady-state images/s and the fixed seconds (lock, worker start,
   final write) apart. Model only: the same engine on pre-decoded one-channel batches, every shape warmed first
   (the engine pads the tail to the full batch), in float16 autocast and in float32. Targets: end to end ≥ 0.8x
   model-only float16, float32 ≥ 0.4x float16.
3. ``finetune``: seconds per epoch from the trunk cache and from images (default data size: 100 labels per class,
   the params.yaml settings), in both orders (cache then images, images then cache). Target: cache ≥ 2x faster.
4. ``torchrun``: a cold ``featurestore extract`` in one process against a cold ``torchrun --nproc-per-node <GPUs>``
   of the same command, each a new process writing a new store, images/s per GPU including the start-up; the two
   stores must hold the same rows. Target: torchrun ≥ 0.9x the single process per GPU.
5. ``onnxruntime``: the exported backbone + head on the CUDA provider through an IOBinding (what ``predict`` does)
   against torch float16 model-only at the same batch size, and its probabilities against the CPU provider's.
   Target: ≥ 0.8x. A machine whose onnxruntime has no working CUDA provider says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 112
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function) -> float:
    """Seconds ``function()`` takes, the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


@section("environment")
def environment(device: torch.device) -> dict:
    import onnxruntime as ort

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke mode: figures mean nothing)"
    return {"device": name, "gpus": torch.cuda.device_count(), "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers()}


def steady_state(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """From (images, seconds) at two sizes: (steady-state images/s, fixed seconds), with seconds = fixed +
    images / rate."""
    (n1, t1), (n2, t2) = small, large
    rate = (n2 - n1) / max(t2 - t1, 1e-9)
    return rate, t1 - n1 / rate


def model_only_rate(model, device: torch.device, batches: list[torch.Tensor], autocast: bool, repeats: int) -> float:
    """Images/s of the extraction engine on pre-decoded batches, every shape warmed (cuDNN plans built) first."""
    from featurestore.encode.engines import TorchEngine

    engine = TorchEngine(model, device, autocast=autocast)
    for batch in (batches[0], batches[-1]) * 2:  # the full shape and the tail (padded to the full one on CUDA)
        engine(batch)
    count = repeats * sum(len(batch) for batch in batches)
    return count / timed(device, lambda: [engine(batch) for _ in range(repeats) for batch in batches])


@section("extraction")
def extraction(data: Path, work: Path, device: torch.device, batch_size: int, model_repeats: int) -> dict:
    from featurestore.data.sources import Source, scan_source
    from featurestore.encode.backbones import load_backbone
    from featurestore.encode.images import collate_decoded, load_image
    from featurestore.extract.launch import extract_features

    model = load_backbone("efficientnet_lite0", image_size=IMAGE_SIZE, crop_pct=1.0)
    source = scan_source(data)
    records = list(source.records)
    small = Source(source.root, source.class_names, records[:len(records) // 5], list(source.unusable))
    options = {"model": model, "device": str(device), "engine": "torch", "batch_size": batch_size, "progress": False}
    extract_features(small, work / "warm.h5", **options)  # CUDA context, cuDNN autotuning, worker forks, file cache
    runs = {}
    for name, subset in (("small", small), ("all", source)):
        summary = extract_features(subset, work / f"extract-{name}.h5", **options)
        runs[name] = (summary.extracted, summary.seconds)
    rate, fixed = steady_state(runs["small"], runs["all"])

    # model-only: a few thousand decoded images (as the workers ship them: one channel for grayscale), reused
    sample = [model.preprocessing(load_image(r.path), gray_channels=1) for r in records[:min(len(records), 8192)]]
    batches = [collate_decoded([(i, t, None) for i, t in enumerate(sample[start:start + batch_size])])[1]
               for start in range(0, len(sample), batch_size)]
    if device.type == "cuda":
        batches = [batch.pin_memory() for batch in batches]
    float32 = model_only_rate(model, device, batches, autocast=False, repeats=model_repeats)
    float16 = model_only_rate(model, device, batches, autocast=True, repeats=model_repeats) \
        if device.type == "cuda" else None
    reference = float16 or float32
    return {"images": runs["all"][0], "images_small_run": runs["small"][0], "batch_size": batch_size,
            "decode_workers": "auto", "end_to_end_seconds": round(runs["all"][1], 2),
            "end_to_end_seconds_small_run": round(runs["small"][1], 2),
            "end_to_end_steady_images_per_second": round(rate), "end_to_end_fixed_seconds": round(fixed, 2),
            "end_to_end_overall_images_per_second": round(runs["all"][0] / runs["all"][1]),
            "model_only_float16_autocast_images_per_second": float16 and round(float16),
            "model_only_float32_images_per_second": round(float32),
            "end_to_end_vs_model_only": round(rate / reference, 3), "target_end_to_end_vs_model_only": 0.8,
            "float32_vs_float16": float16 and round(float32 / float16, 3), "target_float32_vs_float16": 0.4}


@section("finetune")
def finetune_epochs(data: Path, work: Path, device: torch.device, epochs: int) -> dict:
    import yaml

    from featurestore.configs import FinetuneConfig, HeadConfig
    from featurestore.extract.launch import extract_features
    from featurestore.heads.train import train_head
    from featurestore.transfer.finetune import finetune, trunk_cache_for

    settings = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]["efficientnet_lite0"]
    config = FinetuneConfig(**{k: v for k, v in settings.items() if k not in ("mode", "device")})
    config = replace(config, epochs=epochs, patience=epochs + 1)
    store = work / "finetune-features.h5"
    extract_features(data, store, "efficientnet_lite0", image_size=IMAGE_SIZE, crop_pct=1.0, device=str(device),
                     progress=False)
    head = train_head(store, HeadConfig(c_points=6, n_jobs=1))
    cache = work / "trunk.h5"
    built = trunk_cache_for(head, data, cache, config, device=str(device), progress=False)

    def per_epoch(source: str, name: str) -> float:
        result = finetune(head, data, work / f"{name}.pth", replace(config, source=source), device=str(device),
                          progress=False, cache=cache, checkpoint_dir=work / name)
        return sum(h["seconds"] for h in result.history) / len(result.history)

    orders = {}
    for first, second in (("cache", "images"), ("images", "cache")):
        seconds = {first: per_epoch(first, f"{first}-first"), second: per_epoch(second, f"{second}-second")}
        orders[f"{first}_then_{second}"] = {f"epoch_seconds_{s}": round(v, 3) for s, v in seconds.items()}
    cache_mean = np.mean([o["epoch_seconds_cache"] for o in orders.values()])
    images_mean = np.mean([o["epoch_seconds_images"] for o in orders.values()])
    return {"unfreeze_blocks": config.unfreeze_blocks, "views": config.views, "epochs": epochs,
            "trunk_cache_seconds": round(built.seconds, 2), **orders,
            "epoch_seconds_cache": round(float(cache_mean), 3), "epoch_seconds_images": round(float(images_mean), 3),
            "cache_speedup": round(float(images_mean / cache_mean), 2), "target_cache_speedup": 2.0}


def cli_extract(launcher: list[str], data: Path, out: Path, device: torch.device, batch_size: int) -> tuple[dict,
                                                                                                            float]:
    """A cold ``featurestore extract`` (a new process, a new store) under ``launcher``; its JSON and seconds."""
    command = [*launcher, "-m", "featurestore.cli", "extract", "--data", str(data), "--out", str(out),
               "--image-size", str(IMAGE_SIZE), "--crop-pct", "1.0", "--device", device.type, "--engine", "torch",
               "--batch-size", str(batch_size), "--json", "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … failed: {result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), seconds


@section("torchrun")
def torchrun_extraction(data: Path, work: Path, device: torch.device, batch_size: int) -> dict:
    from featurestore import FeatureStore

    ranks = torch.cuda.device_count() if device.type == "cuda" else 1
    single, single_seconds = cli_extract([sys.executable], data, work / "single.h5", device, batch_size)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    group, group_seconds = cli_extract(launcher, data, work / "torchrun.h5", device, batch_size)
    one, many = FeatureStore(work / "single.h5"), FeatureStore(work / "torchrun.h5")
    same_rows, max_diff = one.splits == many.splits, 0.0
    for split in one.splits:
        a, ya, ia = one.load(split)
        b, yb, ib = many.load(split)
        same_rows &= list(ia) == list(ib) and np.array_equal(ya, yb)
        max_diff = max(max_diff, float(np.abs(a - b).max()) if len(a) else 0.0)
    per_rank = group["extracted"] / group_seconds / ranks
    alone = single["extracted"] / single_seconds
    return {"ranks": ranks, "images": single["extracted"], "single_cold_seconds": round(single_seconds, 2),
            "torchrun_cold_seconds": round(group_seconds, 2), "single_images_per_second": round(alone),
            "torchrun_images_per_second_per_rank": round(per_rank),
            "torchrun_vs_single_per_rank": round(per_rank / alone, 3), "target_torchrun_vs_single": 0.9,
            "same_rows": bool(same_rows), "same_fingerprint": one.fingerprint_hash == many.fingerprint_hash,
            "max_feature_diff": max_diff}


@section("onnxruntime")
def onnxruntime_provider(work: Path, device: torch.device, batch_size: int, repeats: int) -> dict:
    from featurestore.configs import HeadConfig
    from featurestore.deploy.export import export_onnx
    from featurestore.deploy.predict import OnnxClassifier
    from featurestore.encode.backbones import load_backbone
    from featurestore.errors import ProviderError
    from featurestore.heads.train import train_head

    store = work / "finetune-features.h5"
    if not store.exists():
        return {"error": "no store from the finetune section"}
    model_path = work / "model.onnx"
    export_onnx(train_head(store, HeadConfig(c_points=6, n_jobs=1)), model_path, float16=device.type == "cuda")
    images = np.random.default_rng(0).integers(0, 256, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    try:
        classifier = OnnxClassifier(model_path, device.type)
    except ProviderError as exc:
        return {"provider_active": False, "why": str(exc)}
    cpu = OnnxClassifier(model_path, "cpu")
    for _ in range(3):  # cuDNN's algorithm search and the device buffers
        classifier(images)
    started = time.perf_counter()
    for _ in range(repeats):
        classifier(images)
    ort_rate = repeats * batch_size / (time.perf_counter() - started)
    backbone = load_backbone("efficientnet_lite0", image_size=IMAGE_SIZE, crop_pct=1.0)
    torch_rate = model_only_rate(backbone, device, [torch.from_numpy(images)], autocast=device.type == "cuda",
                                 repeats=repeats)
    difference = float(np.abs(classifier(images[:32])[0] - cpu(images[:32])[0]).max())
    return {"provider": classifier.provider, "graph": classifier.model_path.name,
            "io_binding": classifier.io_binding, "batch_size": batch_size,
            "images_per_second": round(ort_rate), "torch_model_only_images_per_second": round(torch_rate),
            "onnxruntime_vs_torch": round(ort_rate / torch_rate, 3), "target_onnxruntime_vs_torch": 0.8,
            "max_probability_diff_vs_cpu_provider": difference}


def prepare(work: Path, images: int) -> tuple[Path, Path]:
    """The extraction data (``images`` Fashion-MNIST images: 80% train, 10% val, 10% test) and the fine-tune data
    (the default data set's size, or a tenth of it in the smoke mode)."""
    from featurestore.data.prepare import prepare_fashion_mnist

    per_class = max(10, images // 10)
    extraction = work / "extraction"
    prepare_fashion_mnist(extraction, per_class * 8 // 10, per_class // 10, per_class // 10, seed=0, progress=False)
    tuning = work / "finetune"
    small = images < 10_000
    prepare_fashion_mnist(tuning, 10 if small else 100, 5 if small else 50, 5 if small else 200, seed=0,
                          progress=False)
    return extraction, tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the smoke mode (few images, same code paths, figures mean nothing)")
    parser.add_argument("--images", type=int, help="extraction images (default 50,000 on cuda, 200 on cpu)")
    parser.add_argument("--batch-size", type=int, help="default 256 on cuda, 32 on cpu")
    parser.add_argument("--epochs", type=int, help="fine-tune epochs per run (default 2 on cuda, 1 on cpu)")
    parser.add_argument("--workdir", type=Path, help="where the data and stores go (default: a new temp folder)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"environment": {"cuda": False, "note": "no CUDA GPU: run with --device cpu for the "
                                                                  "smoke mode"}}))
        return
    device = torch.device(args.device)
    images = args.images or (50_000 if cuda else 200)
    batch_size = args.batch_size or (256 if cuda else 32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fs-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    extraction_data, tuning_data = prepare(work, images)
    RESULTS["prepare"] = {"seconds": round(time.perf_counter() - started, 1)}
    environment(device)
    extraction(extraction_data, work, device, batch_size, model_repeats=3 if cuda else 1)
    finetune_epochs(tuning_data, work, device, args.epochs or (2 if cuda else 1))
    torchrun_extraction(tuning_data if not cuda else extraction_data, work, device, batch_size)
    onnxruntime_provider(work, device, batch_size, repeats=20 if cuda else 2)
    RESULTS["total_seconds"] = {"seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"total_seconds": RESULTS["total_seconds"]["seconds"]}))
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2) + "\n")


if __name__ == "__main__":
    main()
