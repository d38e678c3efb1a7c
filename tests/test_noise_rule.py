"""Every choice between models uses one noise-aware rule (issue 25): a candidate replaces the incumbent only when its
lead on the validation items is beyond the noise of the split and the choice among the candidates
(``stats.beats_incumbent``), and a split too small to tell models apart is named in a warning. The plateau rule does
not call a plateau on a split too small to show one."""

import json
import logging

import numpy as np
import pytest

from featurestore.transfer.best import best_on_validation
from featurestore.transfer.plateau import PlateauRule, verdict

ENCODER_18 = {"demo__logreg": {"val": 17 / 18, "n": 18}}  # the user's case: 0.944 against 1.000 on 18 items
HYBRID_18 = {"demo__hybrid": {"val": 1.0, "n": 18, "kind": "hybrid", "file": "hybrid.skops"}}


def answers(n, right):
    """(n,) bool: the items in ``right`` (indices) answered right."""
    out = np.zeros(n, dtype=bool)
    out[list(right)] = True
    return out


def test_a_one_item_lead_on_18_items_deploys_nothing_new_and_a_warning_names_the_size(caplog):
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        figures_only = best_on_validation(ENCODER_18, HYBRID_18)
    assert figures_only["model"] == "encoder" and figures_only["name"] == "demo__logreg"
    assert "18 items" in figures_only["warning"] and "18 items" in caplog.text
    assert figures_only["test"]["paired"] is False and figures_only["test"]["p_value"] == 0.5  # 1 fix: p = 1/2
    # the same with the per-item answers: the hybrid head fixes item 0, breaks nothing
    correct = {"demo__logreg": answers(18, range(1, 18)), "demo__hybrid": answers(18, range(18))}
    paired = best_on_validation(ENCODER_18, HYBRID_18, correct)
    assert paired["model"] == "encoder" and paired["test"]["paired"] is True
    assert paired["test"]["fixes"] == 1 and paired["test"]["breaks"] == 0 and not paired["test"]["beats"]
    assert "18 items" in paired["warning"] and "within the noise" in paired["reason"]
    json.dumps(paired)  # it goes to decision.json as is


def test_a_lead_beyond_the_noise_is_deployed_and_a_large_split_gives_no_warning():
    # 18 items: 5 fixes and no break is the least that counts (p = 1/32); 4 is not (1/16)
    encoder = {"demo__logreg": {"val": 13 / 18, "n": 18}}
    hybrid = {"demo__hybrid": {**HYBRID_18["demo__hybrid"], "val": 1.0}}
    five = best_on_validation(encoder, hybrid, {"demo__logreg": answers(18, range(5, 18)),
                                                "demo__hybrid": answers(18, range(18))})
    assert five["model"] == "hybrid" and five["test"]["p_value"] == pytest.approx(1 / 32)
    assert "18 items" in five["warning"]
    four = best_on_validation({"demo__logreg": {"val": 14 / 18, "n": 18}}, hybrid)
    assert four["model"] == "encoder" and four["test"]["p_value"] == pytest.approx(1 / 16)
    # 500 items: 12 fixed, 2 broken is beyond the noise, 3 fixed and none broken is not; no warning either way
    rng = np.random.default_rng(0)
    incumbent = rng.random(500) < 0.8
    better = incumbent.copy()
    better[np.flatnonzero(~incumbent)[:12]] = True
    better[np.flatnonzero(incumbent)[:2]] = False
    slightly = incumbent.copy()
    slightly[np.flatnonzero(~incumbent)[:3]] = True
    encoder = {"demo__logreg": {"val": float(incumbent.mean()), "n": 500}}
    for candidate, deployed in ((better, "baseline"), (slightly, "encoder")):
        others = {"demo__tfidf_logreg": {"val": float(candidate.mean()), "n": 500, "kind": "baseline",
                                         "file": "baseline.skops"}}
        result = best_on_validation(encoder, others, {"demo__logreg": incumbent, "demo__tfidf_logreg": candidate})
        assert result["model"] == deployed and result["warning"] is None and result["n"] == 500


def test_the_rule_pays_for_choosing_the_best_of_several_candidates():
    """A baseline and a hybrid head that each fix 5 different items of 18: alone either would count (p = 1/32), but
    picking the better of two that disagree is luckier than one, and the rule charges for it."""
    from featurestore.transfer.stats import beats_incumbent

    incumbent = answers(18, range(10, 18))
    baseline, hybrid = answers(18, [*range(5), *range(10, 18)]), answers(18, range(5, 18))
    assert beats_incumbent(incumbent, baseline[None])["beats"]
    both = beats_incumbent(incumbent, np.stack([baseline, hybrid]))
    assert not both["beats"] and both["p_value"] >= 0.05
    encoder = {"e": {"val": float(incumbent.mean()), "n": 18}}
    others = {"b": {"val": float(baseline.mean()), "n": 18, "kind": "baseline"},
              "h": {"val": float(hybrid.mean()), "n": 18, "kind": "hybrid"}}
    assert best_on_validation(encoder, others, {"e": incumbent, "b": baseline, "h": hybrid})["model"] == "encoder"


def test_the_least_lead_that_counts_and_the_size_that_warns_come_from_the_rule():
    from featurestore.transfer.stats import max_gain_test, min_detectable_lead, split_too_small

    lead = min_detectable_lead(0.05)
    assert lead == 5
    for k, passes in ((lead, True), (lead - 1, False)):  # k fixes, no break: the most favourable case
        assert (max_gain_test(np.zeros(k, bool), np.ones((1, k), bool))["p_value"] < 0.05) is passes
    assert split_too_small(100) is None and "99 items" in split_too_small(99)
    assert "the validation split has 18 items" in split_too_small(18)


def test_fine_tunings_choice_carries_the_same_rule_and_warning():
    from featurestore.transfer.decision import choose

    from .test_decision import result_with

    truth = np.arange(18) % 3
    start = np.where(np.arange(18) == 0, (truth + 1) % 3, truth)  # the probe misses item 0
    decision = choose(result_with(truth, start, truth[None]))  # one epoch that fixes it
    assert decision["chosen"] == "probe" and decision["gain"]["fixes"] == 1 and not decision["gain"]["beats"]
    assert "18 items" in decision["warning"]


# -- the plateau rule ---------------------------------------------------------------------------------------------

def curve(*budgets):
    return [{"labels_per_class": b, "val_accuracy": 0.0} for b in budgets]


def test_one_lost_image_of_18_is_not_a_plateau_and_the_warning_names_the_size(caplog):
    before = answers(18, range(18))
    after = answers(18, range(1, 18))  # the larger budget loses one image: -0.056, interval [-0.11, 0]
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        result = verdict(curve(50, 100), [before, after], PlateauRule(budgets=(50, 100)))
    assert result["gain"] == pytest.approx(-1 / 18, abs=1e-6) and result["interval"][1] <= 0
    assert not result["plateaued"] and "18 images" in result["warning"] and "18 images" in caplog.text
    assert "may still pay" in result["reason"]


def test_a_plateau_needs_the_split_that_can_show_one():
    from featurestore.transfer.plateau import smallest_split

    rule = PlateauRule(budgets=(50, 100))
    assert smallest_split(rule) == 230  # 1 - 0.1 ** (1 / n) < 0.01 from n = 230
    for n, plateaued in ((230, True), (229, False)):  # two probes that agree on every image
        same = np.ones(n, dtype=bool)
        result = verdict(curve(50, 100), [same, same], rule)
        assert result["plateaued"] is plateaued and (result["warning"] is None) is plateaued


# -- through the real stage: the pixel baseline against a Lite0 head on 10 validation images ---------------------

def test_the_verdict_stage_tests_the_per_item_answers_of_train_only_fits(fashion_folder_master, lite0_small, tmp_path,
                                                                  caplog):
    from featurestore import FeatureStore
    from featurestore.configs import HeadConfig
    from featurestore.extract import extract_features
    from featurestore.heads import train_head
    from featurestore.heads.head import load_head
    from featurestore.transfer.best import run_challenger_stage, run_verdict_stage, val_answers

    store = tmp_path / "features" / "efficientnet_lite0.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    head = train_head(store, HeadConfig(c_points=4, n_jobs=1)).save(tmp_path / "heads" / "lite0__logreg.skops")
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        run_challenger_stage("baseline", "efficientnet_lite0", store, tmp_path / "baseline", fashion_folder_master)
        added = run_verdict_stage([head], None, [tmp_path / "baseline"], tmp_path / "verdict", fashion_folder_master)
    deployed, test = added["deployed"], added["deployed"]["test"]
    assert test["paired"] is True and test["n"] == 10 and test["candidates"] == 1
    # the paired answers are those of train-only fits: the baseline's give its own figure, the head's a fresh fit's
    # (the sweep's warm-started figure may differ at a degenerate C), and the test reports what it saw
    _, n, incumbent = val_answers("encoder", load_head(head), head)
    assert n == 10 and len(incumbent) == 10
    assert test["incumbent_val"] == pytest.approx(np.mean(list(incumbent.values())))
    assert FeatureStore(store).count("val") == 10
    assert test["candidate_val"] == pytest.approx(deployed["baseline_val"], abs=1e-6)
    assert deployed["model"] == ("baseline" if test["beats"] else "encoder") and not test["beats"]  # 10 items
    assert "the validation split has 10 items" in deployed["warning"] and "10 items" in caplog.text
    json.dumps(added)
