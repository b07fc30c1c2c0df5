"""Read FlagRecords back from the JSONL shards, tolerating a torn last line and reporting bad rows."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from schemas.errors import describe
from schemas.flag import FlagRecord

log = logging.getLogger(__name__)

FLAGS_SUBDIR = "flags"


@dataclass
class BadLine:
    """A line that could not be read as a FlagRecord, with where it is and why."""

    file: str
    line: int
    error: str
    torn: bool = False  # the unterminated last line of a shard: a write a crash cut short

    def __str__(self) -> str:
        what = "torn last line" if self.torn else "bad record"
        return f"{self.file}:{self.line}: {what}: {self.error}"


@dataclass
class ReadResult:
    records: list[FlagRecord] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


@dataclass
class LatestFlags:
    records: dict[str, FlagRecord] = field(default_factory=dict)
    bad: list[BadLine] = field(default_factory=list)


def shard_paths(root: str | Path) -> list[Path]:
    return sorted((Path(root) / FLAGS_SUBDIR).glob("*.jsonl"))


def read_jsonl(path: Path, model: type[BaseModel], records: list, bad: list[BadLine]) -> None:
    """Append each line of the shard ``path`` as a ``model`` to ``records``, or as a BadLine to ``bad``."""
    parse_jsonl(path.read_bytes(), str(path), model, records, bad)


def parse_jsonl(data: bytes, name: str, model: type[BaseModel], records: list, bad: list[BadLine]) -> None:
    """``read_jsonl`` on bytes already read (named ``name`` in BadLines): a caller that also hashes
    the shard parses exactly the bytes it hashed, even while a writer appends."""
    lines = data.split(b"\n")
    # A complete file ends with "\n", so the last split piece is empty; anything else is torn.
    last = len(lines) - 1
    # The validator itself, not model_validate_json: its Python wrapper costs 1.3 us a call, a
    # tenth of validating a review decision, paid for every line of every shard.
    validate = model.__pydantic_validator__.validate_json
    with gc_paused():
        for i, raw in enumerate(lines):
            if not raw or raw.isspace():
                continue
            try:
                records.append(validate(raw))
            except (ValidationError, ValueError) as err:
                msg = describe(err) if isinstance(err, ValidationError) else str(err).splitlines()[0]
                bad.append(BadLine(name, i + 1, msg, torn=i == last))


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector during a bulk read.

    Records read back hold no reference cycles, and the collector rescanning the growing list of
    them, again and again, costs a quarter of reading 100k lines.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_shard(path: Path, result: ReadResult) -> None:
    read_jsonl(path, FlagRecord, result.records, result.bad)


def read_flags(root: str | Path) -> ReadResult:
    """Every record in every shard under ``root``, in file order, plus the lines that were not."""
    result = ReadResult()
    for path in shard_paths(root):
        read_shard(path, result)
    for bad in result.bad:
        log.warning("%s", bad)
    return result


def latest_flags(root: str | Path) -> LatestFlags:
    """The latest revision of each flag (by revision, then save time)."""
    result = read_flags(root)
    return LatestFlags(latest_revisions(result.records), result.bad)


def latest_revisions(records: Iterable[FlagRecord]) -> dict[str, FlagRecord]:
    """The latest revision of each flag among ``records`` (by revision, then save time), by flag_id."""
    latest: dict[str, FlagRecord] = {}
    for rec in records:
        cur = latest.get(rec.flag_id)
        if cur is None or (rec.revision, rec.updated_at) > (cur.revision, cur.updated_at):
            latest[rec.flag_id] = rec
    return latest
