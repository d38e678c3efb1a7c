"""The linear heads' C sweep by the path solver (issue 26) against the estimators it stands in for.

``PathClassifier`` solves ``LogisticRegression``'s and ``LinearSVC``'s problems warm-started along the grid; the
head is still the scikit-learn estimator refitted at the chosen C. On small problems shaped like the default
stores (more dimensions than rows, noisy classes), the sweep must choose the C the estimators' own sweep chooses
(within one grid step) and the head must score the same on test (within half a point). The same check on the
default stores themselves is ``benchmarks/head_sweep.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from featurestore.configs import HeadConfig
from featurestore.heads.estimators import (
    PathClassifier,
    build_estimator,
    choose_c,
    fit_estimator,
    make_scaler,
    sweep_c,
    sweep_segment,
)

GRID = {"c_min": 1e-5, "c_max": 1e1, "c_points": 13}  # half a decade a step
MAX_ACCURACY_CHANGE = 0.005


def store_like_problem(seed: int, classes: int = 5, dim: int = 256, train: int = 200, val: int = 200,
                       test: int = 1000):
    """(X, y) of train, val and test: float32 features, class means in an 8-dimensional subspace, heavy-tailed
    noise (Student t, 5 degrees of freedom); more dimensions than training rows, as on the default stores."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, 8)) @ rng.normal(0, 0.12, (8, dim))

    def split(n: int):
        y = rng.integers(0, classes, n)
        return (means[y] + rng.standard_t(5, (n, dim))).astype(np.float32), y

    return split(train), split(val), split(test)


def estimators_sweep(config: HeadConfig, X, y, Xv, yv) -> list[dict]:
    """The sweep before issue 26: scikit-learn's own estimator at every C (logreg warm-started, LinearSVC cold)."""
    scaler = make_scaler(config.normalize).fit(X)
    X, Xv = scaler.transform(X), scaler.transform(Xv)
    logreg = LogisticRegression(max_iter=config.max_iter, warm_start=True)
    points = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in config.c_grid():
            classifier = (logreg.set_params(C=C) if config.head == "logreg"
                          else LinearSVC(C=C, max_iter=config.max_iter))
            points.append({"C": float(C), "val_accuracy": classifier.fit(X, y).score(Xv, yv)})
    return points


@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_path_sweep_chooses_the_estimators_c_and_the_head_scores_the_same(head, seed):
    (X, y), (Xv, yv), (Xt, yt) = store_like_problem(seed)
    config = HeadConfig(head=head, n_jobs=1, **GRID)
    path = sweep_c(config, X, y, Xv, yv, extend=False)
    before = estimators_sweep(config, X, y, Xv, yv)
    assert [p["C"] for p in path] == pytest.approx([p["C"] for p in before])
    C, C_before = choose_c(path), choose_c(before)
    assert abs(np.log10(C / C_before)) <= 0.5 + 1e-9  # within one grid step
    rows, labels = np.concatenate([X, Xv]), np.concatenate([y, yv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        accuracy_before = build_estimator(config, C_before).fit(rows, labels).score(Xt, yt)
    assert abs(fit_estimator(config, C, rows, labels).score(Xt, yt) - accuracy_before) <= MAX_ACCURACY_CHANGE
    assert 0.6 < accuracy_before < 0.99  # a problem where C matters, not a trivial one


@pytest.mark.parametrize("classes", [2, 4])
def test_the_path_classifier_reaches_the_estimators_optimum(classes):
    (X, y), _, _ = store_like_problem(3, classes=classes, dim=40, train=300)
    X = X.astype(np.float64)
    for loss, reference in (("log_loss", LogisticRegression(C=0.05, tol=1e-10, max_iter=10_000)),
                            ("squared_hinge", LinearSVC(C=0.05, tol=1e-10, max_iter=100_000))):
        solved = PathClassifier(loss, C=0.05, tol=1e-8, max_iter=10_000).fit(X, y)
        reference.fit(X, y)
        assert solved.coef_.shape == reference.coef_.shape == ((1 if classes == 2 else classes), 40)
        scale = np.abs(reference.coef_).max()
        assert np.abs(solved.coef_ - reference.coef_).max() < 1e-4 * scale, loss
        assert np.abs(solved.intercept_ - reference.intercept_).max() < 1e-4 * max(scale, 1.0), loss
        assert np.array_equal(solved.predict(X), reference.predict(X))


@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
def test_a_sweep_cut_into_segments_finds_what_one_segment_finds(head):
    (X, y), (Xv, yv), _ = store_like_problem(4, dim=32)
    config = HeadConfig(head=head, **GRID)
    scaler = make_scaler("standard").fit(X)
    X, Xv = scaler.transform(X), scaler.transform(Xv)
    grid = config.c_grid()
    whole = sweep_segment(config, grid, X, y, Xv, yv)
    parts = sweep_segment(config, grid[:5], X, y, Xv, yv) + sweep_segment(config, grid[5:], X, y, Xv, yv)
    # the first fits of a segment start cold, the rest from the secant prediction: the same accuracies
    assert [(C, accuracy) for C, accuracy, _ in parts] == [(C, accuracy) for C, accuracy, _ in whole]


@pytest.mark.parametrize("classes", [2, 5])
def test_the_linear_svm_refit_is_a_plain_calibrated_linear_svc(classes):
    (X, y), _, (Xt, _) = store_like_problem(5, classes=classes, dim=64)
    config = HeadConfig(head="linear_svm")
    fitted = fit_estimator(config, 0.01, X, y)
    calibrated = fitted.named_steps["classify"]
    assert isinstance(calibrated, CalibratedClassifierCV) and type(calibrated.estimator) is LinearSVC
    folds = calibrated.calibrated_classifiers_
    assert len(folds) == config.calibration_folds and all(type(f.estimator) is LinearSVC for f in folds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        liblinear = build_estimator(config, 0.01).fit(X, y)
    # liblinear's folds and the path solver's hold the same solutions: the same probabilities
    assert np.abs(fitted.predict_proba(Xt) - liblinear.predict_proba(Xt)).max() < 1e-3
    assert np.array_equal(fitted.predict(Xt), liblinear.predict(Xt))
