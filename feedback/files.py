"""Durable file writes: a file replaced whole or not at all, surviving a power cut once written."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in the folder `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or chunks of them) to ``path`` whole or not at all, durably.

    Written to a hidden file beside it (``.<name>.tmp<pid>``, which no reader of ``*.jsonl`` or
    ``*.json`` takes), fsynced, renamed over ``path``, then the folder fsynced. Readers see the old
    bytes or the new ones, never a mix; a failure (a full disk, a kill) leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a row that would not serialise: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def leftover_temp_files(folder: Path) -> list[Path]:
    """The temporary files `write_atomic` left in `folder` when its process was killed mid-write."""
    return [p for p in Path(folder).glob(".*.tmp*") if p.is_file()]


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on the file `path` (made if missing) for the block, waiting for another holder.

    One writer at a time across processes; the kernel drops the lock when its process dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
