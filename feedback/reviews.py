"""ReviewStore: durable, append-only JSONL shards of ReviewDecisions; the latest decision per flag wins.

    >>> reviews = ReviewStore("data/feedback")
    >>> reviews.append(ReviewDecision(flag_id=..., flag_record_id=..., action="accept", reviewer="ana"))
    >>> reviews.latest()[flag_id].action
    'accept'

Decisions live beside the flags, under ``<feedback_dir>/reviews/``, in shards written exactly like
the flag shards (``feedback.store.ShardWriter``: one shard per process, one ``write`` per line,
fsynced before ``append`` returns). A decision never edits a flag and is never edited itself:
deciding again appends a newer decision, and readers keep the latest one of each flag.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from feedback.reader import BadLine, gc_paused, read_jsonl
from feedback.store import ShardWriter
from schemas.review import ReviewDecision

log = logging.getLogger(__name__)

REVIEWS_SUBDIR = "reviews"


@dataclass
class ReadReviews:
    """Every decision read back, in file order, and the lines that were not decisions."""

    decisions: list[ReviewDecision] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


def review_shard_paths(root: str | Path) -> list[Path]:
    return sorted((Path(root) / REVIEWS_SUBDIR).glob("*.jsonl"))


def read_reviews(root: str | Path) -> ReadReviews:
    """Every ReviewDecision under ``root``; a torn last line or a bad row is reported, not fatal."""
    result = ReadReviews()
    for path in review_shard_paths(root):
        read_jsonl(path, ReviewDecision, result.decisions, result.bad)
    for bad in result.bad:
        log.warning("%s", bad)
    return result


def newer(a: ReviewDecision, b: ReviewDecision | None) -> bool:
    """Whether decision ``a`` supersedes ``b``: the later one wins; on a tie, the one read last."""
    return b is None or a.created_at >= b.created_at


def latest_decisions(decisions: list[ReviewDecision]) -> dict[str, ReviewDecision]:
    """The latest decision of each flag, keyed by flag_id."""
    latest: dict[str, ReviewDecision] = {}
    for d in decisions:
        if newer(d, latest.get(d.flag_id)):
            latest[d.flag_id] = d
    return latest


class ReviewStore:
    """Appends ReviewDecisions to this process's review shard and keeps the latest one per flag.

    ``refresh`` picks up decisions other processes appended since, reading only the new bytes.
    """

    def __init__(self, root: str | Path, max_bytes: int = 16 * 1024 * 1024):
        self.root = Path(root)
        self.dir = self.root / REVIEWS_SUBDIR
        self._writer = ShardWriter(self.dir, "reviews", max_bytes)
        self._latest: dict[str, ReviewDecision] = {}
        self._offsets: dict[Path, int] = {}  # bytes of each shard read so far, whole lines only
        self._read_lock = threading.Lock()
        self.refresh()

    def append(self, decision: ReviewDecision) -> ReviewDecision:
        """Write ``decision``; return it once it is on disk. It becomes its flag's latest decision."""
        line = (decision.model_dump_json() + "\n").encode("utf-8")
        with self._writer.lock:
            seq = self._writer.write(line)
            self._keep(decision)
        self._writer.sync(seq)
        return decision

    def _keep(self, decision: ReviewDecision) -> None:
        if newer(decision, self._latest.get(decision.flag_id)):
            self._latest[decision.flag_id] = decision

    def get(self, flag_id: str) -> ReviewDecision | None:
        """The latest decision on ``flag_id`` known to this store, if any."""
        with self._writer.lock:
            return self._latest.get(flag_id)

    def latest(self) -> dict[str, ReviewDecision]:
        """A copy of the latest decision of each flag known to this store."""
        with self._writer.lock:
            return dict(self._latest)

    def refresh(self) -> dict[str, ReviewDecision]:
        """Read the decisions appended to any shard since the last refresh; return the latest of each flag.

        A line still being written (no newline yet) is left for the next refresh.
        """
        with self._read_lock:
            for path in review_shard_paths(self.root):
                start = self._offsets.get(path, 0)
                if path.stat().st_size <= start:
                    continue
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
                end = data.rfind(b"\n") + 1
                if end == 0:
                    continue
                self._offsets[path] = start + end
                decisions = []
                with gc_paused():
                    for raw in data[:end].split(b"\n"):
                        if raw and not raw.isspace():
                            try:
                                decisions.append(ReviewDecision.model_validate_json(raw))
                            except (ValidationError, ValueError) as err:
                                log.warning("%s: bad review decision skipped: %s", path, str(err).splitlines()[0])
                with self._writer.lock:
                    for d in decisions:
                        self._keep(d)
        return self.latest()

    def close(self) -> None:
        self._writer.close()
