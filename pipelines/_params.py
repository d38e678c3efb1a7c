"""Shared helper of the stage scripts: read one section of params.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_params(section: str) -> dict:
    with open(ROOT / "params.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)[section]
