"""Read FlagRecords back from the JSONL shards, tolerating a torn last line and reporting bad rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

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


def read_shard(path: Path, result: ReadResult) -> None:
    data = path.read_bytes()
    lines = data.split(b"\n")
    # A complete file ends with "\n", so the last split piece is empty; anything else is torn.
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        torn = i == last
        try:
            result.records.append(FlagRecord.model_validate_json(raw))
        except (ValidationError, ValueError) as err:
            msg = describe(err) if isinstance(err, ValidationError) else str(err).splitlines()[0]
            result.bad.append(BadLine(str(path), i + 1, msg, torn=torn))


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
    latest: dict[str, FlagRecord] = {}
    for rec in result.records:
        cur = latest.get(rec.flag_id)
        if cur is None or (rec.revision, rec.updated_at) > (cur.revision, cur.updated_at):
            latest[rec.flag_id] = rec
    return LatestFlags(latest, result.bad)
