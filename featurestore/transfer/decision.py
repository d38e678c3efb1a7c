"""Fine-tune only when it pays, and keep the result only when it is better: the fine-tune stage as a function.

1. The mode: ``never``; ``always``; or ``auto``, which fine-tunes only when the plateau rule says the
   cache-only curve has stopped improving with more labels (``plateau.py``).
2. Fine-tuning from the logistic-regression probe: the top blocks on the trunk cache for images
   (``finetune.py``), the top transformer layers for texts (``text_finetune.py``).
3. The choice: the fine-tuned network replaces the probe only when its validation accuracy beats the
   probe's by more than the noise of the validation split: the lower bound of a paired bootstrap interval
   (``stats.paired_gain``, level ``margin_level``) on the gain over the same validation images must be
   above zero. (The fine-tuned accuracy is that of its best epoch on the same split, so it is slightly
   optimistic; the margin asks for more than the noise for that reason too.)
4. If chosen, the fine-tuned weights become backbone ``<backbone>_ft`` (its checkpoint hash in every
   fingerprint), its store is extracted and its heads trained; downstream stages (evaluate, export,
   predict) then use it (``deploy.deployed_head``). Otherwise everything downstream keeps the cache-only heads.

Everything lands in ``out`` (the DVC stage's ``data/finetune/<backbone>/``): ``decision.json``, and when fine-tuning ran
``weights.pth``, ``trunk.h5`` (the cache, kept for the next run), and if chosen ``backbone.json``,
``features.h5`` and ``heads/``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..configs import FINETUNE_MODES, FinetuneConfig
from ..utils.atomic import write_text_atomic
from ..utils.validation import check_choice

log = logging.getLogger("featurestore")

MARGIN_LEVEL = 0.8  # central interval: its lower bound is a one-sided 90% bound
STALE = ("decision.json", "backbone.json", "weights.pth", "features.h5", "heads")


def should_finetune(mode: str, plateau: dict) -> tuple[bool, str]:
    """Whether to fine-tune, and why."""
    check_choice("finetune mode", mode, FINETUNE_MODES)
    if mode != "auto":
        return mode == "always", f"mode is {mode}"
    return bool(plateau["plateaued"]), plateau["reason"]


def choose(result, level: float = MARGIN_LEVEL, seed: int = 0) -> dict:
    """Compare the fine-tuned network's best epoch with the probe (epoch 0) on the same validation images."""
    from .stats import paired_gain

    truth = np.asarray(result.val_labels)
    gain = paired_gain(np.asarray(result.start_val_predictions) == truth,
                       np.asarray(result.best_val_predictions) == truth, level=level, seed=seed)
    chosen = gain["low"] > 0
    return {
        "chosen": "finetuned" if chosen else "probe",
        "val_probe": result.start_val_accuracy, "val_finetuned": result.best_val_accuracy,
        "gain": gain, "margin": f"lower bound of the {level:.0%} paired bootstrap interval of the gain > 0",
        "reason": (f"fine-tuning {'beats' if chosen else 'does not beat'} the probe on validation by more than its "
                   f"noise: {gain['gain']:+.4f}, {level:.0%} interval [{gain['low']:+.4f}, {gain['high']:+.4f}] "
                   f"over {gain['n']} images"),
    }


def run_finetune_stage(backbone: str, head_path: str | Path, data: str | Path, out: str | Path, plateau: dict,
                       mode: str, config: FinetuneConfig, heads: dict[str, object], extract_options: dict,
                       device: str = "auto", progress: bool = False) -> dict:
    """Decide, fine-tune, choose, and (if chosen) register ``<backbone>_ft``, extract its store and train
    ``heads`` (name → HeadConfig) on it. Writes and returns ``decision.json``'s content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in STALE:  # the checkpoints and the trunk cache stay: a rerun resumes and reuses them
        target = out / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run, why = should_finetune(mode, plateau)
    decision = {"mode": mode, "plateaued": plateau["plateaued"], "finetuned": run, "reason": why,
                "chosen": "probe", "config": asdict(config)}
    if run:
        from ..heads.head import load_head

        head = load_head(head_path)
        if head.fingerprint.get("kind") == "text":
            from .text_finetune import finetune_text

            result = finetune_text(head, data, out / "weights.pth", config, device=device, progress=progress,
                                   checkpoint_dir=out / "checkpoints")
        else:
            from .finetune import finetune

            result = finetune(head, data, out / "weights.pth", config, device=device, progress=progress,
                              checkpoint_dir=out / "checkpoints", cache=out / "trunk.h5")
        decision["choice"] = choose(result)
        decision["chosen"] = decision["choice"]["chosen"]
        decision["result"] = {k: getattr(result, k) for k in (
            "start_val_accuracy", "best_val_accuracy", "epochs_run", "stopped_early", "history", "seconds",
            "cache_seconds", "resumed_from_epoch")}
        if decision["chosen"] == "finetuned":
            _adopt(backbone, out, data, heads, extract_options, progress)
    write_text_atomic(out / "decision.json", json.dumps(decision, indent=2) + "\n")
    return decision


def _adopt(backbone: str, out: Path, data: str | Path, heads: dict, extract_options: dict, progress: bool) -> None:
    """Register the fine-tuned weights as ``<backbone>_ft``, extract its store, train its heads."""
    from ..encode.backbones import register_finetuned, write_entry
    from ..extract.launch import extract_features
    from ..heads.train import train_head

    name = f"{backbone}_ft"
    write_entry(out, name, backbone, "weights.pth")  # beside its store: where loaders of its heads look
    register_finetuned(name, backbone, out / "weights.pth")
    extract_features(data, out / "features.h5", name, progress=progress, **extract_options)
    for head_name, head_config in heads.items():
        train_head(out / "features.h5", head_config).save(out / "heads" / f"{name}__{head_name}.skops")
