"""DVC stage `finetune@<backbone>`: fine-tune when it pays (featurestore.transfer.decision.run_finetune_stage).

Reads the plateau verdict, the logreg head (the starting classifier) and every cache-only head of the backbone
(each compared, before deployment, with its twin on the fine-tuned features); writes OUT (decision.json, and
when fine-tuning ran its weights and trunk cache; when the fine-tuned network won, its registry entry, store and
heads). ``finetune.<backbone>.methods`` lists the methods that compete (texts: probe_finetune and setfit, whose
settings are ``finetune.<backbone>.setfit``). ``deploy`` says whether the baseline (and the hybrid head) are fitted
beside the heads, so that the model best on validation is the one deployed (decision.json ``deployed``); picking their
rows in the store imports torch (a few seconds).
"""

import json

from _params import load_params, stage_arguments

from featurestore.configs import FinetuneStageOptions
from featurestore.transfer.decision import run_finetune_stage
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("backbone",), {
        "data": "the prepared data set", "head": "the logreg head (the starting classifier)",
        "heads_dir": "the cache-only heads (<backbone>__<head>.skops), compared with the fine-tuned ones",
        "plateau": "the plateau verdict", "out": "the stage's folder"})
    heads = load_params("train_head")
    options = FinetuneStageOptions.from_params(load_params("finetune")[args.backbone], heads,
                                               load_params("extract")[args.backbone], load_params("deploy"))
    decision = run_finetune_stage(
        args.backbone, args.head, args.data, args.out, json.loads(args.plateau.read_text()), options,
        cache_only_heads={name: args.heads_dir / f"{args.backbone}__{name}.skops" for name in heads["heads"]})
    print(json.dumps({k: decision[k] for k in ("mode", "plateaued", "finetuned", "chosen", "reason")}))
    if "deployed" in decision:
        print(decision["deployed"]["reason"])
