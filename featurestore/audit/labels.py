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
on (a sample of at most :data:`C_SAMPLE_ROWS` of) the rows, ties to the smaller C. The grid is walked upwards and
left :data:`C_PATIENCE` C's past the best so far (the large C's are the slow fits; on the default store the log loss
rises steadily past its minimum, and the chosen C and its probabilities are those of the whole grid, bit for bit).

Beyond :data:`C_SAMPLE_ROWS` rows (never on the default stores) every row's out-of-fold probabilities are computed
at that C, and at scale a fold with more than :data:`FIT_MAX_ROWS` training rows (a store of more than 25,000 rows
in 5 folds) fits its head on a stratified sample of that many, starting from the previous fold's solution, and
predicts all its held-out rows. Measured on ``benchmarks/audit_scale.py``'s store (100,000 x 1,280 rows, 10
classes, 5% of every split's labels flipped; C 0.01), precision at the planted count, flags' recall and seconds of
the five folds: 0.981 / 0.737 / 10 s at 10,000 rows a head, 0.985 / 0.746 / 18 s at 20,000, 0.987 / 0.754 / 37 s
at 40,000, and 0.989 / 0.755 / 94 s with every training row (80,000, and a 410 MB copy of them). Every fit runs on
one BLAS thread (:data:`BLAS_THREADS`).

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
C_PATIENCE = 2  # C's past the best, all worse, after which the path stops: a decade on the half-decade grid
FIT_MAX_ROWS = 20_000  # training rows a fold's head is fitted on, at most (a stratified sample beyond)
PREDICT_ROWS = 10_000  # held-out rows standardised and predicted at a time
MAX_ITER = 300
# One BLAS thread for every fit: at 1,280 features and 10 classes a fit on 4,000 rows took 0.1-0.5 s on one thread
# and 2-8 s on this machine's two while other work ran beside it (20,000 rows: 2.9 s against 15 s).
BLAS_THREADS = 1


@dataclass
class LabelIssues:
    """Per labelled row (N rows, K classes): ``scores`` (N,) float label quality in [0, 1], low = likely issue;
    ``order`` (N,) int64 row indices, most likely issue first; ``is_issue`` (N,) bool; ``suggested`` (N,) int64
    class indices; ``probabilities`` (N, K) float64, the averaged out-of-fold and neighbour-vote probabilities;
    ``C`` and ``folds`` as used; ``log_losses`` {C: out-of-fold log loss} of the C choice; the ``head`` whose
    out-of-fold probabilities they are and its ``settings``."""

    scores: np.ndarray
    order: np.ndarray
    is_issue: np.ndarray
    suggested: np.ndarray
    probabilities: np.ndarray
    C: float | None
    folds: int
    log_losses: dict[float, float]
    head: str = "logreg"
    settings: dict | None = None  # the head's chosen settings (logreg: {"C": C})


@dataclass
class LabelModel:
    """The head's out-of-fold ``probabilities`` (N, P) float64 over the P classes ``present`` (P,) int64 among the
    labels (ascending), with the ``C``, ``folds`` and ``log_losses`` of :class:`LabelIssues`; ``head`` and the
    ``settings`` it was fitted at (another head than logreg: :func:`head_label_model`; C None, no log losses)."""

    probabilities: np.ndarray
    present: np.ndarray
    C: float | None
    folds: int
    log_losses: dict[float, float]
    head: str = "logreg"
    settings: dict | None = None


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


def _stratified_sample(rows: np.ndarray, y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted ``size`` of ``rows`` (R,) int, stratified by their labels ``y`` (R,); all of them if no more."""
    from sklearn.model_selection import train_test_split

    if len(rows) <= size:
        return rows
    picked, _ = train_test_split(rows, train_size=size, stratify=y, random_state=seed)
    return np.sort(picked)


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, Cs: tuple[float, ...],
                              seed: int = 0, fit_max_rows: int | None = None) -> dict[float, np.ndarray]:
    """{C: (N, n_classes) float64 out-of-fold probabilities} of multinomial logistic regression at every C of
    ``Cs`` (ascending; each fit warm-started from the previous C's) on X (N, D) float, y (N,) int64 in
    [0, n_classes), in ``folds`` stratified folds (shuffled with ``seed``). Features are standardised per fold.

    With ``fit_max_rows``, a fold with more training rows than that fits its scaler and head on a stratified
    sample of them (drawn with ``seed``), the head starting from the previous fold's solution, and predicts all of
    its held-out rows, :data:`PREDICT_ROWS` at a time."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    from ..heads.estimators import PathClassifier
    from ..heads.scaling import FeatureScaler

    out = {C: np.zeros((len(y), n_classes)) for C in Cs}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    classifier = None
    with warnings.catch_warnings(), threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, held_out in splitter.split(X, y):
            sampled = fit_max_rows is not None and len(train) > fit_max_rows
            if sampled:
                train = _stratified_sample(train, y[train], fit_max_rows, seed)
            scaler = FeatureScaler().fit(X[train])
            X_train = scaler.transform(X[train], copy=False).astype(np.float32, copy=False)
            if classifier is None or not sampled:
                classifier = PathClassifier("log_loss", C=Cs[0], max_iter=MAX_ITER)
            for C in Cs:
                classifier.set_params(C=C)
                classifier.fit(X_train, y[train])
                for start in range(0, len(held_out), PREDICT_ROWS):
                    rows = held_out[start:start + PREDICT_ROWS]
                    X_held = scaler.transform(X[rows], copy=False).astype(np.float32, copy=False)
                    out[C][rows] = _probabilities(classifier, X_held, classifier.classes_, n_classes)
    return out


def c_path(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, Cs: tuple[float, ...], seed: int = 0,
           patience: int | None = C_PATIENCE) -> tuple[dict[float, np.ndarray], dict[float, float]]:
    """Out-of-fold probabilities and their log loss along ``Cs`` (ascending), as
    :func:`out_of_fold_probabilities` computes them (each fold's fits warm-started along the C's, so the same
    numbers), all folds at one C before the next C: ({C: (N, n_classes) float64}, {C: log loss}). With
    ``patience``, the path stops once that many C's in a row past the best so far are all worse (ties: the smaller
    C is the best); the C's not reached are absent from both."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    from ..heads.estimators import PathClassifier
    from ..heads.scaling import FeatureScaler

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    prepared = []  # per fold: held-out rows, its standardised training and held-out rows, the classifier
    for train, held_out in splitter.split(X, y):
        scaler = FeatureScaler().fit(X[train])
        prepared.append((train, held_out, scaler.transform(X[train]).astype(np.float32),
                         scaler.transform(X[held_out]).astype(np.float32),
                         PathClassifier("log_loss", C=Cs[0], max_iter=MAX_ITER)))
    probabilities: dict[float, np.ndarray] = {}
    losses: dict[float, float] = {}
    best = 0
    with warnings.catch_warnings(), threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for step, C in enumerate(Cs):
            P = np.zeros((len(y), n_classes))
            for train, held_out, X_train, X_held, classifier in prepared:
                classifier.set_params(C=C)
                classifier.fit(X_train, y[train])
                P[held_out] = _probabilities(classifier, X_held, classifier.classes_, n_classes)
            probabilities[C] = P
            losses[C] = float(log_loss(y, np.clip(P, 1e-12, 1), labels=np.arange(n_classes)))
            if round(losses[C], 12) < round(losses[Cs[best]], 12):
                best = step
            if patience is not None and step - best >= patience:
                break
    return probabilities, losses


def choose_c(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int = 0,
             grid: tuple[float, ...] = C_GRID, sample_rows: int = C_SAMPLE_ROWS
             ) -> tuple[float, dict[float, float], dict[float, np.ndarray] | None]:
    """The C of ``grid`` whose out-of-fold probabilities have the lowest log loss (ties: the smaller C), on all rows
    or a stratified sample of ``sample_rows``, the path stopped :data:`C_PATIENCE` C's past the best
    (:func:`c_path`). Returns (C, {C: log loss} of the C's reached, the probabilities per C when the sample was
    every row, else None)."""
    rows = np.arange(len(y))
    whole = len(y) <= sample_rows
    if not whole:
        rows = _stratified_sample(rows, y, sample_rows, seed)
    probabilities, losses = c_path(X[rows], y[rows], n_classes, folds, tuple(sorted(grid)), seed)
    best = min(losses, key=lambda C: (round(losses[C], 12), C))
    return best, losses, probabilities if whole else None


def neighbour_vote(graph: NeighbourGraph, labels: np.ndarray, n_classes: int,
                   temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """(N, n_classes) float64: each row's neighbours' given labels, weighted by ``exp(similarity / temperature)``
    and normalised to sum 1 (uniform for a row with no neighbour). ``labels`` (N,) int64 of the graph's rows."""
    from ..heads.knn import vote  # the kNN head's vote: one weighting for the head and the audit

    valid = graph.indices >= 0
    return vote(graph.similarities, labels[np.where(valid, graph.indices, 0)], n_classes, temperature, valid)


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


def label_model(X: np.ndarray, labels: np.ndarray, class_names: list[str], folds: int = 5,
                seed: int = 0, head: str = "logreg") -> LabelModel:
    """The out-of-fold probabilities of logistic regression for every row of X (N, D) float with given ``labels``
    (N,) int64 indices into ``class_names``: C chosen on a sample (:func:`choose_c`), then, beyond that sample,
    every row's at that C, each fold's head fitted on at most :data:`FIT_MAX_ROWS` rows. Another ``head``
    (``HeadConfig.head``): :func:`head_label_model`."""
    present = np.unique(labels)  # classes without items get no column: cleanlab expects every class labelled
    compact = np.searchsorted(present, labels)
    folds = fold_count(labels, class_names, folds)
    if head != "logreg":
        return head_label_model(X, compact, present, folds, seed, head)
    C, losses, grid_probabilities = choose_c(X, compact, len(present), folds, seed)
    if grid_probabilities is not None:
        probabilities = grid_probabilities[C]
    else:
        probabilities = out_of_fold_probabilities(X, compact, len(present), folds, (C,), seed, FIT_MAX_ROWS)[C]
    return LabelModel(probabilities=probabilities, present=present, C=C, folds=folds, log_losses=losses)


def head_label_model(X: np.ndarray, compact: np.ndarray, present: np.ndarray, folds: int, seed: int,
                     head: str) -> LabelModel:
    """Out-of-fold probabilities of any in-memory head family (``heads.families``) for the rows X (N, D) float with
    labels ``compact`` (N,) int64 indices into ``present``: its settings chosen once by its own protocol, trained on
    the other folds and scored on the first one (as a head's on train → val), then every fold's head refitted at
    them on the other folds. Raises :class:`BadValueError` for a head that is not fitted in memory (sgd_logreg)."""
    from sklearn.model_selection import StratifiedKFold

    from ..configs import HeadConfig
    from ..heads.families import InMemoryFamily, family_of

    family = family_of(head)
    if not isinstance(family, InMemoryFamily):
        raise BadValueError(f"label issues need a head fitted in memory; {head} streams from the store: use logreg, "
                            f"linear_svm, svm_rbf or knn")
    config = HeadConfig(head=head, n_jobs=1)
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, compact))
    first_train, first_held = splits[0]
    settings = family.choose(family.sweep(config, X[first_train], compact[first_train], X[first_held],
                                          compact[first_held], progress=False))
    probabilities = np.zeros((len(compact), len(present)))
    for train, held in splits:
        estimator = family.refit(config, settings, X[train], compact[train])
        probabilities[np.ix_(held, np.asarray(estimator.classes_, dtype=np.int64))] = estimator.predict_proba(X[held])
    log.info("label issues: %s at %s, %d folds", head, settings, folds)
    return LabelModel(probabilities=probabilities, present=present, C=settings.get("C"), folds=folds, log_losses={},
                      head=head, settings={key: float(value) for key, value in settings.items()})


def rank_labels(model: LabelModel, labels: np.ndarray, graph: NeighbourGraph, class_names: list[str]) -> LabelIssues:
    """Label issues of the rows of ``model`` (:func:`label_model`) with given ``labels`` (N,) int64, its
    probabilities averaged with the neighbour vote of ``graph`` (built on the same rows). See the module docstring."""
    compact = np.searchsorted(model.present, labels)
    probabilities = (model.probabilities + neighbour_vote(graph, compact, len(model.present))) / 2
    scores, order, flags = rank_label_issues(probabilities, compact)
    full = np.zeros((len(labels), len(class_names)))
    full[:, model.present] = probabilities
    return LabelIssues(scores=scores, order=order, is_issue=flags,
                       suggested=model.present[probabilities.argmax(axis=1)], probabilities=full, C=model.C,
                       folds=model.folds, log_losses=model.log_losses, head=model.head,
                       settings=model.settings or {"C": model.C})


def audit_labels(X: np.ndarray, labels: np.ndarray, graph: NeighbourGraph, class_names: list[str],
                 folds: int = 5, seed: int = 0, head: str = "logreg") -> LabelIssues:
    """Label issues of every row of X (N, D) float with given ``labels`` (N,) int64 indices into ``class_names``,
    using ``graph`` (built on the same rows) for the neighbour vote: :func:`label_model`, then
    :func:`rank_labels`. See the module docstring."""
    return rank_labels(label_model(X, labels, class_names, folds, seed, head), labels, graph, class_names)
