"""Files replaced whole: written under a unique temporary name beside the target, fsynced, renamed.

Two processes writing the same target never share a temporary file, and a reader (or a writer
killed half-way) only ever sees the previous complete file or the new complete one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """Flush a file's content, or (for a folder) a rename in it, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_temp_path(target: Path) -> Path:
    """A new, empty, uniquely named file beside ``target`` (``.<name>.<random>.tmp``)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(target: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a unique temporary path to write; on success it replaces ``target`` atomically.

    On an exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(target)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, target)
        if fsync:
            fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Replace ``target`` with ``text`` (UTF-8) atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def temp_files_of(target: Path) -> list[Path]:
    """Temporary files that writers of ``target`` left beside it (e.g. after ``kill -9``)."""
    return sorted(target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"))
