"""The heads' feature scaler: scikit-learn's ``StandardScaler``, except that float-noise features stay unscaled.

all-MiniLM-L6-v2 has two embedding dimensions that are zero up to rounding (values about 1e-33). Their
variance is not exactly zero, so ``StandardScaler`` divides them by about 1e-33: the head then reads rounding
noise at unit scale, and its weights folded onto raw features (``heads.fold_scaler``, used by fine-tuning and
the ONNX graph) come out near 1e29: any change fine-tuning made in those dimensions was multiplied by that,
and its first epoch sent the classifier to chance. A feature whose spread is below ``RELATIVE_FLOOR`` of the
widest feature's is treated as constant, as scikit-learn already treats exactly constant ones.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler

RELATIVE_FLOOR = 1e-6


class FeatureScaler(StandardScaler):
    """``StandardScaler`` whose ``scale_`` is 1 for features with std below ``RELATIVE_FLOOR`` × the largest
    std (``fit`` goes through ``partial_fit``, so both, and the streaming head's minibatches, get it)."""

    def partial_fit(self, X, y=None, sample_weight=None):
        super().partial_fit(X, y, sample_weight)
        if self.scale_ is not None:
            self.scale_ = np.where(self.scale_ < RELATIVE_FLOOR * self.scale_.max(), 1.0, self.scale_)
        return self
