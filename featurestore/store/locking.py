"""One writer per store: an exclusive lock (the ``filelock`` package) held for a whole extraction.

The lock is ``<store>.lock``; while it is held, ``<store>.lock.owner`` names the holder (pid, host,
command, start time) so that a second writer can say whom it is waiting for. The operating system
releases the lock when its holder dies, even by ``kill -9``; a stale owner file is simply overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import StoreLockedError
from ..utils.atomic import write_text_atomic

log = logging.getLogger("featurestore")


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


def owner_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock.owner")


def read_owner(store: Path) -> dict | None:
    """The recorded holder of ``store``'s lock: ``{pid, host, command, since}``, or None if unknown."""
    try:
        return json.loads(owner_path(store).read_text())
    except (OSError, ValueError):
        return None


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "a process that has not recorded itself yet"
    return f"pid {owner.get('pid')} on {owner.get('host')} (`{owner.get('command')}`, since {owner.get('since')})"


@contextmanager
def store_lock(store: str | Path, wait: bool = True, poll_seconds: float = 0.2) -> Iterator[None]:
    """Hold ``store``'s writer lock for the duration of the block.

    A second writer waits (saying for whom) or, with ``wait=False``, raises :class:`StoreLockedError`
    naming the holder's pid. Not re-entrant: take it once per extraction (or once per torchrun group).
    """
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(store)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = describe_owner(read_owner(store))
        if not wait:
            raise StoreLockedError(
                f"{store}: another featurestore process is writing this store: {holder}; "
                f"rerun without --no-wait to wait for it"
            ) from None
        log.warning("%s: waiting for %s, which is writing this store", store, holder)
        lock.acquire(poll_interval=poll_seconds)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
             "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_text_atomic(owner_path(store), json.dumps(owner))
        yield
    finally:
        owner_path(store).unlink(missing_ok=True)
        lock.release()
