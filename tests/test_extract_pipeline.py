"""The pipelined extraction (issue 19): hashing in the workers, one batch shape, grayscale as one channel.

Each change must leave the store exactly what the plain path makes: same ids, labels, paths and features.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from featurestore import FeatureStore
from featurestore.encode.encoders import ImageEncoder
from featurestore.encode.engines import TorchEngine, make_engine
from featurestore.encode.images import collate_decoded, load_image
from featurestore.extract.launch import extract_features
from featurestore.extract.phases import auto_workers, streams


def _store_arrays(path):
    store = FeatureStore(path)
    return {split: (*store.load(split), store.paths(split)) for split in store.splits}


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_hashing_in_the_workers_gives_the_rows_and_features_of_the_planned_path(fashion_folder, tmp_path,
                                                                                  lite0_small, engine):
    """on_duplicate="error" still hashes every file first (the path before issue 19); "warn" hashes in the
    workers from the bytes they decode. Both must write the same store, bit for bit."""
    options = {"model": lite0_small, "batch_size": 8, "workers": 2, "progress": False, "engine": engine}
    planned = extract_features(fashion_folder, tmp_path / "planned.h5", on_duplicate="error", **options)
    streamed = extract_features(fashion_folder, tmp_path / "streamed.h5", on_duplicate="warn", **options)
    assert planned.extracted == streamed.extracted == 40
    old, new = _store_arrays(tmp_path / "planned.h5"), _store_arrays(tmp_path / "streamed.h5")
    assert old.keys() == new.keys() == {"train", "val", "test"}
    for split in old:
        (X_old, y_old, ids_old, paths_old), (X_new, y_new, ids_new, paths_new) = old[split], new[split]
        assert list(ids_old) == list(ids_new) and list(paths_old) == list(paths_new)
        np.testing.assert_array_equal(y_old, y_new)
        np.testing.assert_array_equal(X_old, X_new)


def test_the_streamed_path_is_taken_unless_duplicates_must_stop_the_run(lite0_small):
    encoder = ImageEncoder(lite0_small, "float32", torch.device("cpu"))
    assert streams(encoder, "warn") and streams(encoder, "skip")
    assert not streams(encoder, "error")


def test_padded_tail_gives_the_rows_of_an_unpadded_batch(lite0_small):
    """On CUDA every batch is padded to the first one's size (one shape, one set of cuDNN plans); eval-mode
    BatchNorm makes the real rows independent of the padding. Forced on here, on the CPU."""
    images = torch.randint(0, 256, (11, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = TorchEngine(lite0_small, torch.device("cpu"), autocast=False, pad=True)
    plain = TorchEngine(lite0_small, torch.device("cpu"), autocast=False, pad=False)
    assert padded(images[:8]).shape == (8, 1280)
    tail = padded(images[8:])
    assert tail.shape == (3, 1280) and padded.full == 8
    np.testing.assert_array_equal(tail, plain(images[8:]))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_one_channel_grayscale_is_bit_identical_to_three_equal_channels(fashion_folder_master, lite0_small, engine):
    """Grayscale images travel as (1, S, S) and are expanded by the engine: the features must be bit-identical
    to those of the three-channel batch the plain path makes."""
    encoder = ImageEncoder(lite0_small, "float32", torch.device("cpu"), engine=engine)
    files = sorted(fashion_folder_master.glob("train/*/*.png"))[:6]
    one = [encoder.decode(path.read_bytes(), SimpleNamespace(path=path)) for path in files]
    assert all(t.shape == (1, 64, 64) and t.dtype == torch.uint8 for t in one)
    three = [lite0_small.preprocessing(load_image(path)) for path in files]
    assert all(t.shape == (3, 64, 64) for t in three)
    runner = make_engine(lite0_small, torch.device("cpu"), engine)
    _, gray_batch, _ = collate_decoded([(i, t, None) for i, t in enumerate(one)])
    _, rgb_batch, _ = collate_decoded([(i, t, None) for i, t in enumerate(three)])
    assert gray_batch.shape == (6, 1, 64, 64) and rgb_batch.shape == (6, 3, 64, 64)
    np.testing.assert_array_equal(runner(gray_batch), runner(rgb_batch))
    # a batch that mixes one- and three-channel images is expanded by the collate, to the same rows
    _, mixed, _ = collate_decoded([(0, one[0], None), (1, three[1], None)])
    assert mixed.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(mixed, rgb_batch[:2])


def test_workers_are_chosen_by_device():
    assert auto_workers(None, torch.device("cpu")) == 1
    assert auto_workers(3, torch.device("cpu")) == 3
    assert 1 <= auto_workers(None, torch.device("cuda")) <= 8
