"""DVC stage `finetune@<backbone>`: fine-tune when it pays (featurestore.transfer.decision.run_finetune_stage).

Reads the plateau verdict, the logreg head (the starting classifier) and every cache-only head of the backbone
(each compared, before deployment, with its twin on the fine-tuned features); writes OUT (decision.json, and
when fine-tuning ran its weights and trunk cache; when the fine-tuned network won, its registry entry, store and
heads). Skipping is the common case after a head edit, so torch is imported only to fine-tune.
"""

import json

from _params import load_params, stage_arguments

from featurestore.configs import FinetuneConfig, config_from_params, extract_options
from featurestore.transfer.decision import run_finetune_stage
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("backbone",), {
        "data": "the prepared data set", "head": "the logreg head (the starting classifier)",
        "heads_dir": "the cache-only heads (<backbone>__<head>.skops), compared with the fine-tuned ones",
        "plateau": "the plateau verdict", "out": "the stage's folder"})
    params, heads = load_params("finetune")[args.backbone], load_params("train_head")
    config = FinetuneConfig(**{k: v for k, v in params.items() if k not in ("mode", "device")})
    extract = {k: v for k, v in extract_options(load_params("extract")[args.backbone]).items() if k != "on_error"}
    decision = run_finetune_stage(
        args.backbone, args.head, args.data, args.out, json.loads(args.plateau.read_text()), params["mode"], config,
        {name: config_from_params(heads, name) for name in heads["heads"]}, extract, device=params["device"],
        cache_only_heads={name: args.heads_dir / f"{args.backbone}__{name}.skops" for name in heads["heads"]})
    print(json.dumps({k: decision[k] for k in ("mode", "plateaued", "finetuned", "chosen", "reason")}))
