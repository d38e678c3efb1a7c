"""Which head a pipeline deploys: the fine-tuned backbone's when the fine-tune stage chose the fine-tuned backbone
*and* that head beat its cache-only counterpart on validation, else the cache-only one. Paths come from the caller
(the stage's command line); the library knows no project folders."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadValueError


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
