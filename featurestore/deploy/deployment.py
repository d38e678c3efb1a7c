"""Which head a pipeline deploys: the fine-tuned backbone's when the fine-tune stage chose it, else the
cache-only one. Paths come from the caller (the stage's command line); the library knows no project folders."""

from __future__ import annotations

import json
from pathlib import Path


def deployed_head(decision: str | Path, cache_only: str | Path, finetuned: str | Path) -> Path:
    """``finetuned`` when the fine-tune stage's ``decision`` file says the fine-tuned backbone was chosen and that
    head exists, else ``cache_only`` (also when no decision was written)."""
    decision, finetuned = Path(decision), Path(finetuned)
    if decision.is_file() and json.loads(decision.read_text()).get("chosen") == "finetuned" and finetuned.is_file():
        return finetuned
    return Path(cache_only)
