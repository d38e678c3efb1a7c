"""Which model a data set deploys, and its export: the verdict (``transfer.best``) names one model file and its
SHA-256 (``deployed.json``, or ``decision.json``'s ``deployed``); :func:`deployed_model` returns exactly that file, and
:func:`export_model` exports whatever kind of model it is. Paths come from the caller (the stage's command line); the
library knows no project folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BadValueError, ExportError


def deployed_model(record: str | Path) -> Path:
    """The model file the verdict in ``record`` deploys: a ``deployed.json`` (``{"name", "model", "file", "sha256"}``)
    or a ``decision.json`` (its ``deployed``). ``file`` is relative to the record's folder (or absolute). Raises
    :class:`BadValueError` naming the record when there is no verdict, the file is gone, or it is not the file the
    verdict chose (its SHA-256 differs): an export never ships a model that was not measured."""
    from ..data.sources import content_id

    record = Path(record)
    if not record.is_file():
        raise BadValueError(f"{record}: no verdict there (run the fine-tune stage, or `featurestore verdict`)")
    content = json.loads(record.read_text())
    deployed = content.get("deployed", content)
    if not deployed.get("file") or not deployed.get("sha256"):
        raise BadValueError(f"{record}: names no deployed model file (a verdict from an older release: run the "
                            f"fine-tune stage again)")
    path = Path(os.path.normpath(record.parent / deployed["file"]))
    if not path.is_file():
        raise BadValueError(f"{record} deploys {deployed['name']} but its file {path} is not there: run the stage that "
                            f"wrote it again")
    found = content_id(path)
    if found != deployed["sha256"]:
        raise BadValueError(f"{record} deploys {deployed['name']} from {path}, which has changed since the verdict "
                            f"(sha256 {found[:12]}…, not {deployed['sha256'][:12]}…): give the verdict again")
    return path


def export_model(path: str | Path, out: str | Path, **options) -> dict:
    """Export whatever deployable model ``path`` holds: a baseline (``baseline_export.export_baseline_onnx``), a
    hybrid head (``hybrid_export.export_hybrid_onnx``), a small CNN (``cnn_export.export_small_cnn_onnx``) or a head
    (``export.export_onnx``, which takes ``options``). The others take no options: their graphs have no pretrained
    encoder to quantise or halve."""
    import inspect

    from ..heads.baseline import BASELINE_FORMAT, model_format
    from ..heads.cnn import SMALL_CNN_FORMAT
    from ..heads.hybrid import HYBRID_FORMAT
    from .export import export_onnx

    kind = model_format(path)
    if kind in (BASELINE_FORMAT, HYBRID_FORMAT, SMALL_CNN_FORMAT):
        defaults = {k: p.default for k, p in inspect.signature(export_onnx).parameters.items()}
        unsupported = sorted(k for k, v in options.items() if v != defaults.get(k))
        if unsupported:
            raise ExportError(f"{path}: {kind} models are exported as they are ({', '.join(unsupported)} apply to "
                              f"an encoder + head)")
        if kind == BASELINE_FORMAT:
            from .baseline_export import export_baseline_onnx

            return export_baseline_onnx(path, out)
        if kind == SMALL_CNN_FORMAT:
            from .cnn_export import export_small_cnn_onnx

            return export_small_cnn_onnx(path, out)
        from .hybrid_export import export_hybrid_onnx

        return export_hybrid_onnx(path, out)
    return export_onnx(path, out, **options)
