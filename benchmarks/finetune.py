"""Fine-tuning from the trunk cache against fine-tuning from images, same settings, in one process.

    python benchmarks/finetune.py [--workdir DIR] [--epochs 2] [--views N] [--device cpu]

The default data (Fashion-MNIST, 100 labels per class, 112 px), EfficientNet-Lite0, the logistic-regression
probe, the fine-tuning defaults of params.yaml (``--views`` overrides the number of augmented views). Prints:

1. the one-off cost of the trunk cache: seconds to run the frozen trunk over every image's clean view and
   the train images' augmented views (and seconds per view);
2. seconds per epoch reading the cache, and seconds per epoch decoding + augmenting + running the frozen
   trunk from images (the same top blocks, batch size, optimiser, number of steps), and their ratio
   (target: ≥ 2× on the 2-core reference machine), in both orders: cache then images, and images then
   cache, so that whatever warms up in the process (allocator, thread pools, file cache, a GPU's kernels)
   favours neither; the headline figures are the means over both runs of each source;
3. after how many epochs the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from featurestore.configs import FinetuneConfig, HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.transfer.finetune import finetune, trunk_cache_for

ROOT = Path(__file__).resolve().parent.parent


def default_config() -> FinetuneConfig:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]["efficientnet_lite0"]
    return FinetuneConfig(**{k: v for k, v in params.items() if k not in ("mode", "device")})


def epoch_seconds(result) -> float:
    """Mean seconds per epoch of a fine-tune result (train steps and validation, as its history records)."""
    return sum(h["seconds"] for h in result.history) / len(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--views", type=int)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ft-bench-"))
    data = workdir / "prepared"
    if not data.exists():
        prepare_fashion_mnist(data, 100, 50, 200, seed=0, progress=False)
    extract_features(data, workdir / "lite0.h5", "efficientnet_lite0", image_size=112, crop_pct=1.0, progress=False)
    head = train_head(workdir / "lite0.h5", HeadConfig(head="logreg"))
    config = replace(default_config(), epochs=args.epochs, patience=args.epochs + 1)
    if args.views is not None:
        config = replace(config, views=args.views)

    cache = workdir / "trunk.h5"
    cache.unlink(missing_ok=True)
    built = trunk_cache_for(head, data, cache, config, device=args.device, progress=False)
    views = built.extracted

    def run(source: str, name: str):
        """A fine-tune from ``source`` (its own output and checkpoint folder, emptied first so that a killed earlier
        benchmark is not resumed)."""
        (workdir / name / "last.pt").unlink(missing_ok=True)
        return finetune(head, data, workdir / f"{name}.pth", replace(config, source=source), device=args.device,
                        progress=False, cache=cache, checkpoint_dir=workdir / name)

    orders = {}
    for first, second in (("cache", "images"), ("images", "cache")):
        results = {first: run(first, f"{first}-first"), second: run(second, f"{second}-second")}
        seconds = {source: epoch_seconds(result) for source, result in results.items()}
        orders[f"{first}_then_{second}"] = {
            "epoch_seconds_cache": round(seconds["cache"], 2), "epoch_seconds_images": round(seconds["images"], 2),
            "speedup": round(seconds["images"] / seconds["cache"], 2),
            "each_epoch": {source: [h["seconds"] for h in result.history] for source, result in results.items()}}
    per_cache = sum(o["epoch_seconds_cache"] for o in orders.values()) / len(orders)
    per_images = sum(o["epoch_seconds_images"] for o in orders.values()) / len(orders)
    report = {
        "device": args.device, "unfreeze_blocks": config.unfreeze_blocks, "views": config.views,
        "batch_size": config.batch_size, "epochs": args.epochs,
        "cache_seconds": round(built.seconds, 2), "cached_views": views,
        "cache_ms_per_view": round(1000 * built.seconds / max(1, views), 2),
        "epoch_seconds_cache": round(per_cache, 2), "epoch_seconds_images": round(per_images, 2),
        "speedup": round(per_images / per_cache, 2),
        "cache_pays_after_epochs": (round(built.seconds / (per_images - per_cache), 2) if per_images > per_cache
                                    else None),  # None: the cache is not faster here
        **orders,
    }
    print(json.dumps(report))
    print(f"trunk cache: {views} views in {built.seconds:.1f} s ({report['cache_ms_per_view']} ms/view), once")
    for order, figures in orders.items():
        print(f"{order.replace('_', ' ')}: epoch from the cache {figures['epoch_seconds_cache']:.2f} s vs from "
              f"images {figures['epoch_seconds_images']:.2f} s: {figures['speedup']:.2f}x")
    pays = report["cache_pays_after_epochs"]
    print(f"mean of both orders: cache {per_cache:.2f} s vs images {per_images:.2f} s: {report['speedup']:.2f}x "
          f"(target >= 2); " + (f"the cache pays for itself after {pays:.1f} epochs" if pays is not None
                                else "the cache never pays for itself here"))


if __name__ == "__main__":
    main()
