"""One retraining at a time on a host: an advisory file lock that a scheduler tick or a CLI run holds.

    >>> with retrain_lock(lock_path(settings), "scheduler tick"):
    ...     run_pipeline(settings)

``fcntl.flock`` on ``retrain.lock`` beside the runs folder (``data/retrain.lock`` by default). The
kernel drops the lock when its holder exits, however it exits (a kill, a crash), so a stale lock
never blocks the next run. The holder writes who it is into the file so that a process that finds
the lock taken can say by whom.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = "retrain.lock"


class LockHeld(RuntimeError):
    """Another process holds the retraining lock; ``holder`` says which one, as it wrote it."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"another process holds the retraining lock {path} ({holder or 'holder unknown'})")


def lock_path(settings) -> Path:
    """``retrain.lock`` beside the runs folder: every process that trains into these runs takes it."""
    return Path(settings.retrain.runs_dir).parent / LOCK_FILE


@contextmanager
def retrain_lock(path: Path, what: str) -> Iterator[Path]:
    """Hold the lock at ``path`` for the block; raise LockHeld at once, without waiting, if it is taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": never truncate before holding the lock, or the holder's name would be erased.
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise LockHeld(path, f.read().strip()) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}: {what}, since "
                    f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
            f.flush()
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
