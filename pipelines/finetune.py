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

from featurestore.configs import FinetuneConfig, SetFitConfig, config_from_params, extract_options
from featurestore.transfer.decision import run_finetune_stage
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("backbone",), {
        "data": "the prepared data set", "head": "the logreg head (the starting classifier)",
        "heads_dir": "the cache-only heads (<backbone>__<head>.skops), compared with the fine-tuned ones",
        "plateau": "the plateau verdict", "out": "the stage's folder"})
    params, heads = load_params("finetune")[args.backbone], load_params("train_head")
    deploy = load_params("deploy") or {}
    config = FinetuneConfig(**{k: v for k, v in params.items() if k not in ("mode", "device", "methods", "setfit")})
    # the store's local checkpoint (a tv: backbone's) is the fine-tune's start; the fine-tuned backbone has its own
    extract = extract_options(load_params("extract")[args.backbone])
    weights = extract.pop("weights", None)
    extract.pop("on_error", None)
    decision = run_finetune_stage(
        args.backbone, args.head, args.data, args.out, json.loads(args.plateau.read_text()), params["mode"], config,
        {name: config_from_params(heads, name) for name in heads["heads"]}, extract, device=params["device"],
        cache_only_heads={name: args.heads_dir / f"{args.backbone}__{name}.skops" for name in heads["heads"]},
        methods=tuple(params.get("methods") or ("probe_finetune",)),
        setfit_config=SetFitConfig(**(params.get("setfit") or {})),
        baseline=bool(deploy.get("baseline", True)), hybrid=bool(deploy.get("hybrid", True)), weights=weights)
    print(json.dumps({k: decision[k] for k in ("mode", "plateaued", "finetuned", "chosen", "reason")}))
    if "deployed" in decision:
        print(decision["deployed"]["reason"])
