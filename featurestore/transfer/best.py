"""The best model on validation is the one deployed, and the decision says so when it is a baseline.

Candidates, each with its C chosen on the validation split, fitted on the train split alone and scored on the
validation split of the same feature store (the same rows, picked by content id):

- ``encoder``: every cache-only head of the backbone (the point of its own C sweep at its chosen C), and every head
  on the fine-tuned backbone when fine-tuning was kept (``decision["heads"]``, ``compare_heads``' figure);
- ``baseline``: TF-IDF + logistic regression (texts) or raw pixels + logistic regression (images), no encoder
  (``heads.baseline``);
- ``hybrid`` (texts): one logistic regression on the encoder's embedding beside TF-IDF rows
  (``heads.hybrid``).

:func:`best_on_validation` (pure) deploys the baseline or the hybrid head only when it is strictly better than every
encoder head; a tie keeps the encoder head, and each export entry then ships its own head as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("featurestore")

BASELINE_FILE, HYBRID_FILE = "baseline.skops", "hybrid.skops"


def best_on_validation(encoder: Mapping[str, Mapping], others: Mapping[str, Mapping]) -> dict:
    """Which model to deploy, from validation accuracies alone.

    ``encoder``: name → ``{"val": float, "n": int}`` for every encoder head (at least one); ``others``: name →
    ``{"val", "n", "kind": "baseline" | "hybrid", "file"}``. Returns ``decision["deployed"]``: ``{"model":
    "encoder" | "baseline" | "hybrid", "name", "file", "val_accuracy", "best_encoder", "best_encoder_val",
    "baseline", "baseline_val", "n", "reason"}``; ``model`` is not ``"encoder"`` only when that candidate's
    accuracy is strictly above every encoder head's (ties keep the encoder; among others the first best wins).
    """
    if not encoder:
        raise ValueError("best_on_validation needs at least one encoder head")
    best_encoder = max(encoder, key=lambda name: encoder[name]["val"])  # the first of equals
    encoder_val = float(encoder[best_encoder]["val"])
    baseline = next((name for name, c in others.items() if c.get("kind") == "baseline"), None)
    verdict = {"model": "encoder", "name": best_encoder, "file": None, "val_accuracy": encoder_val,
               "best_encoder": best_encoder, "best_encoder_val": encoder_val, "baseline": baseline,
               "baseline_val": None if baseline is None else float(others[baseline]["val"]),
               "n": int(encoder[best_encoder].get("n", 0))}
    best_other = max(others, key=lambda name: others[name]["val"]) if others else None
    if best_other is not None and others[best_other]["val"] > encoder_val:
        chosen = others[best_other]
        verdict.update(model=chosen["kind"], name=best_other, file=chosen.get("file"),
                       val_accuracy=float(chosen["val"]))
        verdict["reason"] = (f"{best_other} ({chosen['kind']}) scores {chosen['val']:.4f} on {chosen.get('n', '?')} "
                             f"validation items against {encoder_val:.4f} for the best encoder head, {best_encoder}: "
                             f"the {chosen['kind']} is deployed")
    else:
        against = ", ".join(f"{name} ({c['kind']}) {c['val']:.4f}" for name, c in others.items()) or "nothing"
        verdict["reason"] = (f"the best encoder head, {best_encoder}, scores {encoder_val:.4f} on validation, at or "
                             f"above {against}: the encoder's heads stay deployed")
    return verdict


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


def deploy_best(backbone: str, data: str | Path, out: str | Path, cache_only: Mapping[str, str | Path],
                decision: Mapping, baseline: bool = True, hybrid: bool = True) -> dict:
    """Fit the baseline (and the hybrid head) on the store of the cache-only heads, save them under ``out``
    (``baseline.skops``, ``hybrid.skops``), and choose what to deploy. Returns the keys it adds to
    ``decision.json``: ``baseline``, ``hybrid`` (each its summary and file), ``candidates`` and ``deployed``
    (:func:`best_on_validation`)."""
    from ..data.sources import scan_source
    from ..heads.baseline import fit_baseline
    from ..heads.head import load_head
    from ..store.hdf5 import FeatureStore
    from .probe import records_for, split_rows

    out = Path(out)
    encoder = encoder_candidates(cache_only, decision, backbone)
    if not encoder:
        return {}
    head = load_head(next(Path(p) for p in cache_only.values() if Path(p).is_file()))
    store = FeatureStore(head.store_path)
    source = scan_source(data)
    records = {split: records_for(source, split_rows(store, split), store) for split in ("train", "val")}
    text = store.fingerprint.get("kind") == "text"
    added, others = {}, {}
    if baseline:
        model = fit_baseline("tfidf" if text else "pixels", records["train"], records["val"], store.class_names,
                             backbone, store.fingerprint_hash, store_path=str(store.path))
        model.save(out / BASELINE_FILE)
        added["baseline"] = {**model.summary(), "file": BASELINE_FILE}
        others[model.name] = {"val": model.val_accuracy, "n": model.n_val, "kind": "baseline", "file": BASELINE_FILE}
    if hybrid and text:
        from ..heads.hybrid import fit_hybrid

        model = fit_hybrid(store, records["train"], records["val"], backbone)
        model.save(out / HYBRID_FILE)
        added["hybrid"] = {**model.summary(), "file": HYBRID_FILE}
        others[model.name] = {"val": model.val_accuracy, "n": model.n_val, "kind": "hybrid", "file": HYBRID_FILE}
    added["candidates"] = {**encoder, **others}
    added["deployed"] = best_on_validation(encoder, others)
    log.info(added["deployed"]["reason"])
    return added
