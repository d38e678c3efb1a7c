"""Does the audit find edited copies of train items planted in test, and how many other test items does it flag
(issue 28)?

    python benchmarks/audit_leaks.py [--images STORE] [--texts STORE] [--copies 20] [--text-copies 10] [--seed 0]
                                     [--blocks] [--calibrate]

The stores default to ``data/features/fashion_mnist.h5`` and ``data/features/bbc_news.h5`` (what ``dvc repro``
builds); their items are read where each store records its data. Edited copies of ``--copies`` train images
(resized by ×1.1 and ×0.9 in turn, cropped by one pixel on each side, saved as JPEG at quality 75) and of
``--text-copies`` train articles (whitespace changed, one sentence replaced by one of another topic's article)
are written to a temporary folder and extracted with the store's own settings through ``extract_features`` (the
fingerprint must match the store's). Then each representation below scores every test item and every copy against
every train item; printed as JSON lines, one per representation:

- ``top1``: the copies whose best-scoring train item is their original;
- ``found_at_1pct`` of ``copies``: copies found (their original is the best match and its score reaches the
  threshold) at the threshold that flags 1 % of the other test items (``threshold_at_1pct``): the most the
  representation can do within the issue's budget;
- for the rule the audit uses (``rule: "the audit's"``; ``"fallback"``: the features' cosine it uses where the items
  cannot be read): ``found`` and ``false_flags`` of ``others`` at its fixed threshold.

Images: (a) the features' cosine; (b) centred on the train mean, PCA-whitened on the store's rows (64, 256 dims);
(c) the cosine less the query's cosine with its 10th neighbour in the val split (score normalisation), and a ratio
test (1 - best) / (1 - second best); (d) ``--blocks``: average-pooled outputs of earlier backbone blocks, computed
here (a few minutes); (e) ``imagehash``'s phash when installed; and the audit's pixel similarity
(:mod:`featurestore.audit.copies`, through :func:`featurestore.audit.duplicates.image_matches`). Texts: the
features' cosine, centred on the train mean, and the audit's shingle containment (:mod:`featurestore.audit.texts`,
through :func:`featurestore.audit.duplicates.text_matches`).

``--calibrate`` also prints what the thresholds were chosen from (never the test split): the pixel similarity of 600
other image copies (300 train images at ×0.9 and ×1.1, seed 100) to their originals, the shingle containment of 100
other text copies (seeds 100-109) to theirs, and the similarity of the val items to their most similar train item.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from featurestore.audit.duplicates import (
    FEATURE_SIMILARITY,
    NEAR_DUPLICATE_SIMILARITY,
    feature_matches,
    image_matches,
    text_matches,
)
from featurestore.audit.graph import unit_rows
from featurestore.configs import Tokenization
from featurestore.extract import extract_features
from featurestore.store import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
SCALES = (1.1, 0.9)
JPEG_QUALITY = 75
BLOCKS = (3, 5, 8, 11, 15)  # EfficientNet-Lite0's 16 blocks: the outputs pooled with --blocks


def edited_image(file: Path, scale: float) -> bytes:
    """The image resized by ``scale`` (bicubic), cropped by one pixel on each side, as JPEG bytes (quality 75)."""
    from PIL import Image

    with Image.open(file) as image:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        image = image.crop((1, 1, image.width - 1, image.height - 1))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def edited_text(text: str, other: str, rng: np.random.Generator) -> str:
    """``text`` with one sentence replaced by a sentence of ``other`` and its whitespace changed (sentences joined
    by two spaces, paragraphs by two blank lines)."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    replacements = [s for s in re.split(r"(?<=[.!?])\s+", other.strip()) if len(s.split()) > 5] or [other.strip()]
    sentences[int(rng.integers(1, len(sentences))) if len(sentences) > 1 else 0] = str(rng.choice(replacements))
    return "  ".join(sentences).replace("\n", "\n\n")


def pick(store: FeatureStore, count: int, seed: int) -> np.ndarray:
    """``count`` train rows drawn without replacement (seeded), in row order."""
    return np.sort(np.random.default_rng(seed).choice(store.count("train"), size=count, replace=False))


def extract_like(store: FeatureStore, folder: Path, out: Path) -> np.ndarray:
    """The features of ``folder`` (a train/<class>/ tree) extracted with the store's settings, in file-name order:
    (N, D) float32. Raises when the fingerprint differs from the store's."""
    fingerprint = store.fingerprint
    if fingerprint.get("kind") == "text":
        tokenization = fingerprint["tokenization"]
        settings = {"tokenization": Tokenization(**{k: v for k, v in tokenization.items()}), "batch_size": 8}
    else:
        preprocessing = fingerprint["preprocessing"]
        settings = {"image_size": preprocessing["image_size"], "crop_pct": preprocessing["crop_pct"]}
    extract_features(folder, out, fingerprint["backbone"], workers=0, device="cpu", progress=False,
                     dtype=fingerprint.get("dtype", "float32"), **settings)
    copies = FeatureStore(out)
    if copies.fingerprint_hash != store.fingerprint_hash:
        changed = sorted(k for k in fingerprint if fingerprint[k] != copies.fingerprint.get(k))
        raise SystemExit(f"the copies' fingerprint differs from {store.path}'s in {changed}: extract the store again "
                         f"with today's code")
    X, _, _ = copies.load("train", np.float32)
    order = np.argsort([Path(p).name for p in copies.paths("train")])
    return X[order]


def plant_image_copies(store: FeatureStore, rows: np.ndarray, folder: Path) -> list[Path]:
    """Edited copies of the train images ``rows`` written under ``folder``/train/<class>/, in the order of rows."""
    source, paths, labels = store.source_folder(), store.paths("train"), store.labels("train")
    files = []
    for j, row in enumerate(rows):
        file = folder / "train" / store.class_names[labels[row]] / f"copy_{j:03d}.jpg"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(edited_image(source / paths[row], SCALES[j % len(SCALES)]))
        files.append(file)
    return files


def plant_text_copies(store: FeatureStore, rows: np.ndarray, folder: Path, seed: int) -> list[Path]:
    """Edited copies of the train articles ``rows`` written under ``folder``/train/<class>/, in the order of rows;
    each replaced sentence comes from a train article of another class."""
    rng = np.random.default_rng(seed)
    source, paths, labels = store.source_folder(), store.paths("train"), store.labels("train")
    files = []
    for j, row in enumerate(rows):
        other = int(rng.choice(np.flatnonzero(labels != labels[row])))
        text = edited_text((source / paths[row]).read_text(encoding="utf-8"),
                           (source / paths[other]).read_text(encoding="utf-8"), rng)
        file = folder / "train" / store.class_names[labels[row]] / f"copy_{j:03d}.txt"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
        files.append(file)
    return files


def measure(name: str, scores: Callable[[np.ndarray], np.ndarray], test: np.ndarray, copies: np.ndarray,
            originals: np.ndarray) -> dict:
    """One representation: ``scores(queries)`` (Q, N_train), higher is closer, for the test rows and the copies."""
    started = time.perf_counter()
    others, planted = scores(test), scores(copies)
    return summary(name, others.max(axis=1), planted.argmax(axis=1), planted.max(axis=1), originals,
                   time.perf_counter() - started)


def summary(name: str, others: np.ndarray, matched: np.ndarray, planted: np.ndarray, originals: np.ndarray,
            seconds: float, threshold: float | None = None, rule: str = "the audit's") -> dict:
    """The figures of one representation (module docstring) from the other items' best scores (O,), the copies'
    best train rows and scores (C,) and their originals (C,)."""
    top1 = matched == originals
    at_1pct = float(np.sort(others)[::-1][max(0, int(len(others) * 0.01))])  # flags 1 %: scores above it
    result = {"representation": name, "copies": int(len(planted)), "others": int(len(others)),
              "top1": int(top1.sum()), "found_at_1pct": int((top1 & (planted > at_1pct)).sum()),
              "threshold_at_1pct": round(at_1pct, 4),
              "copy_scores": [round(float(v), 4) for v in np.quantile(planted, [0, 0.5, 1])],
              "others_max": round(float(others.max()), 4), "seconds": round(seconds, 2)}
    if threshold is not None:
        result.update({"rule": rule, "threshold": threshold, "found": int((top1 & (planted >= threshold)).sum()),
                       "false_flags": int((others >= threshold).sum())})
    return result


def cosine_to(reference: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] = lambda X: X):
    """Scores: the cosine of transformed queries with the transformed reference rows."""
    units = unit_rows(transform(reference))
    return lambda queries: unit_rows(transform(queries)) @ units.T


def whitening(rows: np.ndarray, dims: int) -> Callable[[np.ndarray], np.ndarray]:
    """PCA whitening fitted on ``rows`` (N, D): centred, projected on the first ``dims`` components, scaled to unit
    variance."""
    mean = rows.mean(axis=0)
    _, singular, components = np.linalg.svd(rows - mean, full_matrices=False)
    projection = components[:dims].T / np.maximum(singular[:dims], 1e-6)
    return lambda X: (X - mean) @ projection


def feature_representations(store: FeatureStore, train: np.ndarray, test: np.ndarray, copies: np.ndarray,
                            originals: np.ndarray, threshold: float | None = None, more: bool = True) -> list[dict]:
    """(a), and unless not ``more`` (b)-(c), on the store's features (module docstring); ``threshold``: (a) as the
    audit's fallback at that threshold."""
    mean = train.mean(axis=0)
    raw = cosine_to(train)
    results = [measure("features: cosine", raw, test, copies, originals),
               measure("features: centred on the train mean", cosine_to(train, lambda X: X - mean), test, copies,
                       originals)]
    if threshold is not None:  # the audit's fallback where the items cannot be read
        results[0] = summary(results[0]["representation"], *rule_scores(train, test, copies, threshold), originals,
                             results[0]["seconds"], threshold, "fallback")
    if not more:
        return results
    every = np.concatenate([store.load(split, np.float32)[0] for split in store.splits])
    for dims in (64, 256):
        results.append(measure(f"features: PCA-whitened on the store ({dims} dims)",
                               cosine_to(train, whitening(every, min(dims, len(every) - 1))), test, copies, originals))
    if "val" in store.splits and store.count("val") >= 10:
        background = unit_rows(store.load("val", np.float32)[0])

        def normalised(queries: np.ndarray) -> np.ndarray:
            kth = np.sort(unit_rows(queries) @ background.T, axis=1)[:, -10]
            return raw(queries) - kth[:, None]

        results.append(measure("features: cosine less the 10th val neighbour's", normalised, test, copies, originals))

    def ratio(queries: np.ndarray) -> np.ndarray:
        scores = raw(queries)
        second = np.sort(scores, axis=1)[:, -2]
        return -(1 - scores) / np.maximum(1 - second[:, None], 1e-6)

    results.append(measure("features: ratio test (1 - best) / (1 - second)", ratio, test, copies, originals))
    return results


def rule_scores(train: np.ndarray, test: np.ndarray, copies: np.ndarray, threshold: float):
    """The fallback through :func:`feature_matches`: (others' best, copies' best rows, copies' best scores)."""
    _, others = feature_matches(test, train, threshold)
    everything = cosine_to(train)(copies)
    return others, everything.argmax(axis=1), everything.max(axis=1)


def block_features(store: FeatureStore, files: list[Path]) -> dict[int, np.ndarray]:
    """{block: (N, C) float32} the average-pooled outputs of :data:`BLOCKS` of the store's backbone for ``files``,
    preprocessed as the store's rows (default weights)."""
    import torch

    from featurestore.encode.backbones import load_backbone
    from featurestore.encode.images import load_image

    preprocessing = store.fingerprint["preprocessing"]
    model = load_backbone(store.fingerprint["backbone"], image_size=preprocessing["image_size"],
                          crop_pct=preprocessing["crop_pct"])
    pooled: dict[int, list] = {block: [] for block in BLOCKS}
    hooks = [model.trunk._blocks[block].register_forward_hook(
        lambda module, inputs, output, block=block: pooled[block].append(output.float().mean((2, 3)).numpy()))
        for block in BLOCKS]
    with torch.inference_mode():
        for start in range(0, len(files), 64):
            model(torch.stack([model.preprocessing(load_image(f)) for f in files[start:start + 64]]))
    for hook in hooks:
        hook.remove()
    return {block: np.concatenate(parts) for block, parts in pooled.items()}


def phash_scores(train_files: list[Path]) -> Callable[[list[Path]], np.ndarray] | None:
    """Scores by ``imagehash.phash``: minus the Hamming distance (None when imagehash is not installed)."""
    try:
        import imagehash
        from PIL import Image
    except ImportError:
        return None

    def hashes(files: list[Path]) -> np.ndarray:
        return np.stack([imagehash.phash(Image.open(f)).hash.ravel() for f in files])

    reference = hashes(train_files)
    return lambda files: -(hashes(files)[:, None, :] != reference[None, :, :]).sum(axis=2).astype(np.float32)


def image_benchmark(store: FeatureStore, count: int, seed: int, blocks: bool, work: Path) -> None:
    source = store.source_folder()
    rows = pick(store, count, seed)
    files = plant_image_copies(store, rows, work / "images")
    copies = extract_like(store, work / "images", work / "image_copies.h5")
    train, test = store.load("train", np.float32)[0], store.load("test", np.float32)[0]
    for result in feature_representations(store, train, test, copies, rows):
        print(json.dumps({"modality": "image", **result}), flush=True)
    train_files = [source / p for p in store.paths("train")]
    test_files = [source / p for p in store.paths("test")]
    if blocks:
        pooled = block_features(store, train_files + test_files + files)
        n_train, n_test = len(train_files), len(test_files)
        for block, X in pooled.items():
            result = measure(f"block {block + 1} of 16, average-pooled", cosine_to(X[:n_train]),
                             X[n_train:n_train + n_test], X[n_train + n_test:], rows)
            print(json.dumps({"modality": "image", **result}), flush=True)
    scores = phash_scores(train_files)
    if scores is None:
        print(json.dumps({"modality": "image", "representation": "imagehash phash", "skipped": "not installed"}))
    else:
        print(json.dumps({"modality": "image", **measure("imagehash phash (minus Hamming distance)", scores,
                                                         test_files, files, rows)}), flush=True)
    threshold = NEAR_DUPLICATE_SIMILARITY["image"]
    started = time.perf_counter()
    matched, similarities = image_matches(test_files + files, train_files, threshold=-1.0)
    n_test = len(test_files)
    result = summary("pixels (the audit's rule)", similarities[:n_test], matched[n_test:], similarities[n_test:], rows,
                     time.perf_counter() - started, threshold)
    print(json.dumps({"modality": "image", **result}), flush=True)


def calibrate_images(store: FeatureStore, work: Path) -> None:
    """What the image threshold was chosen from (module docstring)."""
    source = store.source_folder()
    train_files = [source / p for p in store.paths("train")]
    rows = pick(store, min(300, store.count("train")), 100)
    folder = work / "calibration"
    lowest = {}
    for scale in SCALES:
        files = []
        for row in rows:
            file = folder / f"{scale}_{row}.jpg"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(edited_image(source / store.paths("train")[row], scale))
            files.append(file)
        matched, similarities = image_matches(files, train_files, threshold=-1.0)
        own = np.where(matched == rows, similarities, -1.0)
        lowest[scale] = [round(float(v), 4) for v in np.quantile(own, [0, 0.01, 0.5])]
    _, val = image_matches([source / p for p in store.paths("val")], train_files, threshold=-1.0)
    print(json.dumps({"modality": "image", "calibration": True, "copies_per_scale": int(len(rows)),
                      "copies_min_p1_median": lowest,
                      "val_p99_p995_max": [round(float(v), 4) for v in np.quantile(val, [0.99, 0.995, 1])],
                      "threshold": NEAR_DUPLICATE_SIMILARITY["image"]}), flush=True)


def text_benchmark(store: FeatureStore, count: int, seed: int, work: Path) -> None:
    rows = pick(store, count, seed)
    files = plant_text_copies(store, rows, work / "texts", seed)
    copies = extract_like(store, work / "texts", work / "text_copies.h5")
    train, test = store.load("train", np.float32)[0], store.load("test", np.float32)[0]
    for result in feature_representations(store, train, test, copies, rows, FEATURE_SIMILARITY["text"], more=False):
        print(json.dumps({"modality": "text", **result}), flush=True)
    source, threshold = store.source_folder(), NEAR_DUPLICATE_SIMILARITY["text"]
    train_texts = [(source / p).read_text(encoding="utf-8") for p in store.paths("train")]
    test_texts = [(source / p).read_text(encoding="utf-8") for p in store.paths("test")]
    started = time.perf_counter()
    matched, similarities = text_matches(test_texts + [f.read_text(encoding="utf-8") for f in files], train_texts,
                                         np.concatenate([test, copies]), train, threshold=-1.0)
    n_test = len(test_texts)
    result = summary("shingles (the audit's rule)", similarities[:n_test], matched[n_test:], similarities[n_test:],
                     rows, time.perf_counter() - started, threshold)
    print(json.dumps({"modality": "text", **result}), flush=True)


def calibrate_texts(store: FeatureStore, work: Path) -> None:
    """What the text threshold was chosen from (module docstring)."""
    source = store.source_folder()
    train = store.load("train", np.float32)[0]
    train_texts = [(source / p).read_text(encoding="utf-8") for p in store.paths("train")]
    own = []
    for seed in range(100, 110):
        rows = pick(store, min(10, store.count("train")), seed)
        files = plant_text_copies(store, rows, work / f"calibration_texts_{seed}", seed)
        folder = work / f"calibration_texts_{seed}"
        matched, similarities = text_matches([f.read_text(encoding="utf-8") for f in files], train_texts,
                                             extract_like(store, folder, folder / "copies.h5"), train, threshold=-1.0)
        own.extend(np.where(matched == rows, similarities, -1.0).tolist())
    _, val = text_matches([(source / p).read_text(encoding="utf-8") for p in store.paths("val")], train_texts,
                          store.load("val", np.float32)[0], train, threshold=-1.0)
    print(json.dumps({"modality": "text", "calibration": True, "copies": len(own),
                      "copies_min_p1_median": [round(float(v), 4) for v in np.quantile(own, [0, 0.01, 0.5])],
                      "val_top": [round(float(v), 4) for v in np.sort(val)[::-1][:5]],
                      "threshold": NEAR_DUPLICATE_SIMILARITY["text"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=str(ROOT / "data/features/fashion_mnist.h5"))
    parser.add_argument("--texts", default=str(ROOT / "data/features/bbc_news.h5"))
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--text-copies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", action="store_true", help="also pool earlier blocks' outputs (minutes)")
    parser.add_argument("--calibrate", action="store_true", help="print what the image threshold was chosen from")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit_leaks_"))
    try:
        if args.images:
            store = FeatureStore(args.images)
            image_benchmark(store, args.copies, args.seed, args.blocks, work)
            if args.calibrate:
                calibrate_images(store, work)
        if args.texts:
            store = FeatureStore(args.texts)
            text_benchmark(store, args.text_copies, args.seed, work)
            if args.calibrate:
                calibrate_texts(store, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
