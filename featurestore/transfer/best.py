"""The verdict: which model a data set deploys, chosen on validation by the one rule of every choice between models.

Candidates are model files, each with its settings chosen on the validation split, refitted on the train split alone
and scored on the validation items of the same data set (the same items, matched by content id):

- encoder heads (``kind`` ``"encoder"``): every cache-only head of the backbone, and every head on the fine-tuned
  backbone when fine-tuning was kept;
- ``baseline``: TF-IDF + logistic regression (texts) or raw pixels + logistic regression (images), no encoder
  (``heads.baseline``);
- ``hybrid`` (texts): one logistic regression on the encoder's embedding beside TF-IDF rows (``heads.hybrid``).

The incumbent is the head fine-tuning starts from (the pipeline's first head, logreg), on the fine-tuned backbone when
the fine-tune decision kept it (that choice passed the same rule, paying for its epochs). Every other candidate is a
challenger: the best of them replaces the incumbent only when it beats it by more than the noise of the validation
split and the luck of having picked the best of the challengers there (``stats.beats_incumbent``: a paired sign-flip
max-statistic test on the per-item answers, p < ``ALPHA``). A tie or a lead within the noise keeps the incumbent. A
validation split too small to tell models apart (fewer than 100 items at the default alpha: a lead of 5 items with no
loss is the least that counts) is named in a warning, logged and kept in ``deployed["warning"]``.

What is deployed is what export ships: ``deployed`` names the model's file and its SHA-256, and
``deploy.deployment.deployed_model`` returns exactly that file (:func:`deployed_record` is the small record the DVC
export stage depends on). :func:`verdict` computes it from model files, for notebooks and ``featurestore verdict``;
the fine-tune stage calls it through :func:`deploy_best`, after fitting the baseline and the hybrid head.

``deployed`` (schema :data:`VERDICT_SCHEMA`): ``schema``, ``rule``, ``alpha``, ``model`` (the deployed model's kind:
``"encoder"``, ``"baseline"`` or ``"hybrid"``), ``name``, ``file`` (relative to the decision's folder when written by a
stage), ``sha256``, ``val_accuracy``, ``incumbent``, ``incumbent_val``, ``best_encoder`` and ``best_encoder_val`` (the
encoder head with the highest validation figure), ``baseline`` and ``baseline_val``, ``n`` (validation items),
``test`` (the rule's figures: ``candidate``, ``candidates``, ``gain``, ``fixes``, ``breaks``, ``p_value``, ``beats``,
``paired``, ``incumbent_val``, ``candidate_val``; None without challengers), ``warning`` and ``reason``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .stats import ALPHA, beats_incumbent

if TYPE_CHECKING:
    from ..heads.head import TrainedHead
    from ..store.hdf5 import FeatureStore

log = logging.getLogger("featurestore")

BASELINE_FILE, HYBRID_FILE = "baseline.skops", "hybrid.skops"
DEPLOYED_FILE = "deployed.json"  # the small record an export depends on: name, kind, file, sha256
VERDICT_SCHEMA = 1
RULE = "max_gain"  # stats.beats_incumbent (max_gain_test at ALPHA); chosen by benchmarks/decision_rule.py


def best_encoder(encoder: Mapping[str, Mapping]) -> str:
    """The encoder head with the highest validation accuracy (the first of equals)."""
    if not encoder:
        raise ValueError("best_on_validation needs at least one encoder head")
    return max(encoder, key=lambda name: encoder[name]["val"])


def best_on_validation(encoder: Mapping[str, Mapping], others: Mapping[str, Mapping],
                       correct: Mapping[str, np.ndarray | None] | None = None, alpha: float = ALPHA,
                       incumbent: str | None = None) -> dict:
    """Which model to deploy: the ``incumbent`` encoder head unless a challenger (every other encoder head and every
    other candidate) beats it beyond the noise of the validation split (``stats.beats_incumbent``).

    ``encoder``: name → ``{"val": float, "n": int[, "file"]}`` for every encoder head (at least one); ``others``: name →
    ``{"val", "n", "kind": "baseline" | "hybrid", "file"}``; ``incumbent``: an encoder head's name (default: the first
    listed). ``correct``: name → (N,) bool, each model's per-item correctness on the same N validation items (fitted on
    train alone). The test is paired when every model's is given; otherwise (a streamed ``sgd_logreg`` head, a caller
    with accuracies alone) it runs on the most favourable pairing the accuracies allow (each challenger's lead as that
    many fixes and no break, its answers nested in one another), an optimistic bound under which a lead smaller than
    ``stats.min_detectable_lead`` items still never counts; ``test["paired"]`` says which.

    Returns ``decision["deployed"]`` (the module docstring lists its keys; ``sha256`` is the caller's to fill).
    """
    leader = best_encoder(encoder)
    incumbent = next(iter(encoder)) if incumbent is None else incumbent
    if incumbent not in encoder:
        raise ValueError(f"the incumbent {incumbent!r} is not among the encoder heads {list(encoder)}")
    challengers = {**{name: {**c, "kind": "encoder"} for name, c in encoder.items() if name != incumbent}, **others}
    incumbent_val = float(encoder[incumbent]["val"])
    baseline = next((name for name, c in others.items() if c.get("kind") == "baseline"), None)
    verdict = {"schema": VERDICT_SCHEMA, "rule": RULE, "alpha": alpha, "model": "encoder", "name": incumbent,
               "file": encoder[incumbent].get("file"), "sha256": None, "val_accuracy": incumbent_val,
               "incumbent": incumbent, "incumbent_val": incumbent_val, "best_encoder": leader,
               "best_encoder_val": float(encoder[leader]["val"]), "baseline": baseline,
               "baseline_val": None if baseline is None else float(others[baseline]["val"]),
               "n": int(encoder[incumbent].get("n", 0)), "test": None, "warning": None}
    if not challengers:
        verdict["reason"] = (f"{incumbent} scores {incumbent_val:.4f} on validation and no other model was fitted: "
                             f"it is deployed")
        return verdict
    names = list(challengers)
    test = _test(incumbent, encoder, names, challengers, correct or {}, alpha)
    best = names[test["epoch"] - 1] if test["epoch"] else max(names, key=lambda name: challengers[name]["val"])
    test = {"candidate": best, **{k: v for k, v in test.items() if k != "epoch"}}
    verdict.update(n=test["n"], test=test, warning=test.pop("warning"))
    chosen = challengers[best]
    against = (f"{best} ({chosen['kind']}) scores {test['candidate_val']:.4f} on {test['n']} validation items "
               f"against {test['incumbent_val']:.4f} for {incumbent}")
    pairing = "" if test["paired"] else ", unpaired: the most favourable pairing of the accuracies"
    of = f"the choice among {test['candidates']} challengers (sign-flip max-statistic p = {test['p_value']:.4f}"
    if test["beats"]:
        verdict.update(model=chosen["kind"], name=best, file=chosen.get("file"), val_accuracy=float(chosen["val"]))
        verdict["reason"] = (f"{against}: {test['fixes']} fixed, {test['breaks']} broken, beyond the noise and {of} < "
                             f"{alpha}{pairing}): {best} is deployed")
    elif test["gain"] > 0:
        verdict["reason"] = (f"{against}: a lead of {test['gain']:+.4f} ({test['fixes']} fixed, {test['breaks']} "
                             f"broken) within the noise and {of} >= {alpha}{pairing}): {incumbent} stays deployed")
    else:  # the figures of the train-only fits the test saw, which may differ a little from the sweeps' figures
        verdict["reason"] = (f"{against}: no lead over the incumbent ({test['fixes']} fixed, {test['breaks']} "
                             f"broken): {incumbent} stays deployed")
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


def train_only_val_correct(model, store, records: Mapping[str, list]) -> np.ndarray:
    """(N_val,) bool: whether a baseline (``heads.baseline``) or hybrid head (``heads.hybrid``), its estimator refitted
    on the train rows alone (a saved model is refitted on train+val), gets each validation row of ``store`` right:
    the per-item answers behind its ``val_accuracy``. ``records``: ``{"train", "val"}`` records of the store's rows,
    in its order."""
    from sklearn.base import clone

    from ..heads.baseline import decode_pixels, read_texts

    y = np.array([r.label for r in records["train"]], dtype=np.int64)
    truth = np.array([r.label for r in records["val"]], dtype=np.int64)
    from ..heads.hybrid import HYBRID_FORMAT, hybrid_rows

    if model.MODEL_KIND == HYBRID_FORMAT:  # TF-IDF rows beside the store's embeddings

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
    """A head's estimator refitted at its own settings on ``store``'s train split alone (a saved head is refitted on
    train+val, so its own validation score would be inflated), scored on the val split.

    Returns validation image id → predicted class (int) for the in-memory heads. A head its family does not refit in
    memory (``sgd_logreg``, streamed from the store) is not refitted: its sweep already fitted those settings on
    train and scored them on val, and that accuracy (a float) is returned instead; so is it for a head that cannot
    be refitted on train alone (a calibrated head with fewer train items of a class than calibration folds).
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..heads.families import family_of

    head.check_store(store)
    swept = head.val_accuracy
    family = family_of(head.config.head)
    if not family.refits():
        return swept
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, _, ids = store.load("val", dtype=np.float32)
    estimator = family.build(head.config, head.settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(X, y)
    except ValueError as exc:  # a calibrated head whose train split alone has fewer items per class than folds
        log.warning("%s: not refitted on the train split alone (%s): its sweep's validation accuracy stands", head.name,
                    exc)
        return swept
    return dict(zip(ids.tolist(), np.asarray(estimator.predict(Xv)).tolist(), strict=True))


def load_model_file(path: str | Path) -> tuple[str, object]:
    """(kind, model) of any deployable model file (``heads.model_file``): ``"baseline"``, ``"hybrid"`` or
    ``"encoder"`` (a head: an encoder's features and a classifier)."""
    from ..heads.model_file import load_model, model_kind

    kind = model_kind(path)
    return ("encoder" if kind == "head" else kind), load_model(path)


def _store_of(model, path: Path) -> FeatureStore:
    from ..errors import FeaturestoreError
    from ..store.hdf5 import FeatureStore

    if not Path(model.store_path).is_file():
        raise FeaturestoreError(f"{path}: its feature store {model.store_path} is not there to compare it on (run from "
                                f"the folder it was trained in)")
    return FeatureStore(model.store_path)


def val_answers(kind: str, model, path: Path, data: str | Path | None = None,
                records: dict[str, dict[str, list]] | None = None) -> tuple[float, int, dict | None]:
    """A model's validation figure, its number of validation items, and its per-item answers (validation content id →
    right or wrong, bool) from a fit on the train split alone; None where there are none (a streamed ``sgd_logreg``
    head, or a head that cannot be refitted on train alone). ``data``: where the store's items are, for the models
    that read them (default: the store's recorded source). ``records``: store path → its ``{"train", "val"}``
    records, filled here where missing, so that models of one store rebuild (and hash) its items once."""
    store = _store_of(model, path)
    ids, labels = store.ids("val").tolist(), store.labels("val")
    if kind == "encoder":
        val = model.val_accuracy if model.sweep else float("nan")
        predicted = train_only_val_predictions(model, store)
        if not isinstance(predicted, dict):
            return val, len(ids), None
        return val, len(ids), {i: predicted[i] == int(y) for i, y in zip(ids, labels, strict=True)}
    from ..heads.records import store_records

    records = {} if records is None else records
    if str(store.path) not in records:
        records[str(store.path)] = {split: store_records(store, split, data) for split in ("train", "val")}
    correct = train_only_val_correct(model, store, records[str(store.path)])
    return float(model.val_accuracy), int(model.n_val), dict(zip(ids, correct.tolist(), strict=True))


def verdict(models: Sequence[str | Path], incumbent: str | None = None, data: str | Path | None = None,
            alpha: float = ALPHA, relative_to: str | Path | None = None,
            records: dict[str, dict[str, list]] | None = None) -> dict:
    """The verdict over model files (heads, baselines, hybrid heads of one data set): ``{"candidates": name →
    {kind, file, sha256, val, n}, "deployed": ...}`` (``deployed``: :func:`best_on_validation`'s, with ``file`` and
    ``sha256``). ``incumbent``: an encoder head's name (default: the first head listed). Every model is refitted on
    its train split alone and scored on the validation items of the incumbent's store (matched by content id).
    ``relative_to``: a folder the recorded ``file`` paths are written relative to (a stage's output folder).
    ``records``: store path → ``{"train", "val"}`` records the caller already rebuilt (see :func:`val_answers`).

    Notebook: ``verdict(["data/heads/x__logreg.skops", "data/heads/x__linear_svm.skops"])["deployed"]["name"]``."""
    from ..data.sources import content_id
    from ..errors import FeaturestoreError

    loaded: dict[str, tuple[str, object, Path]] = {}
    for path in map(Path, models):
        kind, model = load_model_file(path)
        if model.name in loaded:
            raise FeaturestoreError(f"{path} and {loaded[model.name][2]} both hold a model named {model.name}: a "
                                    f"verdict tells models apart by name (train one under another --name)")
        loaded[model.name] = (kind, model, path)
    heads = [name for name, (kind, _, _) in loaded.items() if kind == "encoder"]
    if not heads:
        raise FeaturestoreError("a verdict needs at least one head (an encoder head is the incumbent)")
    incumbent = heads[0] if incumbent is None else incumbent
    if incumbent not in heads:
        raise FeaturestoreError(f"the incumbent {incumbent!r} is not among the heads given: {heads}")
    records = {} if records is None else dict(records)
    figures = {name: val_answers(kind, model, path, data, records) for name, (kind, model, path) in loaded.items()}
    reference = _store_of(loaded[incumbent][1], loaded[incumbent][2]).ids("val").tolist()
    correct = {name: None if answers is None or any(i not in answers for i in reference)
               else np.array([answers[i] for i in reference]) for name, (_, _, answers) in figures.items()}

    def where(path: Path) -> str:
        return Path(os.path.relpath(path, relative_to)).as_posix() if relative_to is not None else str(path)

    candidates = {name: {"kind": kind, "file": where(path), "sha256": content_id(path), "val": figures[name][0],
                         "n": figures[name][1]} for name, (kind, _, path) in loaded.items()}
    encoder = {name: c for name, c in candidates.items() if c["kind"] == "encoder"}
    encoder = {incumbent: encoder[incumbent], **encoder}
    others = {name: c for name, c in candidates.items() if c["kind"] != "encoder"}
    deployed = best_on_validation(encoder, others, correct, alpha, incumbent)
    deployed.update(file=candidates[deployed["name"]]["file"], sha256=candidates[deployed["name"]]["sha256"])
    return {"candidates": candidates, "deployed": deployed}


def deployed_record(deployed: Mapping) -> dict:
    """What an export needs of a verdict, and all it depends on: ``{"name", "model", "file", "sha256"}``."""
    return {key: deployed[key] for key in ("name", "model", "file", "sha256")}


def write_verdict(result: Mapping, out: str | Path) -> Path:
    """``out`` (a verdict's JSON) and, beside it, :data:`DEPLOYED_FILE` (:func:`deployed_record`). Returns ``out``."""
    from ..utils.atomic import write_text_atomic

    out = Path(out)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    write_text_atomic(out.parent / DEPLOYED_FILE, json.dumps(deployed_record(result["deployed"]), indent=2) + "\n")
    return out


def deploy_best(backbone: str, data: str | Path, out: str | Path, cache_only: Mapping[str, str | Path],
                decision: Mapping, baseline: bool = True, hybrid: bool = True) -> dict:
    """Fit the baseline (and the hybrid head) on the store of the cache-only heads, save them under ``out``
    (``baseline.skops``, ``hybrid.skops``), and give the :func:`verdict` over them, every cache-only head and, when
    the fine-tune decision kept the fine-tuned backbone, every head on it (``out/heads``). The incumbent is the first
    cache-only head's counterpart on the chosen backbone. Returns the keys it adds to ``decision.json``: ``baseline``,
    ``hybrid`` (each its summary and file), ``candidates`` and ``deployed``. ``data``: the folder or manifest the store
    was extracted from (see :meth:`FeatureStore.source`)."""
    from ..heads.baseline import fit_baseline
    from ..heads.head import load_head
    from ..heads.records import store_records
    from ..store.hdf5 import FeatureStore

    out = Path(out)
    files = [Path(p) for p in cache_only.values() if Path(p).is_file()]
    if not files:
        return {}
    first = load_head(files[0])
    incumbent = first.name
    if decision.get("chosen") == "finetuned":
        tuned = sorted((out / "heads").glob("*.skops"))
        files += tuned
        incumbent = f"{backbone}_ft__{first.config.head}"
    store = FeatureStore(first.store_path)
    text = store.fingerprint.get("kind") == "text"
    added = {}
    if baseline or (hybrid and text):
        records = {split: store_records(store, split, data) for split in ("train", "val")}
    if baseline:
        model = fit_baseline("tfidf" if text else "pixels", records["train"], records["val"], store.class_names,
                             backbone, store.fingerprint_hash, store_path=str(store.path))
        model.save(out / BASELINE_FILE)
        added["baseline"] = {**model.summary(), "file": BASELINE_FILE}
        files.append(out / BASELINE_FILE)
    if hybrid and text:
        from ..heads.hybrid import fit_hybrid

        model = fit_hybrid(store, records["train"], records["val"], backbone)
        model.save(out / HYBRID_FILE)
        added["hybrid"] = {**model.summary(), "file": HYBRID_FILE}
        files.append(out / HYBRID_FILE)
    added.update(verdict(files, incumbent, data, relative_to=out,
                         records={str(store.path): records} if baseline or (hybrid and text) else None))
    log.info(added["deployed"]["reason"])
    return added
