"""Timings apart: what a run measured about itself (wall-clock seconds, rates, the host) kept out of the files a
pipeline stage outputs, so that every output is a function of its inputs alone.

A **timing** is a value under a key :func:`is_timing` names: ``seconds``, ``*_seconds``, ``seconds_*``,
``per_second``, ``*_per_second``, ``*_per_s`` (``images_per_second``, ``model_only_items_per_s``) and the host's
name (``hostname``, ``host``). :func:`split_timings` cuts any JSON-like value (dicts and lists, nested) into its
stable part and its timings, the timings nested as they were, so that :func:`merge_timings` puts them back.

Routing: when the environment variable :data:`TIMINGS_VARIABLE` (``FEATURESTORE_TIMINGS``) names a folder (relative
to the working directory, or absolute), the report writers route: :func:`write_json` writes the stable part to the
file named and the timings to its mirror under that folder, ``<folder>/<path relative to the working directory>``
(:func:`timings_path`). Every DVC stage routes (``pipelines/_params.py`` sets the variable to ``timings``, a
git-ignored folder that no stage declares), so its outputs carry no seconds and an unchanged stage reruns to the same
bytes. Unset or empty (the CLI, a notebook), nothing is routed: a file is written whole, seconds included. A file
outside the working directory is never a pipeline output: it is written whole too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

TIMINGS_VARIABLE = "FEATURESTORE_TIMINGS"
HOST_KEYS = frozenset({"hostname", "host"})


def is_timing(key: object) -> bool:
    """Whether a value under ``key`` is a timing (see the module's docstring), e.g. ``"train_seconds"``."""
    key = str(key)
    return (key in ("seconds", "per_second") or key.endswith(("_seconds", "_per_second", "_per_s"))
            or key.startswith("seconds_") or key in HOST_KEYS)


def split_timings(obj: Any) -> tuple[Any, Any]:
    """``(stable, timings)`` of a JSON-like value: ``stable`` is ``obj`` without its timings (new dicts and lists;
    ``obj`` is not changed); ``timings`` holds them at the same place: a dict holds the timing keys and the keys whose
    value holds timings, a list one entry per item (None for an item without timings). ``timings`` is ``{}`` for a
    dict, ``[]`` for a list and None for anything else that holds no timing.

    ``split_timings({"n": 5, "seconds": 1.2, "points": [{"C": 1, "seconds": 0.1}, {"C": 2}]})`` gives
    ``({"n": 5, "points": [{"C": 1}, {"C": 2}]}, {"seconds": 1.2, "points": [{"seconds": 0.1}, None]})``."""
    stable, timings = _split(obj)
    if timings is None:
        timings = {} if isinstance(obj, dict) else [] if isinstance(obj, (list, tuple)) else None
    return stable, timings


def _split(obj: Any) -> tuple[Any, Any]:
    """:func:`split_timings`, with None for timings wherever there are none."""
    if isinstance(obj, dict):
        stable, timings = {}, {}
        for key, value in obj.items():
            if is_timing(key):
                timings[key] = value
                continue
            stable[key], inner = _split(value)
            if inner is not None:
                timings[key] = inner
        return stable, timings or None
    if isinstance(obj, (list, tuple)):
        pairs = [_split(item) for item in obj]
        inner = [timing for _, timing in pairs]
        return [item for item, _ in pairs], None if all(timing is None for timing in inner) else inner
    return obj, None


def merge_timings(stable: Any, timings: Any) -> Any:
    """``stable`` with ``timings`` (as :func:`split_timings` made them) put back in place; the reverse of the split,
    up to the order of a dict's keys (the timings come last). Where the two no longer match (a list of another
    length, a timing the stable part holds itself) the stable part wins."""
    if isinstance(stable, dict) and isinstance(timings, dict):
        merged = dict(stable)
        for key, timing in timings.items():
            if key not in stable:
                merged[key] = timing
            elif not is_timing(key):
                merged[key] = merge_timings(stable[key], timing)
        return merged
    if isinstance(stable, list) and isinstance(timings, list) and len(stable) == len(timings):
        return [merge_timings(item, timing) for item, timing in zip(stable, timings, strict=True)]
    return stable


def timings_folder() -> Path | None:
    """The folder timings are routed to (:data:`TIMINGS_VARIABLE`), None when they are not routed."""
    folder = os.environ.get(TIMINGS_VARIABLE, "")
    return Path(folder) if folder else None


def timings_path(path: str | Path, suffix: str = "") -> Path | None:
    """Where the timings of the file ``path`` go: ``<timings folder>/<path relative to the working
    directory><suffix>`` (e.g. ``timings/data/heads/x.skops.json`` for ``data/heads/x.skops`` and ``".json"``).
    None when timings are not routed, or ``path`` is outside the working directory (no pipeline output)."""
    folder = timings_folder()
    if folder is None:
        return None
    relative = Path(os.path.relpath(os.path.abspath(path), os.getcwd()))
    if relative.parts[:1] == ("..",):
        return None
    return folder / relative.parent / (relative.name + suffix)


def _json_text(obj: Any, sort_keys: bool, indent: int | None) -> str:
    return json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"


def write_json(path: str | Path, obj: Any, sort_keys: bool = False, indent: int | None = 2) -> Path:
    """The one JSON writer of reports: ``obj`` as JSON (``indent``, keys sorted or in their order, a trailing
    newline) to ``path``, atomically. When timings are routed (:func:`timings_path`), ``path`` gets the stable part
    and the mirror the timings (a mirror left by an earlier run is removed when there are none); otherwise ``obj``
    whole. Returns ``path``."""
    mirror = timings_path(path)
    if mirror is None:
        return write_text_atomic(path, _json_text(obj, sort_keys, indent))
    stable, timings = split_timings(obj)
    write_text_atomic(path, _json_text(stable, sort_keys, indent))
    write_timings(mirror, timings, sort_keys)
    return Path(path)


def write_timings(mirror: Path, timings: Any, sort_keys: bool = False) -> Path | None:
    """``timings`` as JSON (indent 2) to ``mirror``, atomically; when there are none, an earlier file there is
    removed. Returns ``mirror``, or None when nothing was written."""
    if not timings:
        mirror.unlink(missing_ok=True)
        return None
    return write_text_atomic(mirror, _json_text(timings, sort_keys, 2))


def write_text_routed(path: str | Path, stable: str, whole: str) -> Path:
    """A text report (a markdown table, a CSV) in two versions: ``stable`` (no timings) to ``path`` and ``whole``
    (with them) to its mirror when timings are routed; ``whole`` to ``path`` otherwise. Atomic. Returns ``path``."""
    mirror = timings_path(path)
    write_text_atomic(path, whole if mirror is None else stable)
    if mirror is not None:
        write_text_atomic(mirror, whole)
    return Path(path)


def read_json(path: str | Path) -> Any:
    """A JSON report as :func:`write_json` wrote it: the file, with its routed timings merged back when timings are
    routed and its mirror is there (a report written whole reads the same)."""
    stable = json.loads(Path(path).read_text(encoding="utf-8"))
    mirror = timings_path(path)
    if mirror is None or not mirror.is_file():
        return stable
    return merge_timings(stable, json.loads(mirror.read_text(encoding="utf-8")))
