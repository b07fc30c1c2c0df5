"""The review table: the latest revision of every flag joined with its latest decision, and its filters.

    >>> index = FlagIndex("data/feedback")
    >>> index.refresh()                                   # reads only what was appended since last time
    >>> rows = review_rows(index.frame(), ReviewStore("data/feedback").latest())
    >>> pending = filter_rows(rows, Filters(statuses=("pending",), reasons=("incorrect",)))

Speed matters here (100k flags must load and filter in well under 2 s), so the table is read on a
fast path: each line is parsed with orjson and only the fields the table shows are kept, instead
of validating every line as a FlagRecord (several times slower). The fast path checks the fields
it keeps and gives the same rows as ``feedback.reader.latest_flags`` for every line that reader
accepts; a line it cannot use is reported like the reader does. The one flag a reviewer opens is
read again in full and validated (``FlagIndex.record``).

A decision counts for the flag revision it was made on: a flag its user changed after the review
is pending again (``changed_since_review``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from feedback.reader import BadLine, gc_paused, shard_paths
from schemas.flag import REASONS, FlagRecord
from schemas.review import ReviewDecision

log = logging.getLogger(__name__)

STATUSES = ("pending", "accepted", "rejected")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_US = timedelta(microseconds=1)
STATUS_OF_ACTION = {"accept": "accepted", "reject": "rejected"}
THUMBS = ("up", "down", "none")
NO_REASON = "(none)"  # the reason filter's name for flags without a reason (a thumbs click alone)
REASON_BITS = {reason: 1 << i for i, reason in enumerate(REASONS)}
PREVIEW_CHARS = 80

# The columns FlagIndex.frame() has, one row per flag (its latest revision).
FLAG_COLUMNS = ["flag_id", "record_id", "revision", "created_at", "model_version", "thumbs", "reason_bits"]
# What review_rows adds from the decisions.
DECISION_COLUMNS = ["status", "reviewer", "decided_at", "changed_since_review"]
# The columns the reviewer sees in the table, in order, with their headers.
TABLE_COLUMNS = {
    "flag_id": "flag", "created": "created (UTC)", "status": "status", "model_version": "model",
    "thumbs": "thumbs", "reasons": "reasons", "question": "question", "answer": "answer", "comment": "comment",
}


class FlagLineError(ValueError):
    """A shard line the review table cannot use, and why."""


# --- one line ---------------------------------------------------------------------------------
def preview(text: str, width: int = PREVIEW_CHARS) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def model_label(model: dict) -> str:
    """How the table names the model that answered: its registry version, else its file and hash."""
    if model.get("version"):
        return str(model["version"])
    return f"{model['file']} · {str(model['sha256'])[:8]}"


def reasons_text(bits: int) -> str:
    """The reasons of a reason bit mask, comma-separated, in the taxonomy's order."""
    return ", ".join(r for r, bit in REASON_BITS.items() if bits & bit)


def _micros(t: datetime) -> int:
    """A time as integer microseconds since the epoch (a naive time is taken as UTC)."""
    return ((t if t.tzinfo else t.replace(tzinfo=timezone.utc)) - EPOCH) // ONE_US


def _later(revision: int, updated_at: str, old_revision: int, old_updated_at: str) -> bool:
    """Whether a flag line is a later revision than the one kept: by number, then by save time."""
    if revision != old_revision:
        return revision > old_revision
    return datetime.fromisoformat(updated_at) > datetime.fromisoformat(old_updated_at)


def summarize(obj) -> tuple:
    """The table's fields of one parsed flag line: FLAG_COLUMNS' values, then updated_at.

    Checks what it keeps, so that a line the FlagRecord reader refuses for these fields is refused
    here too (FlagLineError).
    """
    try:
        if obj["schema_version"] != 1:
            raise FlagLineError(f"schema_version: expected 1, got {obj['schema_version']!r}")
        flag_id, record_id, revision = obj["flag_id"], obj["record_id"], obj["revision"]
        if not (isinstance(flag_id, str) and isinstance(record_id, str)):
            raise FlagLineError("flag_id and record_id must be text")
        if type(revision) is not int or revision < 1:
            raise FlagLineError(f"revision: expected an integer >= 1, got {revision!r}")
        if obj["conversation"][-1]["role"] != "assistant":
            raise FlagLineError("conversation: must end with the flagged assistant answer")
        thumbs = obj.get("thumbs")
        if thumbs not in ("up", "down", None):
            raise FlagLineError(f"thumbs: expected 'up', 'down' or null, got {thumbs!r}")
        bits = 0
        for r in obj.get("reasons", ()):
            bits |= REASON_BITS[r]
        created, updated = obj["created_at"], obj["updated_at"]
        if not (isinstance(created, str) and isinstance(updated, str)):
            raise FlagLineError("created_at and updated_at must be ISO 8601 text")
        return (flag_id, record_id, revision, created, model_label(obj["model"]), thumbs or "none", bits, updated)
    except FlagLineError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        raise FlagLineError(f"missing or malformed field: {type(err).__name__} {err}") from None


def texts_of(obj: dict) -> tuple[str, str, str]:
    """The previews the table shows of a parsed flag line: last question, answer, comment."""
    conversation = obj["conversation"]
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return (preview(users[-1]) if users else "", preview(conversation[-1]["content"]), preview(obj.get("comment", "")))


# --- the index of every flag ------------------------------------------------------------------
class FlagIndex:
    """The latest revision of every flag under a feedback folder, summarised for the review table.

    ``refresh`` reads only the bytes appended to each shard since the last call (shards are
    append-only), up to the last complete line: a line being written, or torn by a crash, is
    left for later. Only the fields the table filters and sorts on are kept; the text previews
    of the rows on screen are read again on demand (``texts``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._reset()

    def _reset(self) -> None:
        self.bad: list[BadLine] = []
        self._shards: list[Path] = []
        self._offsets: dict[Path, int] = {}  # bytes read so far, whole lines only
        self._lines: dict[Path, int] = {}  # lines read so far, for file:line in bad rows
        self._pos: dict[str, int] = {}  # flag_id -> its place in _rows
        self._rows: list[tuple] = []  # FLAG_COLUMNS' values, then updated_at, shard, offset
        self._texts: dict[str, tuple[str, str, str]] = {}
        self._frame: pd.DataFrame | None = None

    def refresh(self) -> bool:
        """Read what was appended since the last refresh; return whether any flag changed."""
        paths = shard_paths(self.root)
        if any(p not in paths or p.stat().st_size < off for p, off in self._offsets.items()):
            log.info("flag shards under %s were replaced: reading them all again", self.root)
            self._reset()
        changed = False
        with gc_paused():
            for path in paths:
                changed |= self._read_new(path)
        if changed:
            self._frame = None
        return changed

    def _read_new(self, path: Path) -> bool:
        start = self._offsets.get(path, 0)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end == 0:
            return False
        if path not in self._offsets:
            self._shards.append(path)
            self._lines[path] = 0
        shard = self._shards.index(path)
        lines = data[:end].split(b"\n")[:-1]
        first = self._lines[path] + 1
        self._offsets[path] = start + end
        self._lines[path] += len(lines)
        rows, pos, loads = self._rows, self._pos, orjson.loads
        changed = False
        offset = start
        for number, raw in enumerate(lines, start=first):
            at, offset = offset, offset + len(raw) + 1
            if not raw or raw.isspace():
                continue
            try:
                row = summarize(loads(raw)) + (shard, at)
            except (orjson.JSONDecodeError, FlagLineError) as err:
                self.bad.append(BadLine(str(path), number, str(err).splitlines()[0]))
                log.warning("%s", self.bad[-1])
                continue
            i = pos.get(row[0])
            if i is None:
                pos[row[0]] = len(rows)
                rows.append(row)
            elif _later(row[2], row[7], rows[i][2], rows[i][7]):
                rows[i] = row
                self._texts.pop(row[0], None)
            else:
                continue
            changed = True
        return changed

    def frame(self) -> pd.DataFrame:
        """One row per flag (its latest revision), FLAG_COLUMNS, newest first."""
        if self._frame is None:
            self._frame = flags_frame(self._rows)
        return self._frame

    def _line(self, flag_id: str) -> bytes:
        i = self._pos.get(flag_id)
        if i is None:
            raise KeyError(f"no flag {flag_id!r} under {self.root}")
        *_, shard, offset = self._rows[i]
        with open(self._shards[shard], "rb") as f:
            f.seek(offset)
            return f.readline()

    def record(self, flag_id: str) -> FlagRecord:
        """The full, validated FlagRecord of the revision the table shows for ``flag_id``."""
        return FlagRecord.model_validate_json(self._line(flag_id))

    def texts(self, flag_ids) -> dict[str, tuple[str, str, str]]:
        """(question, answer, comment) previews of these flags, read from their lines once, then kept."""
        for flag_id in flag_ids:
            if flag_id not in self._texts:
                self._texts[flag_id] = texts_of(orjson.loads(self._line(flag_id)))
        return {flag_id: self._texts[flag_id] for flag_id in flag_ids}

    def __len__(self) -> int:
        return len(self._pos)


def flags_frame(rows: list[tuple]) -> pd.DataFrame:
    """Summaries (FLAG_COLUMNS' values first) as a DataFrame, created_at as UTC datetimes, newest first.

    Text columns stay plain object arrays: converting 100k strings to pandas' string dtype costs
    more than every filter afterwards.
    """
    col = {name: [r[k] for r in rows] for k, name in enumerate(FLAG_COLUMNS)}
    created = pd.to_datetime(pd.Series(col["created_at"], dtype=object), utc=True, format="ISO8601")
    order = np.argsort(-created.values.view("int64"), kind="stable")
    text = {name: pd.Series(np.asarray(col[name], dtype=object)[order], dtype=object)
            for name in ("flag_id", "record_id", "model_version", "thumbs")}
    return pd.DataFrame({
        "flag_id": text["flag_id"],
        "record_id": text["record_id"],
        "revision": np.asarray(col["revision"], dtype="int64")[order],
        "created_at": created.iloc[order].reset_index(drop=True),
        "model_version": text["model_version"],
        "thumbs": text["thumbs"],
        "reason_bits": np.asarray(col["reason_bits"], dtype="int64")[order],
    })


# --- join with the decisions ------------------------------------------------------------------
def review_rows(flags: pd.DataFrame, decisions: dict[str, ReviewDecision]) -> pd.DataFrame:
    """Each flag with its review status: pending, or the action of its latest decision on this revision.

    Adds DECISION_COLUMNS: status, reviewer ('' if none), decided_at (NaT if none), and
    changed_since_review (decided on an earlier revision, so pending again).
    """
    rows = flags.copy(deep=False)
    n = len(rows)
    keys = list(decisions)
    found = pd.Index(keys, dtype=object).get_indexer(rows["flag_id"]) if keys else np.full(n, -1)
    has = found >= 0
    at = found[has]
    decided_on = np.array([d.flag_record_id for d in decisions.values()], dtype=object)
    current = np.zeros(n, dtype=bool)
    current[has] = decided_on[at] == rows["record_id"].to_numpy()[has]
    status = np.full(n, "pending", dtype=object)
    actions = np.array([STATUS_OF_ACTION[d.action] for d in decisions.values()], dtype=object)
    status[current] = actions[found[current]]
    reviewer = np.full(n, "", dtype=object)
    reviewer[has] = np.array([d.reviewer for d in decisions.values()], dtype=object)[at]
    when = np.full(n, np.iinfo("int64").min, dtype="int64")  # NaT
    when[has] = np.array([_micros(d.created_at) for d in decisions.values()], dtype="int64")[at]
    rows["status"] = pd.Series(status, dtype=object, index=rows.index)
    rows["reviewer"] = pd.Series(reviewer, dtype=object, index=rows.index)
    rows["decided_at"] = pd.to_datetime(when, unit="us", utc=True)
    rows["changed_since_review"] = has & ~current
    return rows


# --- filters ----------------------------------------------------------------------------------
def parse_day(value, what: str) -> date | None:
    """A date filter's value (a date, datetime, timestamp, 'YYYY-MM-DD…' text, or empty) as a UTC day."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).date() if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).date()
    try:
        return date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a date: write it as YYYY-MM-DD") from None


@dataclass(frozen=True)
class Filters:
    """What the reviewer narrowed the table to; an empty choice means 'any'."""

    reasons: tuple[str, ...] = ()  # any of these (NO_REASON: flags without a reason)
    statuses: tuple[str, ...] = ()
    model_versions: tuple[str, ...] = ()
    thumbs: tuple[str, ...] = ()  # "up", "down", "none"
    start: date | None = None  # first UTC day included
    end: date | None = None  # last UTC day included

    @classmethod
    def of(cls, reasons=None, statuses=None, model_versions=None, thumbs=None, start=None, end=None) -> "Filters":
        """Filters from UI values, checked: unknown choices and unreadable dates are a ValueError."""
        for name, given, allowed in (
            ("reason", reasons, (*REASONS, NO_REASON)), ("status", statuses, STATUSES), ("thumbs", thumbs, THUMBS),
        ):
            unknown = [v for v in given or () if v not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}: choose from {', '.join(allowed)}")
        first, last = parse_day(start, "start date"), parse_day(end, "end date")
        if first and last and first > last:
            raise ValueError(f"the start date {first} is after the end date {last}: swap them")
        return cls(tuple(reasons or ()), tuple(statuses or ()), tuple(model_versions or ()), tuple(thumbs or ()),
                   first, last)


def filter_mask(rows: pd.DataFrame, f: Filters) -> np.ndarray:
    """A boolean mask of the rows ``f`` keeps."""
    keep = np.ones(len(rows), dtype=bool)
    if f.reasons:
        mask = sum(REASON_BITS[r] for r in f.reasons if r != NO_REASON)
        bits = rows["reason_bits"].to_numpy()
        hit = (bits & mask) != 0
        if NO_REASON in f.reasons:
            hit |= bits == 0
        keep &= hit
    if f.statuses:
        keep &= rows["status"].isin(f.statuses).to_numpy()
    if f.model_versions:
        keep &= rows["model_version"].isin(f.model_versions).to_numpy()
    if f.thumbs:
        keep &= rows["thumbs"].isin(f.thumbs).to_numpy()
    created = rows["created_at"]
    if f.start:
        keep &= (created >= pd.Timestamp(datetime.combine(f.start, time(), timezone.utc))).to_numpy()
    if f.end:
        keep &= (created < pd.Timestamp(datetime.combine(f.end + timedelta(days=1), time(), timezone.utc))).to_numpy()
    return keep


def filter_rows(rows: pd.DataFrame, f: Filters) -> pd.DataFrame:
    """The rows ``f`` keeps, in the same order."""
    return rows[filter_mask(rows, f)]


# --- what the reviewer sees -------------------------------------------------------------------
def table_view(rows: pd.DataFrame, texts: dict[str, tuple[str, str, str]] | None = None,
               limit: int = 500) -> pd.DataFrame:
    """The first ``limit`` rows as the table shows them, under TABLE_COLUMNS' headers, as text.

    ``texts`` gives each shown flag's (question, answer, comment) previews (FlagIndex.texts).
    """
    shown = rows.head(limit)
    ids = shown["flag_id"].tolist()
    texts = texts or {}
    blank = ("", "", "")
    view = pd.DataFrame({
        "flag_id": ids,
        "created": shown["created_at"].dt.strftime("%Y-%m-%d %H:%M").tolist(),
        "status": np.where(shown["changed_since_review"], "pending (changed)", shown["status"]).tolist(),
        "model_version": shown["model_version"].astype(str).tolist(),
        "thumbs": shown["thumbs"].astype(str).tolist(),
        "reasons": [reasons_text(b) for b in shown["reason_bits"].tolist()],
        "question": [texts.get(i, blank)[0] for i in ids],
        "answer": [texts.get(i, blank)[1] for i in ids],
        "comment": [texts.get(i, blank)[2] for i in ids],
    }, dtype=object)
    return view.rename(columns=TABLE_COLUMNS)


def model_versions(rows: pd.DataFrame) -> list[str]:
    """The model versions present, most flagged first (the model-version filter's choices)."""
    counts = rows["model_version"].value_counts()
    return [str(v) for v in counts[counts > 0].index]


def next_pending(rows: pd.DataFrame, after: str | None) -> str | None:
    """The first pending flag below ``after`` in ``rows`` (wrapping to the top), or None if none is left."""
    pending = np.flatnonzero(rows["status"].eq("pending").to_numpy())
    ids = rows["flag_id"].to_numpy()
    if after is not None:
        pending = pending[ids[pending] != after]
    if not len(pending):
        return None
    here = np.flatnonzero(ids == after)
    below = pending[pending > here[0]] if len(here) else pending
    return str(ids[below[0] if len(below) else pending[0]])
