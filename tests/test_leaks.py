"""Labels and leaks: identical images across splits or labels, classes missing from training."""

import shutil

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.errors import DuplicateItemsError, LeakError
from featurestore.extract.launch import extract_features
from featurestore.heads.reports import evaluate_head
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-3, "c_max": 1e2, "c_points": 4, "n_jobs": 1}


def extract(folder, out, model, **kwargs):
    return extract_features(folder, out, model=model, batch_size=16, workers=0, progress=False, **kwargs)


@pytest.fixture
def leaky_folder(fashion_folder):
    """The tiny data set with one train image copied into test (same class) and one into val under another
    class: two groups of identical bytes across splits, one also across labels."""
    train_image = sorted((fashion_folder / "train" / "Bag").iterdir())[0]
    shutil.copy(train_image, fashion_folder / "test" / "Bag" / "leaked.png")
    other = sorted((fashion_folder / "train" / "Coat").iterdir())[0]
    shutil.copy(other, fashion_folder / "val" / "Dress" / "relabelled.png")
    return fashion_folder


def test_duplicates_are_reported_in_the_summary_and_the_store(leaky_folder, tmp_path, lite0_small, caplog):
    summary = extract(leaky_folder, tmp_path / "f.h5", lite0_small)
    groups = {tuple(sorted(group["paths"])): group for group in summary.duplicates}
    assert len(groups) == 2
    leaked = next(g for paths, g in groups.items() if "test/Bag/leaked.png" in paths)
    assert leaked["splits"] == ["test", "train"] and leaked["labels"] == ["Bag"]
    relabelled = next(g for paths, g in groups.items() if "val/Dress/relabelled.png" in paths)
    assert relabelled["labels"] == ["Coat", "Dress"]
    assert FeatureStore(tmp_path / "f.h5").duplicates == summary.duplicates
    assert "identical files across splits or labels" in caplog.text  # warn is the default


def test_on_duplicate_error_stops_before_running_the_model(leaky_folder, tmp_path, lite0_small, count_model_images):
    with pytest.raises(DuplicateItemsError, match="2 group\\(s\\) of identical files"):
        extract(leaky_folder, tmp_path / "f.h5", lite0_small, engine="torch", on_duplicate="error")
    assert count_model_images == [] and not (tmp_path / "f.h5").exists()


def test_on_duplicate_keep_is_silent_but_still_records(leaky_folder, tmp_path, lite0_small, caplog):
    summary = extract(leaky_folder, tmp_path / "f.h5", lite0_small, on_duplicate="keep")
    assert len(summary.duplicates) == 2 and "identical files" not in caplog.text


def test_evaluation_refuses_a_test_split_that_shares_images_with_train(leaky_folder, tmp_path, lite0_small):
    extract(leaky_folder, tmp_path / "f.h5", lite0_small)
    store = FeatureStore(tmp_path / "f.h5")
    head = train_head(store, HeadConfig(**GRID))
    with pytest.raises(LeakError, match="1 of 11 test images also appear in train/val.*test/Bag/leaked.png"):
        evaluate_head(head, store)
    metrics, _, _ = evaluate_head(head, store, allow_overlap=True)
    assert metrics["n"] == 11


@pytest.fixture
def class_only_in_test(fashion_folder):
    """"Sandal" has no train or val images: the store has 10 classes, the heads see 9."""
    for split in ("train", "val"):
        shutil.rmtree(fashion_folder / split / "Sandal")
    return fashion_folder


@pytest.mark.parametrize("head_name", ["logreg", "svm_rbf"])
def test_probability_columns_follow_the_store_classes_when_one_is_missing(class_only_in_test, tmp_path, lite0_small,
                                                                         head_name):
    extract(class_only_in_test, tmp_path / "f.h5", lite0_small)
    store = FeatureStore(tmp_path / "f.h5")
    assert len(store.class_names) == 10
    head = train_head(store, HeadConfig(head=head_name, **GRID))
    sandal = store.class_names.index("Sandal")
    assert head.missing_classes == ["Sandal"] and sandal not in head.classes
    X, y, _ = store.load("test")
    proba = head.predict_proba(X)
    assert proba.shape == (10, 10) and np.allclose(proba.sum(axis=1), 1) and np.all(proba[:, sandal] == 0)
    # column k is class k: the argmax of the spread probabilities is what the estimator predicts
    assert np.array_equal(proba.argmax(axis=1), head.predict(X))
    metrics, truth, predicted = evaluate_head(head, store)
    assert metrics["top1"] == pytest.approx(np.mean(truth == predicted))


def test_a_text_store_says_texts_when_it_refuses_overlap(tmp_path):
    """The overlap refusal counts in the store's own unit: a text store's shared items are texts, not images."""
    from featurestore.heads.reports import check_no_overlap
    from featurestore.store.hdf5 import SplitArrays, write_store

    def split(ids):
        return SplitArrays(features=np.zeros((len(ids), 4), np.float32), labels=np.zeros(len(ids), np.int64),
                           ids=ids, paths=[f"{i}.txt" for i in ids])

    fingerprint = {"backbone": "minilm_l6", "kind": "text", "feature_dim": 4, "weights_sha256": "0" * 64,
                   "dtype": "float32"}
    store = FeatureStore(write_store(tmp_path / "texts.h5", fingerprint, ["a"], {
        "train": split(["a" * 64, "b" * 64]), "test": split(["a" * 64, "c" * 64])}))
    with pytest.raises(LeakError, match="1 of 2 test texts also appear in train/val"):
        check_no_overlap(store, "test")
