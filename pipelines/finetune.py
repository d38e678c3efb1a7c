"""DVC stage `finetune@<backbone>`: plateau check, then (auto/always) fine-tune, extract, train heads.

Writes data/finetune/<backbone>/: plateau.json (+ .png), decision.json, and when it fine-tunes:
weights.pth, backbone.json (the registry entry <backbone>_ft), features.h5, heads/*.joblib.
"""

import json
import shutil
import sys

from _params import ROOT, load_params

from featurestore.backbones import register_finetuned
from featurestore.console import setup_logging
from featurestore.extract import extract_features
from featurestore.finetune import FinetuneConfig, finetune
from featurestore.heads import config_from_params, load_head, train_head
from featurestore.plateau import PlateauRule, detect_plateau

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    p, rule, ex, heads = (load_params(s) for s in ("finetune", "plateau", "extract", "train_head"))
    out = ROOT / "data" / "finetune" / backbone
    for stale in ("decision.json", "backbone.json", "weights.pth", "features.h5", "heads"):
        target = out / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)  # checkpoints stay
    store = ROOT / "data" / "features" / f"{backbone}.h5"
    plateau = detect_plateau(store, PlateauRule(tuple(rule["budgets"]), rule["min_gain"], rule["seed"]),
                             out=out / "plateau.json")
    mode = p["mode"]
    if mode not in ("auto", "always", "never"):
        sys.exit(f"finetune.mode must be auto, always or never, not {mode!r}")
    run = mode == "always" or (mode == "auto" and plateau["plateaued"])
    decision = {"mode": mode, "plateaued": plateau["plateaued"], "finetuned": run,
                "reason": plateau["reason"] if mode == "auto" else f"mode is {mode}"}
    if run:
        options = {k: v for k, v in p.items() if k not in ("mode", "device")}
        result = finetune(load_head(ROOT / "data" / "heads" / f"{backbone}__logreg.joblib"),
                          ROOT / "data" / "prepared", out / "weights.pth", FinetuneConfig(**options),
                          device=p["device"], progress=False, checkpoint_dir=out / "checkpoints")
        name = f"{backbone}_ft"
        (out / "backbone.json").write_text(json.dumps({"name": name, "base": backbone, "weights": "weights.pth"}))
        register_finetuned(name, backbone, out / "weights.pth")
        extract_features(ROOT / "data" / "prepared", out / "features.h5", name, image_size=ex.get("image_size"),
                         crop_pct=ex.get("crop_pct"), batch_size=ex["batch_size"], workers=ex["workers"],
                         device=ex["device"], progress=False)
        for head_name in heads["heads"]:
            trained = train_head(out / "features.h5", config_from_params(heads, head_name))
            trained.save(out / "heads" / f"{name}__{head_name}.joblib")
        decision["result"] = {k: v for k, v in result.__dict__.items() if k != "out"}
    else:
        decision["result"] = None
        print(f"fine-tuning skipped: {decision['reason']}; downstream stages use the cache-only heads")
    (out / "decision.json").write_text(json.dumps(decision, indent=2) + "\n")
    print(json.dumps({k: v for k, v in decision.items() if k != "result"}))
