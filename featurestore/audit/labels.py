"""Label issues: which items' given labels the features contradict, ranked with cleanlab.

Every labelled row of the store (all splits together) gets out-of-fold class probabilities from a logistic-regression
head (the heads' own solver, :class:`~featurestore.heads.estimators.PathClassifier`, on standardised features:
:class:`~featurestore.heads.FeatureScaler`) in stratified k folds, and a vote of its neighbours in the graph (their
given labels weighted by ``exp(similarity / 0.07)``, DINOv2's kNN temperature). The two are averaged; cleanlab ranks
the rows by self-confidence (``cleanlab.rank.get_label_quality_scores``, the probability of the given label: lowest
first) and flags as issues the lowest ones, as many as its confident-joint estimate of the number of label errors
(``cleanlab.filter.find_label_issues(filter_by="low_self_confidence")``), so the flagged items are the top of the
ranking. The suggested label is the class of highest averaged probability.

C is chosen once per audit: the one of :data:`C_GRID` whose out-of-fold probabilities have the lowest log loss
on (a sample of at most :data:`C_SAMPLE_ROWS` of) the rows, ties to the smaller C.

Why all splits, and why the vote (``benchmarks/audit_label_noise.py``, the default Fashion-MNIST store: 1,000 train,
500 val, 2,000 test rows of Lite0 features; 10% of the labels flipped to a random other class, flip seeds 0, 1, 2;
the precision of the ranking at the planted count, on train): out-of-fold logistic regression on train alone (this
module's C choice, no vote) 0.80, 0.85, 0.82; with the head trained on every split, only train flipped, and the vote:
0.87, 0.92, 0.86; every split flipped alike (the judge learning from labels as noisy as those it judges) 0.85, 0.89,
0.87 (mean 0.870; 0.857 and 0.873 with the folds shuffled by seeds 1 and 2). Found while choosing: trained on the
true labels, the train-only head reached only 0.81-0.85 (with 800 rows a fold it errs too often itself), and the vote
alone 0.72-0.80. The flags: ``low_self_confidence`` flagged 123-134 items at recall 0.89-0.96 and precision
0.70-0.75; cleanlab's default filter (``prune_by_noise_rate``) was 0.55-0.60 precise at recall 0.76-0.86. On the
store's own labels the audit flags 163 of 3,500 items (49 of the 1,000 train items), 104 of them given as shirt,
T-shirt, pullover or coat (the commonest suggestions: shirt <-> T-shirt, pullover -> coat).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import BadValueError
from .graph import NeighbourGraph

log = logging.getLogger("featurestore")

KNN_TEMPERATURE = 0.07
C_GRID = tuple(float(f"{C:.3g}") for C in np.logspace(-4, 1, 11))  # half-decade steps
C_SAMPLE_ROWS = 5_000
MAX_ITER = 300


@dataclass
class LabelIssues:
    """Per labelled row (N rows, K classes): ``scores`` (N,) float label quality in [0, 1], low = likely issue;
    ``order`` (N,) int64 row indices, most likely issue first; ``is_issue`` (N,) bool; ``suggested`` (N,) int64
    class indices; ``probabilities`` (N, K) float64, the averaged out-of-fold and neighbour-vote probabilities;
    ``C`` and ``folds`` as used; ``log_losses`` {C: out-of-fold log loss} of the C choice."""

    scores: np.ndarray
    order: np.ndarray
    is_issue: np.ndarray
    suggested: np.ndarray
    probabilities: np.ndarray
    C: float
    folds: int
    log_losses: dict[float, float]


def fold_count(labels: np.ndarray, class_names: list[str], folds: int) -> int:
    """The folds to use: ``folds``, or fewer where a class has fewer items than that (each test fold must hold
    one of each class, each training fold one too). Raises :class:`BadValueError` naming a class with a single
    item (no fold can both hold it out and learn it), or for fewer than two classes."""
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise BadValueError(f"label issues need at least two classes among the labelled items; found "
                            f"{[class_names[c] for c in present]}")
    smallest = int(counts.min())
    if smallest < 2:
        name = class_names[int(present[counts.argmin()])]
        raise BadValueError(f"class {name!r} has {smallest} labelled item: out-of-fold probabilities need at "
                            f"least 2 items of every class")
    if smallest < folds:
        name = class_names[int(present[counts.argmin()])]
        log.warning("class %r has only %d labelled items: %d folds instead of %d", name, smallest, smallest, folds)
        return smallest
    return folds


def _probabilities(classifier, X: np.ndarray, columns: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities of a fitted PathClassifier on X; ``columns`` maps its classes_ to columns."""
    from scipy.special import expit, softmax

    scores = classifier.decision_function(X)
    if scores.ndim == 1:  # two classes: the decision is for classes_[1]
        fitted = np.stack([1 - expit(scores), expit(scores)], axis=1)
    else:
        fitted = softmax(scores, axis=1)
    out = np.zeros((X.shape[0], n_classes))
    out[:, columns] = fitted
    return out


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, Cs: tuple[float, ...],
                              seed: int = 0) -> dict[float, np.ndarray]:
    """{C: (N, n_classes) float64 out-of-fold probabilities} of multinomial logistic regression at every C of
    ``Cs`` (ascending; each fit warm-started from the previous C's) on X (N, D) float, y (N,) int64 in
    [0, n_classes), in ``folds`` stratified folds (shuffled with ``seed``). Features are standardised per fold."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    from ..heads.estimators import IN_PROCESS_LINEAR_MAX_VALUES, PathClassifier
    from ..heads.scaling import FeatureScaler

    out = {C: np.zeros((len(y), n_classes)) for C in Cs}
    threads = 1 if X.shape[0] * X.shape[1] <= IN_PROCESS_LINEAR_MAX_VALUES else None  # as the heads' sweep
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(limits=threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, held_out in splitter.split(X, y):
            scaler = FeatureScaler().fit(X[train])
            X_train = scaler.transform(X[train]).astype(np.float32)
            X_held = scaler.transform(X[held_out]).astype(np.float32)
            classifier = PathClassifier("log_loss", C=Cs[0], max_iter=MAX_ITER)
            for C in Cs:
                classifier.set_params(C=C)
                classifier.fit(X_train, y[train])
                out[C][held_out] = _probabilities(classifier, X_held, classifier.classes_, n_classes)
    return out


def choose_c(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int = 0,
             grid: tuple[float, ...] = C_GRID, sample_rows: int = C_SAMPLE_ROWS
             ) -> tuple[float, dict[float, float], dict[float, np.ndarray] | None]:
    """The C of ``grid`` whose out-of-fold probabilities have the lowest log loss (ties: the smaller C), on all rows
    or a stratified sample of ``sample_rows``. Returns (C, {C: log loss}, the probabilities per C when the sample
    was every row, else None)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    whole = len(y) <= sample_rows
    if not whole:
        rows, _ = train_test_split(rows, train_size=sample_rows, stratify=y, random_state=seed)
        rows = np.sort(rows)
    probabilities = out_of_fold_probabilities(X[rows], y[rows], n_classes, folds, tuple(sorted(grid)), seed)
    losses = {C: float(log_loss(y[rows], np.clip(P, 1e-12, 1), labels=np.arange(n_classes)))
              for C, P in probabilities.items()}
    best = min(losses, key=lambda C: (round(losses[C], 12), C))
    return best, losses, probabilities if whole else None


def neighbour_vote(graph: NeighbourGraph, labels: np.ndarray, n_classes: int,
                   temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """(N, n_classes) float64: each row's neighbours' given labels, weighted by ``exp(similarity / temperature)``
    and normalised to sum 1 (uniform for a row with no neighbour). ``labels`` (N,) int64 of the graph's rows."""
    indices, similarities = graph.indices, graph.similarities.astype(np.float64)
    valid = indices >= 0
    top = np.where(valid, similarities, -np.inf).max(axis=1, initial=-np.inf, keepdims=True)
    weights = np.where(valid, np.exp((similarities - np.where(np.isfinite(top), top, 0)) / temperature), 0.0)
    cells = np.arange(len(labels))[:, None] * n_classes + labels[np.where(valid, indices, 0)]
    votes = np.bincount(cells.ravel(), weights.ravel(), minlength=len(labels) * n_classes).reshape(-1, n_classes)
    totals = votes.sum(axis=1, keepdims=True)
    return np.where(totals > 0, votes / np.where(totals > 0, totals, 1), 1.0 / n_classes)


def rank_label_issues(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cleanlab's self-confidence scores (N,), the order (N,) int64 most likely issue first (stable: ties in row
    order) and the flags (N,) bool, for given ``labels`` (N,) and ``probabilities`` (N, K) over the K classes
    present (every column's class has at least one label)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    order = np.argsort(scores, kind="stable").astype(np.int64)
    flags = find_label_issues(labels, probabilities, filter_by="low_self_confidence")
    return scores, order, np.asarray(flags, dtype=bool)


def audit_labels(X: np.ndarray, labels: np.ndarray, graph: NeighbourGraph, class_names: list[str],
                      folds: int = 5, seed: int = 0) -> LabelIssues:
    """Label issues of every row of X (N, D) float with given ``labels`` (N,) int64 indices into ``class_names``,
    using ``graph`` (built on the same rows) for the neighbour vote. See the module docstring."""
    present = np.unique(labels)  # classes without items get no column: cleanlab expects every class labelled
    compact = np.searchsorted(present, labels)
    folds = fold_count(labels, class_names, folds)
    n_present = len(present)
    C, losses, grid_probabilities = choose_c(X, compact, n_present, folds, seed)
    if grid_probabilities is not None:
        model = grid_probabilities[C]
    else:
        model = out_of_fold_probabilities(X, compact, n_present, folds, (C,), seed)[C]
    probabilities = (model + neighbour_vote(graph, compact, n_present)) / 2
    scores, order, flags = rank_label_issues(probabilities, compact)
    full = np.zeros((len(labels), len(class_names)))
    full[:, present] = probabilities
    return LabelIssues(scores=scores, order=order, is_issue=flags, suggested=present[probabilities.argmax(axis=1)],
                       probabilities=full, C=C, folds=folds, log_losses=losses)
