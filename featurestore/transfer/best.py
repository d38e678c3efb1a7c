"""The best model on validation is the one deployed, and the decision says so when it is a baseline.

Candidates, each with its C chosen on the validation split, fitted on the train split alone and scored on the
validation split of the same feature store (the same rows, picked by content id):

- ``encoder``: every cache-only head of the backbone (the point of its own C sweep at its chosen C), and every head
  on the fine-tuned backbone when fine-tuning was kept (``decision["heads"]``, ``compare_heads``' figure);
- ``baseline``: TF-IDF + logistic regression (texts) or raw pixels + logistic regression (images), no encoder
  (``heads.baseline``);
- ``hybrid`` (texts): one logistic regression on the encoder's embedding beside TF-IDF rows
  (``heads.hybrid``).

:func:`best_on_validation` (pure) deploys the baseline or the hybrid head only when it beats the best encoder head by
more than the noise of the validation split and the luck of having picked the best of the candidates there: the one
rule of every choice between models (``stats.beats_incumbent``, fine-tuning's rule too), paired on the per-item
answers of fits on the train split alone. A tie or a lead within the noise keeps the encoder head, and each export
entry then ships its own head as before. A validation split too small to tell models apart (fewer than 100 items
at the default alpha: a lead of 5 items with no loss is the least that counts) is named in a warning, logged and
kept in ``decision["deployed"]["warning"]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .stats import ALPHA, beats_incumbent

if TYPE_CHECKING:
    from ..heads.head import TrainedHead
    from ..store.hdf5 import FeatureStore

log = logging.getLogger("featurestore")

BASELINE_FILE, HYBRID_FILE = "baseline.skops", "hybrid.skops"


def best_encoder(encoder: Mapping[str, Mapping]) -> str:
    """The encoder head with the highest validation accuracy (the first of equals): the incumbent."""
    if not encoder:
        raise ValueError("best_on_validation needs at least one encoder head")
    return max(encoder, key=lambda name: encoder[name]["val"])


def best_on_validation(encoder: Mapping[str, Mapping], others: Mapping[str, Mapping],
                       correct: Mapping[str, np.ndarray | None] | None = None, alpha: float = ALPHA) -> dict:
    """Which model to deploy: the best encoder head (the incumbent) unless another candidate beats it beyond the
    noise of the validation split (``stats.beats_incumbent``).

    ``encoder``: name → ``{"val": float, "n": int}`` for every encoder head (at least one); ``others``: name →
    ``{"val", "n", "kind": "baseline" | "hybrid", "file"}``. ``correct``: name → (N,) bool, each model's per-item
    correctness on the same N validation items (fitted on train alone), for the incumbent and every other
    candidate. The test is paired when all of them are given; otherwise (a streamed ``sgd_logreg`` incumbent, a
    caller with accuracies alone) it runs on the most favourable pairing the accuracies allow (each candidate's
    lead as that many fixes and no break, its answers nested in one another), an optimistic bound under which a
    lead smaller than ``stats.min_detectable_lead`` items still never counts; ``test["paired"]`` says which.

    Returns ``decision["deployed"]``: ``{"model": "encoder" | "baseline" | "hybrid", "name", "file",
    "val_accuracy", "best_encoder", "best_encoder_val", "baseline", "baseline_val", "n", "test", "warning",
    "reason"}``; ``test`` holds the rule's figures (``beats_incumbent``'s, ``candidate`` naming the best of the
    others, ``paired``, and the accuracies the test saw, ``incumbent_val`` and ``candidate_val``; None without
    others) and ``warning`` names the split's size when it is too small to tell
    models apart (else None).
    """
    incumbent = best_encoder(encoder)
    encoder_val = float(encoder[incumbent]["val"])
    baseline = next((name for name, c in others.items() if c.get("kind") == "baseline"), None)
    n = int(encoder[incumbent].get("n", 0))
    verdict = {"model": "encoder", "name": incumbent, "file": None, "val_accuracy": encoder_val,
               "best_encoder": incumbent, "best_encoder_val": encoder_val, "baseline": baseline,
               "baseline_val": None if baseline is None else float(others[baseline]["val"]), "n": n,
               "test": None, "warning": None}
    if not others:
        verdict["reason"] = (f"the best encoder head, {incumbent}, scores {encoder_val:.4f} on validation and no other "
                             f"model was fitted: the encoder's heads stay deployed")
        return verdict
    names = list(others)
    test = _test(incumbent, encoder, names, others, correct or {}, alpha)
    best = names[test["epoch"] - 1] if test["epoch"] else max(names, key=lambda name: others[name]["val"])
    test = {"candidate": best, **{k: v for k, v in test.items() if k != "epoch"}}
    verdict.update(n=test["n"], test=test, warning=test.pop("warning"))
    chosen = others[best]
    against = (f"{best} ({chosen['kind']}) scores {test['candidate_val']:.4f} on {test['n']} validation items "
               f"against {test['incumbent_val']:.4f} for the best encoder head, {incumbent}")
    pairing = "" if test["paired"] else ", unpaired: the most favourable pairing of the accuracies"
    if test["beats"]:
        verdict.update(model=chosen["kind"], name=best, file=chosen.get("file"), val_accuracy=float(chosen["val"]))
        verdict["reason"] = (f"{against}: {test['fixes']} fixed, {test['breaks']} broken, beyond the noise and the "
                             f"choice among {test['candidates']} candidates (sign-flip max-statistic p = "
                             f"{test['p_value']:.4f} < {alpha}{pairing}): the {chosen['kind']} is deployed")
    elif test["gain"] > 0:
        verdict["reason"] = (f"{against}: a lead of {test['gain']:+.4f} ({test['fixes']} fixed, {test['breaks']} "
                             f"broken) within the noise and the choice among {test['candidates']} candidates "
                             f"(sign-flip max-statistic p = {test['p_value']:.4f} >= {alpha}{pairing}): the "
                             f"encoder's heads stay deployed")
    else:
        listed = ", ".join(f"{name} ({c['kind']}) {c['val']:.4f}" for name, c in others.items())
        verdict["reason"] = (f"the best encoder head, {incumbent}, scores {encoder_val:.4f} on validation, at or "
                             f"above {listed}: the encoder's heads stay deployed")
    if verdict["warning"]:
        log.warning(verdict["warning"])
    return verdict


def _test(incumbent: str, encoder: Mapping[str, Mapping], names: list[str], others: Mapping[str, Mapping],
          correct: Mapping[str, np.ndarray | None], alpha: float) -> dict:
    """``beats_incumbent`` on the per-item answers, or on the most favourable pairing of the accuracies."""
    answers = [correct.get(name) for name in (incumbent, *names)]
    paired = all(a is not None for a in answers)
    if not paired:
        n = int(encoder[incumbent].get("n") or max(int(others[name].get("n") or 0) for name in names))
        if n < 1:
            raise ValueError("best_on_validation needs the number of validation items (n) or per-item answers")
        ranks = np.arange(n)  # item i right for a model with k right items when i < k: nested answers
        vals = [encoder[incumbent]["val"], *(others[name]["val"] for name in names)]
        answers = [ranks < round(float(val) * n) for val in vals]
    test = beats_incumbent(answers[0], np.stack(answers[1:]), alpha)
    # the accuracies the test saw: a fresh train-only fit may differ a little from the warm-started sweep's figure
    incumbent_val = round(float(np.mean(answers[0])), 6)
    return {**test, "paired": paired, "incumbent_val": incumbent_val,
            "candidate_val": round(incumbent_val + test["gain"], 6)}


def encoder_candidates(cache_only: Mapping[str, str | Path], decision: Mapping, backbone: str) -> dict[str, dict]:
    """name → ``{"val", "n", "kind": "encoder"}`` for every cache-only head file (its sweep's validation accuracy at
    its chosen C: fitted on train alone, scored on val) and every fine-tuned head ``decision["heads"]`` compared."""
    from ..heads.head import load_head
    from ..store.hdf5 import FeatureStore

    candidates = {}
    for path in cache_only.values():
        if not Path(path).is_file():
            continue
        head = load_head(path)
        point = min(head.sweep, key=lambda p: abs(p["C"] - head.C)) if head.sweep else None
        if point is None:
            continue
        n = FeatureStore(head.store_path).count("val") if Path(head.store_path).is_file() else 0
        candidates[head.name] = {"val": float(point["val_accuracy"]), "n": n, "kind": "encoder"}
    for name, verdict in decision.get("heads", {}).items():
        if verdict.get("finetuned_val") is not None:
            candidates[f"{backbone}_ft__{name}"] = {"val": float(verdict["finetuned_val"]), "n": verdict["n"],
                                                     "kind": "encoder"}
    return candidates


def train_only_val_correct(model, store, records: Mapping[str, list]) -> np.ndarray:
    """(N_val,) bool: whether a baseline (``heads.baseline``) or hybrid head (``heads.hybrid``), its estimator refitted
    on the train rows alone (a saved model is refitted on train+val), gets each validation row of ``store`` right:
    the per-item answers behind its ``val_accuracy``. ``records``: ``{"train", "val"}`` records of the store's rows,
    in its order."""
    from sklearn.base import clone

    from ..heads.baseline import decode_pixels, read_texts

    y = np.array([r.label for r in records["train"]], dtype=np.int64)
    truth = np.array([r.label for r in records["val"]], dtype=np.int64)
    if hasattr(model, "weight"):  # the hybrid head: TF-IDF rows beside the store's embeddings
        from ..heads.hybrid import hybrid_rows

        texts, val_texts = read_texts(records["train"]), read_texts(records["val"])
        X, Xv = store.load("train", dtype=np.float32)[0], store.load("val", dtype=np.float32)[0]
        tfidf = clone(model.estimator.named_steps["tfidf"]).fit(texts)
        classify = clone(model.estimator.named_steps["classify"]).fit(hybrid_rows(tfidf, texts, X, model.weight), y)
        return classify.predict(hybrid_rows(tfidf, val_texts, Xv, model.weight)) == truth

    def inputs(split):
        rows = records[split]
        return model.features(read_texts(rows) if model.kind == "tfidf" else decode_pixels(rows))

    return clone(model.estimator).fit(inputs("train"), y).predict(inputs("val")) == truth


def train_only_val_predictions(head: TrainedHead, store: FeatureStore) -> dict[str, int] | float:
    """A head's estimator refitted at its own C on ``store``'s train split alone (a saved head is refitted on
    train+val, so its own validation score would be inflated), scored on the val split.

    Returns validation image id → predicted class (int) for the in-memory heads. ``sgd_logreg`` (streamed from
    the store) is not refitted: its sweep already fitted that C on train and scored it on val, and that accuracy
    (a float) is returned instead; so is it for a head that cannot be refitted on train alone (a calibrated head
    with fewer train items of a class than calibration folds).
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..heads.estimators import build_estimator

    head.check_store(store)
    swept = float(min(head.sweep, key=lambda point: abs(point["C"] - head.C))["val_accuracy"])
    if head.config.head == "sgd_logreg":
        return swept
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, _, ids = store.load("val", dtype=np.float32)
    estimator = build_estimator(head.config, head.C)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(X, y)
    except ValueError as exc:  # a calibrated head whose train split alone has fewer items per class than folds
        log.warning("%s: not refitted on the train split alone (%s): its sweep's validation accuracy stands", head.name,
                    exc)
        return swept
    return dict(zip(ids.tolist(), np.asarray(estimator.predict(Xv)).tolist(), strict=True))


def encoder_correct(name: str, cache_only: Mapping[str, str | Path], out: str | Path, store) -> np.ndarray | None:
    """(N_val,) bool: whether the encoder head ``name`` (a cache-only head file, or a fine-tuned one under
    ``out/heads``), refitted at its C on its train split alone (:func:`train_only_val_predictions`), gets each
    validation item of ``store`` right, in ``store``'s order. None for a streamed ``sgd_logreg`` head (its sweep keeps
    no per-item answers) or when its store lacks one of these items."""
    from ..heads.head import load_head
    from ..store.hdf5 import FeatureStore
    paths = [Path(p) for p in cache_only.values() if Path(p).is_file()] + [Path(out) / "heads" / f"{name}.skops"]
    head = next((h for h in (load_head(p) for p in paths if p.is_file()) if h.name == name), None)
    if head is None or not Path(head.store_path).is_file():
        return None
    predicted = train_only_val_predictions(head, FeatureStore(head.store_path))
    ids = store.ids("val").tolist()
    if not isinstance(predicted, dict) or any(i not in predicted for i in ids):
        return None
    return np.array([predicted[i] for i in ids]) == store.labels("val")


def deploy_best(backbone: str, data: str | Path, out: str | Path, cache_only: Mapping[str, str | Path],
                decision: Mapping, baseline: bool = True, hybrid: bool = True) -> dict:
    """Fit the baseline (and the hybrid head) on the store of the cache-only heads, save them under ``out``
    (``baseline.skops``, ``hybrid.skops``), and choose what to deploy. Returns the keys it adds to
    ``decision.json``: ``baseline``, ``hybrid`` (each its summary and file), ``candidates`` and ``deployed``
    (:func:`best_on_validation`). ``data``: the folder or manifest the store was extracted from (see
    :meth:`FeatureStore.source`)."""
    from ..heads.baseline import fit_baseline
    from ..heads.head import load_head
    from ..heads.records import store_records
    from ..store.hdf5 import FeatureStore

    out = Path(out)
    encoder = encoder_candidates(cache_only, decision, backbone)
    if not encoder:
        return {}
    head = load_head(next(Path(p) for p in cache_only.values() if Path(p).is_file()))
    store = FeatureStore(head.store_path)
    records = {split: store_records(store, split, data) for split in ("train", "val")}
    text = store.fingerprint.get("kind") == "text"
    added, others, correct = {}, {}, {}  # correct: per-item validation answers, for the rule's paired test
    if baseline:
        model = fit_baseline("tfidf" if text else "pixels", records["train"], records["val"], store.class_names,
                             backbone, store.fingerprint_hash, store_path=str(store.path))
        model.save(out / BASELINE_FILE)
        added["baseline"] = {**model.summary(), "file": BASELINE_FILE}
        others[model.name] = {"val": model.val_accuracy, "n": model.n_val, "kind": "baseline", "file": BASELINE_FILE}
        correct[model.name] = train_only_val_correct(model, store, records)
    if hybrid and text:
        from ..heads.hybrid import fit_hybrid

        model = fit_hybrid(store, records["train"], records["val"], backbone)
        model.save(out / HYBRID_FILE)
        added["hybrid"] = {**model.summary(), "file": HYBRID_FILE}
        others[model.name] = {"val": model.val_accuracy, "n": model.n_val, "kind": "hybrid", "file": HYBRID_FILE}
        correct[model.name] = train_only_val_correct(model, store, records)
    added["candidates"] = {**encoder, **others}
    if others:
        incumbent = best_encoder(encoder)
        correct[incumbent] = encoder_correct(incumbent, cache_only, out, store)
    added["deployed"] = best_on_validation(encoder, others, correct)
    log.info(added["deployed"]["reason"])
    return added
