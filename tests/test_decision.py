"""The fine-tune stage: fine-tune only when the rule says so, keep the result only when it beats the probe by
more than the validation noise, and then deploy it downstream."""

import json
from dataclasses import replace

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import FinetuneConfig, HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.deploy.deployment import deployed_head
from featurestore.errors import FeaturestoreError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.transfer.decision import choose, run_finetune_stage, should_finetune
from featurestore.transfer.training import TrainResult

PLATEAUED = {"plateaued": True, "reason": "flat"}
RISING = {"plateaued": False, "reason": "still rising"}


def result_with(truth, start, best):
    return TrainResult(best_val_accuracy=float(np.mean(np.array(best) == truth)),
                       start_val_accuracy=float(np.mean(np.array(start) == truth)), epochs_run=3, steps=9,
                       stopped_early=False, val_labels=list(truth), start_val_predictions=list(start),
                       best_val_predictions=list(best))


def test_the_mode_rule():
    assert should_finetune("auto", PLATEAUED) == (True, "flat")
    assert should_finetune("auto", RISING) == (False, "still rising")
    assert should_finetune("always", RISING)[0] and not should_finetune("never", PLATEAUED)[0]
    with pytest.raises(FeaturestoreError, match="auto, always, never"):
        should_finetune("sometimes", RISING)


def test_the_finetuned_network_is_chosen_only_beyond_the_noise():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 500)
    start = np.where(rng.random(500) < 0.8, truth, (truth + 1) % 10)
    clearly_better = np.where(rng.random(500) < 0.5, truth, start)  # fixes about half of the probe's mistakes
    decision = choose(result_with(truth, start, clearly_better))
    assert decision["chosen"] == "finetuned" and decision["gain"]["low"] > 0
    slightly = start.copy()
    wrong = np.flatnonzero(start != truth)
    slightly[wrong[:6]] = truth[wrong[:6]]
    slightly[np.flatnonzero(start == truth)[:3]] = (truth[np.flatnonzero(start == truth)[:3]] + 1) % 10
    decision = choose(result_with(truth, start, slightly))  # +3 images of 500: within the noise
    assert decision["chosen"] == "probe" and decision["gain"]["gain"] == pytest.approx(0.006)
    assert decision["gain"]["low"] <= 0 and "does not beat" in decision["reason"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project layout: 10 train and 5 val images per class at 32 px, where the probe (C = 1e-6) is
    weak (val 0.58) and six epochs of fine-tuning reach 0.70: a gain beyond the validation noise."""
    root = tmp_path_factory.mktemp("project")
    data = root / "data" / "prepared"
    prepare_fashion_mnist(data, labels_per_class=10, val_per_class=5, test_per_class=2, seed=3, progress=False)
    store = root / "data" / "features" / "efficientnet_lite0.h5"
    extract_features(data, store, "efficientnet_lite0", image_size=32, crop_pct=1.0, workers=0, progress=False)
    head = train_head(store, HeadConfig(c_min=1e-6, c_max=1e-6, c_points=1, n_jobs=1))
    head.save(root / "data" / "heads" / "efficientnet_lite0__logreg.skops")
    return root


@pytest.mark.slow
def test_the_stage_skips_fine_tunes_chooses_and_deploys(project):
    out = project / "data" / "finetune" / "efficientnet_lite0"
    head_path = project / "data" / "heads" / "efficientnet_lite0__logreg.skops"
    data = project / "data" / "prepared"
    heads = {"logreg": HeadConfig(c_points=3, n_jobs=1)}
    options = {"image_size": 32, "crop_pct": 1.0, "workers": 0}
    config = FinetuneConfig(unfreeze_blocks=2, epochs=6, head_lr=1e-3, backbone_lr_factor=1.0, batch_size=16,
                            workers=0)

    finetuned_head = out / "heads" / "efficientnet_lite0_ft__logreg.skops"

    def deployed():
        return deployed_head(out / "decision.json", head_path, finetuned_head)

    skipped = run_finetune_stage("efficientnet_lite0", head_path, data, out, RISING, "auto", config, heads, options,
                                 device="cpu")
    assert not skipped["finetuned"] and skipped["chosen"] == "probe"
    assert json.loads((out / "decision.json").read_text())["reason"] == "still rising"
    assert deployed() == head_path

    chosen = run_finetune_stage("efficientnet_lite0", head_path, data, out, RISING, "always", config, heads,
                                options, device="cpu")
    assert chosen["finetuned"] and chosen["chosen"] == "finetuned", chosen["choice"]["reason"]
    assert chosen["reason"] == "mode is always"
    assert chosen["choice"]["val_finetuned"] > chosen["choice"]["val_probe"] and chosen["choice"]["gain"]["low"] > 0
    ft_store = FeatureStore(out / "features.h5")
    assert ft_store.fingerprint["backbone"] == "efficientnet_lite0_ft"
    assert deployed() == finetuned_head
    assert (out / "trunk.h5").is_file()  # kept: the next run reuses it

    never = run_finetune_stage("efficientnet_lite0", head_path, data, out, PLATEAUED, "never",
                               replace(config, epochs=1), heads, options, device="cpu")
    assert never["chosen"] == "probe" and not (out / "heads").exists() and not (out / "backbone.json").exists()
    assert deployed() == head_path
