"""Which keep-or-discard rule for fine-tuning: how often each candidate is fooled by noise, and how often it keeps
a real gain (issue 17). The result is ``decision.RULE`` and ``decision.ALPHA``.

    python benchmarks/decision_rule.py [--seeds 1000] [--n 500] [--epochs 12] [--alpha 0.05]

A simulation on per-image correctness (numpy only, seeded; 1,000 seeds took 12 minutes on this 2-core machine
while other jobs ran). The probe is right on each of ``--n`` validation images with probability 0.80;
fine-tuning gives ``--epochs`` epochs (a gain scenario's trajectory sets its own), and each rule sees the probe's
and every epoch's correctness, as ``decision.choose`` does (the epoch kept is the best on validation).

Scenarios. An epoch's answer on an image differs from the probe's by flips drawn from a per-image uniform that
is redrawn each epoch with probability ``churn`` (1: independent epochs; 0.3: a trajectory that changes slowly,
about 30% of the images' draws renewed per epoch).

- ``zero-mean``: fine-tuning is the probe plus noise that breaks a right answer with probability ``a`` and
  fixes a wrong one with ``4a`` (equal expected counts at 0.80): ``a`` = 0.02 (about 8 breaks and 8 fixes an
  epoch on 500 images) and 0.05 (20 and 20).
- ``random-class``: each answer replaced by a uniformly random class (10 classes) with probability ``q`` = 0.1:
  breaks 9 of 10 replaced right answers, fixes 1 of 10 replaced wrong ones (a loss on average).
- ``+3``: a real gain with the zero-mean noise above on top: at full strength it breaks 3.5% of the right
  answers (14 of 400) and fixes enough wrong ones for an expected +3.0 points (about 29 fixes: 43 disagreements
  on 500 images before the noise, the plateau demo's share: 174 of 2,000 for +4.6). Trajectories
  (``PROFILES``): ``ramp``, whole from epoch 3 (a third after epoch 1); ``short dip``, -2 then -1 points at
  epochs 1-2, whole at 5; ``long dip``, -3, -3, -2, -1 points, whole at 8; ``peak, decline``, whole at epochs
  3-4, then overfitting back towards the probe, stopped at epoch 8 (patience 4).

Rules (each returns keep fine-tuning / keep the probe; alpha 0.05 unless named):

- ``bootstrap80`` (the rule until issue 17): lower bound of the 80% paired bootstrap interval of the best
  epoch's gain > 0 (``stats.paired_gain``).
- ``sign_best``: exact one-sided sign test on the best epoch's disagreements, p < alpha (no account of the
  choice of the epoch).
- ``sign_bonferroni``: the same with p × epochs < alpha.
- ``split_half``: the epoch chosen on a random half of val, the exact sign test (p < alpha) on the other half.
- ``max_gain``: the sign-flip randomisation test of the maximum gain over the epochs (``stats.max_gain_test``,
  2,000 randomisations), p < alpha: the selection of the best epoch is repeated inside the test.
- ``max_studentized``: the same over each epoch's gain divided by the root of its disagreements.
- ``mean_gain``: the sign-flip test of the mean gain over all epochs (no selection to pay for).

The chosen rule keeps the probe in at least 95% of the seeds of every noise scenario, also at the one-sided 95%
upper bound of the measured rate (so that a 100-seed test passes without luck), keeps the probe when the best
epoch fixes 3 of 500 images and breaks none, and keeps the +3-point gain most often in the worst trajectory (its
shape is not known in advance), the mean breaking ties. The run of 1,000 seeds (percent of seeds; ``MAX`` is
``max_gain`` at 0.05, ``max25`` at 0.025, ``mean25`` ``mean_gain`` at 0.025):

% of seeds                           boot80   sign   bonf  split maxstu   mean mean25    MAX  max40  max30  max25
probe kept, zero-mean a=.02 indep      38.9   73.6   97.6   98.3   95.3   96.6   98.9   96.9   97.6   97.9   98.5
probe kept, zero-mean a=.02 corr       58.3   82.1   98.7   98.0   97.4   95.7   98.0   98.1   98.4   98.7   98.8
probe kept, zero-mean a=.05 indep      41.4   69.7   96.8   96.8   95.5   95.6   98.1   96.5   97.1   97.7   98.3
probe kept, zero-mean a=.05 corr       59.7   79.2   98.4   97.5   96.2   96.4   98.4   96.8   97.8   98.5   98.8
probe kept, random-class q=.1 indep   100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0
probe kept, random-class q=.1 corr    100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0  100.0
ft kept, +3, ramp, .02 corr            99.1   96.0   66.2   34.3   77.6   86.8   78.8   76.3   73.4   68.9   65.1
ft kept, +3, ramp, .02 indep           99.9   99.2   76.2   33.6   83.9   96.7   94.3   82.6   79.2   75.3   71.5
ft kept, +3, ramp, .05 corr            96.4   89.2   49.8   25.6   61.7   72.1   59.6   61.3   56.8   50.9   48.5
ft kept, +3, short dip, .02 corr       98.5   94.9   60.6   33.1   72.8   75.4   62.7   74.2   70.7   65.5   62.6
ft kept, +3, long dip, .02 corr        97.1   90.5   50.6   31.5   62.0   33.8   22.1   68.6   64.4   59.3   55.6
ft kept, +3, peak+decline, .02 corr    92.2   79.9   40.4   27.9   52.7   61.6   49.2   58.5   54.5   49.2   46.6
fixes 3 of 500, breaks none              ft  probe  probe  probe  probe  probe  probe  probe  probe  probe  probe
gains kept, worst scenario             92.2   79.9   40.4   25.6   52.7   33.8   22.1   58.5   54.5   49.2   46.6
gains kept, mean                       97.2   91.6   57.3   31.0   68.5   71.1   61.1   70.2   66.5   61.5   58.3

chosen: max_gain, alpha 0.05 (worst trajectory 58.5%, mean 70.2%; probe kept in 96.5-98.1% under zero-mean noise).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from featurestore.transfer.stats import max_gain_test, paired_gain, sign_test

PROBE_ACCURACY = 0.80
CLASSES = 10
# Per epoch: (share of the full gain, points lost to a dip below the probe).
PROFILES = {
    "ramp": [(min(1.0, e / 3), 0.0) for e in range(1, 13)],  # whole from epoch 3, for 12 epochs
    # -2 then -1 points at epochs 1-2, the gain whole at epoch 5; the long dip: -3, -3, -2, -1, whole at epoch 8.
    "short dip": [(min(1.0, max(0.0, (e - 1) / 4)), max(0.0, 3.0 - e)) for e in range(1, 13)],
    "long dip": [(min(1.0, max(0.0, (e - 3) / 5)), [3, 3, 2, 1][e - 1] if e <= 4 else 0.0) for e in range(1, 13)],
    # Peaks at epochs 3-4, then overfits back towards the probe; early stopping (patience 4) ends it at epoch 8.
    "peak, decline": [(f, 0.0) for f in (1 / 3, 2 / 3, 1, 1, 0.7, 0.5, 0.3, 0.2)],
}
REQUIRED_PROBE_KEPT = 0.95


def flips(rng: np.random.Generator, n: int, epochs: int, churn: float, probability) -> np.ndarray:
    """(E, N) bool: whether epoch e flips image i, for ``probability(e)`` (N,) per-image flip probabilities;
    each image's uniform is redrawn each epoch with probability ``churn`` (all drawn at epoch 1)."""
    uniform = rng.random(n)
    out = np.empty((epochs, n), dtype=bool)
    for e in range(epochs):
        if e:
            renew = rng.random(n) < churn
            uniform[renew] = rng.random(int(renew.sum()))
        out[e] = uniform < probability(e + 1)
    return out


def zero_mean(a: float) -> tuple[float, float]:
    """(break, fix) probabilities with equal expected counts at the probe's accuracy."""
    return a, a * PROBE_ACCURACY / (1 - PROBE_ACCURACY)


def simulate(rng: np.random.Generator, n: int, epochs: int, scenario: dict) -> tuple[np.ndarray, np.ndarray]:
    """(probe correctness (N,) bool, epochs' correctness (E, N) bool) of one seed of ``scenario``; a gain
    scenario's ``profile`` sets its number of epochs."""
    probe = rng.random(n) < PROBE_ACCURACY
    churn = scenario["churn"]
    if scenario["kind"] == "random-class":
        q = scenario["q"]
        breaks, fixes = q * (1 - 1 / CLASSES), q / CLASSES
    else:
        breaks, fixes = zero_mean(scenario.get("noise", 0.0))
    profile = PROFILES[scenario["profile"]] if scenario["kind"] == "gain" else None
    epochs = len(profile) if profile else epochs
    per_image = np.where(probe, breaks, fixes)
    noise = flips(rng, n, epochs, churn, lambda e: per_image)
    if profile is None:
        return probe, probe ^ noise
    # The target: break rate a_g, fix rate b_g such that, with the noise on top (a flip of a flip undoes it), the
    # expected gain at full strength is scenario["gain"]: 0.2 b_g (1 - 2 fixes) - 0.8 a_g (1 - 2 breaks), for b_g.
    a_g = scenario["breaks"]
    b_g = (scenario["gain"] + PROBE_ACCURACY * a_g * (1 - 2 * breaks)) / ((1 - PROBE_ACCURACY) * (1 - 2 * fixes))
    target = np.where(probe, a_g, b_g)
    change = flips(rng, n, epochs, churn, lambda e: target * profile[e - 1][0])
    # A dip below the probe: that many points of right answers broken (on top of the rest).
    dip = flips(rng, n, epochs, churn, lambda e: np.where(probe, profile[e - 1][1] / 100 / PROBE_ACCURACY, 0.0))
    return probe, probe ^ change ^ noise ^ dip


def best_epoch(probe: np.ndarray, epochs: np.ndarray) -> int:
    """0-based index of the first epoch with the most right answers, or -1 when none beats the probe."""
    right = epochs.sum(axis=1)
    best = int(np.argmax(right))
    return best if right[best] > probe.sum() else -1


def bootstrap80(probe, epochs, alpha, seed):
    best = best_epoch(probe, epochs)
    return best >= 0 and paired_gain(probe, epochs[best], level=0.8, seed=seed)["low"] > 0


def _sign(probe, epoch) -> float:
    return sign_test(int((epoch & ~probe).sum()), int((probe & ~epoch).sum()))


def sign_best(probe, epochs, alpha, seed):
    best = best_epoch(probe, epochs)
    return best >= 0 and _sign(probe, epochs[best]) < alpha


def sign_bonferroni(probe, epochs, alpha, seed):
    best = best_epoch(probe, epochs)
    return best >= 0 and _sign(probe, epochs[best]) * len(epochs) < alpha


def split_half(probe, epochs, alpha, seed):
    half = np.random.default_rng(seed).permutation(len(probe)) < len(probe) // 2
    best = best_epoch(probe[half], epochs[:, half])
    return best >= 0 and _sign(probe[~half], epochs[best, ~half]) < alpha


def max_gain(probe, epochs, alpha, seed):
    return max_gain_test(probe, epochs, seed=seed)["p_value"] < alpha


def _sign_flip(probe, epochs, seed, statistic, randomisations=2000) -> float:
    """p-value of ``statistic`` ((R, E) signed sums, (M, E) differences → (R,)) under whole-image sign flips."""
    d = (epochs.astype(np.int8) - probe.astype(np.int8))[:, np.any(epochs != probe, axis=0)].T.astype(np.float32)
    if not len(d):
        return 1.0
    observed = statistic(d.sum(axis=0)[None], d)[0]
    signs = 1 - 2 * np.random.default_rng(seed).integers(0, 2, (randomisations, len(d)), dtype=np.int8)
    null = statistic(signs.astype(np.float32) @ d, d)
    return (1 + int((null >= observed - 1e-6).sum())) / (randomisations + 1)


def max_studentized(probe, epochs, alpha, seed):
    """The max-statistic test of each epoch's gain divided by the root of its disagreements."""
    if best_epoch(probe, epochs) < 0:
        return False
    return _sign_flip(probe, epochs, seed, lambda s, d: (s / np.sqrt(np.maximum((d != 0).sum(0), 1))).max(1)) < alpha


def mean_gain(probe, epochs, alpha, seed):
    """The sign-flip test of the mean gain over all epochs (no selection to correct for; the best is deployed)."""
    if best_epoch(probe, epochs) < 0:
        return False
    return _sign_flip(probe, epochs, seed, lambda s, d: s.mean(1)) < alpha


def _at(rule, alpha: float | None = None):
    return (lambda p, e, a, s: rule(p, e, alpha, s)) if alpha is not None else rule


RULES = {"bootstrap80": bootstrap80, "sign_best": sign_best, "sign_bonferroni": sign_bonferroni,
         "split_half": split_half, "max_studentized": max_studentized, "mean_gain": mean_gain,
         "mean_gain@.025": _at(mean_gain, 0.025), "max_gain": max_gain, **{
             f"max_gain@{alpha:.3g}".replace("@0.", "@."): _at(max_gain, alpha) for alpha in (0.04, 0.03, 0.025)}}

NOISE = {
    "zero-mean a=.02 indep": {"kind": "noise", "noise": 0.02, "churn": 1.0},
    "zero-mean a=.02 corr": {"kind": "noise", "noise": 0.02, "churn": 0.3},
    "zero-mean a=.05 indep": {"kind": "noise", "noise": 0.05, "churn": 1.0},
    "zero-mean a=.05 corr": {"kind": "noise", "noise": 0.05, "churn": 0.3},
    "random-class q=.1 indep": {"kind": "random-class", "q": 0.1, "churn": 1.0},
    "random-class q=.1 corr": {"kind": "random-class", "q": 0.1, "churn": 0.3},
}
GAIN = {
    "+3, ramp, noise .02 corr": {"profile": "ramp", "noise": 0.02, "churn": 0.3},
    "+3, ramp, noise .02 indep": {"profile": "ramp", "noise": 0.02, "churn": 1.0},
    "+3, ramp, noise .05 corr": {"profile": "ramp", "noise": 0.05, "churn": 0.3},
    "+3, short dip, .02 corr": {"profile": "short dip", "noise": 0.02, "churn": 0.3},
    "+3, long dip, .02 corr": {"profile": "long dip", "noise": 0.02, "churn": 0.3},
    "+3, peak+decline, .02 corr": {"profile": "peak, decline", "noise": 0.02, "churn": 0.3},
}
GAIN = {name: {"kind": "gain", "gain": 0.03, "breaks": 0.035, **scenario} for name, scenario in GAIN.items()}


def fixes_three_of_500() -> tuple[np.ndarray, np.ndarray]:
    """The issue's case: the best epoch fixes 3 of 500 images and breaks none (12 epochs, the others = probe)."""
    probe = np.arange(500) % 5 != 0  # 0.80
    epochs = np.repeat(probe[None], 12, axis=0)
    epochs[6, np.flatnonzero(~probe)[:3]] = True
    return probe, epochs


def measure(seeds: int, n: int, epochs: int, alpha: float) -> dict:
    """{rule: {scenario: share of seeds where fine-tuning is kept}} and the 3-of-500 verdicts."""
    kept = {rule: {} for rule in RULES}
    for name, scenario in {**NOISE, **GAIN}.items():
        data = [simulate(np.random.default_rng([seed, 17]), n, epochs, scenario) for seed in range(seeds)]
        for rule, decide in RULES.items():
            kept[rule][name] = float(np.mean([decide(p, e, alpha, seed) for seed, (p, e) in enumerate(data)]))
    three = {rule: bool(decide(*fixes_three_of_500(), alpha, 0)) for rule, decide in RULES.items()}
    return {"kept": kept, "three_of_500": three}


def upper_bound(rate: float, seeds: int) -> float:
    """One-sided 95% upper bound (normal approximation, at least one event) of a rate measured on ``seeds``."""
    rate_ = max(rate, 1 / seeds)
    return rate + 1.645 * np.sqrt(rate_ * (1 - rate_) / seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--n", type=int, default=500, help="validation images")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the sign and randomisation tests")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(args.seeds, args.n, args.epochs, args.alpha)
    kept = result["kept"]
    print(f"{args.seeds} seeds, {args.n} validation images, {args.epochs} epochs, alpha {args.alpha}; "
          f"probe kept under noise (want >= 95%), fine-tuning kept with a real gain (higher is better)\n")
    print("| scenario | " + " | ".join(RULES) + " |")
    print("| --- |" + " --- |" * len(RULES))
    for name in NOISE:
        print(f"| probe kept: {name} | " + " | ".join(f"{1 - kept[r][name]:.1%}" for r in RULES) + " |")
    for name in GAIN:
        print(f"| ft kept: {name} | " + " | ".join(f"{kept[r][name]:.1%}" for r in RULES) + " |")
    print("| fixes 3 of 500, breaks none | " + " | ".join(
        "fine-tuned" if result["three_of_500"][r] else "probe" for r in RULES) + " |")
    worst = {r: min(kept[r][s] for s in GAIN) for r in RULES}
    mean = {r: float(np.mean([kept[r][s] for s in GAIN])) for r in RULES}
    print("| gains kept, worst scenario | " + " | ".join(f"{worst[r]:.1%}" for r in RULES) + " |")
    print("| gains kept, mean | " + " | ".join(f"{mean[r]:.1%}" for r in RULES) + " |")
    # Eligible: the probe kept in >= 95% of the seeds of every noise scenario, also at the one-sided 95% upper
    # bound of the measured false-keep rate (so that a 100-seed test of it passes with little luck), and the
    # 3-of-500 case rejected. Then the most gains kept in the worst trajectory (its shape is not known in
    # advance), the mean breaking ties.
    eligible = [r for r in RULES if min(1 - upper_bound(kept[r][s], args.seeds) for s in NOISE) >= REQUIRED_PROBE_KEPT
                and not result["three_of_500"][r]]
    if eligible:
        chosen = max(eligible, key=lambda r: (worst[r], mean[r]))
        print(f"\nchosen: {chosen}: of the rules that keep the probe under noise ({', '.join(eligible)}), the one "
              f"that keeps a +3-point gain most often in the worst trajectory ({worst[chosen]:.1%}; mean "
              f"{mean[chosen]:.1%})")
    else:
        print("\nno rule keeps the probe in >= 95% of every noise scenario")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
