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
    # The verdict is the rule applied to this curve: 1 → 2 labels per class, a paired gain on the same val images
    # (so exactly the difference of the two accuracies), plateaued exactly when the upper bound is below min_gain.
    assert saved["from"] == saved["curve"][0] and saved["to"] == saved["curve"][1]
    assert saved["gain"] == pytest.approx(saved["curve"][1]["val_accuracy"] - saved["curve"][0]["val_accuracy"])
    assert saved["plateaued"] == (high < rule.min_gain) and saved["min_gain"] == rule.min_gain
    assert ("no longer pay" if saved["plateaued"] else "may still pay") in saved["reason"]
    # The same curve judged with min_gain just above and at its upper bound: both verdicts, as the rule says.
    above = detect_plateau(FeatureStore(store), PlateauRule(budgets=(1, 2), min_gain=high + 0.005))
    at = detect_plateau(FeatureStore(store), PlateauRule(budgets=(1, 2), min_gain=high))
    assert above["interval"] == at["interval"] == [low, high]  # the curve and its interval do not depend on it
    assert above["plateaued"] is True and "no longer pay" in above["reason"]
    assert at["plateaued"] is False and "may still pay" in at["reason"]


def test_the_curve_reads_a_float16_store_as_float32_like_the_head(tmp_path, monkeypatch):
    import featurestore.transfer.plateau as plateau
    from featurestore.store.hdf5 import SplitArrays, write_store

    rng = np.random.default_rng(0)

    def split(per_class: int, name: str) -> SplitArrays:
        labels = np.repeat(np.arange(3), per_class)
        features = (np.eye(3, 16)[labels] * 3 + rng.normal(0, 1, (len(labels), 16))).astype(np.float16)
        ids = [f"{name}{i:060d}" for i in range(len(labels))]
        return SplitArrays(features, labels, ids, ids)

    path = write_store(tmp_path / "h.h5", {"backbone": "synthetic", "feature_dim": 16}, ["a", "b", "c"],
                       {"train": split(8, "train"), "val": split(4, "val")}, dtype="float16")
    seen, original = [], plateau.sweep_c
    monkeypatch.setattr(plateau, "sweep_c", lambda config, X, y, Xv, yv, **kw: seen.append((X.dtype, Xv.dtype))
                        or original(config, X, y, Xv, yv, **kw))
    curve, _ = plateau.learning_curve(FeatureStore(path), PlateauRule(budgets=(2, 4)), plateau.CURVE_HEAD)
    assert len(curve) == 2 and seen == [(np.float32, np.float32)] * 2
