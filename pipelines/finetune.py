"""DVC stage `finetune@<backbone>`: fine-tune when the plateau stage (or `finetune.mode`) says so.

Reads data/plateau/<backbone>.json. Writes data/finetune/<backbone>/decision.json, and when it
fine-tunes: weights.pth, backbone.json (the registry entry <backbone>_ft), features.h5, heads/*.skops.
Skipping is the common case after a head edit, so torch and scikit-learn are imported only to run.
"""

import json
import shutil
import sys
from pathlib import Path

from _params import ROOT, load_params


def run_finetune(backbone: str, out: Path, params: dict) -> dict:
    """Fine-tune from the logreg head, register <backbone>_ft, extract its store and train its heads."""
    from featurestore.backbones import register_finetuned
    from featurestore.console import setup_logging
    from featurestore.extract import extract_features
    from featurestore.finetune import FinetuneConfig, finetune
    from featurestore.heads import config_from_params, load_head, train_head

    setup_logging()
    ex, heads = load_params("extract"), load_params("train_head")
    options = {k: v for k, v in params.items() if k not in ("mode", "device")}
    result = finetune(load_head(ROOT / "data" / "heads" / f"{backbone}__logreg.skops"),
                      ROOT / "data" / "prepared", out / "weights.pth", FinetuneConfig(**options),
                      device=params["device"], progress=False, checkpoint_dir=out / "checkpoints")
    name = f"{backbone}_ft"
    (out / "backbone.json").write_text(json.dumps({"name": name, "base": backbone, "weights": "weights.pth"}))
    register_finetuned(name, backbone, out / "weights.pth")
    extract_features(ROOT / "data" / "prepared", out / "features.h5", name, image_size=ex.get("image_size"),
                     crop_pct=ex.get("crop_pct"), batch_size=ex["batch_size"], workers=ex["workers"],
                     device=ex["device"], progress=False)
    for head_name in heads["heads"]:
        trained = train_head(out / "features.h5", config_from_params(heads, head_name))
        trained.save(out / "heads" / f"{name}__{head_name}.skops")
    return {k: v for k, v in result.__dict__.items() if k != "out"}


if __name__ == "__main__":
    backbone = sys.argv[1]
    p = load_params("finetune")
    out = ROOT / "data" / "finetune" / backbone
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("decision.json", "backbone.json", "weights.pth", "features.h5", "heads"):
        target = out / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)  # checkpoints stay
    plateau = json.loads((ROOT / "data" / "plateau" / f"{backbone}.json").read_text())
    mode = p["mode"]
    if mode not in ("auto", "always", "never"):
        sys.exit(f"finetune.mode must be auto, always or never, not {mode!r}")
    run = mode == "always" or (mode == "auto" and plateau["plateaued"])
    decision = {"mode": mode, "plateaued": plateau["plateaued"], "finetuned": run,
                "reason": plateau["reason"] if mode == "auto" else f"mode is {mode}"}
    decision["result"] = run_finetune(backbone, out, p) if run else None
    if not run:
        print(f"fine-tuning skipped: {decision['reason']}; downstream stages use the cache-only heads")
    (out / "decision.json").write_text(json.dumps(decision, indent=2) + "\n")
    print(json.dumps({k: v for k, v in decision.items() if k != "result"}))
