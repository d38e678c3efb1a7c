"""Shared helper of the stage scripts: the project root, one section of params.yaml, and the arguments every
stage takes from its `cmd` in dvc.yaml (its input and output paths: the library knows no project folders).

Importing this module moves the process to the project root (where DVC runs the stages anyway): files are named
by paths relative to the project, so the metrics and reports the stages write hold no machine-specific absolute
paths and `dvc metrics diff` between two clones shows only real differences. It also routes timings
(featurestore.utils.timings): the seconds a stage took, and anything else about the run rather than its inputs,
go to the git-ignored folder ``timings/`` (the same paths inside it), which no stage declares, so that every DVC
output is a function of its inputs alone and a stage rerun on the same inputs rewrites the same bytes. Set
FEATURESTORE_TIMINGS to another folder to move them, or to an empty value to keep them in the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

# The featurestore package beside this script, before an installed one: a queued `dvc exp run` runs the stages in a
# temporary copy of the project, whose code (perhaps edited by the experiment) is what must run, not the editable
# install's. Stage scripts import this module before featurestore.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.chdir(Path(__file__).resolve().parent.parent)
ROOT = Path(".")
os.environ.setdefault("FEATURESTORE_TIMINGS", "timings")  # featurestore.utils.timings.TIMINGS_VARIABLE


# Where a stage notes the params keys it read (a test runs the pipeline with it set, and checks every key against the
# stage's declared params in dvc.yaml): one JSON line per stage run, {"cmd", "keys"}.
READ_LOG_VARIABLE = "FEATURESTORE_PARAMS_READ"
_READ: set[str] = set()


class ReadParams(dict):
    """A params.yaml mapping that notes the dotted key of every value read (``[]``, ``get``; iterating or copying
    it reads the whole mapping), so that what a stage reads can be checked against what it declares."""

    def __init__(self, values: dict, prefix: str):
        super().__init__(values)
        self.prefix = prefix

    def _wrap(self, key, value):
        dotted = f"{self.prefix}.{key}"
        if isinstance(value, dict):
            return ReadParams(value, dotted)
        _READ.add(dotted)
        return value

    def __getitem__(self, key):
        return self._wrap(key, super().__getitem__(key))

    def __contains__(self, key) -> bool:
        _READ.add(f"{self.prefix}.{key}")  # asking whether it is there is a read: adding it changes the result
        return super().__contains__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        _READ.add(self.prefix)
        return super().__iter__()

    def items(self):
        _READ.add(self.prefix)
        return super().items()

    def values(self):
        _READ.add(self.prefix)
        return super().values()

    def keys(self):
        _READ.add(self.prefix)
        return super().keys()


def _log_reads() -> None:
    import json

    with open(os.environ[READ_LOG_VARIABLE], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"cmd": " ".join(["python", *sys.argv]), "keys": sorted(_READ)}) + "\n")


if os.environ.get(READ_LOG_VARIABLE):
    import atexit

    atexit.register(_log_reads)


def load_params(section: str, params: Path = ROOT / "params.yaml"):
    """One section of params.yaml; every key the stage reads from it is noted (:class:`ReadParams`)."""
    with open(params, encoding="utf-8") as handle:
        value = yaml.safe_load(handle)[section]
    if isinstance(value, dict):
        return ReadParams(value, section)
    _READ.add(section)
    return value


def store_entry(store: str) -> dict:
    """``stores.<store>``: the store's data set folder (``data``, under data/) and ``backbone``."""
    entry = load_params("stores").get(store)
    if not isinstance(entry, dict) or "backbone" not in entry or "data" not in entry:
        raise SystemExit(f"params.yaml: stores.{store} must be {{data: <folder under data/>, backbone: <name>}}")
    return entry


def store_settings(section: str, store: str) -> dict:
    """The settings ``section`` (extract, plateau, finetune, curve) gives ``store``: its backbone's entry
    (``<section>.<backbone>``), overridden key by key by the store's own (``stores.<store>.<section>``)."""
    entry = store_entry(store)
    backbone = entry["backbone"]
    settings = load_params(section).get(backbone)
    if settings is None:
        raise SystemExit(f"params.yaml: no {section} settings for backbone {backbone} (store {store}): add "
                         f"{section}.{backbone}")
    return {**settings, **(entry.get(section) or {})}


def stage_arguments(doc: str, positional: tuple[str, ...], paths: dict[str, str],
                    optional: dict[str, str] | None = None) -> argparse.Namespace:
    """The stage's arguments: ``positional`` names (a store, a head) and ``--<path>`` options, all required, and the
    ``optional`` ``--<name>`` values (a string, None when not given)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name in positional:
        parser.add_argument(name)
    for name, help_text in paths.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=Path, required=True, help=help_text)
    for name, help_text in (optional or {}).items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text)
    return parser.parse_args()


LAYER_STORE = "features.h5"  # inside data/layers/<store>/: the store's --layers all features, when it has them


def layer_store(store: str, folder: Path) -> Path | None:
    """The store's layer store in ``folder`` (``extract_layers``'s output), None where ``stores.<store>.layers`` is not
    ``all`` (the folder then holds only its status.json)."""
    path = folder / LAYER_STORE
    return path if store_entry(store).get("layers", "penultimate") == "all" and path.is_file() else None
