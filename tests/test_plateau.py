import json

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.extract import extract_features
from featurestore.plateau import PlateauRule, detect_plateau, nested_subset, verdict


def curve(*points):
    return [{"labels_per_class": b, "val_accuracy": a} for b, a in points]


def test_the_rule_compares_the_last_doubling():
    flat = verdict(curve((10, 0.70), (25, 0.78), (50, 0.800), (100, 0.805)), min_gain=0.01)
    assert flat["plateaued"] and flat["from"]["labels_per_class"] == 50 and flat["gain"] == pytest.approx(0.005)
    rising = verdict(curve((10, 0.70), (25, 0.78), (50, 0.80), (100, 0.83)), min_gain=0.01)
    assert not rising["plateaued"] and "still gained" in rising["reason"]
    # 60 is more than half of 100: the comparison goes back to 25
    assert verdict(curve((25, 0.7), (60, 0.79), (100, 0.80)), 0.01)["from"]["labels_per_class"] == 25


def test_nested_subsets_grow_without_reshuffling():
    labels = np.repeat(np.arange(3), 20)
    small, large = nested_subset(labels, 5, seed=1), nested_subset(labels, 10, seed=1)
    assert set(small) < set(large)
    assert np.bincount(labels[large]).tolist() == [10, 10, 10]


def test_detect_plateau_writes_curve_and_verdict(fashion_folder_master, tmp_path, lite0_small):
    store = tmp_path / "f.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    rule = PlateauRule(budgets=(1, 2, 50), min_gain=0.01)
    result = detect_plateau(FeatureStore(store), rule, out=tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["plateaued"] == result["plateaued"] and isinstance(result["plateaued"], bool)
    assert [p["labels_per_class"] for p in saved["curve"]] == [1, 2]  # 50 is more than the split holds
    assert (tmp_path / "p.png").is_file()
