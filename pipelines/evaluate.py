"""DVC stage `evaluate`: every head of params.yaml, the heads on the fine-tuned backbones and the challengers of each
verdict, in REPORTS/metrics.json and comparison.md; and, per data set, the model deployed (the best on validation,
VERDICTS/<store>/verdict.json "deployed") with the figures it was chosen on.

The frozen heads were evaluated by their own `train_head` stages (this stage only reads their JSON); the heads on
a fine-tuned backbone (FINETUNE_HEADS/<store>/<head>/<store>_ft__<head>.skops, their store the one they
record, FINETUNE/<store>/features.h5) are evaluated here, into REPORTS/finetuned/; the baselines and hybrid heads
(CHALLENGERS/<store>/{baseline,hybrid}/) were evaluated by their own stages (metrics.json beside each model), and
their metrics are gathered into REPORTS/finetuned/heads/<name>.json.

Near-duplicate leaks: the items of the evaluated split that each store's audit (REPORTS/audit/<store>/, the audit
stage) found to be near-duplicates of train/val items (``featurestore.audit.duplicates``) are named in one warning
line per store; with ``evaluate.refuse_near_duplicates: true`` the stage fails instead.
"""

import json
import sys
from pathlib import Path

from _params import load_params, stage_arguments

from featurestore.heads.summary import comparison_table, read_head_metrics, write_summary
from featurestore.utils.timings import read_json, write_json


def challenger_metrics(path: Path, split: str) -> dict:
    """A challenger's metrics on ``split``, as its stage wrote them beside it (``metrics.json``)."""
    written = path.parent / "metrics.json"
    if not written.is_file() or json.loads(written.read_text()).get("split") != split:
        raise SystemExit(f"{path}: no metrics on the {split} split beside it: run its stage again")
    return read_json(written)


def check_leaks(audits: Path, stores: list[str], split: str, refuse: bool) -> None:
    """One warning line per store whose audit found near-duplicates of train/val items in ``split`` (``refuse``: the
    stage fails instead); a store not audited is named, not checked."""
    from featurestore.audit.duplicates import audit_leaks
    from featurestore.errors import DataError

    for name in stores:
        try:
            leaks = audit_leaks(audits / name, split)
        except DataError as exc:
            print(f"WARNING: {exc}: near-duplicate leaks of {name} not checked", file=sys.stderr)
            continue
        if leaks.rows and refuse:
            raise SystemExit(f"{name}: {leaks.line()} (evaluate.refuse_near_duplicates is true)")
        if leaks.rows:
            print(f"WARNING: {name}: {leaks.line()}", file=sys.stderr)


if __name__ == "__main__":
    args = stage_arguments(__doc__, (), {"reports": "the reports folder",
                                         "finetune_heads": "the fine-tuned heads' stages' folder",
                                         "challengers": "the challengers' folder", "verdicts": "the verdicts' folder",
                                         "multilayer": "the train_multilayer stages' folder"})
    stores = list(load_params("stores"))
    heads = load_params("train_head")["heads"]
    evaluate = load_params("evaluate")
    split = evaluate["split"]
    check_leaks(args.reports / "audit", stores, split, bool(evaluate.get("refuse_near_duplicates", False)))
    results = read_head_metrics(args.reports, [f"{s}__{h}" for s in stores for h in heads])
    for name in stores:  # the train_multilayer stages' heads, where a store keeps its layers
        report = args.multilayer / name / "heads" / f"{name}__multilayer.json"
        if report.is_file():
            results[f"{name}__multilayer"] = json.loads(report.read_text())
    finetuned_out = args.reports / "finetuned"
    finetuned_out.mkdir(parents=True, exist_ok=True)
    finetuned = [p for s in stores for h in heads
                 for p in sorted((args.finetune_heads / s / h).glob("*.skops"))]
    if finetuned:  # frozen vs fine-tuned side by side
        from featurestore.heads import load_head, write_head_report
        from featurestore.store import FeatureStore

        for path in finetuned:
            head = load_head(path)
            results[head.name] = write_head_report(head, FeatureStore(head.store_path), finetuned_out, split=split)
    verdicts = {}
    for name in stores:
        verdict = args.verdicts / name / "verdict.json"
        if verdict.is_file():
            verdicts[name] = json.loads(verdict.read_text())
        for folder in sorted(p for p in (args.challengers / name).glob("*") if (p / "status.json").is_file()):
            status = json.loads((folder / "status.json").read_text())
            if status.get("fitted"):  # a model without an encoder (or beside it), on the same split
                results[status["name"]] = metrics = challenger_metrics(folder / status["file"], split)
                write_json(finetuned_out / "heads" / f"{status['name']}.json", metrics)
    from featurestore.heads.reports import deployment_table

    section = deployment_table(verdicts)
    write_summary(results, args.reports, appendix=section)
    print(comparison_table(results) + ("\n" + section if section else ""), end="")
