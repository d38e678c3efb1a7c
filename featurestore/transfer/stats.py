"""Is a difference in accuracy bigger than the noise of the split it was measured on?

Both models are scored on the same images, so the comparison is paired: resampling the images (a
bootstrap) and recomputing the difference on each resample gives an interval for it that reflects only
the images on which the two models disagree.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def paired_gain(correct_before: np.ndarray, correct_after: np.ndarray, level: float = 0.9, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Accuracy gain of "after" over "before" on the same N images, with a bootstrap interval.

    ``correct_*``: (N,) bool, whether each model got image i right. Returns ``{"gain", "low", "high",
    "level", "disagreements", "n"}`` where [low, high] is the central ``level`` interval (so ``high`` is a
    one-sided ``(1 + level) / 2`` upper bound).
    """
    before, after = np.asarray(correct_before, dtype=bool), np.asarray(correct_after, dtype=bool)
    if before.shape != after.shape or before.ndim != 1 or not len(before):
        raise ValueError(f"need two equal (N,) arrays of per-image correctness, got {before.shape}, {after.shape}")
    difference = after.astype(np.int8) - before.astype(np.int8)  # +1, 0 or -1 per image
    rng = np.random.default_rng(seed)
    resampled = difference[rng.integers(0, len(difference), (samples, len(difference)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return {"gain": round(float(difference.mean()), 6), "low": round(float(low), 6), "high": round(float(high), 6),
            "level": level, "disagreements": int(np.count_nonzero(difference)), "n": int(len(difference))}
