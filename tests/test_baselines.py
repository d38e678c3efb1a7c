"""The baselines and the learning curve: pixels, the from-scratch network, probe and probe-then-fine-tune."""

import json

import numpy as np
import pytest
import torch

from featurestore.configs import CURVE_METHODS, CurveOptions, FinetuneConfig, ScratchConfig, SmallCNNConfig
from featurestore.errors import FeaturestoreError
from featurestore.extract.launch import extract_features
from featurestore.transfer.baselines import convergence, pixel_features, pixel_logreg, train_from_scratch
from featurestore.transfer.curve import merge_curves, run_curve


def history(train_accuracy, val_accuracy):
    return [{"steps": 10 * (i + 1), "train_accuracy": t, "val_accuracy": v}
            for i, (t, v) in enumerate(zip(train_accuracy, val_accuracy, strict=True))]


def test_convergence_needs_a_fitted_training_set_or_an_early_validation_peak():
    memorised = convergence(history([0.3, 0.6, 0.9, 0.99, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                    [0.2, 0.4, 0.5, 0.55, 0.56, 0.56, 0.55, 0.56, 0.56, 0.56]))
    assert memorised["by"] == "train_accuracy" and memorised["final_train_accuracy"] == 1.0
    assert memorised["best_val_step"] == 50
    early_peak = convergence(history([0.3, 0.4, 0.5, 0.6, 0.7, 0.72, 0.75, 0.8, 0.85, 0.9],
                                     [0.2, 0.4, 0.55, 0.6, 0.6, 0.595, 0.6, 0.6, 0.598, 0.6]))
    assert early_peak["by"] == "val_accuracy"
    annealed = convergence(history([0.1, 0.3, 0.5, 0.6, 0.7, 0.78, 0.81, 0.82, 0.83, 0.83],  # flat only because the
                                   [0.1, 0.3, 0.5, 0.6, 0.7, 0.74, 0.76, 0.78, 0.79, 0.79]))  # rate went to zero
    assert annealed["by"] is None


def test_pixel_logistic_regression_chooses_c_on_val(fashion_folder_master, monkeypatch):
    import featurestore.heads.estimators as estimators
    from featurestore.data.sources import scan_source
    from featurestore.heads.estimators import choose_c

    records = scan_source(fashion_folder_master).records
    pixels = {split: pixel_features([r for r in records if r.split == split]) for split in ("train", "val", "test")}
    labels = {split: np.array([r.label for r in records if r.split == split]) for split in ("train", "val", "test")}
    swept, original = [], estimators.sweep_c
    monkeypatch.setattr(estimators, "sweep_c", lambda config, X, y, Xv, yv, **kw: swept.append(
        (config, X, y, Xv, yv, original(config, X, y, Xv, yv, **kw))) or swept[-1][-1])
    result = pixel_logreg(fashion_folder_master)
    assert len(swept) == 1
    config, X, y, Xv, yv, sweep = swept[0]
    # the sweep fitted on the train pixels and scored on the val pixels: never on test
    assert np.array_equal(X, pixels["train"]) and np.array_equal(y, labels["train"])
    assert np.array_equal(Xv, pixels["val"]) and np.array_equal(yv, labels["val"])
    # and the C the baseline reports is the one that sweep chose, with that sweep's val accuracy
    assert result.C == choose_c(sweep)
    assert result.val_accuracy == next(p["val_accuracy"] for p in sweep if p["C"] == result.C)
    assert 0.0 <= result.test_accuracy <= 1.0 and result.seconds >= 0


@pytest.mark.slow
def test_scratch_starts_from_random_weights_and_trains_every_layer(fashion_folder_master, monkeypatch):
    import featurestore.transfer.baselines as baselines
    from featurestore.encode.backbones import load_classifier

    # The run's own network, seen through the training loop it is handed to: train(top, network.state_dict, ...).
    runs, original = [], baselines.train

    def watched(top, weights_of, optimizer, *args, **kwargs):
        network = weights_of.__self__
        start = {name: p.detach().clone() for name, p in network.named_parameters()}
        outcome = original(top, weights_of, optimizer, *args, **kwargs)
        end = {name: p.detach().clone() for name, p in network.named_parameters()}  # after the last step
        runs.append((start, end))
        return outcome

    monkeypatch.setattr(baselines, "train", watched)
    config = ScratchConfig(steps=6, image_size=32, batch_size=8, workers=0)
    result = train_from_scratch(fashion_folder_master, config, device="cpu")
    assert result.steps == 6 and len(result.history) == 6  # validation every ceil(6 / 20) = 1 step
    assert result.test_accuracy is not None and 0 <= result.best_val_accuracy <= 1
    assert set(result.converged) >= {"by", "final_train_accuracy", "best_val_step"}
    (start, end), = runs
    # random weights: no tensor of the starting network is the pretrained one
    _, pretrained, _ = load_classifier("efficientnet_lite0")
    shared = {name: p for name, p in pretrained.named_parameters() if name in start and p.shape == start[name].shape}
    assert len(shared) == len(start) - 2  # all but the new 10-class classifier's weight and bias
    assert not [name for name, p in shared.items() if torch.equal(p, start[name])]
    # every layer trained: every parameter of the network moved during the run (a frozen one would not)
    assert len(start) > 100 and not [name for name in start if torch.equal(start[name], end[name])]


@pytest.mark.slow
def test_the_curve_trains_every_image_method_per_budget(fashion_folder_master, tmp_path, lite0_small):
    store, layers = tmp_path / "f.h5", tmp_path / "f.layers.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    extract_features(fashion_folder_master, layers, layers="all", image_size=lite0_small.preprocessing.image_size,
                     crop_pct=1.0, workers=0, progress=False)  # the multilayer line's store
    options = CurveOptions(budgets=[1, 2], methods=CURVE_METHODS,  # the default leaves the from-scratch networks out
                           layers=layers,
                           finetune=FinetuneConfig(unfreeze_blocks=1, epochs=1, batch_size=8, workers=0),
                           scratch=ScratchConfig(steps=4, image_size=32, batch_size=8, workers=0), device="cpu",
                           small_cnn=SmallCNNConfig(lrs=(3e-3,), widths=(8,), hidden=16, rounds=2, round_images=20,
                                                    threads=1))
    result = run_curve(store, fashion_folder_master, tmp_path / "curve", options)
    points = {(p["labels_per_class"], p["method"]): p for p in result["points"]}
    assert set(points) == {(b, m) for b in (1, 2) for m in CURVE_METHODS}  # the image methods: no tfidf
    for point in points.values():
        assert 0.0 <= point["test_accuracy"] <= 1.0 and point["seconds"] >= 0
        assert point["n_train"] == 10 * point["labels_per_class"]
    assert "by" in points[(2, "scratch")]["converged"] and points[(2, "pixels")]["C"] > 0
    assert "by" in points[(2, "small_cnn")]["converged"] and len(points[(2, "small_cnn")]["history"]) == 2
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert saved["points"] == result["points"] and saved["trunk_cache_seconds"] > 0
    assert (tmp_path / "curve" / "curve_labels.png").is_file() and (tmp_path / "curve" / "curve_seconds.png").is_file()
    assert sorted(p.name for p in (tmp_path / "curve").iterdir()) == [
        "curve.csv", "curve.json", "curve_labels.png", "curve_seconds.png"]  # no weights or caches left behind
    assert np.isfinite([p["test_accuracy"] for p in result["points"]]).all()


def curve(methods, budgets=(5, 10), scratch_steps=300, seed=0, accuracy=0.5):
    return {"backbone": "minilm_l6", "budgets": list(budgets), "probe": {"normalize": "standard"},
            "finetune": {"seed": seed}, "scratch": {"steps": scratch_steps}, "trunk_cache_seconds": 0.0,
            "points": [{"labels_per_class": b, "method": m, "test_accuracy": accuracy, "seconds": 1.0}
                       for b in budgets for m in methods]}


def test_a_method_run_apart_merges_into_an_earlier_curve():
    earlier = curve(["tfidf", "linear_probe", "scratch"], scratch_steps=100, accuracy=0.2)
    added = curve(["scratch"], scratch_steps=300, accuracy=0.9)
    merged = merge_curves(earlier, added)
    assert [(p["labels_per_class"], p["method"], p["test_accuracy"]) for p in merged["points"]] == [
        (5, "tfidf", 0.2), (5, "linear_probe", 0.2), (5, "scratch", 0.9),
        (10, "tfidf", 0.2), (10, "linear_probe", 0.2), (10, "scratch", 0.9)]
    assert merged["scratch"] == {"steps": 300} and merged["finetune"] == earlier["finetune"]
    for other in (curve(["scratch"], budgets=(5, 20)), curve(["scratch"], seed=1)):
        with pytest.raises(FeaturestoreError, match="cannot merge"):
            merge_curves(earlier, other)
