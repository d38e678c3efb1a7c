"""Near-duplicate leaks (issue 28): edited copies of train items planted in test are found by the audit's rules
(the pixels of images aligned on each other, the shared word 5-grams of texts), and ``evaluate`` warns about them
or, with ``--refuse-near-duplicates``, refuses them."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.audit.copies import FRAME, SHIFTS, ZOOMS, pixel_similarity, warp_operator
from featurestore.audit.duplicates import (
    NEAR_DUPLICATE_SIMILARITY,
    audit_leaks,
    find_leaks,
    image_near_duplicates,
    store_near_duplicates,
    unique_pairs,
)
from featurestore.audit.graph import neighbour_graph
from featurestore.audit.texts import containment, shingles
from featurestore.cli import main
from featurestore.configs import HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.store import FeatureStore

GRID = HeadConfig(c_min=1e-2, c_max=1e2, c_points=3, n_jobs=1)
COPIES = {"Coat": 1.1, "Sneaker": 0.9, "Bag": 1.1}  # class of the train image copied into test: its resize factor


def edit_image(source: Path, target: Path, scale: float) -> None:
    """``source`` resized by ``scale``, cropped by one pixel on each side, saved as JPEG at quality 75."""
    with Image.open(source) as image:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        image.crop((1, 1, image.width - 1, image.height - 1)).save(target, "JPEG", quality=75)


def edit_text(text: str, other: str) -> str:
    """``text`` with its second sentence replaced by ``other``'s third, and its whitespace changed."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    sentences[1] = re.split(r"(?<=[.!?])\s+", other.strip())[2]
    return "  ".join(sentences).replace("\n", "\n\n")


class Lines(logging.Handler):
    """The featurestore logger's messages while installed (the CLI's handler writes to stderr, not propagated)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = Lines()
    logger = logging.getLogger("featurestore")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


# --- the rules' parts, without a model --------------------------------------------------------------------------

def test_the_identity_warp_gives_the_frame_back_and_an_image_is_its_own_copy():
    operator, masks = warp_operator()
    identity = ZOOMS.index(1.0) * len(SHIFTS) ** 2 + SHIFTS.index(0.0) * (len(SHIFTS) + 1)  # zoom 1, no shift
    rng = np.random.default_rng(0)
    frame = rng.random((FRAME, FRAME)).astype(np.float32)
    warped = (operator @ frame.ravel()).reshape(len(masks), FRAME * FRAME)[identity]
    assert np.allclose(warped, frame.ravel(), atol=1e-6) and masks[identity].all()
    other = rng.random((FRAME, FRAME)).astype(np.float32)
    found = pixel_similarity(frame[None], np.stack([other, frame]), np.array([[0, 1, -1]]))
    # float32 sums of squares: an image with itself is 1 to within 1e-3 (near the threshold, to within 1e-6)
    assert found[0, 1] == pytest.approx(1.0, abs=1e-3) and found[0, 0] < 0.8 and found[0, 2] == -1


def test_pairs_are_listed_once_with_their_largest_similarity():
    neighbours = np.array([[1, 2], [0, -1], [0, 1]])
    similarities = np.array([[0.97, 0.5], [0.98, -1.0], [0.5, 0.96]], np.float32)
    pairs, found = unique_pairs(neighbours, similarities, 0.95)
    assert pairs.tolist() == [[0, 1], [1, 2]] and found.tolist() == pytest.approx([0.98, 0.96])


def test_shingles_ignore_whitespace_case_and_punctuation():
    text = "The quick brown fox jumps over the lazy dog. It ran away before the farmer could see it."
    assert containment(shingles(text), shingles("the  QUICK brown fox\n\njumps over the lazy dog - " + text[45:]))\
        == 1.0
    assert containment(shingles(text), shingles("A completely different sentence about markets and prices.")) == 0
    assert shingles("") == frozenset() and len(shingles("two words")) == 1


def test_the_pipeline_reads_the_leaks_from_an_audit(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({
        "rows": {"train": 4, "val": 2, "test": 3}, "near_duplicates": {"rule": "pixels", "threshold": 0.956}}))
    with open(tmp_path / "near_duplicates.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "duplicate_path", "duplicate_split", "similarity"])
        writer.writerows([["test/a/1.png", "test", "train/a/1.png", "train", 0.99],
                          ["train/b/2.png", "train", "test/b/9.png", "test", 0.97],
                          ["test/b/9.png", "test", "val/b/3.png", "val", 0.98],
                          ["train/a/1.png", "train", "train/a/2.png", "train", 0.96]])
    leaks = audit_leaks(tmp_path, "test")
    assert leaks.rows == [("test/a/1.png", "train/a/1.png", "train", 0.99),
                          ("test/b/9.png", "val/b/3.png", "val", 0.98)]
    assert leaks.line().startswith("2 of 3 test images are near-duplicates of train/val items (pixel similarity >= "
                                   "0.956): test/a/1.png ~ train/a/1.png")
    assert audit_leaks(tmp_path, "val").references == ("train",) and audit_leaks(tmp_path, "val").rows == []


# --- real images: Lite0 features of Fashion-MNIST ---------------------------------------------------------------

@pytest.fixture(scope="module")
def leaky_images(tmp_path_factory, lite0_small):
    """10 classes × (3 train, 1 val, 3 test) real Fashion-MNIST images, edited copies of three train images in test
    (:data:`COPIES`), their Lite0 store and a logistic-regression head on it."""
    root = tmp_path_factory.mktemp("leaks")
    images = root / "images"
    prepare_fashion_mnist(images, labels_per_class=3, val_per_class=1, test_per_class=3, seed=5, progress=False)
    planted = {}
    for name, scale in COPIES.items():
        original = sorted((images / "train" / name).iterdir())[0]
        edit_image(original, images / "test" / name / "copy.jpg", scale)
        planted[f"test/{name}/copy.jpg"] = f"train/{name}/{original.name}"
    extract_features(images, root / "store.h5", model=lite0_small, workers=0, progress=False)
    head = train_head(root / "store.h5", GRID)
    head.save(root / "head.skops")
    return {"root": root, "images": images, "store": root / "store.h5", "head": root / "head.skops",
            "planted": planted}


@pytest.mark.slow
def test_edited_copies_of_train_images_are_found_as_leaks_and_no_other_image(leaky_images):
    leaks = find_leaks(FeatureStore(leaky_images["store"]), "test")
    assert {(path, reference) for path, reference, _, _ in leaks.rows} == set(leaky_images["planted"].items())
    assert leaks.rule == "pixels" and leaks.checked == 33 and leaks.references == ("train", "val")
    assert all(similarity >= NEAR_DUPLICATE_SIMILARITY["image"] for *_, similarity in leaks.rows)


@pytest.mark.slow
def test_evaluate_warns_about_near_duplicate_leaks_and_refuses_them_with_the_flag(leaky_images, tmp_path, warnings,
                                                                                   capsys):
    code = main(["-q", "evaluate", "--heads", str(leaky_images["head"]), "--out", str(tmp_path / "warned")])
    assert code == 0 and (tmp_path / "warned" / "metrics.json").is_file()
    said = [line for line in warnings if "near-duplicates" in line]
    assert len(said) == 1 and "\n" not in said[0]
    assert "3 of 33 test images are near-duplicates of train/val items" in said[0] and "copy.jpg" in said[0]

    capsys.readouterr()
    code = main(["-q", "evaluate", "--heads", str(leaky_images["head"]), "--out", str(tmp_path / "refused"),
                 "--refuse-near-duplicates"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "3 of 33 test images are near-duplicates" in err
    assert not (tmp_path / "refused" / "metrics.json").exists()


@pytest.mark.slow
def test_the_audit_lists_the_copies_and_without_the_files_falls_back_to_the_features(leaky_images, tmp_path,
                                                                                      warnings):
    store = FeatureStore(leaky_images["store"])
    paths = [str(p) for split in store.splits for p in store.paths(split)]
    graph = neighbour_graph(np.concatenate([store.load(s, np.float32)[0] for s in store.splits]), 20)
    found = store_near_duplicates(store, graph)
    listed = {tuple(sorted((paths[a], paths[b]))) for a, b in found.pairs}
    assert found.rule == "pixels" and found.threshold == NEAR_DUPLICATE_SIMILARITY["image"]
    assert {tuple(sorted(pair)) for pair in leaky_images["planted"].items()} <= listed

    elsewhere = tmp_path / "moved"
    shutil.copytree(leaky_images["images"], elsewhere)
    assert store_near_duplicates(store, graph, data=elsewhere).rule == "pixels"
    fallback = store_near_duplicates(store, graph, data=tmp_path / "nowhere")
    assert fallback.rule == "features" and any("features' cosine" in line for line in warnings)


def test_pixel_pairs_of_image_files_include_a_resized_recompressed_copy(tmp_path):
    rng = np.random.default_rng(1)
    pixels = (rng.random((28, 28)) * 255).astype(np.uint8)
    smooth = Image.fromarray(pixels).resize((7, 7), Image.BOX).resize((28, 28), Image.BICUBIC)
    smooth.save(tmp_path / "original.png")
    edit_image(tmp_path / "original.png", tmp_path / "copy.jpg", 1.1)
    Image.fromarray(255 - np.asarray(smooth)).save(tmp_path / "other.png")
    pairs, similarities = image_near_duplicates([tmp_path / "original.png", tmp_path / "other.png",
                                                 tmp_path / "copy.jpg"])
    assert pairs.tolist() == [[0, 2]] and similarities[0] >= NEAR_DUPLICATE_SIMILARITY["image"]


# --- real texts: all-MiniLM-L6-v2 embeddings of BBC News --------------------------------------------------------

@pytest.mark.slow
def test_texts_copied_with_a_sentence_and_whitespace_changed_are_found_as_leaks(tmp_path):
    from featurestore.configs import Tokenization
    from featurestore.data.prepare import prepare_bbc_news

    data = tmp_path / "bbc"
    prepare_bbc_news(data, labels_per_class=4, val_per_class=2, test_per_class=2, seed=0)
    planted = {}
    for topic, other in (("sports", "tech"), ("business", "politics")):
        original = sorted((data / "train" / topic).iterdir())[0]
        replacement = sorted((data / "train" / other).iterdir())[0].read_text(encoding="utf-8")
        (data / "test" / topic / "copy.txt").write_text(edit_text(original.read_text(encoding="utf-8"), replacement),
                                                        encoding="utf-8")
        planted[f"test/{topic}/copy.txt"] = f"train/{topic}/{original.name}"
    extract_features(data, tmp_path / "minilm.h5", "minilm_l6", tokenization=Tokenization(max_length=64),
                     batch_size=8, workers=0, progress=False)
    leaks = find_leaks(FeatureStore(tmp_path / "minilm.h5"), "test")
    assert leaks.rule == "shingles" and leaks.unit == "texts" and leaks.checked == 12
    assert {(path, reference) for path, reference, _, _ in leaks.rows} == set(planted.items())
    assert leaks.line().startswith("2 of 12 test texts are near-duplicates of train/val items (shared word 5-grams")
