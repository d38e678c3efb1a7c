"""Shared fixtures: a few dozen real Fashion-MNIST images and one real pretrained backbone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from featurestore.data.prepare import FASHION_MNIST_DIR, prepare_fashion_mnist

# Small input keeps the real EfficientNet-Lite0 fast on 2 cores; correctness tests that need the
# native resolution (ImageNet top-5) build their own.
TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Exported ONNX graphs go to a per-session folder (subprocesses inherit it), not ~/.cache."""
    folder = tmp_path_factory.mktemp("featurestore-cache")
    previous = os.environ.get("FEATURESTORE_CACHE")
    os.environ["FEATURESTORE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FEATURESTORE_CACHE", None)
    else:
        os.environ["FEATURESTORE_CACHE"] = previous


@pytest.fixture(scope="session")
def fashion_folder_master(tmp_path_factory) -> Path:
    """10 classes × (2 train, 1 val, 1 test) real Fashion-MNIST PNGs = 40 images (read-only master)."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_MNIST_DIR} missing: run `make test`, which installs dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("fashion") / "images"
    prepare_fashion_mnist(root, labels_per_class=2, val_per_class=1, test_per_class=1, seed=1, progress=False)
    return root


@pytest.fixture
def fashion_folder(fashion_folder_master, tmp_path) -> Path:
    """A private copy of the tiny data set that a test may change."""
    copy = tmp_path / "images"
    shutil.copytree(fashion_folder_master, copy)
    return copy


@pytest.fixture(scope="session")
def lite0_small():
    """The real EfficientNet-Lite0 with ImageNet weights, at 64 px without centre crop."""
    from featurestore.encode.backbones import load_backbone

    return load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE, crop_pct=1.0)


@pytest.fixture
def count_model_images(lite0_small):
    """Counts the images that go through the model's forward pass (torch engine) during a test."""
    seen: list[int] = []
    handle = lite0_small.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    yield seen
    handle.remove()


def bbc_store_and_head(root: Path, train: int, val: int, test: int, seed: int):
    """Real BBC articles per topic (``train``/``val``/``test`` of each) under ``root``/bbc, their all-MiniLM-L6-v2
    store at 64 tokens and a logistic-regression head on it: (data folder, store path, TrainedHead)."""
    from featurestore.configs import HeadConfig, Tokenization
    from featurestore.data.prepare import prepare_bbc_news
    from featurestore.extract import extract_features
    from featurestore.heads.train import train_head

    data, store = root / "bbc", root / "minilm.h5"
    prepare_bbc_news(data, labels_per_class=train, val_per_class=val, test_per_class=test, seed=seed)
    extract_features(data, store, "minilm_l6", tokenization=Tokenization(max_length=64), batch_size=8, workers=0,
                     progress=False)
    return data, store, train_head(store, HeadConfig(c_min=1e-2, c_max=1e2, c_points=5, n_jobs=1))


def cached_view_images(head, folder: Path, config, view: int) -> torch.Tensor:
    """View ``view`` of every train image of ``folder``, as the trunk cache draws it for ``head``'s preprocessing
    and ``config``'s recipe and seed: (N, 3, S, S) float32, before pixel normalisation."""
    from featurestore.data.sources import content_id, scan_source
    from featurestore.encode.encoders import Item, view_id
    from featurestore.encode.preprocess import Preprocessing
    from featurestore.transfer.augment import ViewRecipe
    from featurestore.transfer.trunk import ViewImages

    pre = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    train = [r for r in scan_source(folder).records if r.split == "train"]
    items = [Item(view_id(content_id(r.path), view), r.path, r.rel_path, r.label, f"train.view{view}", view=view)
             for r in train]
    views = ViewImages(items, pre, ViewRecipe(config.crop_scale_min), config.seed)
    return torch.stack([views[i][1] for i in range(len(items))])
