"""The fine-tune stage: fine-tune only when the rule says so, keep the result only when it beats the probe by
more than the validation noise and the luck of picking its best epoch, deploy each fine-tuned head only where it
beats its cache-only head on validation."""

import json
import sys
import types
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import FinetuneConfig, HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.deploy.deployment import deployed_head
from featurestore.errors import FeaturestoreError
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import SplitArrays, write_store
from featurestore.transfer import decision as decision_module
from featurestore.transfer.decision import ALPHA, choose, compare_heads, run_finetune_stage, should_finetune
from featurestore.transfer.training import TrainResult

PLATEAUED = {"plateaued": True, "reason": "flat"}
RISING = {"plateaued": False, "reason": "still rising"}
CLASSES = 10


def result_with(truth, start, epochs) -> TrainResult:
    """A TrainResult as ``training.train`` makes it: ``epochs`` (E, N) predicted classes, the best epoch the
    first with the most right answers if it beats the start (else the start, epoch 0)."""
    truth, start, epochs = np.asarray(truth), np.asarray(start), np.asarray(epochs)
    right = (epochs == truth).sum(axis=1)
    best = int(np.argmax(right)) + 1 if right.max() > (start == truth).sum() else 0
    best_predictions = epochs[best - 1] if best else start
    return TrainResult(best_val_accuracy=float(np.mean(best_predictions == truth)),
                       start_val_accuracy=float(np.mean(start == truth)), epochs_run=len(epochs), steps=9,
                       stopped_early=False, val_labels=truth.tolist(), start_val_predictions=start.tolist(),
                       best_val_predictions=best_predictions.tolist(), epoch_val_predictions=epochs.tolist(),
                       best_epoch=best)


def wrong_class(rng, truth):
    return (truth + rng.integers(1, CLASSES, len(truth))) % CLASSES


def probe_answers(rng, n=500, accuracy=0.8):
    truth = rng.integers(0, CLASSES, n)
    return truth, np.where(rng.random(n) < accuracy, truth, wrong_class(rng, truth))


def zero_mean_noise(seed, n=500, epochs=12, breaks=0.05):
    """The probe plus noise: each epoch (independently) breaks a right answer with probability ``breaks`` and
    fixes a wrong one with 4 × that: as many fixes as breaks expected at the probe's 0.80."""
    rng = np.random.default_rng(seed)
    truth, start = probe_answers(rng, n)
    right = start == truth
    answers = [np.where(rng.random(n) < np.where(right, breaks, 4 * breaks),
                        np.where(right, wrong_class(rng, truth), truth), start) for _ in range(epochs)]
    return truth, start, np.stack(answers)


def random_class_noise(seed, n=500, epochs=12, q=0.1):
    """The probe with each answer replaced by a random class with probability ``q``, independently per epoch."""
    rng = np.random.default_rng(seed)
    truth, start = probe_answers(rng, n)
    return truth, start, np.where(rng.random((epochs, n)) < q, rng.integers(0, CLASSES, (epochs, n)), start)


def real_gain(seed, n=500, epochs=12, breaks=0.035, noise=0.02, churn=0.3):
    """A real +3 points (benchmarks/decision_rule.py, "+3, ramp, noise .02 corr"): at full strength fine-tuning
    breaks 3.5% of the right answers and fixes enough wrong ones for +3.0 points expected (about 43 disagreements
    on 500 images), reached over the first 3 epochs, with zero-mean noise on top; each image's draws are renewed
    with probability ``churn`` per epoch (a trajectory that changes slowly)."""
    rng = np.random.default_rng(seed)
    truth, start = probe_answers(rng, n)
    right = start == truth
    fixes = (0.03 + 0.8 * breaks * (1 - 2 * noise)) / (0.2 * (1 - 2 * 4 * noise))
    answers, u, v = np.empty((epochs, n), dtype=np.int64), rng.random(n), rng.random(n)
    for e in range(epochs):
        if e:
            for uniform in (u, v):
                renew = rng.random(n) < churn
                uniform[renew] = rng.random(int(renew.sum()))
        change = u < np.where(right, breaks, fixes) * min(1.0, (e + 1) / 3)
        flip = change ^ (v < np.where(right, noise, 4 * noise))
        answers[e] = np.where(flip, np.where(right, wrong_class(rng, truth), truth), start)
    return truth, start, answers


def test_the_mode_rule():
    assert should_finetune("auto", PLATEAUED) == (True, "flat")
    assert should_finetune("auto", RISING) == (False, "still rising")
    assert should_finetune("always", RISING)[0] and not should_finetune("never", PLATEAUED)[0]
    with pytest.raises(FeaturestoreError, match="auto, always, never"):
        should_finetune("sometimes", RISING)


@pytest.mark.parametrize("noise", [zero_mean_noise, partial(zero_mean_noise, breaks=0.02), random_class_noise],
                         ids=["zero-mean a=.05", "zero-mean a=.02", "random classes"])
def test_fine_tuning_that_is_the_probe_plus_noise_keeps_the_probe_in_95_of_100_seeds(noise):
    """The best of 12 noisy epochs looks better than the probe by luck; the old rule (80% bootstrap of the best
    epoch) kept the probe in only 47 and 43 of these 100 seeds of zero-mean noise. Measured here: 96, 99 and 100."""
    kept_probe = 0
    for seed in range(100):
        result = result_with(*noise(seed))
        kept_probe += choose(result)["chosen"] == "probe"
    assert kept_probe >= 95


def test_a_real_gain_of_three_points_on_500_images_is_kept_in_most_seeds():
    """Kept in 66 of these 100 seeds (73% over 1,000 seeds of this generator; benchmarks/decision_rule.py: 76% for
    this trajectory, 58-83% over its six trajectories of a +3-point gain): 500 validation images are few for 3
    points once the choice of the best of 12 epochs is paid for."""
    runs = [real_gain(seed) for seed in range(100)]
    true_gain = np.mean([(epochs[2:] == truth).mean() - (start == truth).mean() for truth, start, epochs in runs])
    assert true_gain == pytest.approx(0.03, abs=0.003)  # from epoch 3 on (the best epoch's is higher: selected)
    assert sum(choose(result_with(*run))["chosen"] == "finetuned" for run in runs) >= 60


def test_the_finetuned_network_is_chosen_only_beyond_the_noise_and_the_choice_of_its_epoch():
    rng = np.random.default_rng(0)
    truth, start = probe_answers(rng)
    clearly_better = np.stack([np.where(rng.random(500) < 0.02, wrong_class(rng, truth), start) for _ in range(12)])
    clearly_better[8:] = np.where(rng.random(500) < 0.5, truth, start)  # epochs 9-12 fix about half the mistakes
    decision = choose(result_with(truth, start, clearly_better))
    assert decision["chosen"] == "finetuned" and decision["gain"]["p_value"] < ALPHA
    assert decision["gain"]["epoch"] == 9 and decision["val_finetuned"] - decision["val_probe"] > 0.08
    slightly = np.repeat(start[None], 12, axis=0)
    wrong, right = np.flatnonzero(start != truth), np.flatnonzero(start == truth)
    slightly[5, wrong[:6]] = truth[wrong[:6]]
    slightly[5, right[:3]] = (truth[right[:3]] + 1) % 10
    decision = choose(result_with(truth, start, slightly))  # +3 images of 500: within the noise
    assert decision["chosen"] == "probe" and decision["gain"]["gain"] == pytest.approx(0.006)
    assert decision["gain"]["p_value"] >= ALPHA and "does not beat" in decision["reason"]


def test_three_fixes_and_no_break_of_500_keep_the_probe():
    rng = np.random.default_rng(1)
    truth, start = probe_answers(rng)
    epochs = np.repeat(start[None], 12, axis=0)
    fixed = np.flatnonzero(start != truth)[:3]
    epochs[6:, fixed] = truth[fixed]
    decision = choose(result_with(truth, start, epochs))
    assert decision["chosen"] == "probe"  # the old rule's 80% bootstrap interval was [+0.002, +0.010]: kept
    assert decision["gain"]["fixes"] == 3 and decision["gain"]["breaks"] == 0 and decision["gain"]["p_value"] == 0.125


def test_the_choice_records_the_rule_its_figures_and_a_reason():
    truth, start, epochs = real_gain(3)
    decision = choose(result_with(truth, start, epochs))
    assert decision["rule"] == "max_gain" and {"val_probe", "val_finetuned", "reason", "chosen"} <= set(decision)
    gain = decision["gain"]
    assert {"gain", "p_value", "alpha", "epoch", "fixes", "breaks", "n", "candidates"} <= set(gain)
    assert gain["gain"] == pytest.approx(decision["val_finetuned"] - decision["val_probe"], abs=1e-6)
    assert gain["candidates"] == 12 and gain["n"] == 500 and gain["alpha"] == ALPHA
    assert f"{gain['p_value']:.4f}" in decision["reason"] and f"{gain['gain']:+.4f}" in decision["reason"]
    json.dumps(decision)  # it goes to decision.json as is
    nothing = choose(result_with(truth, start, np.repeat(start[None], 4, axis=0)))
    assert nothing["chosen"] == "probe" and nothing["gain"]["epoch"] == 0 and "none of its 4 epochs" in \
        nothing["reason"]


# -- heads on the fine-tuned features against the cache-only heads ---------------------------------------------

def synthetic_store(path, backbone, separation, seed=0, n=(90, 60)):
    """A 3-class store whose features (8 dims) hold the class at ``separation`` standard deviations; the same ids
    and labels for every ``separation`` (the same images), the noise drawn from ``seed``."""
    labels_rng, noise_rng = np.random.default_rng(100), np.random.default_rng(seed)
    means = np.eye(3, 8) * separation
    splits = {}
    for split, count in zip(("train", "val"), n, strict=True):
        y = labels_rng.integers(0, 3, count)
        X = (means[y] + noise_rng.standard_normal((count, 8))).astype(np.float32)
        ids = [f"{split[0]}{i:063d}" for i in range(count)]
        splits[split] = SplitArrays(features=X, labels=y, ids=ids, paths=[f"{split}/c/{i}.png" for i in range(count)])
    fingerprint = {"backbone": backbone, "feature_dim": 8, "weights_sha256": "0" * 64, "dtype": "float32"}
    return FeatureStore(write_store(path, fingerprint, ["a", "b", "c"], splits))


HEADS = {"logreg": HeadConfig(c_points=5, n_jobs=1), "linear_svm": HeadConfig(head="linear_svm", c_max=1.0,
                                                                                c_points=4, n_jobs=1)}


@pytest.fixture
def cache_only_heads(tmp_path):
    store = synthetic_store(tmp_path / "features" / "demo.h5", "demo", separation=1.0)
    return {name: train_head(store, config).save(tmp_path / "heads" / f"demo__{name}.skops")
            for name, config in HEADS.items()}


def test_heads_are_compared_on_the_same_validation_images_fitted_on_train_alone(tmp_path, cache_only_heads):
    better = synthetic_store(tmp_path / "ft" / "better.h5", "demo_ft", separation=3.0, seed=1)
    worse = synthetic_store(tmp_path / "ft" / "worse.h5", "demo_ft", separation=0.3, seed=2)
    same = FeatureStore(tmp_path / "features" / "demo.h5")
    verdicts = compare_heads(cache_only_heads, {"logreg": train_head(better, HEADS["logreg"]),
                                                "linear_svm": train_head(worse, HEADS["linear_svm"])})
    assert verdicts["logreg"]["deployed"] == "finetuned" and verdicts["linear_svm"]["deployed"] == "cache-only"
    for verdict in verdicts.values():
        assert verdict["n"] == 60 and set(verdict) >= {"cache_only_val", "finetuned_val", "deployed", "reason"}
    assert verdicts["logreg"]["finetuned_val"] > verdicts["logreg"]["cache_only_val"]
    assert verdicts["linear_svm"]["finetuned_val"] < verdicts["linear_svm"]["cache_only_val"]
    # Fitted on train alone: the cache-only logreg's score is that of a fresh train-only fit at its C.
    head = load_head(cache_only_heads["logreg"])
    X, y, _ = same.load("train")
    Xv, yv, _ = same.load("val")
    from featurestore.heads.estimators import build_estimator

    assert verdicts["logreg"]["cache_only_val"] == pytest.approx(
        float(np.mean(build_estimator(head.config, head.C).fit(X, y).predict(Xv) == yv)), abs=1e-6)
    # The same features give the same score: a tie keeps the cache-only head; a head with nothing to compare with
    # is not deployed.
    refitted = {"logreg": train_head(same, HEADS["logreg"]), "linear_svm": train_head(better, HEADS["linear_svm"])}
    tie = compare_heads({"logreg": cache_only_heads["logreg"]}, refitted)
    assert tie["logreg"]["finetuned_val"] == tie["logreg"]["cache_only_val"]
    assert tie["logreg"]["deployed"] == "cache-only" and tie["linear_svm"]["deployed"] == "cache-only"


def test_a_streamed_head_is_compared_by_its_sweeps_train_only_score(tmp_path):
    config = HeadConfig(head="sgd_logreg", c_points=3, max_iter=5, n_jobs=1)
    base = train_head(synthetic_store(tmp_path / "demo.h5", "demo", separation=0.3), config)
    tuned = train_head(synthetic_store(tmp_path / "ft.h5", "demo_ft", separation=3.0, seed=1), config)
    verdict = compare_heads({"sgd_logreg": base.save(tmp_path / "demo__sgd_logreg.skops")}, {"sgd_logreg": tuned})
    def swept(head):  # the chosen C's validation accuracy, fitted on train alone
        return max(point["val_accuracy"] for point in head.sweep)

    assert verdict["sgd_logreg"]["cache_only_val"] == pytest.approx(swept(base))
    assert verdict["sgd_logreg"]["finetuned_val"] == pytest.approx(swept(tuned))
    assert verdict["sgd_logreg"]["deployed"] == "finetuned" and verdict["sgd_logreg"]["n"] == 60


def test_deployed_head_follows_each_heads_verdict(tmp_path):
    cache_only, finetuned = tmp_path / "demo__logreg.skops", tmp_path / "demo_ft__logreg.skops"
    finetuned.write_text("a head")
    decision = tmp_path / "decision.json"

    def deployed(content, **kwargs):
        decision.write_text(json.dumps(content))
        return deployed_head(decision, cache_only, finetuned, **kwargs)

    wins = {"chosen": "finetuned", "heads": {"logreg": {"deployed": "finetuned"}, "svm": {"deployed": "cache-only"}}}
    assert deployed({**wins, "heads": {"logreg": {"deployed": "cache-only"}}}) == cache_only  # lost on validation
    assert deployed({"chosen": "finetuned"}) == cache_only  # never compared: the cache-only head stays
    assert deployed(wins) == finetuned
    assert deployed(wins, head="svm") == cache_only
    assert deployed({**wins, "chosen": "probe"}) == cache_only
    decision.unlink()
    assert deployed_head(decision, cache_only, finetuned) == cache_only
    with pytest.raises(FeaturestoreError, match="head name"):
        deployed_head(decision, tmp_path / "logreg.skops", finetuned)


def test_the_stage_compares_the_fine_tuned_heads_before_deploying_them(tmp_path, cache_only_heads, monkeypatch):
    """The stage with fine-tuning and extraction replaced by stand-ins (the slow test below runs the real ones):
    a fine-tuned network that clearly wins, whose features are better for logreg and worse for linear_svm."""
    val = FeatureStore(tmp_path / "features" / "demo.h5")
    truth = val.labels("val")

    def finetune(head, data, out, config, **options):
        rng = np.random.default_rng(0)
        start = np.where(rng.random(len(truth)) < 0.6, truth, (truth + 1) % 3)
        epochs = np.repeat(np.where(rng.random(len(truth)) < 0.9, truth, start)[None], 3, axis=0)
        result = result_with(truth, start, epochs)
        return types.SimpleNamespace(**vars(result), cache_seconds=0.0, train_ids=["a", "b"])

    def adopt(backbone, out, data, heads, extract_options, progress):
        stores = {"logreg": synthetic_store(out / "features.h5", f"{backbone}_ft", separation=3.0, seed=1),
                  "linear_svm": synthetic_store(out / "worse.h5", f"{backbone}_ft", separation=0.3, seed=2)}
        trained = {name: train_head(stores[name], config) for name, config in heads.items()}
        for name, head in trained.items():
            head.save(out / "heads" / f"{backbone}_ft__{name}.skops")
        return trained

    monkeypatch.setitem(sys.modules, "featurestore.transfer.finetune", types.SimpleNamespace(finetune=finetune))
    monkeypatch.setattr(decision_module, "adopt_finetuned", adopt)
    out = tmp_path / "finetune" / "demo"
    decision = run_finetune_stage("demo", cache_only_heads["logreg"], tmp_path / "data", out, PLATEAUED, "auto",
                                  FinetuneConfig(), HEADS, {}, cache_only_heads=cache_only_heads,
                                  baseline=False, hybrid=False)  # synthetic stores: no items for a baseline
    written = json.loads((out / "decision.json").read_text())
    assert written == json.loads(json.dumps(decision)) and written["chosen"] == "finetuned"
    assert written["heads"]["logreg"]["deployed"] == "finetuned"
    assert written["heads"]["linear_svm"]["deployed"] == "cache-only"
    for name, path in cache_only_heads.items():
        finetuned = out / "heads" / f"demo_ft__{name}.skops"
        assert finetuned.is_file()
        expected = finetuned if name == "logreg" else path
        assert deployed_head(out / "decision.json", path, finetuned) == expected


# -- the real stage on a tiny project --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project layout: 10 train and 5 val images per class at 32 px, its logistic-regression probe with
    C chosen on validation as the pipeline does (no handicap: whether fine-tuning wins is up to the rule)."""
    root = tmp_path_factory.mktemp("project")
    data = root / "data" / "prepared"
    prepare_fashion_mnist(data, labels_per_class=10, val_per_class=5, test_per_class=2, seed=3, progress=False)
    store = root / "data" / "features" / "efficientnet_lite0.h5"
    extract_features(data, store, "efficientnet_lite0", image_size=32, crop_pct=1.0, workers=0, progress=False)
    for name, config in HEADS.items():
        train_head(store, config).save(root / "data" / "heads" / f"efficientnet_lite0__{name}.skops")
    return root


@pytest.mark.slow
def test_the_stage_skips_fine_tunes_chooses_and_deploys(project):
    out = project / "data" / "finetune" / "efficientnet_lite0"
    heads_dir = project / "data" / "heads"
    cache_only = {name: heads_dir / f"efficientnet_lite0__{name}.skops" for name in HEADS}
    head_path = cache_only["logreg"]
    data = project / "data" / "prepared"
    options = {"image_size": 32, "crop_pct": 1.0, "workers": 0}
    config = FinetuneConfig(unfreeze_blocks=2, epochs=6, head_lr=1e-3, backbone_lr_factor=1.0, batch_size=16,
                            workers=0)

    def finetuned_head(name):
        return out / "heads" / f"efficientnet_lite0_ft__{name}.skops"

    def deployed(name):
        return deployed_head(out / "decision.json", cache_only[name], finetuned_head(name))

    def stage(plateau, mode, stage_config=config):
        return run_finetune_stage("efficientnet_lite0", head_path, data, out, plateau, mode, stage_config, HEADS,
                                  options, device="cpu", cache_only_heads=cache_only)

    skipped = stage(RISING, "auto")  # skips: the curve still rises
    assert not skipped["finetuned"] and skipped["chosen"] == "probe" and not (out / "weights.pth").exists()
    assert json.loads((out / "decision.json").read_text())["reason"] == "still rising"
    assert all(deployed(name) == cache_only[name] for name in HEADS)

    ran = stage(RISING, "always")  # fine-tunes, and chooses by the rule, on a probe that was not handicapped
    assert ran["finetuned"] and ran["reason"] == "mode is always" and (out / "weights.pth").is_file()
    choice = ran["choice"]
    assert choice["rule"] == "max_gain" and choice["gain"]["candidates"] == ran["result"]["epochs_run"]
    assert choice["gain"]["n"] == 50 and choice["val_probe"] == ran["result"]["start_val_accuracy"]
    assert ran["chosen"] == choice["chosen"] == ("finetuned" if choice["gain"]["p_value"] < ALPHA else "probe")
    assert (out / "trunk.h5").is_file()  # kept: the next run reuses it
    if ran["chosen"] == "finetuned":  # deploys each head only where it beat its cache-only head
        assert FeatureStore(out / "features.h5").fingerprint["backbone"] == "efficientnet_lite0_ft"
        for name in HEADS:
            verdict = ran["heads"][name]
            assert verdict["n"] == 50 and finetuned_head(name).is_file()
            wins = verdict["finetuned_val"] > verdict["cache_only_val"]
            assert deployed(name) == (finetuned_head(name) if wins else cache_only[name])
    else:  # deploys the cache-only heads; the fine-tuned network was not adopted
        assert "heads" not in ran and not (out / "heads").exists() and not (out / "features.h5").exists()
        assert all(deployed(name) == cache_only[name] for name in HEADS)
        # What adoption does is still run for real here: the fine-tuned weights' store, heads and comparison.
        trained = decision_module.adopt_finetuned("efficientnet_lite0", out, data, HEADS, options, False)
        verdicts = compare_heads(cache_only, trained)
        assert set(verdicts) == set(HEADS) and all(v["n"] == 50 for v in verdicts.values())
        assert FeatureStore(out / "features.h5").fingerprint["backbone"] == "efficientnet_lite0_ft"

    never = stage(PLATEAUED, "never", replace(config, epochs=1))
    assert never["chosen"] == "probe" and not (out / "heads").exists() and not (out / "backbone.json").exists()
    assert all(deployed(name) == cache_only[name] for name in HEADS)
