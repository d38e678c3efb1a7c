import json

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.data.sources import nested_subset
from featurestore.extract.launch import extract_features
from featurestore.transfer.plateau import PlateauRule, detect_plateau, verdict
from featurestore.transfer.stats import paired_gain


def curve(*budgets):
    return [{"labels_per_class": b, "val_accuracy": 0.0} for b in budgets]


def correctness(n: int, accuracy: float, flips: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two paired correctness vectors: ``before`` at ``accuracy``; ``after`` = before with ``flips`` wrong
    answers made right (flips > 0) or right answers made wrong (flips < 0)."""
    rng = np.random.default_rng(seed)
    before = rng.random(n) < accuracy
    after = before.copy()
    pool = np.flatnonzero(~before if flips > 0 else before)
    after[rng.choice(pool, abs(flips), replace=False)] = flips > 0
    return before, after


def test_paired_gain_interval_reflects_the_disagreements():
    before, after = correctness(500, 0.8, flips=10)
    gain = paired_gain(before, after, level=0.8)
    assert gain["gain"] == pytest.approx(0.02) and gain["disagreements"] == 10
    assert gain["low"] <= 0.02 <= gain["high"] and gain["low"] > 0  # only improvements: the interval is positive
    mixed = paired_gain(*correctness(500, 0.8, flips=0), level=0.8)
    assert mixed["gain"] == 0 and mixed["low"] == mixed["high"] == 0  # identical predictions: no uncertainty


def test_the_rule_calls_a_plateau_only_when_the_upper_bound_is_below_min_gain():
    rule = PlateauRule(budgets=(25, 50, 100), min_gain=0.01)
    before, same = correctness(2000, 0.85)
    half_wrong = before.copy()
    half_wrong[np.flatnonzero(before)[:30]] = False  # 30 images the larger budget loses ...
    half_wrong[np.flatnonzero(~before)[:32]] = True  # ... and 32 it wins: gain +0.001 on 2,000 images
    flat = verdict(curve(25, 50, 100), [before, before, half_wrong], rule)
    assert flat["plateaued"] and flat["from"]["labels_per_class"] == 50
    assert flat["interval"][1] < 0.01 and "no longer pay" in flat["reason"]
    small_before, small_after = before[:200], half_wrong[:200]  # the same kind of gain on 200 images: too noisy
    noisy = verdict(curve(25, 50, 100), [small_before, small_before, small_after], rule)
    assert not noisy["plateaued"] and noisy["interval"][1] >= 0.01 and "may still pay" in noisy["reason"]
    rising = verdict(curve(50, 100), list(correctness(2000, 0.8, flips=80)), rule)
    assert not rising["plateaued"] and rising["gain"] == pytest.approx(0.04)
    # 60 is more than half of 100: the comparison goes back to 25
    assert verdict(curve(25, 60, 100), [before, before, before], rule)["from"]["labels_per_class"] == 25


def test_nested_subsets_grow_without_reshuffling():
    labels = np.repeat(np.arange(3), 20)
    small, large = nested_subset(labels, 5, seed=1), nested_subset(labels, 10, seed=1)
    assert set(small) < set(large)
    assert np.bincount(labels[large]).tolist() == [10, 10, 10]


def test_detect_plateau_writes_curve_verdict_and_interval(fashion_folder_master, tmp_path, lite0_small):
    store = tmp_path / "f.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    rule = PlateauRule(budgets=(1, 2, 50), min_gain=0.01)
    result = detect_plateau(FeatureStore(store), rule, out=tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["plateaued"] == result["plateaued"] and isinstance(result["plateaued"], bool)
    assert [p["labels_per_class"] for p in saved["curve"]] == [1, 2]  # 50 is more than the split holds
    low, high = saved["interval"]
    assert low <= saved["gain"] <= high and saved["interval_level"] == 0.8
    assert (tmp_path / "p.png").is_file()
