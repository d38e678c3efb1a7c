"""DVC stage `evaluate`: every head of params.yaml on the test split → data/reports/."""

from _params import ROOT, load_params

from featurestore.heads import load_head
from featurestore.reports import comparison_table, write_reports
from featurestore.store import FeatureStore

if __name__ == "__main__":
    backbones = load_params("extract")["backbones"]
    heads = load_params("train_head")["heads"]
    stores = {b: FeatureStore(ROOT / "data" / "features" / f"{b}.h5") for b in backbones}
    trained = [load_head(ROOT / "data" / "heads" / f"{b}__{h}.joblib") for b in backbones for h in heads]
    for b in backbones:  # fine-tuned backbones, when the finetune stage ran (frozen vs fine-tuned side by side)
        finetuned = ROOT / "data" / "finetune" / b
        for path in sorted((finetuned / "heads").glob("*.joblib")):
            head = load_head(path)
            stores[head.backbone] = FeatureStore(finetuned / "features.h5")
            trained.append(head)
    results = write_reports(trained, stores, ROOT / "data" / "reports", split=load_params("evaluate")["split"])
    print(comparison_table(results), end="")
