"""DVC stage `evaluate`: every head of params.yaml, and the fine-tuned backbones' heads when the finetune stage
made them, in REPORTS/metrics.json and comparison.md.

The frozen heads were evaluated by their own `evaluate_head` stages (this stage only reads their JSON); the
fine-tuned heads (FINETUNE/<backbone>/heads/, beside their store FINETUNE/<backbone>/features.h5) are evaluated
here, into REPORTS/finetuned/.
"""

from _params import load_params, stage_arguments

from featurestore.heads.summary import comparison_table, read_head_metrics, write_summary

if __name__ == "__main__":
    args = stage_arguments(__doc__, (), {"reports": "the reports folder", "finetune": "the finetune stages' folder"})
    backbones = list(load_params("stores"))
    heads = load_params("train_head")["heads"]
    results = read_head_metrics(args.reports, [f"{b}__{h}" for b in backbones for h in heads])
    finetuned_out = args.reports / "finetuned"
    finetuned_out.mkdir(parents=True, exist_ok=True)
    finetuned = [p for b in backbones for p in sorted((args.finetune / b / "heads").glob("*.skops"))]
    if finetuned:  # frozen vs fine-tuned side by side
        from featurestore.heads import load_head, write_head_report
        from featurestore.store import FeatureStore

        for path in finetuned:
            head = load_head(path)
            store = FeatureStore(path.parent.parent / "features.h5")
            results[head.name] = write_head_report(head, store, finetuned_out, split=load_params("evaluate")["split"])
    write_summary(results, args.reports)
    print(comparison_table(results), end="")
