"""DVC stage `finetune@<backbone>`: fine-tune when it pays (featurestore.decision.run_finetune_stage).

Reads data/plateau/<backbone>.json and the logreg head; writes data/finetune/<backbone>/ (decision.json,
and when fine-tuning ran its weights and trunk cache; when the fine-tuned network won, its registry entry,
store and heads). Skipping is the common case after a head edit, so torch is imported only to fine-tune.
"""

import json
import sys

from _params import ROOT, load_params

from featurestore.configs import FinetuneConfig, config_from_params, extract_options
from featurestore.console import setup_logging
from featurestore.decision import run_finetune_stage

if __name__ == "__main__":
    setup_logging()
    backbone = sys.argv[1]
    params, heads = load_params("finetune")[backbone], load_params("train_head")
    config = FinetuneConfig(**{k: v for k, v in params.items() if k not in ("mode", "device")})
    extract = {k: v for k, v in extract_options(load_params("extract")[backbone]).items() if k != "on_error"}
    data, out = ROOT / "data" / load_params("stores")[backbone], ROOT / "data" / "finetune" / backbone
    plateau = json.loads((ROOT / "data" / "plateau" / f"{backbone}.json").read_text())
    decision = run_finetune_stage(
        backbone, ROOT / "data" / "heads" / f"{backbone}__logreg.skops", data, out, plateau, params["mode"], config,
        {name: config_from_params(heads, name) for name in heads["heads"]}, extract, device=params["device"])
    print(json.dumps({k: decision[k] for k in ("mode", "plateaued", "finetuned", "chosen", "reason")}))
