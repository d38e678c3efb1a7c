"""The statistics behind the plateau rule and the fine-tune decision (featurestore.transfer.stats)."""

import tracemalloc

import numpy as np
import pytest
from scipy.stats import binom

from featurestore.transfer.stats import max_gain_test, paired_gain, sign_test


def unchunked_paired_gain(before, after, level=0.9, seed=0, samples=2000):
    """paired_gain as it was before its memory was bounded: one (samples, N) index array."""
    difference = np.asarray(after, dtype=np.int8) - np.asarray(before, dtype=np.int8)
    rng = np.random.default_rng(seed)
    resampled = difference[rng.integers(0, len(difference), (samples, len(difference)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return round(float(low), 6), round(float(high), 6)


@pytest.mark.parametrize("n, block_elements", [(1001, 3000), (500, 1000), (7, 10), (5000, 1_000_000)])
def test_paired_gain_in_blocks_gives_the_interval_of_one_draw(n, block_elements):
    rng = np.random.default_rng(n)
    before = rng.random(n) < 0.8
    after = np.where(rng.random(n) < 0.1, ~before, before)
    gain = paired_gain(before, after, level=0.8, seed=3, block_elements=block_elements)
    assert (gain["low"], gain["high"]) == unchunked_paired_gain(before, after, level=0.8, seed=3)


def test_paired_gain_on_100k_images_stays_under_200_mb():
    rng = np.random.default_rng(0)
    before = rng.random(100_000) < 0.8
    after = np.where(rng.random(100_000) < 0.05, ~before, before)
    tracemalloc.start()
    try:
        gain = paired_gain(before, after, level=0.8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB"  # one (2000, 100k) int64 draw alone is 1.6 GB
    assert gain["low"] < gain["gain"] < gain["high"] and gain["n"] == 100_000


@pytest.mark.parametrize("fixes, breaks", [(3, 0), (0, 4), (25, 10), (29, 14), (6, 3), (700, 620), (1, 1)])
def test_sign_test_is_the_exact_binomial_tail(fixes, breaks):
    assert sign_test(fixes, breaks) == pytest.approx(binom.sf(fixes - 1, fixes + breaks, 0.5), rel=1e-9, abs=1e-15)


def test_max_gain_test_of_three_fixes_and_no_break_is_one_in_eight():
    probe = np.arange(500) % 5 != 0
    epochs = np.repeat(probe[None], 12, axis=0)
    epochs[6, np.flatnonzero(~probe)[:3]] = True  # epoch 7 fixes 3 images, breaks none
    test = max_gain_test(probe, epochs)
    assert test["epoch"] == 7 and test["fixes"] == 3 and test["breaks"] == 0
    assert test["p_value"] == 0.125 and test["randomisations"] == 8  # all 2^3 sign patterns: exact


def test_max_gain_test_of_one_candidate_is_the_sign_test():
    rng = np.random.default_rng(1)
    probe = rng.random(500) < 0.8
    epoch = probe.copy()
    epoch[np.flatnonzero(~probe)[:25]] = True
    epoch[np.flatnonzero(probe)[:10]] = False
    test = max_gain_test(probe, epoch[None], randomisations=20_000)
    assert test["gain"] == pytest.approx(15 / 500) and test["disagreements"] == 35
    assert test["p_value"] == pytest.approx(sign_test(25, 10), abs=0.003)


def test_max_gain_test_charges_for_choosing_among_different_epochs_not_among_copies():
    rng = np.random.default_rng(2)
    probe = rng.random(500) < 0.8
    best = probe.copy()
    best[np.flatnonzero(~probe)[:20]] = True
    best[np.flatnonzero(probe)[:8]] = False
    alone = max_gain_test(probe, best[None])["p_value"]
    copies = max_gain_test(probe, np.repeat(best[None], 12, axis=0))["p_value"]
    assert copies == alone  # twelve identical epochs are one choice
    others = np.where(rng.random((11, 500)) < 0.04, ~probe, probe)  # eleven epochs of noise around the probe
    chosen_among = max_gain_test(probe, np.concatenate([best[None], others]))
    assert chosen_among["epoch"] == 1 and chosen_among["p_value"] > alone


def test_max_gain_test_without_a_better_epoch_keeps_the_reference():
    probe = np.arange(100) % 2 == 0
    worse = probe.copy()
    worse[:10] = False
    test = max_gain_test(probe, np.stack([probe, worse]))
    assert test["epoch"] == 0 and test["p_value"] == 1.0 and test["gain"] == 0


def test_stats_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="equal"):
        paired_gain(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="candidate"):
        max_gain_test(np.ones(3, bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="counts"):
        sign_test(-1, 2)
