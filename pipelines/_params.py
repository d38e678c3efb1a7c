"""Shared helper of the stage scripts: the project root, one section of params.yaml, and the arguments every
stage takes from its `cmd` in dvc.yaml (its input and output paths: the library knows no project folders).

Importing this module moves the process to the project root (where DVC runs the stages anyway): files are named
by paths relative to the project, so the metrics and reports the stages write hold no machine-specific absolute
paths and `dvc metrics diff` between two clones shows only real differences.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

os.chdir(Path(__file__).resolve().parent.parent)
ROOT = Path(".")


def load_params(section: str, params: Path = ROOT / "params.yaml") -> dict:
    with open(params, encoding="utf-8") as handle:
        return yaml.safe_load(handle)[section]


def stage_arguments(doc: str, positional: tuple[str, ...], paths: dict[str, str]) -> argparse.Namespace:
    """The stage's arguments: ``positional`` names (a backbone, a head) and ``--<path>`` options, all required."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name in positional:
        parser.add_argument(name)
    for name, help_text in paths.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=Path, required=True, help=help_text)
    return parser.parse_args()
