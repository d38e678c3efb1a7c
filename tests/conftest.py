"""Shared fixtures: a few dozen real Fashion-MNIST images and one real pretrained backbone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
