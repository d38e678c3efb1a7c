"""Is a difference in accuracy bigger than the noise of the split it was measured on?

Both models are scored on the same images, so the comparison is paired: only the images on which the two
models disagree carry information about the difference.

- :func:`paired_gain`: a paired bootstrap interval for the gain of one model over another (resampling the
  images and recomputing the difference on each resample). Its memory is bounded: the resamples are drawn in
  blocks of rows, so 100k validation images peak at 72 MB (measured) instead of 1.8 GB, with the same seeded draws
  (and so the same interval) as one ``samples × n`` draw.
- :func:`sign_test`: the exact one-sided sign (McNemar) test on the disagreeing images of two models.
- :func:`max_gain_test`: whether the best of several candidates (fine-tuning epochs) beats a reference (the
  probe) by more than the noise *and* the luck of having picked the best one on the same images: a paired
  sign-flip randomisation test of the maximum gain over the candidates.
- :func:`beats_incumbent`: the one rule for every choice between models (fine-tuning's epochs and methods, the
  baseline and hybrid heads against the encoder head): :func:`max_gain_test` at ``ALPHA``, with the warning of
  :func:`split_too_small` when the split cannot tell candidates apart.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000
# Resampled indices (int64) + the gathered int8 differences per block: 9 bytes an element, about 72 MB a block.
BOOTSTRAP_BLOCK_ELEMENTS = 8_000_000
RANDOMISATIONS = 2000
# Sign patterns (float32) per block of the randomisation test: 4 bytes an element, 16 MB a block.
RANDOMISATION_BLOCK_ELEMENTS = 4_000_000
ALPHA = 0.05  # a candidate replaces the incumbent when max_gain_test's p-value is below this (issue 17's benchmark)
# A split is too small to tell candidates apart when the smallest lead the rule can accept is above this share of it.
RESOLUTION = 0.05


def _check_correctness(*arrays: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=bool) for a in arrays]
    if any(a.shape != arrays[0].shape for a in arrays) or arrays[0].ndim != 1 or not len(arrays[0]):
        raise ValueError(f"need equal (N,) arrays of per-image correctness, got {[a.shape for a in arrays]}")
    return arrays


def paired_gain(correct_before: np.ndarray, correct_after: np.ndarray, level: float = 0.9, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES, block_elements: int = BOOTSTRAP_BLOCK_ELEMENTS) -> dict:
    """Accuracy gain of "after" over "before" on the same N images, with a bootstrap interval.

    ``correct_*``: (N,) bool, whether each model got image i right. Returns ``{"gain", "low", "high",
    "level", "disagreements", "n"}`` (floats rounded to 6 digits; ints) where [low, high] is the central
    ``level`` interval (so ``high`` is a one-sided ``(1 + level) / 2`` upper bound).

    The ``samples`` resamples of N indices are drawn ``block_elements // N`` rows (at least 2) at a time:
    numpy's Generator continues one stream across calls, so the draws, and the result, equal those of one
    ``(samples, N)`` draw, while peak memory is about ``9 × max(block_elements, 2N)`` bytes.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    before, after = _check_correctness(correct_before, correct_after)
    difference = after.astype(np.int8) - before.astype(np.int8)  # +1, 0 or -1 per image
    n = len(difference)
    rng = np.random.default_rng(seed)
    rows = max(2, block_elements // n)
    resampled = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, rows):
        stop = min(samples, start + rows)
        resampled[start:stop] = difference[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return {"gain": round(float(difference.mean()), 6), "low": round(float(low), 6), "high": round(float(high), 6),
            "level": level, "disagreements": int(np.count_nonzero(difference)), "n": int(n)}


def sign_test(fixes: int, breaks: int) -> float:
    """Exact one-sided p-value of the sign (McNemar) test: ``P(X >= fixes)`` for X ~ Binomial(fixes + breaks, 1/2).

    ``fixes``: images the new model gets right and the old one wrong; ``breaks``: the reverse. The chance of
    at least that many fixes among the disagreements if each disagreement were a fair coin. Returns a float in
    (0, 1]; 1.0 when there are no disagreements.
    """
    fixes, breaks = int(fixes), int(breaks)
    if fixes < 0 or breaks < 0:
        raise ValueError(f"fixes and breaks are counts, got {fixes}, {breaks}")
    total = fixes + breaks
    if fixes == 0:
        return 1.0
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, total + 1, dtype=np.float64)))])
    k = np.arange(fixes, total + 1)
    log_pmf = log_factorial[total] - log_factorial[k] - log_factorial[total - k] - total * np.log(2.0)
    peak = log_pmf.max()
    return float(min(1.0, np.exp(peak) * np.exp(log_pmf - peak).sum()))


def max_gain_test(correct_reference: np.ndarray, correct_candidates: np.ndarray, seed: int = 0,
                  randomisations: int = RANDOMISATIONS,
                  block_elements: int = RANDOMISATION_BLOCK_ELEMENTS) -> dict:
    """Does the best of E candidates beat the reference on the same N images by more than chance and selection?

    ``correct_reference``: (N,) bool, the reference model's per-image correctness (the probe);
    ``correct_candidates``: (E, N) bool, each candidate's (each fine-tuning epoch's), in order. The statistic
    is the largest gain of a candidate over the reference, ``max_e mean_i(c[e, i] - r[i])``: the gain of the
    candidate one would pick on these images. Its null distribution comes from sign flips of whole images: if
    fine-tuning changed nothing but noise, swapping the reference's and the candidates' answers on an image
    (the same swap for every candidate of that image, which keeps the correlation between epochs) is as
    likely as not, and each such swap flips the sign of that image's differences. The p-value is the share of
    ``randomisations`` sign patterns (counting the observed one) whose maximum gain is at least the observed
    one: a max-statistic test, so having chosen the best epoch on the same images is accounted for. With at
    most ``log2(randomisations)`` disagreeing images every pattern is enumerated (an exact p-value).

    Returns ``{"gain", "epoch", "p_value", "fixes", "breaks", "disagreements", "n", "candidates",
    "randomisations"}``: ``epoch`` is the 1-based index of the first candidate with the largest gain (0 and a
    p-value of 1 when none beats the reference); ``fixes``/``breaks`` and ``disagreements`` are that
    candidate's; ``randomisations`` is the number of sign patterns used (0 when no test was needed).
    """
    reference = _check_correctness(correct_reference)[0]
    candidates = np.asarray(correct_candidates, dtype=bool)
    if candidates.ndim != 2 or candidates.shape[1] != len(reference) or not len(candidates):
        raise ValueError(f"need (E, {len(reference)}) candidate correctness for (N,) reference, got "
                         f"{candidates.shape}")
    n = len(reference)
    differences = candidates.astype(np.int8) - reference.astype(np.int8)  # (E, N) of +1, 0, -1
    gains = differences.sum(axis=1)  # (E,) ints: net images won
    best = int(np.argmax(gains))
    fixes, breaks = int((differences[best] > 0).sum()), int((differences[best] < 0).sum())
    result = {"gain": round(float(gains[best]) / n, 6), "epoch": best + 1, "p_value": 1.0, "fixes": fixes,
              "breaks": breaks, "disagreements": fixes + breaks, "n": n, "candidates": int(len(candidates)),
              "randomisations": 0}
    if gains[best] <= 0:
        return {**result, "epoch": 0}
    informative = differences[:, np.any(differences != 0, axis=0)].T.astype(np.float32)  # (M, E)
    m = len(informative)
    observed = float(gains[best])
    if 2 ** m <= randomisations:  # every sign pattern: an exact p-value
        patterns = 1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1).astype(np.float32)  # (2^m, M)
        at_least = int(((patterns @ informative).max(axis=1) >= observed - 0.5).sum())
        return {**result, "p_value": round(at_least / 2 ** m, 6), "randomisations": 2 ** m}
    rng = np.random.default_rng(seed)
    rows = max(1, block_elements // m)
    at_least = 0
    for start in range(0, randomisations, rows):
        count = min(rows, randomisations - start)
        signs = (1 - 2 * rng.integers(0, 2, (count, m), dtype=np.int8)).astype(np.float32)
        at_least += int(((signs @ informative).max(axis=1) >= observed - 0.5).sum())
    return {**result, "p_value": round((at_least + 1) / (randomisations + 1), 6), "randomisations": randomisations}


def min_detectable_lead(alpha: float = ALPHA) -> int:
    """The fewest validation items a candidate must win by for :func:`max_gain_test` to give a p-value below
    ``alpha``, in the most favourable case: every disagreement a fix, k of them, whose exact p-value is ``2**-k``
    (more breaks, or candidates that disagree among themselves, need a larger lead). 5 at ``alpha`` 0.05."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lead = 1
    while 2.0 ** -lead >= alpha:
        lead += 1
    return lead


def split_too_small(n: int, alpha: float = ALPHA, resolution: float = RESOLUTION) -> str | None:
    """A warning naming the split's size when ``n`` validation items cannot tell candidates apart (None when they
    can): when even :func:`min_detectable_lead` (a lead with no loss at all) is above ``resolution`` of the split,
    i.e. fewer than 100 items at ``alpha`` 0.05 and ``resolution`` 0.05."""
    lead = min_detectable_lead(alpha)
    if lead <= resolution * n:
        return None
    return (f"the validation split has {n} items: too few to tell models apart; a candidate must win at least "
            f"{lead} of them more than the incumbent, and lose none, to count as better than the noise "
            f"(p < {alpha}), a lead of {lead / n:.1%} accuracy at the least, so smaller leads deploy nothing new "
            f"(a split of {int(np.ceil(lead / resolution))} items or more tells a {resolution:.0%} lead apart)")


def beats_incumbent(correct_incumbent: np.ndarray, correct_candidates: np.ndarray, alpha: float = ALPHA,
                    seed: int = 0) -> dict:
    """Does the best of E candidates beat the incumbent on the same N validation items by more than the noise of
    the split and the luck of having picked the best of them there? The one rule for every choice between models.

    ``correct_incumbent``: (N,) bool, the incumbent's per-item correctness (the probe, the best encoder head);
    ``correct_candidates``: (E, N) bool, each candidate's (fine-tuning epochs, the baseline, the hybrid head), in
    order. Returns :func:`max_gain_test`'s dict (``epoch``: the 1-based index of the best candidate, 0 when none is
    better) with ``alpha``, ``beats`` (p-value < ``alpha``) and ``warning`` (:func:`split_too_small`, or None).
    """
    result = max_gain_test(correct_incumbent, correct_candidates, seed=seed)
    return {**result, "alpha": alpha, "beats": bool(result["p_value"] < alpha),
            "warning": split_too_small(result["n"], alpha)}
