"""What the retraining loop is doing: its schedule, its runs, the version served, the corrections waiting.

    >>> [row["run_id"] for row in runs_table(settings)]
    ['run-20261124-030000', 'run-20261123-030000']
    >>> new_corrections(settings).count
    4

Plain functions over the run folders, the registry, the review shards and the scheduler's job
store, returning dataclasses: `python -m retrain status` prints them, the review tab shows the same.
Reading never changes anything, and a file a crash left half-written is reported, not fatal.

"New" accepted corrections are counted against the newest *finished* run (published, refused by the
gate, or failed), not against the version the registry serves: a refused run must not be retried
on the same data, and a rollback does not make corrections new again. A correction is new when the
latest decision on its flag is an accept that run never saw (by decision id), so a reviewer's edit
of an accepted correction counts as new too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, NotRequired

import orjson
from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from schemas.registry import GateReport, ModelVersion

log = logging.getLogger(__name__)

TICKS_FILE = "ticks.jsonl"  # one line per scheduler tick that worked on the run (schedule.py writes it)
ACCEPTED_FILE = "accepted_decisions.json"  # the accepted decisions a run saw when its merge failed
JOBSTORE_FILE = "scheduler.sqlite"
JOB_ID = "flagloop-retrain"
FINISHED = ("publish", "refused", "failed")


# --- runs ------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    """One run as the status shows it: how far it got, and the figures of its train and gate stages."""

    run_id: str
    stage_done: str
    verdict: str
    message: str
    version: str | None
    updated_at: datetime | None
    steps: int | None
    final_loss: float | None
    heldout_before: float | None
    heldout_after: float | None
    drift: float | None
    gate_passed: bool | None
    failed_ticks: int
    last_error: str | None

    @property
    def finished(self) -> bool:
        return self.verdict in FINISHED or self.stage_done == "publish"


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders (``run-*``, the ids `python -m retrain` gives), oldest first: the ids sort by start time."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.glob("run-*") if p.is_dir())


def is_finished(run_dir: Path) -> bool:
    """Whether a run is over: published, refused by the gate, or failed. Else a later tick resumes it."""
    from retrain.run_files import read_state

    try:
        state = read_state(run_dir)
    except (OSError, ValueError) as err:  # written atomically, so only a damaged disk: never the end of counting
        log.warning("%s: its state.json cannot be read (%s): taken as unfinished", run_dir, err)
        return False
    return state.verdict in FINISHED or state.stage_done == "publish"


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of each logged step, from ``train_log.jsonl``; [] before training logs any."""
    return [(int(e.get("step", 0)), float(e["loss"])) for e in jsonl_entries(Path(run_dir) / "train_log.jsonl")
            if e.get("loss") is not None]


def jsonl_entries(path: Path) -> list[dict]:
    """The JSON objects of a run's append-only log, in order; [] when it does not exist. A line that
    is not one (the last line of a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def gate_report(run_dir: Path) -> GateReport | None:
    """The run's gate.json; None when the gate has not run (or its file cannot be read, which is logged)."""
    path = Path(run_dir) / "gate.json"
    if not path.exists():
        return None
    try:
        return GateReport.model_validate_json(path.read_bytes())
    except ValueError as err:
        log.warning("%s is not a gate report (%s): run the gate stage of %s again", path, err, Path(run_dir).name)
        return None


def failed_ticks(run_dir: Path) -> list[dict]:
    """The scheduler ticks that failed on this run, oldest first (each {"at", "action", "error", ...})."""
    return [entry for entry in jsonl_entries(Path(run_dir) / TICKS_FILE) if entry.get("error")]


def run_summary(run_dir: Path) -> RunSummary:
    """How far one run got, with its last loss and its gate figures."""
    from retrain.run_files import read_state

    run_dir = Path(run_dir)
    try:
        state = read_state(run_dir)
        stage, verdict, message, version, updated = (state.stage_done, state.verdict, state.message, state.version,
                                                     state.updated_at)
    except ValueError as err:
        stage, verdict, message, version, updated = "?", "?", f"state.json cannot be read: {err}", None, None
    curve = loss_curve(run_dir)
    gate = gate_report(run_dir)
    fails = failed_ticks(run_dir)
    return RunSummary(
        run_id=run_dir.name, stage_done=stage, verdict=verdict, message=message, version=version, updated_at=updated,
        steps=curve[-1][0] if curve else None, final_loss=curve[-1][1] if curve else None,
        heldout_before=gate.heldout_before if gate else None, heldout_after=gate.heldout_after if gate else None,
        drift=gate.drift if gate else None, gate_passed=gate.passed if gate else None,
        failed_ticks=len(fails), last_error=fails[-1]["error"] if fails else None,
    )


def run_summaries(settings, limit: int | None = None) -> list[RunSummary]:
    """The newest ``limit`` runs (all by default), newest first."""
    runs = list_runs(Path(settings.retrain.runs_dir))[::-1]
    return [run_summary(r) for r in (runs if limit is None else runs[:limit])]


def runs_table(settings, limit: int | None = None) -> list[dict]:
    """``run_summaries`` as plain dicts (a table's rows), newest first."""
    return [asdict(s) for s in run_summaries(settings, limit)]


# --- the registry ----------------------------------------------------------------------------------
def serving_version(settings) -> ModelVersion | None:
    """The registry's current version (what the app serves); None when nothing was published yet."""
    from retrain.registry import LocalRegistry

    return LocalRegistry(settings.registry_dir).current()


# --- corrections waiting ---------------------------------------------------------------------------
@dataclass
class NewCorrections:
    """Accepted corrections the newest finished run did not see, and that run (None: no run finished yet)."""

    count: int
    since_run: str | None
    since_verdict: str | None
    needed: int


def seen_decisions(run_dir: Path) -> set[str]:
    """The accepted decisions a run's merge saw: its correction rows, what it left out, and, when its
    merge failed, every accept it had (``accepted_decisions.json``)."""
    run_dir = Path(run_dir)
    seen: set[str] = set()
    for rel in ("data/train.jsonl", "data/heldout.jsonl"):
        path = run_dir / rel
        if path.exists():
            for line in path.read_bytes().splitlines():
                if line.strip():
                    decision = orjson.loads(line).get("meta", {}).get("decision_id")
                    if decision:
                        seen.add(decision)
    report = run_dir / "merge_report.json"
    if report.exists():
        seen.update(d["decision_id"] for d in json.loads(report.read_bytes()).get("left_out", []) if d.get("decision_id"))
    accepted = run_dir / ACCEPTED_FILE
    if accepted.exists():
        seen.update(json.loads(accepted.read_bytes())["decision_ids"])
    return seen


def accepted_decision_ids(feedback_dir: Path) -> set[str]:
    """The decision ids of the flags whose latest review decision is an accept (review shards only: cheap)."""
    from feedback.reviews import latest_decisions, read_reviews

    latest = latest_decisions(read_reviews(feedback_dir).decisions)
    return {d.decision_id for d in latest.values() if d.action == "accept"}


def last_finished_run(settings) -> Path | None:
    """The newest run that is over (published, refused or failed)."""
    return next((r for r in reversed(list_runs(Path(settings.retrain.runs_dir))) if is_finished(r)), None)


class _DecisionHead(TypedDict):
    """The fields of a ReviewDecision line that the count reads: whose, when, and accept or reject."""

    schema_version: NotRequired[Literal[1]]  # as ReviewDecision: 1 when left out, another version is not read
    decision_id: str
    flag_id: Annotated[str, Field(min_length=1)]
    action: Literal["accept", "reject"]
    created_at: datetime


@lru_cache(maxsize=1)
def _read_head():
    return TypeAdapter(_DecisionHead).validator.validate_json  # the validator itself: no wrapper per line


def pinned_review_shards(run_dir: Path, feedback_dir: Path) -> dict[str, int] | None:
    """The review shards a run's merge read, as {path in the feedback folder: bytes read}, provided
    each still begins with exactly those bytes; None when the run has no manifest (its merge failed)
    or a shard changed (rewritten, replaced, gone)."""
    from feedback.reviews import REVIEWS_SUBDIR
    from retrain.run_files import read_manifest

    try:
        files = read_manifest(Path(run_dir)).feedback_files
    except (OSError, ValueError):  # no manifest, or one that is not a RunManifest
        return None
    pinned = {}
    for f in files:
        if f.path.startswith(f"{REVIEWS_SUBDIR}/"):
            try:
                with open(Path(feedback_dir) / f.path, "rb") as shard:
                    data = shard.read(f.bytes)
            except OSError:
                return None
            if len(data) != f.bytes or hashlib.sha256(data).hexdigest() != f.sha256:
                return None
            pinned[f.path] = f.bytes
    return pinned


def accepts_past(feedback_dir: Path, pinned: dict[str, int]) -> set[str] | None:
    """The decision ids of the flags whose latest decision is an accept lying past the ``pinned`` bytes
    (see pinned_review_shards): accepts that a merge which read those bytes never read. None when a
    line this answer rests on is not a valid ReviewDecision (a caller then compares decision ids).

    A decision that is still its flag's latest and lies inside the bytes a merge read was its flag's
    latest then too, so that merge made it a row or left it out by id: it is not new. So only the
    lines past the pinned bytes are candidates, and when there are none (what almost every tick
    finds) no line is parsed; else the lines before are parsed to see whether one of them is still a
    candidate flag's latest decision.
    """
    from feedback.reader import gc_paused
    from feedback.reviews import review_shard_paths
    from schemas.review import ReviewDecision

    read_head = _read_head()
    feedback_dir = Path(feedback_dir)
    shards = []  # (bytes, where the lines past the pinned bytes start)
    for path in review_shard_paths(feedback_dir):
        data = path.read_bytes()
        read = pinned.get(path.relative_to(feedback_dir).as_posix(), 0)
        # A line whose newline is at ``read`` was the merge's last piece, whole: it was read too.
        shards.append((data, data.rfind(b"\n", 0, read + 1) + 1))

    def heads(shard: int, part: int, lines: bytes):
        """(flag_id, rank, decision, line) of each decision line; rank orders as feedback.reviews.newer:
        later created_at, then read later (shard, then before / past the pinned bytes, then line)."""
        for i, raw in enumerate(lines.split(b"\n")):
            if raw and not raw.isspace():
                try:
                    head = read_head(raw)
                except ValidationError:  # a bad line: the merge reports it; reading the decisions skips it
                    continue
                yield head["flag_id"], (head["created_at"], shard, part, i), head, raw

    with gc_paused():
        best: dict[str, tuple] = {}  # flag_id -> (rank, decision, line) of its latest decision past the pinned bytes
        for s, (data, cut) in enumerate(shards):
            for flag_id, rank, head, raw in heads(s, 1, data[cut:]):
                if flag_id not in best or rank > best[flag_id][0]:
                    best[flag_id] = (rank, head, raw)
        if best:
            for s, (data, cut) in enumerate(shards):
                for flag_id, rank, _, _ in heads(s, 0, data[:cut]):
                    if flag_id in best and rank > best[flag_id][0]:
                        del best[flag_id]  # a decision the merge read is its latest after all
    validate = ReviewDecision.__pydantic_validator__.validate_json
    new = set()
    for _, head, raw in best.values():  # few: checked whole, as the merge will read them
        try:
            validate(raw)
        except ValidationError:
            return None
        if head["action"] == "accept":
            new.add(head["decision_id"])
    return new


def new_corrections(settings) -> NewCorrections:
    """How many accepted corrections wait for a run, counted against the newest finished run (see the module doc)."""
    from retrain.run_files import read_state

    since = last_finished_run(settings)
    feedback = Path(settings.feedback_dir)
    # Fast (it decides every scheduler tick): the accepts past the review bytes that run's merge read.
    pinned = pinned_review_shards(since, feedback) if since is not None else None
    new = accepts_past(feedback, pinned) if pinned is not None else None
    if new is not None:
        accepted = since / ACCEPTED_FILE  # a run that failed after its merge also saw the accepts of then
        count = len(new - set(json.loads(accepted.read_bytes())["decision_ids"]) if accepted.exists() else new)
    else:  # no run finished yet, its merge failed, or the shards changed: compare decision ids
        seen = seen_decisions(since) if since is not None else set()
        count = len(accepted_decision_ids(feedback) - seen)
    return NewCorrections(count=count, since_run=since.name if since else None,
                          since_verdict=read_state(since).verdict if since else None,
                          needed=settings.retrain.schedule.min_new_corrections)


# --- the schedule ----------------------------------------------------------------------------------
@dataclass
class ScheduleInfo:
    """The configured schedule, and the job a scheduler registered in the job store (if one did)."""

    trigger: str  # from the settings, e.g. "cron '0 3 * * *' (local time)"
    jobstore: Path
    registered: bool
    registered_trigger: str | None  # the trigger the stored job runs on (a running scheduler uses it)
    next_run_time: datetime | None  # None: no job stored, or one paused
    min_new_corrections: int


def describe_schedule(cfg) -> str:
    """A ScheduleConfig's trigger in words."""
    zone = cfg.timezone or "local time"
    if cfg.trigger == "cron":
        return f"cron '{cfg.cron}' ({zone})"
    return f"every {cfg.interval_minutes:g} minutes"


def jobstore_path(settings) -> Path:
    """The SQLite job store: retrain.schedule.jobstore, else scheduler.sqlite beside the runs folder."""
    configured = settings.retrain.schedule.jobstore
    return Path(configured) if configured else Path(settings.retrain.runs_dir).parent / JOBSTORE_FILE


def schedule_info(settings) -> ScheduleInfo:
    """The schedule from the settings and, read from the job store, the registered job and its next run time."""
    cfg = settings.retrain.schedule
    path = jobstore_path(settings)
    job = stored_job(path) if path.exists() else None
    return ScheduleInfo(
        trigger=describe_schedule(cfg), jobstore=path, registered=job is not None,
        registered_trigger=str(job.trigger) if job is not None else None,
        next_run_time=job.next_run_time if job is not None else None,
        min_new_corrections=cfg.min_new_corrections,
    )


def stored_job(path: Path):
    """The flagloop job in the SQLite job store at ``path`` (an apscheduler Job), None when there is none."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    store = SQLAlchemyJobStore(url=f"sqlite:///{Path(path).resolve()}")
    try:
        store.start(None, "default")  # creates the table when missing; no scheduler is needed to read a job
        return store.lookup_job(JOB_ID)
    except Exception as err:  # a job pickled by other code, a file that is not SQLite: say so, do not crash
        log.warning("cannot read the job %s from the job store %s (%s: %s)", JOB_ID, path, type(err).__name__, err)
        return None
    finally:
        store.shutdown()
