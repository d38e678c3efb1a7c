"""Files replaced whole: written under a unique temporary name beside the target, fsynced, renamed.

Two processes writing the same target never share a temporary file, and a reader (or a writer
killed half-way) only ever sees the previous complete file or the new complete one.
"""

from __future__ import annotations

import os
import secrets
import stat
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
    """A new, empty, uniquely named file beside ``target`` (``.<name>.<random>.tmp``) with the permissions an
    ordinary ``open(target, "w")`` would leave: the existing file's mode, or for a new file 0666 less the umask
    (``tempfile.mkstemp`` makes 0600, which would hide a shared store or head from the owner's team)."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        keep = True
    except FileNotFoundError:
        mode, keep = 0o666, False  # the kernel applies the umask to a file it creates
    while True:
        candidate = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        try:
            if keep:
                os.fchmod(fd, mode)  # exactly the target's mode, whatever the umask
        finally:
            os.close(fd)
        return candidate


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


STATUS_FILE = "status.json"  # what a stage that may make no model or store did (its folder is still a DVC output)


def write_status(out: str | Path, status: dict) -> Path:
    """``out/status.json``: what a stage that may make no model did, as sorted, indented JSON (its folder is then
    still a DVC output)."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / STATUS_FILE, json.dumps(status, indent=2, sort_keys=True) + "\n")


def temp_files_of(target: Path) -> list[Path]:
    """Temporary files that writers of ``target`` left beside it (e.g. after ``kill -9``)."""
    return sorted(target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"))
