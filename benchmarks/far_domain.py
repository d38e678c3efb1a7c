"""Transfer far from ImageNet (issue 27): what the verdict picks on validation, against the pixel baseline, and what
the default fine-tune gains over the probe, on image sets built here from what ships with the libraries.

    python benchmarks/far_domain.py [--workdir DIR] [--sets digits textures fashion28]

- ``digits``: scikit-learn's 1,797 8×8 scans of handwritten digits (``load_digits``), upscaled to 32-px grey PNGs;
  per class 100 train, 40 val, the rest (~37) test.
- ``textures``: scikit-image's brick, grass and gravel photos, 48-px crops at random places (4 classes: gravel
  rotated by 90° is the fourth, so orientation matters), 60 train, 30 val, 60 test per class.
- ``fashion28``: the default images (data/prepared, `make repro`) at 28 px instead of 112: Lite0 sees them at their
  own resolution, far below what it was trained on.

Every set: EfficientNet-Lite0's penultimate store and its `--layers all` store at 112 px (fashion28: 28 px); the
logreg head, the multilayer head and the pixel baseline, each chosen on val; the verdict over the three (the
pipeline's rule, logreg the incumbent); the default fine-tune (params.yaml's `finetune.efficientnet_lite0`, from
the logreg probe). Prints one row per set: each model's val and test accuracy, the pick's test accuracy minus the
pixels', and the fine-tune's test gain over the probe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from featurestore.configs import FINETUNE_STAGE_KEYS, FinetuneConfig, HeadConfig
from featurestore.extract.launch import extract_features
from featurestore.heads.baseline import evaluate_model
from featurestore.heads.records import store_records
from featurestore.heads.reports import evaluate_head
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore
from featurestore.transfer.best import fit_challenger, verdict
from featurestore.transfer.finetune import finetune


def save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def build_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits, rng = load_digits(), np.random.default_rng(0)
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == label))
        for rank, index in enumerate(chosen):
            split = "train" if rank < 100 else "val" if rank < 140 else "test"
            pixels = (digits.images[index] / 16 * 255).astype(np.uint8)
            save(np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)),
                 root / split / str(label) / f"{index}.png")
    return root


def build_textures(root: Path) -> Path:
    import skimage.data

    rng = np.random.default_rng(0)
    sources = {"brick": skimage.data.brick(), "grass": skimage.data.grass(), "gravel": skimage.data.gravel(),
               "gravel_turned": np.rot90(skimage.data.gravel())}
    for name, photo in sources.items():
        for split, count in (("train", 60), ("val", 30), ("test", 60)):
            for index in range(count):
                y, x = rng.integers(0, photo.shape[0] - 48), rng.integers(0, photo.shape[1] - 48)
                save(np.ascontiguousarray(photo[y:y + 48, x:x + 48]), root / split / name / f"{split}_{index}.png")
    return root


def measure(name: str, data: Path, work: Path, image_size: int, finetune_config: FinetuneConfig) -> dict:
    options = {"image_size": image_size, "crop_pct": 1.0, "workers": 1, "progress": False}
    penultimate, layers = work / f"{name}.h5", work / f"{name}.layers.h5"
    extract_features(data, penultimate, "efficientnet_lite0", **options)
    extract_features(data, layers, "efficientnet_lite0", layers="all", **options)
    logreg = train_head(penultimate, HeadConfig())
    multilayer = train_head(layers, HeadConfig(head="multilayer"))
    pixels = fit_challenger("baseline", penultimate, data=data, name=name)
    files = [logreg.save(work / f"{name}_logreg.skops"), multilayer.save(work / f"{name}_multilayer.skops"),
             pixels.save(work / f"{name}_pixels.skops")]
    test = {logreg.name: evaluate_head(logreg, FeatureStore(penultimate))[0]["top1"],
            multilayer.name: evaluate_head(multilayer, FeatureStore(layers))[0]["top1"],
            pixels.name: evaluate_model(pixels, FeatureStore(penultimate),
                                        store_records(FeatureStore(penultimate), "test", data))["top1"]}
    chosen = verdict(files, data=data)
    val = {candidate: figures["val"] for candidate, figures in chosen["candidates"].items()}
    picked = chosen["deployed"]["name"]
    tuned = finetune(logreg, data, work / f"{name}_ft.pth", finetune_config, device="cpu", progress=False)
    row = {"set": name, "val": val, "test": test, "picked": picked, "pick_test": test[picked],
           "pick_minus_pixels": test[picked] - test[pixels.name], "probe_val": tuned.start_val_accuracy,
           "finetune_val": tuned.best_val_accuracy, "finetune_test": tuned.test_accuracy,
           "finetune_gain": tuned.test_accuracy - test[logreg.name], "finetune_epochs": tuned.epochs_run}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--sets", nargs="+", default=["digits", "textures", "fashion28"])
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="far-domain-"))
    params = yaml.safe_load(Path("params.yaml").read_text())["finetune"]["efficientnet_lite0"]
    config = FinetuneConfig(**{k: v for k, v in params.items() if k not in FINETUNE_STAGE_KEYS})
    builders = {"digits": (lambda: build_digits(work / "digits"), 112),
                "textures": (lambda: build_textures(work / "textures"), 112),
                "fashion28": (lambda: Path("data/prepared"), 28)}
    rows = [measure(name, builders[name][0](), work, builders[name][1], config) for name in args.sets]
    print("| set | probe val / test | multilayer val / test | pixels val / test | pick (test) | pick − pixels "
          "| fine-tune test (gain) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        names = list(row["test"])
        cells = [f"{row['val'][n]:.3f} / {row['test'][n]:.4f}" for n in names]
        print(f"| {row['set']} | " + " | ".join(cells) + f" | {row['picked'].split('__')[-1]} {row['pick_test']:.4f} "
              f"| {100 * row['pick_minus_pixels']:+.2f} | {row['finetune_test']:.4f} "
              f"({100 * row['finetune_gain']:+.2f}) |")


if __name__ == "__main__":
    main()
