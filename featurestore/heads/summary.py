"""Every evaluated head in one place: data/reports/metrics.json and a markdown comparison table.

Reads and writes JSON only (no scikit-learn), so gathering the per-head reports after a head
experiment costs a fraction of a second. In a DVC stage (timings routed, ``utils.timings``) metrics.json and
comparison.md hold no seconds: the table with its ``train s`` column goes to the timings folder.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..configs import HeadConfig
from ..errors import FeaturestoreError
from ..utils.timings import read_json, timings_path, write_json, write_text_routed


def shown_setting(value) -> str:
    """A chosen setting as a person reads it: a float to 3 digits, a multilayer head's layers ([[name, first column,
    width], …]) by name (``block08+block10``), anything else as it is."""
    if isinstance(value, list) and all(isinstance(entry, list) and entry for entry in value):
        return "+".join(str(entry[0]) for entry in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def settings_cell(metrics: dict) -> str:
    """What sets a model apart in a comparison: the settings chosen on validation (``C=0.01``) and every setting its
    experiment gave that is not its kind's default (``normalize=l2``); C alone for models that record no more."""
    chosen = metrics.get("settings") or {"C": metrics["C"]}
    parts = [f"{k}={shown_setting(v)}" for k, v in chosen.items()]
    config = metrics.get("config")
    if config:
        defaults = asdict(HeadConfig(head=config["head"]))
        parts += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()
                  if k not in ("head", "seed") and defaults.get(k) != v]
    return ", ".join(parts)


def comparison_table(results: dict[str, dict], seconds: bool = True) -> str:
    """Markdown table of every model (``results``: metrics by model name), best top-1 first (ties by name);
    ``settings`` (:func:`settings_cell`); ``seconds``: with the ``train s`` column (a model whose metrics lack
    ``train_seconds`` shows –)."""
    columns = ["model", "backbone", "head", "top-1", "top-5", "mean per-class acc.", "macro-F1", "n", "settings"] + (
        ["train s"] if seconds else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, m in sorted(results.items(), key=lambda item: (-item[1]["top1"], item[0])):
        top5 = "–" if m["top5"] is None else f"{m['top5']:.4f}"
        cells = [name, m["backbone"], m["head"], f"{m['top1']:.4f}", top5, f"{m['mean_per_class_accuracy']:.4f}",
                 f"{m['macro_f1']:.4f}", str(m["n"]), settings_cell(m)]
        if seconds:
            cells.append("–" if m.get("train_seconds") is None else f"{m['train_seconds']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_head_metrics(out: str | Path, names: list[str]) -> dict[str, dict]:
    """The metrics that reports.write_head_report saved under ``out``/heads for each head name (``<store>__<head>``
    in the pipeline), with their routed timings when there are some (``utils.timings.read_json``)."""
    results = {}
    for name in names:
        path = Path(out) / "heads" / f"{name}.json"
        if not path.is_file():
            raise FeaturestoreError(f"{path}: no evaluation of head {name} (run its train_head stage first)")
        results[name] = read_json(path)
    return results


def write_summary(results: dict[str, dict], out: str | Path, appendix: str = "") -> None:
    """``out``/metrics.json (metrics by head name) and ``out``/comparison.md (the table, then ``appendix``, a
    markdown section, after a blank line). Timings routed: both without seconds, the table with them in the
    timings folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", results, sort_keys=True)
    tail = "\n" + appendix if appendix else ""
    whole = comparison_table(results) + tail
    stable = comparison_table(results, seconds=False) + tail if timings_path(out / "comparison.md") else whole
    write_text_routed(out / "comparison.md", stable, whole)
