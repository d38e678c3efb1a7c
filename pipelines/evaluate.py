"""DVC stage `evaluate`: every head of params.yaml, and the fine-tuned backbones' heads when the
finetune stage made them, in data/reports/metrics.json and comparison.md.

The frozen heads were evaluated by their own `evaluate_head` stages (this stage only reads their
JSON); fine-tuned heads are evaluated here, into data/reports/finetuned/.
"""

from _params import ROOT, load_params

from featurestore.summary import comparison_table, read_head_metrics, write_summary

if __name__ == "__main__":
    backbones = list(load_params("stores"))
    heads = load_params("train_head")["heads"]
    split = load_params("evaluate")["split"]
    reports = ROOT / "data" / "reports"
    results = read_head_metrics(reports, [f"{b}__{h}" for b in backbones for h in heads])
    finetuned_out = reports / "finetuned"
    finetuned_out.mkdir(parents=True, exist_ok=True)
    finetuned = [p for b in backbones for p in sorted((ROOT / "data" / "finetune" / b / "heads").glob("*.skops"))]
    if finetuned:  # frozen vs fine-tuned side by side
        from featurestore.heads import load_head
        from featurestore.reports import write_head_report
        from featurestore.store import FeatureStore

        for path in finetuned:
            head = load_head(path)
            store = FeatureStore(path.parent.parent / "features.h5")
            results[head.name] = write_head_report(head, store, finetuned_out, split=split)
    write_summary(results, reports)
    print(comparison_table(results), end="")
