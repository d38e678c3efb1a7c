"""SetFit for sentence encoders: balanced, seeded pairs; contrastive tuning that pulls real texts of one class
together (all-MiniLM-L6-v2's real weights, real BBC News articles); the decision among fine-tuning methods; and the
method refused with one line where it does not apply (images). The command-line runs on a text store are in
test_text_verbs.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, SetFitConfig
from featurestore.encode.backbones import load_text_backbone
from featurestore.errors import BadValueError, FeaturestoreError
from featurestore.extract import extract_features
from featurestore.heads import train_head
from featurestore.transfer.decision import choose_among
from featurestore.transfer.setfit import build_pairs, pair_separation, setfit_text
from featurestore.transfer.training import TrainResult

from .conftest import bbc_store_and_head

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 has a single text


def test_pairs_are_balanced_and_deterministic_per_seed():
    pairs, targets = build_pairs(LABELS, iterations=3, seed=5)
    assert pairs.shape == (2 * 3 * 9, 2) and pairs.dtype == np.int64 and targets.dtype == np.float32
    assert targets.sum() == len(targets) / 2  # as many same-class as different-class pairs
    same = LABELS[pairs[:, 0]] == LABELS[pairs[:, 1]]
    assert np.array_equal(same, targets == 1.0) and not np.any(pairs[:, 0] == pairs[:, 1])
    anchors = np.bincount(pairs[:, 0], minlength=len(LABELS))
    assert np.array_equal(anchors, [6] * 9 + [0])  # every text with a classmate: one of each kind per round
    assert 9 in build_pairs(LABELS, 30, seed=5)[0][:, 1]  # the singleton class still appears, as a negative
    again, again_targets = build_pairs(LABELS, iterations=3, seed=5)
    assert np.array_equal(pairs, again) and np.array_equal(targets, again_targets)
    assert not np.array_equal(pairs, build_pairs(LABELS, iterations=3, seed=6)[0])
    capped, capped_targets = build_pairs(LABELS, iterations=3, seed=5, max_pairs=10)
    assert len(capped) == 10 and capped_targets.sum() == 5


def test_pairs_need_two_classes_and_a_class_with_two_texts():
    with pytest.raises(FeaturestoreError, match="at least two classes"):
        build_pairs(np.zeros(5, dtype=int), 2, seed=0)
    with pytest.raises(FeaturestoreError, match="two train texts of one class"):
        build_pairs(np.arange(4), 2, seed=0)
    with pytest.raises(BadValueError, match="setfit lr"):
        SetFitConfig(lr=0)


def test_pair_separation_is_same_class_minus_different_class_cosine():
    embeddings = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])  # two classes on orthogonal axes
    assert pair_separation(embeddings, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert pair_separation(embeddings, np.array([0, 1, 0, 1])) == pytest.approx(-0.5)  # same 0, different 0.5


def _result(truth, start, epochs) -> TrainResult:
    accuracies = [float(np.mean(np.asarray(e) == truth)) for e in epochs]
    best = int(np.argmax(accuracies))
    return TrainResult(best_val_accuracy=accuracies[best], start_val_accuracy=float(np.mean(start == truth)),
                       epochs_run=len(epochs), steps=1, stopped_early=False, val_labels=truth.tolist(),
                       start_val_predictions=start.tolist(), best_val_predictions=list(epochs[best]),
                       epoch_val_predictions=[list(e) for e in epochs], best_epoch=best + 1)


def test_the_decision_compares_every_method_and_keeps_the_one_that_pays():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 300)
    start = np.where(rng.random(300) < 0.8, truth, (truth + 1) % 5)  # the probe: 80%
    noise = [np.where(rng.random(300) < 0.03, (p + 2) % 5, p) for p in (start, start)]  # no better than the probe
    fixed = np.where(rng.random(300) < 0.6, truth, start)  # fixes ~60% of the probe's errors
    choice = choose_among({"probe_finetune": _result(truth, start, noise), "setfit": _result(truth, start, [fixed])})
    assert choice["chosen"] == "finetuned" and choice["method"] == "setfit" and choice["gain"]["epoch"] == 1
    assert choice["gain"]["candidates"] == 3 and choice["val_finetuned"] == pytest.approx(np.mean(fixed == truth))
    assert choice["per_method"]["probe_finetune"]["epochs_run"] == 2
    neither = choose_among({"probe_finetune": _result(truth, start, noise), "setfit": _result(truth, start, [start])})
    assert neither["chosen"] == "probe"
    one = choose_among({"setfit": _result(truth, start, [fixed])})
    assert one["method"] == "setfit" and one["chosen"] == "finetuned" and one["gain"]["candidates"] == 1
    with pytest.raises(FeaturestoreError, match="different validation items"):
        choose_among({"a": _result(truth, start, [start]), "b": _result(truth[::-1], start, [start])})


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    """3 train, 2 val, 1 test real BBC articles per topic, a store at 64 tokens and a logreg head on it."""
    return bbc_store_and_head(tmp_path_factory.mktemp("setfit"), 3, 2, 1, seed=4)


@pytest.mark.slow
def test_contrastive_tuning_pulls_real_texts_of_one_topic_together(articles, tmp_path):
    data, store, head = articles
    config = SetFitConfig(iterations=4, unfreeze_blocks=2, lr=1e-4, epochs=2, batch_size=8, max_length=64)
    result = setfit_text(head, data, tmp_path / "setfit.pth", config, device="cpu", progress=False)
    separations = [result.start_separation] + [epoch["separation"] for epoch in result.history]
    # Same-topic minus different-topic mean cosine of the train articles, as the store embeds them: it grows.
    assert separations[1] > separations[0] + 0.05 and separations[2] > separations[0] + 0.05, separations
    assert [epoch["pairs"] for epoch in result.history] == [2 * 4 * 15] * 2
    assert result.train_ids == list(FeatureStore(store).ids("train")) and len(result.epoch_val_predictions) == 2
    assert result.best_val_accuracy >= result.start_val_accuracy and result.test_accuracy is not None
    tuned = torch.load(tmp_path / "setfit.pth", weights_only=True)
    packaged = load_text_backbone("minilm_l6").encoder.state_dict()
    assert tuned.keys() == packaged.keys()
    changed = {key.split(".")[2] for key in tuned if not torch.equal(tuned[key], packaged[key])}
    assert changed == ({"4", "5"} if result.best_epoch else set())  # the top 2 of 6 layers, if an epoch was kept


@pytest.mark.slow
def test_setfit_is_refused_for_images_with_one_line(fashion_folder_master, lite0_small, tmp_path):
    store = tmp_path / "lite0.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    head = train_head(store, HeadConfig(c_min=1e-2, c_max=1e2, c_points=3, n_jobs=1)).save(tmp_path / "head.skops")
    for args in (["curve", "--features", store, "--data", fashion_folder_master, "--out", tmp_path / "c",
                  "--budgets", 1, "--methods", "setfit"],
                 ["finetune", "--head", head, "--data", fashion_folder_master, "--out", tmp_path / "w.pth",
                  "--method", "setfit"]):
        run = subprocess.run([sys.executable, "-m", "featurestore.cli", *map(str, args)], capture_output=True,
                             text=True)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "setfit" in run.stderr and "image" in run.stderr
