"""Fine-tune only when it pays, and keep the result only when it is better: the fine-tune stage as a function.

1. The mode: ``never``; ``always``; or ``auto``, which fine-tunes only when the plateau rule says the
   cache-only curve has stopped improving with more labels (``plateau.py``).
2. Fine-tuning from the logistic-regression probe: the top blocks on the trunk cache for images
   (``finetune.py``), the top transformer layers for texts (``text_finetune.py``).
3. The choice (:func:`choose`, a pure function of the training result): the fine-tuned network (its best epoch
   on validation) replaces the probe only when it beats the probe by more than the noise of the validation
   split *and* the luck of having picked the best of its epochs on that same split. The rule, ``max_gain``
   (``stats.max_gain_test``): a paired sign-flip randomisation test whose statistic is the best epoch's gain
   over the probe; each of its 2,000 randomisations swaps the probe's and the fine-tuned answers on a random
   half of the images (the same swap for every epoch of an image) and takes the maximum gain over the epochs
   again, so the selection of the epoch is repeated inside the test. Kept when p < ``ALPHA`` = 0.05.
4. If chosen, the fine-tuned weights become backbone ``<backbone>_ft`` (its checkpoint hash in every
   fingerprint) and its store is extracted. Its heads are trained by stages of their own (``train_head_ft``), and
   the verdict over every candidate (``best.run_verdict_stage``) is a stage of its own too, so that a head's settings
   rerun neither the fine-tune nor each other.

Why this rule (issue 17). Until then the rule was the lower bound of an 80% paired bootstrap interval of the best
epoch's gain > 0: the best of up to 12 epochs and the probe, judged on the images it was picked on. It kept a
best epoch that fixes 3 of 500 images and breaks none (interval [+0.002, +0.010]), and, when every epoch was
the probe plus zero-mean noise, kept fine-tuning in 40-61% of the seeds. ``benchmarks/decision_rule.py``
simulated each candidate (1,000 seeds, 500 validation images, probe 0.80, 12 epochs): zero-mean noise that
breaks 2% or 5% of the right answers and fixes as many wrong ones, in independent or slowly changing epochs;
random-class noise on 10% of the answers; and a real +3 points expected (3.5% of the right answers broken,
about 43 disagreements before the noise) along six trajectories: a ramp over 3 epochs under three kinds of
noise, a short and a long dip below the probe first, a peak then overfitting stopped at epoch 8. Eligible: the
probe kept in >= 95% of the seeds of every noise scenario, also at the one-sided 95% upper bound of the measured
rate (so that a 100-seed test passes without luck). Share of seeds where the probe is kept under noise (the worst
of the four zero-mean scenarios; under random-class noise every rule keeps it in 100%), and where the +3-point
gain is kept (worst and mean over the six trajectories):

| rule                                              | probe kept | gain kept, worst | gain kept, mean |
| ------------------------------------------------- | ---------- | ---------------- | --------------- |
| bootstrap80 (the old rule)                        | 38.9%      | 92.2%            | 97.2%           |
| exact sign test of the best epoch, p < 0.05       | 69.7%      | 79.9%            | 91.6%           |
| the same, Bonferroni × 12 epochs                  | 96.8%      | 40.4%            | 57.3%           |
| epoch chosen on half of val, sign test on the rest | 96.8%    | 25.6%            | 31.0%           |
| sign-flip test of the mean gain over the epochs   | 95.6%      | 33.8%            | 71.1%           |
| max_gain, p < 0.05 (chosen)                       | 96.5%      | 58.5%            | 70.2%           |
| max_gain, p < 0.025                               | 98.3%      | 46.6%            | 58.3%           |

``max_gain`` at 0.05 keeps the probe in at least 96.5% of the seeds of every noise scenario (96.5-98.1%; the
95% upper bound of the worst false-keep rate, 4.5%, is under 5%) and keeps a +3-point gain most often in the
worst trajectory; the mean gain over the epochs is a little stronger on a steady plateau (96.7% against 82.6%)
but loses real gains that start with a dip (33.8% against 68.6% after a long one). The 3-of-500 case gets the
exact p-value 1/8 (all 2³ sign patterns): the probe stays. The price of honesty: 500 validation images are few
for 3 points once the choice of the epoch is paid for (58-83% kept over the trajectories); a larger validation
split is what raises it.

Several methods can compete (``methods``; for texts ``probe_finetune`` and ``setfit``, ``setfit.py``): every epoch of
every method is a candidate of the same test (:func:`choose_among`), so picking the method is paid for as picking
the epoch is, and the method of the best candidate is the one kept when the test passes.

Everything lands in ``out`` (the DVC stage's ``data/finetune/<backbone>/``): ``decision.json``, and when fine-tuning ran
``weights.pth`` (SetFit's in ``setfit.pth`` until chosen), ``trunk.h5`` (the cache, kept for the next run), and if
chosen ``backbone.json`` and ``features.h5``. ``decision.json``: mode, plateau verdict, whether fine-tuning ran and
why, and when it ran ``choice`` (chosen, method, rule, reason, val_probe, val_finetuned, gain: the gain, best epoch,
p-value, alpha, fixes, breaks, disagreements, n, epochs tested).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..configs import FINETUNE_METHODS, FINETUNE_MODES, FinetuneStageOptions, HeadConfig
from ..data.sources import ids_digest
from ..errors import FeaturestoreError
from ..store.hdf5 import FeatureStore
from ..utils.timings import write_json
from ..utils.validation import check_choice
from .stats import ALPHA, beats_incumbent

log = logging.getLogger("featurestore")

RULE = "max_gain"  # stats.beats_incumbent (max_gain_test at ALPHA); chosen by benchmarks/decision_rule.py (above)
STALE = ("decision.json", "deployed.json", "backbone.json", "weights.pth", "setfit.pth", "features.h5", "heads",
         "baseline.skops", "hybrid.skops")  # the last four: what the stage wrote before its heads and verdict moved


def should_finetune(mode: str, plateau: dict) -> tuple[bool, str]:
    """Whether to fine-tune, and why."""
    check_choice("finetune mode", mode, FINETUNE_MODES)
    if mode != "auto":
        return mode == "always", f"mode is {mode}"
    return bool(plateau["plateaued"]), plateau["reason"]


def _correctness(result) -> tuple[np.ndarray, np.ndarray]:
    """(probe correctness (N,) bool, every epoch's (E, N) bool) on the validation images of a TrainResult.

    The epochs are ``epoch_val_predictions``; a result without them (written before they were kept) gives the
    best epoch alone, and one that misses the best epoch's (a run resumed from such a checkpoint) gets it added.
    """
    truth = np.asarray(result.val_labels)
    start = np.asarray(result.start_val_predictions) == truth
    epochs = [np.asarray(p) == truth for p in result.epoch_val_predictions]
    best = np.asarray(result.best_val_predictions) == truth
    if result.best_epoch > len(epochs) or not epochs:
        epochs.append(best)
    return start, np.stack(epochs)


def choose(result, alpha: float = ALPHA, seed: int = 0) -> dict:
    """Keep the fine-tuned network (its best epoch) or the probe (epoch 0), from a TrainResult alone.

    Uses ``result.val_labels``, ``start_val_predictions`` and ``epoch_val_predictions`` (lists of class ints
    over the same N validation images). The rule (``RULE``): the sign-flip max-statistic test of the best
    epoch's gain over the probe (``stats.max_gain_test``), which repeats the choice of the best epoch inside the
    test; fine-tuning is kept when its p-value is below ``alpha`` (``stats.beats_incumbent``, the rule of every
    choice between models). Returns ``decision.json``'s ``choice``: ``{"chosen", "rule", "criterion",
    "val_probe", "val_finetuned", "gain", "reason", "warning"}``, where ``gain`` holds the test's figures (gain,
    epoch, p_value, alpha, beats, fixes, breaks, disagreements, n, candidates, randomisations) and ``warning``
    names the split's size when it is too small to tell models apart (else None).
    """
    start, epochs = _correctness(result)
    gain = beats_incumbent(start, epochs, alpha, seed)
    chosen = gain["beats"]
    of = f"over the probe on {gain['n']} validation images"
    if gain["epoch"] == 0:
        reason = (f"fine-tuning does not beat the probe: none of its {gain['candidates']} epochs is better {of} "
                  f"(best gain {gain['gain']:+.4f})")
    else:
        reason = (f"fine-tuning {'beats' if chosen else 'does not beat'} the probe by more than the noise and the "
                  f"choice of the best of {gain['candidates']} epochs: epoch {gain['epoch']} gains "
                  f"{gain['gain']:+.4f} {of} ({gain['fixes']} fixed, {gain['breaks']} broken), sign-flip "
                  f"max-statistic p = {gain['p_value']:.4f} {'<' if chosen else '>='} {alpha}")
    return {
        "chosen": "finetuned" if chosen else "probe", "rule": RULE,
        "criterion": f"p-value of the best epoch's gain over the probe, the choice of the epoch included, < {alpha}",
        "val_probe": result.start_val_accuracy, "val_finetuned": result.best_val_accuracy, "gain": gain,
        "reason": reason, "warning": _warn(gain.pop("warning")),
    }


def _warn(warning: str | None) -> str | None:
    """Log a too-small-split warning (``stats.split_too_small``) and return it for ``decision.json``."""
    if warning:
        log.warning(warning)
    return warning


def choose_among(results: Mapping[str, object], alpha: float = ALPHA, seed: int = 0) -> dict:
    """Keep the probe or the best epoch of one of several fine-tuning methods (method name → TrainResult, all on
    the same validation items; texts: ``probe_finetune`` and ``setfit``), from the results alone.

    One method: :func:`choose`, with ``method`` added. Several: the same test (``stats.max_gain_test``) over every
    epoch of every method as candidates, against the first method's probe predictions, so the choice of the method
    is repeated inside the test as the choice of the epoch is. Returns :func:`choose`'s dict, where ``method`` names
    the method of the best candidate (None when none beats the probe), ``gain["epoch"]`` is that method's own
    epoch, and ``per_method`` gives each method's best validation accuracy and epoch.
    """
    if len(results) == 1:
        ((method, result),) = results.items()
        choice = choose(result, alpha, seed)
        return {**choice, "method": method if choice["gain"]["epoch"] else None}
    names = list(results)
    truth = list(results[names[0]].val_labels)
    if any(list(results[name].val_labels) != truth for name in names):
        raise FeaturestoreError(f"fine-tuning methods {names} were scored on different validation items")
    reference, _ = _correctness(results[names[0]])
    owners, candidates = [], []
    for name in names:
        epochs = _correctness(results[name])[1]
        candidates.append(epochs)
        owners += [(name, epoch) for epoch in range(1, len(epochs) + 1)]
    gain = beats_incumbent(reference, np.concatenate(candidates), alpha, seed)
    method, epoch = owners[gain["epoch"] - 1] if gain["epoch"] else (None, 0)
    chosen = gain["beats"]
    gain.update(epoch=epoch, method=method)
    of = f"over the probe on {gain['n']} validation items"
    if method is None:
        reason = (f"no fine-tuning method ({', '.join(names)}) beats the probe: none of their {gain['candidates']} "
                  f"epochs is better {of} (best gain {gain['gain']:+.4f})")
    else:
        reason = (f"{method} {'beats' if chosen else 'does not beat'} the probe by more than the noise and the "
                  f"choice of the best of {gain['candidates']} epochs of {', '.join(names)}: its epoch {epoch} gains "
                  f"{gain['gain']:+.4f} {of} ({gain['fixes']} fixed, {gain['breaks']} broken), sign-flip "
                  f"max-statistic p = {gain['p_value']:.4f} {'<' if chosen else '>='} {alpha}")
    val_probe = float(np.mean(reference))
    return {
        "chosen": "finetuned" if chosen else "probe", "method": method, "rule": RULE,
        "criterion": f"p-value of the best epoch's gain over the probe, the choice of the method and epoch included, "
                     f"< {alpha}",
        "val_probe": val_probe, "val_finetuned": round(val_probe + gain["gain"], 6), "gain": gain,
        "per_method": {name: {"best_val_accuracy": results[name].best_val_accuracy,
                              "best_epoch": results[name].best_epoch, "epochs_run": results[name].epochs_run}
                       for name in names},
        "reason": reason, "warning": _warn(gain.pop("warning")),
    }


def run_finetune_stage(backbone: str, head_path: str | Path, data: str | Path, out: str | Path, plateau: dict,
                       options: FinetuneStageOptions = FinetuneStageOptions(), progress: bool = False) -> dict:
    """Decide, fine-tune, choose, and (if chosen) register ``<backbone>_ft`` and extract its store. Writes
    ``decision.json`` and returns its content. (Its heads and the verdict are stages of their own:
    ``train_head_ft`` and ``best.run_verdict_stage``.)

    ``head_path``: the cache-only logistic-regression head fine-tuning starts from. ``plateau``: the plateau stage's
    verdict. ``options`` (:class:`~featurestore.configs.FinetuneStageOptions`): ``methods`` run and compete
    (:func:`choose_among`; texts may add ``setfit``, its weights in ``setfit.pth`` until chosen);
    ``decision["results"]`` then holds each one's result, ``decision["result"]`` the chosen method's (else the
    first's). ``weights``: where an image fine-tune starts (default the registry's weights); ``extract``: how the
    fine-tuned store is extracted.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in STALE:  # the checkpoints and the trunk cache stay: a rerun resumes and reuses them
        target = out / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    config, methods, device = options.config, options.methods, options.device
    run, why = should_finetune(options.mode, plateau)
    # Fine-tuning starts from the penultimate layer's probe whichever cache-only head leads (a multilayer head's lower
    # layers are below the blocks that train); the verdict then weighs the fine-tuned heads against every head.
    decision = {"mode": options.mode, "plateaued": plateau["plateaued"], "finetuned": run, "reason": why,
                "chosen": "probe", "config": asdict(config), "methods": list(methods),
                "starts_from": Path(head_path).as_posix(), "plateau_line": plateau.get("line", "linear_probe")}
    if "setfit" in methods:
        decision["setfit"] = asdict(options.setfit)
    if run:
        from ..heads.head import load_head

        head = load_head(head_path)
        kind = head.fingerprint.get("kind", "image")
        for method in methods:
            check_choice(f"fine-tuning method of an {kind} backbone", method, FINETUNE_METHODS[kind])
        results = {}
        for method in methods:
            if method == "setfit":
                from .setfit import setfit_text

                results[method] = setfit_text(head, data, out / "setfit.pth", options.setfit, device=device,
                                              progress=progress)
            elif kind == "text":
                from .text_finetune import finetune_text

                results[method] = finetune_text(head, data, out / "weights.pth", config, device=device,
                                                progress=progress, checkpoint_dir=out / "checkpoints")
            else:
                from .finetune import finetune

                results[method] = finetune(head, data, out / "weights.pth", config, device=device,
                                           progress=progress, checkpoint_dir=out / "checkpoints",
                                           cache=out / "trunk.h5", weights=options.weights)
        decision["choice"] = choose_among(results)
        decision["chosen"] = decision["choice"]["chosen"]
        summaries = {method: _result_summary(result) for method, result in results.items()}
        decision["result"] = summaries[decision["choice"]["method"] or methods[0]]
        if len(results) > 1:
            decision["results"] = summaries
        if decision["chosen"] == "finetuned" and decision["choice"]["method"] == "setfit":
            (out / "setfit.pth").replace(out / "weights.pth")  # what <backbone>_ft loads
        if decision["chosen"] == "finetuned":
            adopt_finetuned(backbone, out, data, options.extract, progress, store=FeatureStore(head.store_path))
    write_json(out / "decision.json", decision)  # its seconds go to the timings folder in a DVC stage
    return decision


def _result_summary(result) -> dict:
    """What ``decision.json`` keeps of a fine-tuning run: its figures, and the probe's rows by content."""
    summary = {k: getattr(result, k) for k in (
        "start_val_accuracy", "best_val_accuracy", "best_epoch", "epochs_run", "stopped_early", "history",
        "seconds", "cache_seconds", "resumed_from_epoch")}
    summary["train_ids"] = ids_digest(result.train_ids)
    return summary


def adopt_finetuned(backbone: str, out: Path, data: str | Path, extract_options: dict,
                    progress: bool = False, store: FeatureStore | None = None) -> Path:
    """Register the fine-tuned weights as ``<backbone>_ft`` (its entry beside them, where loaders of its heads look)
    and extract its store ``out/features.h5`` with ``extract_options`` from the items of ``store`` (the cache-only
    store: its items and labels, corrections included, ``heads.records.store_source``; without it, all of
    ``data``); returns the store's path."""
    from ..encode.backbones import register_finetuned, write_entry
    from ..extract.launch import extract_features
    from ..heads.records import store_source

    name = f"{backbone}_ft"
    write_entry(out, name, backbone, "weights.pth")
    register_finetuned(name, backbone, out / "weights.pth")
    items = data if store is None else store_source(store, data)
    extract_features(items, out / "features.h5", name, progress=progress, **extract_options)
    return out / "features.h5"


def train_finetuned_head(config: HeadConfig, finetune_dir: str | Path, out: str | Path,
                         store_name: str | None = None) -> dict:
    """The ``train_head_ft`` stage: ``config``'s head on the fine-tuned store ``finetune_dir/features.h5`` when the
    decision there kept the fine-tuned backbone, saved as ``out/<name>.skops`` (older ones removed), its name
    ``<store_name>_ft__<head>`` (``store_name``: the cache-only store's name), else ``<backbone>_ft__<head>``;
    ``out/status.json`` says what was done either way. Returns the status."""
    from ..utils.atomic import write_status

    finetune_dir, out = Path(finetune_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.skops"):
        old.unlink()
    decision = json.loads((finetune_dir / "decision.json").read_text())
    status = {"head": config.head, "trained": False}
    if decision.get("chosen") == "finetuned":
        from ..heads.train import train_head  # only here: scikit-learn's import is most of a kept probe's stage

        head = train_head(finetune_dir / "features.h5", config)
        head.store_name = f"{store_name}_ft" if store_name else None
        status["backbone"] = head.backbone
        head.save(out / f"{head.name}.skops")
        status.update(trained=True, file=f"{head.name}.skops", name=head.name)
    else:
        status["reason"] = f"the finetune stage kept the probe ({decision.get('reason')})"
    write_status(out, status)
    return status
