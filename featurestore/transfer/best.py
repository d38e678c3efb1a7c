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
the DVC pipeline's ``verdict@<backbone>`` stage calls it through :func:`run_verdict_stage`, over the cache-only heads,
the heads on the fine-tuned backbone (stage ``train_head_ft``) and the baseline and hybrid head
(:func:`run_challenger_stage`, stages ``baseline`` and ``hybrid``), each a stage of its own, so that a change to one
candidate reruns only that candidate and the verdict.

``deployed`` (schema :data:`VERDICT_SCHEMA`): ``schema``, ``rule``, ``alpha``, ``model`` (the deployed model's kind:
``"encoder"``, ``"baseline"`` or ``"hybrid"``), ``name``, ``file`` (relative to the verdict's folder when written by a
stage), ``sha256``, ``val_accuracy``, ``incumbent``, ``incumbent_val``, ``best_encoder`` and ``best_encoder_val`` (the
encoder head with the highest validation figure), ``baseline`` and ``baseline_val``, ``n`` (validation items),
``test`` (the rule's figures: ``candidate``, ``candidates``, ``gain``, ``fixes``, ``breaks``, ``p_value``, ``beats``,
``paired``, ``incumbent_val``, ``candidate_val``; None without challengers), ``warning`` and ``reason``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..configs import CHALLENGERS, SMALL_CNN_DEFAULTS, SmallCNNConfig
from ..errors import FeaturestoreError
from ..utils.atomic import write_status
from ..utils.validation import check_choice
from .stats import ALPHA, beats_incumbent

if TYPE_CHECKING:
    from ..heads.head import TrainedHead
    from ..store.hdf5 import FeatureStore

log = logging.getLogger("featurestore")

BASELINE_FILE, HYBRID_FILE = "baseline.skops", "hybrid.skops"
# The deployable small CNN keeps each rate's last round: its validation score is then chosen among 3 rates, not among
# 90 rounds (measured on the default images at 100 per class: best round val 0.864 / test 0.8405).
DEPLOYED_SMALL_CNN = replace(SMALL_CNN_DEFAULTS, keep_round="last")
CHALLENGER_FILES = {"baseline": BASELINE_FILE, "hybrid": HYBRID_FILE, "small_cnn": "small_cnn.skops"}
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
    from ..heads.families import family_of

    head.check_store(store)
    swept = head.val_accuracy
    family = family_of(head.config.head)
    if not family.refits():
        return swept
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, _, ids = store.load("val", dtype=np.float32)
    try:  # the family's own refit, as the head itself was refitted on train+val
        estimator = family.refit(head.config, head.settings, X, y)
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

    if getattr(model, "val_answers", None) and set(model.val_answers) == set(ids) \
            and getattr(model, "store_fingerprint_hash", None) == store.fingerprint_hash:
        return float(model.val_accuracy), int(model.n_val), dict(model.val_answers)  # fit_challenger made them
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
    from ..utils.timings import write_json

    out = Path(out)
    write_json(out, result)  # in a DVC stage its seconds (the candidates' train_seconds) go to the timings folder
    write_json(out.parent / DEPLOYED_FILE, deployed_record(result["deployed"]))
    return out


SPLIT_METRICS = "metrics.json"  # a challenger's metrics on the evaluation split, beside its model file
VERDICT_FILE = "verdict.json"


def not_applicable(kind: str, text: bool) -> str | None:
    """Why challenger ``kind`` does not apply to a store of texts (``text``) or images, None when it does."""
    if kind == "hybrid" and not text:
        return "the hybrid head reads texts: not for an image store"
    if kind == "small_cnn" and text:
        return "the small CNN trains on images: not for a text store"
    return None


def fit_challenger(kind: str, store_path: str | Path | FeatureStore, data: str | Path | None = None,
                   name: str | None = None, small_cnn: SmallCNNConfig | None = None):
    """One challenger of the verdict fitted on the items of ``store_path``'s train split, its settings chosen on
    val: ``baseline`` (TF-IDF for texts, raw pixels for images, + logistic regression), ``hybrid`` (texts only:
    [w x embedding, TF-IDF] + logistic regression) or ``small_cnn`` (images only: a small CNN from scratch,
    ``transfer.small_cnn``, with the ``small_cnn`` settings, not refitted on train+val). ``data``: where the
    store's items are (default its recorded source); ``name``: the store's name its model is named after
    (``<name>__<kind>``; default the store's backbone). Returns the model (a ``heads.baseline.BaselineModel``,
    ``heads.hybrid.HybridModel`` or ``heads.cnn.SmallCNNModel``); raises :class:`FeaturestoreError` for a hybrid
    head on images or a small CNN on texts."""
    from ..heads.baseline import fit_baseline
    from ..heads.records import store_records
    from ..store.hdf5 import FeatureStore

    check_choice("challenger", kind, CHALLENGERS)
    store = store_path if isinstance(store_path, FeatureStore) else FeatureStore(store_path)
    text = store.fingerprint.get("kind") == "text"
    refused = not_applicable(kind, text)
    if refused:
        raise FeaturestoreError(f"{store.path}: {refused}")
    name = name or str(store.fingerprint.get("backbone", "unknown"))
    records = {split: store_records(store, split, data) for split in ("train", "val")}
    if kind == "small_cnn":  # not refitted on train+val (its round is chosen on val): its val answers are its own
        from .small_cnn import fit_small_cnn_model

        model = fit_small_cnn_model(records, store.class_names, name, small_cnn or DEPLOYED_SMALL_CNN,
                                    store_fingerprint_hash=store.fingerprint_hash, store_path=str(store.path),
                                    val_ids=store.ids("val").tolist())
        model.corrections = store.corrections_record
        return model
    if kind == "baseline":
        model = fit_baseline("tfidf" if text else "pixels", records["train"], records["val"], store.class_names,
                             name, store.fingerprint_hash, store_path=str(store.path))
    else:
        from ..heads.hybrid import fit_hybrid

        model = fit_hybrid(store, records["train"], records["val"], name)
    model.corrections = store.corrections_record
    # the verdict's per-item answers, made once here rather than by every verdict that weighs it
    model.val_answers = dict(zip(store.ids("val").tolist(), train_only_val_correct(model, store, records).tolist(),
                                 strict=True))
    return model


def run_challenger_stage(kind: str, name: str, store_path: str | Path, out: str | Path,
                         data: str | Path | None = None, enabled: bool = True, split: str | None = None,
                         small_cnn: SmallCNNConfig | None = None) -> dict:
    """The stages ``baseline`` and ``hybrid``: :func:`fit_challenger` into ``out/<kind>.skops``, with
    ``out/status.json`` saying what was done (``fitted`` and why not: disabled, or a hybrid head of images), so
    that the folder is a DVC output either way. ``name``: the store's (its models are ``<name>__<kind>``, e.g.
    ``fashion_mnist__pixels_logreg``). ``split``: also evaluate the model on that split of the store (when it has
    one) into ``out/<SPLIT_METRICS>`` (``heads.baseline.evaluate_model``'s metrics), as ``train_head``'s stage does
    for a head, so that the summary of a head experiment does not evaluate it again. Returns the status."""
    from ..store.hdf5 import FeatureStore

    check_choice("challenger", kind, CHALLENGERS)
    out = Path(out)
    model_file = out / CHALLENGER_FILES[kind]
    for earlier in (model_file, out / SPLIT_METRICS):
        earlier.unlink(missing_ok=True)
    status = {"kind": kind, "store": name, "fitted": False}
    if not enabled:
        write_status(out, {**status, "reason": f"deploy.{kind} is off"})
        return status
    store = FeatureStore(store_path)
    refused = not_applicable(kind, store.fingerprint.get("kind") == "text")
    if refused:
        write_status(out, {**status, "reason": refused})
        return status
    model = fit_challenger(kind, store_path, data, name, small_cnn)
    model.save(model_file)
    status = {**status, "fitted": True, "file": model_file.name, "name": model.name}
    if split is not None and split in store.splits:
        from ..heads.baseline import evaluate_model
        from ..heads.records import store_records
        from ..utils.timings import write_json

        write_json(out / SPLIT_METRICS, evaluate_model(model, store, store_records(store, split, data), split),
                   sort_keys=True)
        status["evaluated_on"] = split
    write_status(out, status)
    return status


def verdict_candidates(heads: Sequence[str | Path], finetune_dir: str | Path | None,
                       challengers: Sequence[str | Path]) -> tuple[list[Path], str | None]:
    """The model files a data set's verdict weighs and its incumbent's name: the cache-only heads (the first is
    the incumbent), the heads on the fine-tuned backbone when the fine-tune decision (``finetune_dir/decision.json``)
    kept it (each in its folder of ``challengers``, with the incumbent's counterpart as incumbent), and the fitted
    baseline and hybrid head found in ``challengers`` (folders written by :func:`run_challenger_stage` and the
    fine-tuned heads' stage)."""
    from ..heads.head import load_head
    from ..heads.model_file import model_kind

    files = [Path(p) for p in heads if Path(p).is_file()]
    if not files:
        return [], None
    first = load_head(files[0])
    incumbent = first.name
    decision_file = Path(finetune_dir) / "decision.json" if finetune_dir is not None else None
    finetuned = (decision_file is not None and decision_file.is_file()
                 and json.loads(decision_file.read_text()).get("chosen") == "finetuned")
    for folder in map(Path, challengers):
        for path in sorted(folder.glob("*.skops")):
            kind = model_kind(path)
            if kind == "head" and not finetuned:
                continue  # a head on a fine-tuned store the decision since dropped
            files.append(path)
            if kind == "head" and finetuned and path.stem == f"{first.store_name or first.backbone}_ft__{first.label}":
                incumbent = path.stem
    return files, incumbent


def run_verdict_stage(heads: Sequence[str | Path], finetune_dir: str | Path | None,
                      challengers: Sequence[str | Path], out: str | Path, data: str | Path | None = None) -> dict:
    """The verdict stage of one data set: :func:`verdict` over :func:`verdict_candidates`, written to
    ``out/verdict.json`` with ``out/deployed.json`` beside it (the record its export ships). Returns the verdict."""
    out = Path(out)
    files, incumbent = verdict_candidates(heads, finetune_dir, challengers)
    if not files:
        raise FeaturestoreError(f"no head files among {', '.join(map(str, heads))}: nothing to give a verdict on")
    out.mkdir(parents=True, exist_ok=True)
    result = verdict(files, incumbent, data, relative_to=out)
    write_verdict(result, out / VERDICT_FILE)
    log.info(result["deployed"]["reason"])
    return result
