"""Which head downstream stages deploy: the fine-tuned backbone's when the fine-tune stage chose it."""

from __future__ import annotations

import json
from pathlib import Path


def deployed_head(project: str | Path, backbone: str, head: str) -> Path:
    """The head downstream stages use for ``backbone`` × ``head``: the fine-tuned backbone's when the fine-tune
    stage chose it, else the cache-only one."""
    project = Path(project)
    finetuned = project / "data" / "finetune" / backbone / "heads" / f"{backbone}_ft__{head}.skops"
    decision = project / "data" / "finetune" / backbone / "decision.json"
    if decision.is_file() and json.loads(decision.read_text()).get("chosen") == "finetuned" and finetuned.is_file():
        return finetuned
    return project / "data" / "heads" / f"{backbone}__{head}.skops"
