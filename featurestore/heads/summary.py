"""Every evaluated head in one place: data/reports/metrics.json and a markdown comparison table.

Reads and writes JSON only (no scikit-learn), so gathering the per-head reports after a head
experiment costs a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FeaturestoreError


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown table of every backbone × head, best top-1 first."""
    lines = [
        "| backbone | head | top-1 | top-5 | mean per-class acc. | macro-F1 | n | C | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in sorted(results.values(), key=lambda m: -m["top1"]):
        top5 = "–" if m["top5"] is None else f"{m['top5']:.4f}"
        lines.append(
            f"| {m['backbone']} | {m['head']} | {m['top1']:.4f} | {top5} | {m['mean_per_class_accuracy']:.4f} | "
            f"{m['macro_f1']:.4f} | {m['n']} | {m['C']:.3g} | {m['train_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def read_head_metrics(out: str | Path, names: list[str]) -> dict[str, dict]:
    """The metrics that reports.write_head_report saved under ``out``/heads for each ``<backbone>__<head>``."""
    results = {}
    for name in names:
        path = Path(out) / "heads" / f"{name}.json"
        if not path.is_file():
            raise FeaturestoreError(f"{path}: no evaluation of head {name} (run its evaluate_head stage first)")
        results[name] = json.loads(path.read_text())
    return results


def write_summary(results: dict[str, dict], out: str | Path) -> None:
    """``out``/metrics.json (metrics by head name) and ``out``/comparison.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "comparison.md").write_text(comparison_table(results))
