"""DVC stage `verdict@<store>`: which model the data set deploys (featurestore.transfer.best.run_verdict_stage):
the best on validation among the cache-only heads (HEADS/<head>.skops, the first listed in ``train_head.heads`` the
incumbent, and MULTILAYER/multilayer.skops where the store keeps its layers), the heads on the fine-tuned backbone
when the finetune stage kept it (FINETUNE_HEADS/<head>/), and the baseline and hybrid head (CHALLENGERS/<kind>/), by
the one noise-aware rule. Writes OUT/verdict.json and OUT/deployed.json (name, kind, file, SHA-256: what the export
stage ships)."""

from _params import load_params, stage_arguments

from featurestore.transfer.best import CHALLENGERS, run_verdict_stage
from featurestore.utils.console import setup_logging

MULTILAYER = "multilayer"  # the head of the train_multilayer stage

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("store",), {
        "heads": "the cache-only heads' folder", "finetune": "the finetune stage's folder",
        "finetune_heads": "the folder of the fine-tuned heads' stages", "challengers": "the challengers' folder",
        "multilayer": "the train_multilayer stage's folder", "data": "the prepared data set",
        "out": "the stage's folder"})
    names = load_params("train_head")["heads"]
    heads = [args.heads / f"{name}.skops" for name in names]
    heads.append(args.multilayer / f"{MULTILAYER}.skops")  # its train_multilayer stage's, where it made one
    challengers = [args.finetune_heads / name for name in names]
    challengers += [args.challengers / kind for kind in CHALLENGERS]
    result = run_verdict_stage(heads, args.finetune, challengers, args.out, args.data)
    print(result["deployed"]["reason"])
