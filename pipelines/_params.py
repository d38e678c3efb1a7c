"""Shared helper of the stage scripts: the project root and one section of params.yaml.

Importing this module moves the process to the project root (where DVC runs the stages anyway), and
``ROOT`` is ``Path(".")``: files are named by paths relative to the project, so the metrics and reports
the stages write hold no machine-specific absolute paths and `dvc metrics diff` between two clones shows
only real differences.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

os.chdir(Path(__file__).resolve().parent.parent)
ROOT = Path(".")


def load_params(section: str) -> dict:
    with open(ROOT / "params.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)[section]
