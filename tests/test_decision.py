"""The fine-tune stage: fine-tune only when the rule says so, keep the result only when it beats the probe by
more than the validation noise and the luck of picking its best epoch; then the verdict over every head on both
backbones, whose deployed model (file and SHA-256) is exactly what export ships."""

import json
import sys
import types
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import FinetuneConfig, FinetuneStageOptions, HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.deploy.deployment import deployed_model
from featurestore.errors import FeaturestoreError
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import SplitArrays, write_store
from featurestore.transfer import decision as decision_module
from featurestore.transfer.best import run_verdict_stage, verdict
from featurestore.transfer.decision import ALPHA, choose, run_finetune_stage, should_finetune, train_finetuned_head
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


def test_the_verdict_compares_heads_on_the_same_validation_items_fitted_on_train_alone(tmp_path, cache_only_heads):
    """Heads on two backbones (the same items, other features): the incumbent stays unless a challenger beats it
    beyond the noise; every figure is that of a fit on the train split alone."""
    better = synthetic_store(tmp_path / "ft" / "better.h5", "demo_ft", separation=3.0, seed=1)
    worse = synthetic_store(tmp_path / "ft" / "worse.h5", "demo_ft", separation=0.3, seed=2)
    tuned = [train_head(better, HEADS["logreg"]).save(tmp_path / "ft" / "demo_ft__logreg.skops"),
             train_head(worse, HEADS["linear_svm"]).save(tmp_path / "ft" / "demo_ft__linear_svm.skops")]
    result = verdict([*cache_only_heads.values(), *tuned])
    deployed, candidates = result["deployed"], result["candidates"]
    assert deployed["incumbent"] == "demo__logreg" and deployed["name"] == "demo_ft__logreg"  # 3σ against 1σ
    assert deployed["test"]["paired"] and deployed["test"]["beats"] and deployed["test"]["candidates"] == 3
    assert deployed["file"] == str(tuned[0]) and all(c["n"] == 60 for c in candidates.values())
    # the incumbent's answers are those of a fresh train-only fit at its C
    head, same = load_head(cache_only_heads["logreg"]), FeatureStore(tmp_path / "features" / "demo.h5")
    from featurestore.heads.estimators import build_estimator

    X, y, _ = same.load("train")
    Xv, yv, _ = same.load("val")
    assert deployed["test"]["incumbent_val"] == pytest.approx(
        float(np.mean(build_estimator(head.config, head.C).fit(X, y).predict(Xv) == yv)), abs=1e-6)
    # a worse challenger, or the same features under another backbone's name, never replaces the incumbent
    same_features = synthetic_store(tmp_path / "ft" / "same.h5", "demo_ft2", separation=1.0)
    twin = train_head(same_features, HEADS["logreg"]).save(tmp_path / "ft" / "demo_ft2__logreg.skops")
    kept = verdict([cache_only_heads["logreg"], tuned[1], twin])["deployed"]
    assert kept["name"] == "demo__logreg" and not kept["test"]["beats"]
    with pytest.raises(FeaturestoreError, match="both hold a model named demo__logreg"):
        verdict([cache_only_heads["logreg"], cache_only_heads["logreg"]])


def test_a_streamed_head_enters_the_verdict_by_its_sweeps_train_only_score(tmp_path):
    config = HeadConfig(head="sgd_logreg", c_points=3, max_iter=5, n_jobs=1)
    base = train_head(synthetic_store(tmp_path / "demo.h5", "demo", separation=0.3), config)
    tuned = train_head(synthetic_store(tmp_path / "ft.h5", "demo_ft", separation=3.0, seed=1), config)
    result = verdict([base.save(tmp_path / "demo__sgd_logreg.skops"), tuned.save(tmp_path / "demo_ft__sgd.skops")])

    def swept(head):  # the chosen C's validation accuracy, fitted on train alone
        return min(head.sweep, key=lambda point: abs(point["C"] - head.C))["val_accuracy"]

    assert result["candidates"]["demo__sgd_logreg"]["val"] == pytest.approx(swept(base))
    assert result["candidates"]["demo_ft__sgd_logreg"]["val"] == pytest.approx(swept(tuned))
    deployed = result["deployed"]
    assert not deployed["test"]["paired"] and deployed["n"] == 60  # no per-item answers: the optimistic pairing
    assert deployed["name"] == ("demo_ft__sgd_logreg" if deployed["test"]["beats"] else "demo__sgd_logreg")


def test_deployed_model_ships_exactly_the_file_the_verdict_measured(tmp_path, cache_only_heads):
    from featurestore.transfer.best import write_verdict

    out = tmp_path / "verdict" / "verdict.json"
    out.parent.mkdir()
    write_verdict(verdict(list(cache_only_heads.values()), relative_to=out.parent), out)
    record = json.loads((out.parent / "deployed.json").read_text())
    assert record["file"] == "../heads/demo__logreg.skops" and record["model"] == "encoder"
    assert deployed_model(out) == deployed_model(out.parent / "deployed.json") == cache_only_heads["logreg"]
    retrained = train_head(FeatureStore(tmp_path / "features" / "demo.h5"), replace(HEADS["logreg"], c_points=3))
    retrained.save(cache_only_heads["logreg"])  # the head changed after the verdict: it was not measured
    with pytest.raises(FeaturestoreError, match="has changed since the verdict"):
        deployed_model(out)
    cache_only_heads["logreg"].unlink()
    with pytest.raises(FeaturestoreError, match="is not there"):
        deployed_model(out)
    (tmp_path / "old.json").write_text(json.dumps({"deployed": {"model": "encoder", "name": "x", "file": None}}))
    with pytest.raises(FeaturestoreError, match="names no deployed model file"):
        deployed_model(tmp_path / "old.json")


def finetuned_heads_then_verdict(backbone: str, cache_only: dict, finetune_dir, root, data=None) -> dict:
    """What the pipeline runs after its finetune stage: one ``train_head_ft`` stage per head (into
    ``root/finetune_heads/<backbone>__<head>/``), then the verdict stage (into ``root/verdict/<backbone>``)."""
    folders = []
    for name, config in HEADS.items():
        folder = root / "finetune_heads" / f"{backbone}__{name}"
        train_finetuned_head(config, finetune_dir, folder)
        folders.append(folder)
    return run_verdict_stage(list(cache_only.values()), finetune_dir, folders, root / "verdict" / backbone, data)


def test_the_fine_tuned_heads_are_candidates_of_the_verdict_stage(tmp_path, cache_only_heads, monkeypatch):
    """The stages with fine-tuning and extraction replaced by stand-ins (the slow test below runs the real ones):
    a fine-tuned network that clearly wins, whose features are better for logreg and worse for linear_svm."""
    val = FeatureStore(tmp_path / "features" / "demo.h5")
    truth = val.labels("val")

    def finetune(head, data, out, config, **options):
        rng = np.random.default_rng(0)
        start = np.where(rng.random(len(truth)) < 0.6, truth, (truth + 1) % 3)
        epochs = np.repeat(np.where(rng.random(len(truth)) < 0.9, truth, start)[None], 3, axis=0)
        result = result_with(truth, start, epochs)
        return types.SimpleNamespace(**vars(result), cache_seconds=0.0, train_ids=["a", "b"])

    def adopt(backbone, out, data, extract_options, progress, store=None):
        return synthetic_store(out / "features.h5", f"{backbone}_ft", separation=3.0, seed=1)

    monkeypatch.setitem(sys.modules, "featurestore.transfer.finetune", types.SimpleNamespace(finetune=finetune))
    monkeypatch.setattr(decision_module, "adopt_finetuned", adopt)
    out = tmp_path / "finetune" / "demo"
    decision = run_finetune_stage("demo", cache_only_heads["logreg"], tmp_path / "data", out, PLATEAUED)
    written = json.loads((out / "decision.json").read_text())
    assert written == json.loads(json.dumps(decision)) and written["chosen"] == "finetuned"
    assert "deployed" not in written  # the verdict is a stage of its own
    verdict = finetuned_heads_then_verdict("demo", cache_only_heads, out, tmp_path)
    deployed = verdict["deployed"]
    assert deployed["incumbent"] == "demo_ft__logreg"  # the kept fine-tune's logreg: it passed the rule already
    assert set(verdict["candidates"]) == {"demo__logreg", "demo__linear_svm", "demo_ft__logreg",
                                          "demo_ft__linear_svm"}
    assert deployed["name"] == "demo_ft__logreg"
    assert deployed["file"] == "../../finetune_heads/demo__logreg/demo_ft__logreg.skops"
    assert verdict["candidates"]["demo__logreg"]["file"] == "../../heads/demo__logreg.skops"
    record = tmp_path / "verdict" / "demo" / "deployed.json"
    assert deployed_model(record) == tmp_path / "finetune_heads" / "demo__logreg" / "demo_ft__logreg.skops"
    # the fine-tune dropped since: its heads' stages train nothing, and the verdict weighs the cache-only heads
    written["chosen"] = "probe"
    (out / "decision.json").write_text(json.dumps(written))
    again = finetuned_heads_then_verdict("demo", cache_only_heads, out, tmp_path)
    assert set(again["candidates"]) == {"demo__logreg", "demo__linear_svm"}
    assert not list((tmp_path / "finetune_heads").glob("*/*.skops"))
    assert json.loads((tmp_path / "finetune_heads" / "demo__logreg" / "status.json").read_text())["trained"] is False


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
        folder = project / "data" / "finetune_heads" / f"efficientnet_lite0__{name}"
        return folder / f"efficientnet_lite0_ft__{name}.skops"

    def stage(plateau, mode, stage_config=config):
        decision = run_finetune_stage("efficientnet_lite0", head_path, data, out, plateau,
                                      FinetuneStageOptions(mode=mode, config=stage_config, extract=options,
                                                           device="cpu"))
        verdict = finetuned_heads_then_verdict("efficientnet_lite0", cache_only, out, project / "data", data)
        return decision, verdict["deployed"], deployed_model(project / "data" / "verdict" / "efficientnet_lite0" /
                                                              "deployed.json")

    skipped, deployed, shipped = stage(RISING, "auto")  # skips: the curve still rises
    assert not skipped["finetuned"] and skipped["chosen"] == "probe" and not (out / "weights.pth").exists()
    assert json.loads((out / "decision.json").read_text())["reason"] == "still rising"
    assert deployed["incumbent"] == "efficientnet_lite0__logreg"
    assert shipped == heads_dir / f"{deployed['name']}.skops"  # a cache-only head either way

    ran, deployed, shipped = stage(RISING, "always")  # fine-tunes, and chooses by the rule, on an unhandicapped probe
    assert ran["finetuned"] and ran["reason"] == "mode is always" and (out / "weights.pth").is_file()
    choice = ran["choice"]
    assert choice["rule"] == "max_gain" and choice["gain"]["candidates"] == ran["result"]["epochs_run"]
    assert choice["gain"]["n"] == 50 and choice["val_probe"] == ran["result"]["start_val_accuracy"]
    assert ran["chosen"] == choice["chosen"] == ("finetuned" if choice["gain"]["p_value"] < ALPHA else "probe")
    assert (out / "trunk.h5").is_file()  # kept: the next run reuses it
    if ran["chosen"] == "finetuned":  # the fine-tuned logreg is the incumbent, every head on both backbones challenges
        assert FeatureStore(out / "features.h5").fingerprint["backbone"] == "efficientnet_lite0_ft"
        assert deployed["incumbent"] == "efficientnet_lite0_ft__logreg"
        assert all(finetuned_head(name).is_file() for name in HEADS)
    else:  # the cache-only heads alone; the fine-tuned network was not adopted
        assert not any(finetuned_head(name).exists() for name in HEADS) and not (out / "features.h5").exists()
        assert deployed["incumbent"] == "efficientnet_lite0__logreg"
    assert deployed["n"] == 50 and shipped.is_file()
    assert shipped in {*cache_only.values(), *(finetuned_head(name) for name in HEADS)}

    never, deployed, shipped = stage(PLATEAUED, "never", replace(config, epochs=1))
    assert never["chosen"] == "probe" and not (out / "backbone.json").exists()
    assert not any(finetuned_head(name).exists() for name in HEADS) and shipped in set(cache_only.values())


def test_the_stage_options_resolve_the_params_sections_once():
    import yaml

    params = yaml.safe_load(open("params.yaml"))
    text = FinetuneStageOptions.from_params(params["finetune"]["minilm_l6"],
                                            {**params["extract"]["minilm_l6"], "weights": "w.pt"})
    assert text.methods == ("probe_finetune", "setfit") and text.setfit.iterations == 20
    assert text.weights == "w.pt" and "weights" not in text.extract and "on_error" not in text.extract
    assert text.config.unfreeze_blocks == 2 and text.mode == "auto"
    image = FinetuneStageOptions.from_params(params["finetune"]["efficientnet_lite0"],
                                             params["extract"]["efficientnet_lite0"])
    assert image.methods == ("probe_finetune",) and image.extract["image_size"] == 112
    with pytest.raises(FeaturestoreError, match="mode"):
        FinetuneStageOptions(mode="sometimes")
