"""Which model a pipeline deploys: the baseline (or the hybrid head) when the fine-tune stage found it better on
validation than every encoder head (:func:`deployed_model`); else the fine-tuned backbone's head when the stage chose
the fine-tuned backbone *and* that head beat its cache-only counterpart on validation, else the cache-only one.
Paths come from the caller (the stage's command line); the library knows no project folders."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadValueError, ExportError


def head_name_of(path: str | Path) -> str:
    """The head name of a head file named ``<backbone>__<head>.skops`` (e.g. ``logreg``)."""
    stem = Path(path).stem
    if "__" not in stem:
        raise BadValueError(f"{path}: a head file is named <backbone>__<head>.skops; pass the head name")
    return stem.split("__", 1)[1]


def deployed_head(decision: str | Path, cache_only: str | Path, finetuned: str | Path, head: str | None = None) -> Path:
    """``finetuned`` when the fine-tune stage's ``decision`` file says the fine-tuned backbone was chosen and its
    per-head verdict (``decision["heads"][head]["deployed"]``) deploys the fine-tuned head, and that file exists;
    else ``cache_only`` (also when no decision was written, or it holds no verdict for that head).

    ``head``: the head name, by default read from ``cache_only``'s file name ``<backbone>__<head>.skops``.
    """
    decision, finetuned = Path(decision), Path(finetuned)
    name = head if head is not None else head_name_of(cache_only)
    if decision.is_file() and finetuned.is_file():
        content = json.loads(decision.read_text())
        verdict = content.get("heads", {}).get(name, {})
        if content.get("chosen") == "finetuned" and verdict.get("deployed") == "finetuned":
            return finetuned
    return Path(cache_only)


def deployed_model(decision: str | Path, cache_only: str | Path, finetuned: str | Path,
                   head: str | None = None) -> Path:
    """The model file an export entry ships: the baseline's (or the hybrid head's) when the fine-tune stage's
    ``decision`` deploys it (``decision["deployed"]["model"]`` is ``"baseline"`` or ``"hybrid"``: it beat every
    encoder head on validation; its file lies beside ``decision``), else :func:`deployed_head`."""
    decision = Path(decision)
    if decision.is_file():
        deployed = json.loads(decision.read_text()).get("deployed", {})
        if deployed.get("model") in ("baseline", "hybrid") and deployed.get("file"):
            path = decision.parent / deployed["file"]
            if not path.is_file():
                raise BadValueError(f"{decision} deploys {deployed['name']} but its file {path} is not there: "
                                    f"run the fine-tune stage again")
            return path
    return deployed_head(decision, cache_only, finetuned, head)


def export_model(path: str | Path, out: str | Path, **options) -> dict:
    """Export whatever deployable model ``path`` holds: a baseline (``baseline_export.export_baseline_onnx``), a
    hybrid head (``hybrid_export.export_hybrid_onnx``) or a head (``export.export_onnx``, which takes ``options``). The
    baselines and the hybrid head take no options: their graphs have no encoder to quantise or halve."""
    import inspect

    from ..heads.baseline import BASELINE_FORMAT, model_format
    from ..heads.hybrid import HYBRID_FORMAT
    from .export import export_onnx

    kind = model_format(path)
    if kind in (BASELINE_FORMAT, HYBRID_FORMAT):
        defaults = {k: p.default for k, p in inspect.signature(export_onnx).parameters.items()}
        unsupported = sorted(k for k, v in options.items() if v != defaults.get(k))
        if unsupported:
            raise ExportError(f"{path}: {kind} models are exported as they are ({', '.join(unsupported)} apply to "
                              f"an encoder + head)")
        if kind == BASELINE_FORMAT:
            from .baseline_export import export_baseline_onnx

            return export_baseline_onnx(path, out)
        from .hybrid_export import export_hybrid_onnx

        return export_hybrid_onnx(path, out)
    return export_onnx(path, out, **options)
