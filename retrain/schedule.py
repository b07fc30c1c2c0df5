"""Retraining on a schedule: each tick resumes an interrupted run, or starts one when enough corrections wait.

    $ python -m retrain schedule          # APScheduler, SQLite job store, one tick at each cron time
    $ python -m retrain schedule --once   # one tick now (tests, or a crontab line instead of the scheduler)

    >>> tick(Settings()).message
    'waiting: 3 new accepted corrections, need 10 (since run-20261123-030000, publish)'

A tick (`tick`, a plain function) holds the host's retraining lock (retrain/lock.py), then:

0. with a dataset repo, brings the feedback folder up to date from it (retrain/follow.py); when the
   Hub cannot be reached it waits for the next tick (``retrain.schedule.on_pull_failure``);
1. the newest run, if it is unfinished (killed, or a stage raised), is continued where it stopped,
   with the settings its manifest pinned: same data, same training configuration;
2. otherwise it counts the accepted corrections the newest finished run did not see (status.py says
   how) and starts a new run when there are at least ``retrain.schedule.min_new_corrections``.

A run the gate refuses is finished: the next one waits for new corrections. A merge that cannot make
training data (MergeError) finishes its run as failed, remembering the accepts it had. Any other
error leaves the run to the next tick, up to ``max_attempts`` failed ticks, then marks it failed
(`python -m retrain run --run-id ...` still continues it by hand).

The scheduler (`serve`) is APScheduler 3's BlockingScheduler with one job, ``flagloop-retrain``,
kept in a SQLite job store: a restart finds the same job, and keeps its next run time when the
trigger did not change, so a tick missed while the scheduler was down still runs (within
``misfire_grace_seconds``; several missed ticks run once). The job runs each tick in a child
process, ``python -m retrain ... schedule --once``: the scheduler process stays small between
runs, and SIGTERM or Ctrl-C stops the child (the run stays resumable) and then the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from retrain.lock import LockHeld, lock_path, retrain_lock
from retrain.status import (
    ACCEPTED_FILE,
    JOB_ID,
    TICKS_FILE,
    accepted_decision_ids,
    describe_schedule,
    failed_ticks,
    is_finished,
    jobstore_path,
    list_runs,
    new_corrections,
)
from schemas.run import ScheduleConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the child `python -m retrain` imports the project from here
JOB_FUNC = "retrain.schedule:scheduled_tick"  # by name: the job store pickles a reference, not the function


class ScheduleError(ValueError):
    """The schedule settings cannot make a trigger; the message says which setting and what to write."""


@dataclass
class TickResult:
    """What one tick did: waited, found the lock taken, or started / resumed a run (and how it ended)."""

    action: Literal["waiting", "busy", "started", "resumed"]
    message: str
    run_id: str | None = None
    stage_done: str | None = None
    verdict: str | None = None  # publish, refused, failed, or pending (a stage raised: the next tick resumes)
    version: str | None = None
    new_corrections: int | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """For `schedule --once`: 0 nothing wrong (published, waiting, busy), 3 refused by the gate, 1 failed."""
        if self.error is not None or self.verdict == "failed":
            return 1
        return 3 if self.verdict == "refused" else 0


# --- one tick --------------------------------------------------------------------------------------
def tick(settings) -> TickResult:
    """One scheduled step under the retraining lock: resume the interrupted run, else maybe start one."""
    try:
        with retrain_lock(lock_path(settings), "python -m retrain schedule tick"):
            return _tick(settings)
    except LockHeld as held:
        message = f"{held}: skipping this tick, waiting for its run to finish"
        log.warning("%s", message)
        return TickResult("busy", message)


def _tick(settings) -> TickResult:
    from retrain.follow import follow_feedback

    cfg = settings.retrain.schedule
    follow = follow_feedback(settings)  # with a dataset repo: push this host's decisions, pull the others'
    if not follow.ok:
        if cfg.on_pull_failure == "wait":
            message = f"waiting: {follow.message}; no run until a pull gets through (retrain.schedule.on_pull_failure)"
            log.warning("%s", message)
            return TickResult("waiting", message, error=follow.message)
        log.warning("training on the local copy anyway (retrain.schedule.on_pull_failure = 'train')")
    run_id = run_to_resume(settings)
    if run_id is not None:
        log.info("resuming the interrupted run %s", run_id)
        return run_to_end(settings, run_id, "resumed")
    new = new_corrections(settings)
    since = f" (since {new.since_run}, {new.since_verdict})" if new.since_run else ""
    if new.count < cfg.min_new_corrections:
        message = f"waiting: {new.count} new accepted corrections, need {cfg.min_new_corrections}{since}"
        log.info("%s", message)
        return TickResult("waiting", message, new_corrections=new.count)
    from retrain.pipeline import new_run_id

    log.info("%d new accepted corrections%s: starting a run", new.count, since)
    result = run_to_end(settings, new_run_id(), "started")
    result.new_corrections = new.count
    return result


def run_to_resume(settings) -> str | None:
    """The newest run when it is unfinished; None when there is none or it is over.

    Only the newest: an older unfinished run is left alone, since a newer run merged all its data
    and more (every run trains on every accepted correction so far).
    """
    runs = list_runs(Path(settings.retrain.runs_dir))
    if not runs or is_finished(runs[-1]):
        return None
    return runs[-1].name


def pinned_settings(settings, run_dir: Path):
    """``settings`` with the retraining settings the run's manifest pinned (its runs folder kept): a resumed
    run finishes with the configuration it started with. Unchanged before the merge pinned anything."""
    from retrain.pipeline import read_manifest

    if not (Path(run_dir) / "manifest.json").exists():
        return settings
    pinned = read_manifest(Path(run_dir)).settings.model_copy(update={"runs_dir": settings.retrain.runs_dir})
    if pinned != settings.retrain:
        log.info("run %s continues with the settings its manifest pinned, not the current ones", Path(run_dir).name)
    return settings.model_copy(update={"retrain": pinned})


def run_to_end(settings, run_id: str, action: Literal["started", "resumed"]) -> TickResult:
    """Run (or continue) ``run_id`` through the pipeline, and turn how it ended into a TickResult."""
    from retrain.merge import MergeError
    from retrain.pipeline import read_state, run_dir_of, run_pipeline

    run_dir = run_dir_of(settings, run_id)
    try:
        state = run_pipeline(pinned_settings(settings, run_dir), run_id=run_id)
    except MergeError as err:
        # No training data can come of the feedback as it is: the run is over.
        record_tick(run_dir, action, read_state(run_dir), str(err))
        state = mark_failed(settings, run_dir, str(err))
        log.error("run %s failed: %s", run_id, err)
        return TickResult(action, f"run {run_id} failed: {err}", run_id, state.stage_done, state.verdict,
                          error=str(err))
    except Exception as err:
        log.exception("run %s stopped by an error", run_id)
        error = f"{type(err).__name__}: {err}"
        state = read_state(run_dir)
        record_tick(run_dir, action, state, error)
        attempts = len(failed_ticks(run_dir))
        max_attempts = settings.retrain.schedule.max_attempts
        if attempts >= max_attempts:
            state = mark_failed(settings, run_dir, (
                f"gave up after {attempts} failed ticks (retrain.schedule.max_attempts={max_attempts}); last error: "
                f"{error}. Fix it, then `python -m retrain run --run-id {run_id}` continues it"))
            message = f"run {run_id} failed {attempts} times, now marked failed: {error}"
        else:
            message = (f"run {run_id} stopped after stage {state.stage_done} ({error}); the next tick resumes it "
                       f"(failed ticks: {attempts} of {max_attempts})")
        return TickResult(action, message, run_id, state.stage_done, state.verdict, error=error)
    record_tick(run_dir, action, state, None)
    verb = "resumed and" if action == "resumed" else "started and"
    if state.verdict == "refused":
        message = f"run {run_id} {verb} refused by the gate: {state.message}"
    elif state.verdict == "publish":
        message = f"run {run_id} {verb} published {state.version}: {state.message}"
    else:
        message = f"run {run_id} {verb} stopped after {state.stage_done}: {state.message}"
    log.info("%s", message)
    return TickResult(action, message, run_id, state.stage_done, state.verdict, state.version)


def mark_failed(settings, run_dir: Path, message: str):
    """End a run as failed, remembering the accepts there are now: the next run waits for new ones
    instead of failing the same way on the same data at every tick."""
    from feedback.files import write_atomic
    from retrain.pipeline import read_state, write_state

    ids = sorted(accepted_decision_ids(Path(settings.feedback_dir)))
    write_atomic(Path(run_dir) / ACCEPTED_FILE, json.dumps({"decision_ids": ids}).encode())
    return write_state(Path(run_dir), read_state(Path(run_dir)).model_copy(update={"verdict": "failed",
                                                                                   "message": message}))


def record_tick(run_dir: Path, action: str, state, error: str | None) -> None:
    """Append this tick to the run's ticks.jsonl (the status counts the failed ones)."""
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": action,
             "stage_done": state.stage_done, "verdict": state.verdict, "error": error}
    with open(Path(run_dir) / TICKS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


# --- the scheduler ---------------------------------------------------------------------------------
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field in APScheduler 3's terms.

    APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0 (7 is Sunday too), so
    `0 3 * * 1` would fire on Tuesdays; numbers are turned into day names (which both read alike).
    """
    if not any(c.isdigit() for c in field):
        return field
    days: list[int] = []
    for part in field.split(","):
        body, _, step = part.partition("/")
        if body == "*":
            first, last = 0, 6
        elif "-" in body:
            first, last = (int(x) for x in body.split("-", 1))
        else:
            first = last = int(body)
            if step:  # "1/2": from 1 to the end of the week, as cron reads it
                last = 6
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last) or (step and int(step) < 1):
            raise ValueError(f"day of week {part!r} is not 0-7 (0 and 7 are Sunday), a range a-b or a step /n")
        days += [d % 7 for d in range(first, last + 1, int(step) if step else 1)]
    return ",".join(WEEKDAYS[d] for d in sorted(set(days)))


def make_trigger(cfg: ScheduleConfig):
    """The APScheduler trigger of the schedule settings (CronTrigger or IntervalTrigger)."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    try:
        zone = cfg.timezone or None  # None: the machine's local time zone
        if cfg.trigger == "interval":
            return IntervalTrigger(seconds=round(cfg.interval_minutes * 60), timezone=zone)
        fields = cfg.cron.split()
        if len(fields) != 5:
            raise ValueError(f"{len(fields)} fields, crontab has 5")
        fields[4] = crontab_weekdays(fields[4])
        return CronTrigger.from_crontab(" ".join(fields), timezone=zone)
    except (ValueError, KeyError) as err:  # a bad zone name is a ZoneInfoNotFoundError, a KeyError
        setting = "timezone" if isinstance(err, KeyError) else "cron"
        raise ScheduleError(
            f"retrain.schedule.{setting} {getattr(cfg, setting)!r} cannot be used ({type(err).__name__}: {err}): "
            "write the cron times as 'minute hour day month weekday', e.g. '0 3 * * *' for 03:00 every day, "
            "and the time zone as an IANA name such as 'Europe/Paris'"
        ) from err


def same_trigger(a, b) -> bool:
    """Whether two triggers fire at the same times (str() leaves out an interval's start, which we ignore)."""
    return str(a) == str(b) and str(getattr(a, "timezone", None)) == str(getattr(b, "timezone", None))


def build_scheduler(settings, cli_args: list[str]):
    """A BlockingScheduler holding the one retraining job in the SQLite job store (not started yet).

    ``cli_args`` are the global options of `python -m retrain` that each tick's child process gets.
    """
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.blocking import BlockingScheduler

    cfg = settings.retrain.schedule
    trigger = make_trigger(cfg)
    path = jobstore_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SQLAlchemyJobStore(url=f"sqlite:///{path.resolve()}")
    scheduler = BlockingScheduler(jobstores={"default": store}, executors={"default": ThreadPoolExecutor(1)})
    store.start(scheduler, "default")  # to read the job a previous scheduler left (start() does this again)
    try:
        stored = store.lookup_job(JOB_ID)
    except Exception as err:  # pickled by code that moved: replace it
        log.warning("the stored job %s cannot be read (%s: %s): replacing it", JOB_ID, type(err).__name__, err)
        stored = None
    keep = {}
    if stored is not None and same_trigger(stored.trigger, trigger) and stored.next_run_time is not None:
        # Same times: keep the stored next run time, so a tick missed while no scheduler ran still runs.
        keep["next_run_time"] = stored.next_run_time
    scheduler.add_job(
        JOB_FUNC, trigger, args=[list(cli_args)], id=JOB_ID, name=f"flagloop retrain, {describe_schedule(cfg)}",
        replace_existing=True, max_instances=1, coalesce=True, misfire_grace_time=cfg.misfire_grace_seconds, **keep,
    )
    return scheduler


_child_lock = threading.Lock()
_child: subprocess.Popen | None = None
_stopping = False


def scheduled_tick(cli_args: list[str]) -> int:
    """The scheduler's job: one tick in a child `python -m retrain <cli_args> schedule --once`; its exit code."""
    global _child
    cmd = [sys.executable, "-m", "retrain", *cli_args, "schedule", "--once"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with _child_lock:
        if _stopping:
            return 0
        # Its output goes where the scheduler's goes: one log for both.
        _child = subprocess.Popen(cmd, env=env)
    try:
        code = _child.wait()
    finally:
        with _child_lock:
            _child = None
    if _stopping:
        log.info("tick stopped (exit code %d); its run resumes at the next tick", code)
    else:
        (log.info if code in (0, 3) else log.warning)("tick finished (exit code %d)", code)
    return code


def stop_child(timeout: float = 120.0) -> None:
    """Stop the tick running now, if any: SIGTERM (it unwinds; its run stays resumable), SIGKILL after ``timeout``."""
    global _stopping
    with _child_lock:
        _stopping = True
        child = _child
    if child is None or child.poll() is not None:
        return
    log.info("stopping the running tick (pid %d); its run resumes at the next tick", child.pid)
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("the tick (pid %d) did not stop in %.0f s: killing it", child.pid, timeout)
        child.kill()
        child.wait()


def serve(settings, cli_args: list[str]) -> None:
    """Run the scheduler until SIGTERM or Ctrl-C; then stop the running tick and exit cleanly."""
    from apscheduler.events import (
        EVENT_JOB_ERROR,
        EVENT_JOB_EXECUTED,
        EVENT_SCHEDULER_STARTED,
    )

    global _stopping
    _stopping = False
    scheduler = build_scheduler(settings, cli_args)

    def next_tick(event) -> None:
        if _stopping:
            return
        job = scheduler.get_job(JOB_ID)
        when = f"{job.next_run_time:%Y-%m-%d %H:%M:%S %Z}" if job and job.next_run_time else "none"
        if event.code == EVENT_SCHEDULER_STARTED:
            log.info("scheduler started: %s, at least %d new accepted corrections per run; job store %s, lock %s",
                     describe_schedule(settings.retrain.schedule), settings.retrain.schedule.min_new_corrections,
                     jobstore_path(settings), lock_path(settings))
        log.info("next tick at %s", when)

    # The signal handler only starts a thread that stops things: APScheduler runs its main loop in this
    # thread and catches exceptions in places (listeners, job stores), so one raised here could be lost.
    stop_requested = threading.Event()

    def stop(signame: str) -> None:
        log.info("stopping the scheduler (%s)", signame)
        stop_child()
        while not scheduler.running:  # a signal that came while the scheduler was still starting
            time.sleep(0.05)
        scheduler.shutdown(wait=True)  # returns once the job thread has seen its child exit

    def on_signal(signum, frame) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            threading.Thread(target=stop, args=(signal.Signals(signum).name,), name="flagloop-stop", daemon=True).start()

    scheduler.add_listener(next_tick, EVENT_SCHEDULER_STARTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.start()  # blocks until stop() has shut the scheduler down
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("scheduler stopped; the job stays in %s for the next start", jobstore_path(settings))
