"""DVC stage `evaluate`: every head of params.yaml, and the fine-tuned backbones' heads when the finetune stage
made them, in REPORTS/metrics.json and comparison.md; and, per data set, the model deployed (the best on validation,
FINETUNE/<backbone>/decision.json "deployed") with the figures it was chosen on.

The frozen heads were evaluated by their own `evaluate_head` stages (this stage only reads their JSON); the
fine-tuned heads (FINETUNE/<backbone>/heads/, beside their store FINETUNE/<backbone>/features.h5) are evaluated
here, into REPORTS/finetuned/, and so are the baselines and hybrid heads the finetune stages fitted
(FINETUNE/<backbone>/baseline.skops, hybrid.skops) on the test split of their data set, read from the folder or
manifest the store records as its source (each item checked against its content id), into
REPORTS/finetuned/heads/<name>.json.
"""

import json

from _params import load_params, stage_arguments

from featurestore.heads.summary import comparison_table, read_head_metrics, write_summary

if __name__ == "__main__":
    args = stage_arguments(__doc__, (), {"reports": "the reports folder", "finetune": "the finetune stages' folder"})
    backbones = list(load_params("stores"))
    heads = load_params("train_head")["heads"]
    split = load_params("evaluate")["split"]
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
            results[head.name] = write_head_report(head, store, finetuned_out, split=split)
    decisions = {}
    for backbone in backbones:
        decision = args.finetune / backbone / "decision.json"
        if decision.is_file():
            decisions[backbone] = json.loads(decision.read_text())
        raw_models = [args.finetune / backbone / name for name in ("baseline.skops", "hybrid.skops")]
        raw_models = [path for path in raw_models if path.is_file()]
        if raw_models:  # the models without an encoder (or beside it), on the same test split
            from featurestore.heads.baseline import evaluate_model, load_baseline
            from featurestore.heads.hybrid import load_hybrid
            from featurestore.heads.records import store_records
            from featurestore.store import FeatureStore

            for path in raw_models:
                model = load_baseline(path) if path.name == "baseline.skops" else load_hybrid(path)
                store = FeatureStore(model.store_path)
                if store.fingerprint_hash != model.store_fingerprint_hash:
                    raise SystemExit(f"{path}: fitted on another version of {store.path}: run its finetune stage")
                results[model.name] = metrics = evaluate_model(model, store, store_records(store, split), split)
                (finetuned_out / "heads").mkdir(exist_ok=True)
                (finetuned_out / "heads" / f"{model.name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_summary(results, args.reports)
    from featurestore.heads.reports import deployment_table

    section = deployment_table(decisions)
    if section:
        with open(args.reports / "comparison.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + section)
    print(comparison_table(results) + ("\n" + section if section else ""), end="")
