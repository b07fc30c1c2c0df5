"""FlagStore: durable, append-only JSONL shards of FlagRecords, one writer shard per process.

    >>> store = FlagStore("data/feedback")
    >>> saved = store.save(record)        # returns once the line is fsynced on disk
    >>> saved.revision
    1

Each process appends to its own shard (``flags-YYYYMMDD-<host>-<pid>-<token>-<n>.jsonl``, the token
random per process), so two processes never interleave bytes in one file, and a shard restored from
the Hub after a restart (same host name, same pid: a container) never has the name of a new one. A shard is rotated past ``max_bytes`` or when the
UTC day changes. A line is written with a single ``write`` and fsynced before ``save`` returns:
a record the caller was told about survives a crash; a crash mid-write leaves at most one torn
last line, which the reader reports and skips.

Concurrent saves share fsyncs (group commit): each writer's line is written under the lock,
then one leader's fsync makes every line written so far durable while the others wait on a
condition, so 32 writers do not queue behind 32 fsyncs. The shard writing itself is ``ShardWriter``, shared with the review decisions' store.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from feedback.reader import FLAGS_SUBDIR, latest_flags
from schemas.flag import FlagRecord, utcnow

log = logging.getLogger(__name__)


class ShardWriter:
    """Appends whole lines to this process's own JSONL shards in ``dir``, durably, fsyncs shared.

        >>> writer = ShardWriter(Path("data/feedback/reviews"), "reviews")
        >>> with writer.lock:
        ...     seq = writer.write(b'{"a": 1}\\n')   # callers update their own index under the same lock
        >>> writer.sync(seq)                         # returns once that line is on disk

    Shards are named ``<prefix>-YYYYMMDD-<host>-<pid>-<token>-<n>.jsonl`` (the token random per
    writer) and rotated past ``max_bytes`` or when the UTC day changes.
    """

    def __init__(self, dir: Path, prefix: str, max_bytes: int):
        self.dir = dir
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.lock = threading.Lock()  # guards the file and the counters (and the caller's index)
        # Group commit: one caller (the leader) fsyncs for every line written so far while the
        # others sleep on _cond; guards _synced and _syncing, never held together with lock.
        self._cond = threading.Condition()
        self._syncing = False
        self._file = None
        self._retired: list = []  # rotated-out shards not yet fsynced and closed
        self._written = 0  # lines written so far
        self._synced = 0  # lines known durable
        self._day = ""
        self._seq = 0
        # A container restarts with the same host name and pid: without this, a new shard could take
        # the name of one the Hub holds and that a pull brings back later.
        self._token = uuid.uuid4().hex[:6]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the feedback folder {self.dir}: {err.strerror}; "
                          "set FLAGLOOP_FEEDBACK_DIR to a writable folder") from err

    @property
    def written(self) -> int:
        """How many lines were written so far (call with ``lock`` held for a consistent value)."""
        return self._written

    def write(self, line: bytes) -> int:
        """Write one whole line (ending in newline) with one ``write``; return its sequence number.

        Call with ``lock`` held, then ``sync`` the returned number outside the lock.
        """
        f = self._shard_for(len(line))
        try:
            f.write(line)  # unbuffered: one write() call per line
        except OSError:
            # A partial line may be there now: start a fresh shard so the next record is whole.
            self._file = None
            self._retired.append(f)  # lines before the torn one still get their fsync
            raise
        self._written += 1
        return self._written

    def close(self) -> None:
        self.sync(self._written)
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def sync(self, seq: int) -> None:
        """Return once line number ``seq`` is on disk: one caller fsyncs for all who wait."""
        with self._cond:
            while self._synced < seq:
                if not self._syncing:
                    self._syncing = True  # lead: fsync below, outside the condition
                    break
                self._cond.wait()
            else:
                return
        upto, retired = None, []
        try:
            with self.lock:
                retired, current = self._retired, self._file
                self._retired = []
                upto = self._written
            for f in retired + ([current] if current is not None else []):
                os.fsync(f.fileno())
            for f in retired:
                f.close()
        except BaseException:
            with self.lock:  # rotated-out shards not yet durable wait for the next fsync
                self._retired = [f for f in retired if not f.closed] + self._retired
            upto = None
            raise
        finally:
            with self._cond:
                self._syncing = False
                if upto is not None:
                    self._synced = max(self._synced, upto)
                self._cond.notify_all()  # followers recheck; one not yet covered leads the next fsync

    def _shard_for(self, nbytes: int):
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        f = self._file
        if f is not None and day == self._day and f.tell() + nbytes <= self.max_bytes:
            return f
        if f is not None:
            self._retired.append(f)  # fsynced and closed by the next sync
        self._day = day
        while True:
            self._seq += 1
            name = f"{self.prefix}-{day}-{socket.gethostname()}-{os.getpid()}-{self._token}-{self._seq}.jsonl"
            path = self.dir / name
            try:
                # "xb": never append to a shard some earlier process (same pid, reused) left behind.
                self._file = open(path, "xb", buffering=0)
            except FileExistsError:
                continue
            log.info("writing %s to %s", self.prefix, path)
            # Make the new file's name itself durable.
            dirfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
            return self._file


class FlagStore:
    """Appends FlagRecords to this process's shard; re-saving an unchanged flag writes nothing."""

    def __init__(self, root: str | Path, max_bytes: int = 16 * 1024 * 1024):
        self.root = Path(root)
        self.dir = self.root / FLAGS_SUBDIR
        self.max_bytes = max_bytes
        self._writer = ShardWriter(self.dir, "flags", max_bytes)
        # The latest revision of every flag already on disk, so re-saves revise instead of duplicate.
        self._latest: dict[str, FlagRecord] = latest_flags(self.root).records

    def get(self, flag_id: str) -> FlagRecord | None:
        with self._writer.lock:
            return self._latest.get(flag_id)

    def save(self, record: FlagRecord) -> FlagRecord:
        """Write ``record`` as the next revision of its flag; return what is on disk.

        An unchanged re-save returns the stored revision and writes nothing.
        """
        with self._writer.lock:
            previous = self._latest.get(record.flag_id)
            if previous is not None and previous.content_key() == record.content_key():
                record, seq = previous, self._writer.written  # it may still be waiting for its fsync
            else:
                record, seq = self._write(record, previous)
        self._writer.sync(seq)
        return record

    def _write(self, record: FlagRecord, previous: FlagRecord | None) -> tuple[FlagRecord, int]:
        if previous is not None:
            record = record.model_copy(
                update={"revision": previous.revision + 1, "created_at": previous.created_at, "updated_at": utcnow()}
            )
        seq = self._writer.write((record.model_dump_json() + "\n").encode("utf-8"))
        self._latest[record.flag_id] = record
        return record, seq

    def close(self) -> None:
        self._writer.close()
