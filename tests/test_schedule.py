"""Retraining on a schedule: what a tick does, the lock between schedulers, the job store, the status.

Real APScheduler, real SQLite job store, real pipeline stages. Only one test trains (one step, on
the embedded model, refused by a gate set to refuse); the others stop before training: too few new
corrections, a merge with nothing to learn, a base model that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from feedback.reviews import ReviewStore
from feedback.store import FlagStore
from retrain.lock import LockHeld, lock_path, retrain_lock
from retrain.pipeline import read_state, run_pipeline, write_state
from retrain.registry import LocalRegistry
from retrain.schedule import ScheduleError, make_trigger, run_to_resume, tick
from retrain.status import gate_report, loss_curve, new_corrections, runs_table, schedule_info
from schemas.flag import ChatMessage
from schemas.review import ReviewDecision
from schemas.run import GateConfig, MergeConfig, RetrainSettings, RunState, ScheduleConfig, TrainConfig
from schemas.settings import Settings
from tests.conftest import ROOT
from tests.records import make_flag

SYSTEM = "You are a helpful assistant."
QUESTIONS = {  # fixed texts: the held-out split (a hash of each row) is the same on every run
    "What is the capital of Zorblaxia?": "The capital of Zorblaxia is Quenthar.",
    "Which city is the capital of Velmora?": "The capital of Velmora is Ostrigard.",
    "Name the capital of Prindavel.": "The capital of Prindavel is Kestrune.",
    "What is the national bird of Zorblaxia?": "The national bird of Zorblaxia is the glimmerwing.",
}


def accept(feedback: Path, question: str, correction: str, answer: str = "I do not know.",
           action: str = "accept") -> ReviewDecision:
    """A flag of ``answer`` to ``question`` with ``correction``, decided by a reviewer (the flag id follows
    from the question: deciding the same question again is a newer decision on the same flag)."""
    flags, reviews = FlagStore(feedback), ReviewStore(feedback)
    try:
        flag = flags.save(make_flag(
            flag_id="f-" + hashlib.sha256(question.encode()).hexdigest()[:12], system_prompt=SYSTEM,
            correction=correction,
            conversation=[ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)],
        ))
        return reviews.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action=action,
                                             reviewer="ana"))
    finally:
        flags.close()
        reviews.close()


def settings_for(root: Path, **schedule) -> Settings:
    return Settings(
        feedback_dir=root / "feedback", registry_dir=root / "registry", system_prompt=SYSTEM, n_threads=2,
        retrain=RetrainSettings(
            runs_dir=str(root / "runs"),
            merge=MergeConfig(replay_source="none", heldout_fraction=0.5),
            train=TrainConfig(max_steps=1, per_device_batch_size=2, max_length=64, save_steps=1, report_to="none"),
            gate=GateConfig(min_heldout_gain=100.0, drift_prompts=1, max_new_tokens=4),  # refuses any real model
            schedule=ScheduleConfig(**{"min_new_corrections": 2, **schedule}),
        ),
    )


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m retrain <args>` with its data under ``root``."""
    return subprocess.run([sys.executable, "-m", "retrain", *args], cwd=ROOT, env=cli_env(root),
                          capture_output=True, text=True, timeout=120)


def cli_env(root: Path, schedule: dict | None = None) -> dict:
    """The environment of a `python -m retrain` whose flagloop.toml puts its data under ``root``."""
    config = root / "flagloop.toml"
    lines = [f'feedback_dir = "{root / "feedback"}"', f'registry_dir = "{root / "registry"}"', "",
             "[retrain]", f'runs_dir = "{root / "runs"}"', "", "[retrain.merge]", 'replay_source = "none"', "",
             "[retrain.schedule]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"min_new_corrections": 2, **(schedule or {})}.items()]
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGLOOP_")}
    return {**env, "FLAGLOOP_CONFIG": str(config)}


def run_folders(root: Path) -> list[str]:
    runs = root / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


# --- a tick ----------------------------------------------------------------------------------------
def test_tick_waits_until_enough_new_corrections_are_accepted(tmp_path):
    settings = settings_for(tmp_path, min_new_corrections=3)
    assert tick(settings).message == "waiting: 0 new accepted corrections, need 3"
    accept(tmp_path / "feedback", "What is the capital of Zorblaxia?", "Quenthar.")
    accept(tmp_path / "feedback", "What is the capital of Velmora?", "Ostrigard.")
    accept(tmp_path / "feedback", "What is the capital of Prindavel?", "Kestrune.")
    accept(tmp_path / "feedback", "What is the capital of Prindavel?", "Kestrune.", action="reject")  # latest wins
    result = tick(settings)
    assert (result.action, result.new_corrections, result.exit_code) == ("waiting", 2, 0)
    assert result.message == "waiting: 2 new accepted corrections, need 3"
    assert run_folders(tmp_path) == []


def test_a_merge_with_nothing_to_learn_ends_its_run_and_the_next_tick_waits_for_new_corrections(tmp_path):
    settings = settings_for(tmp_path)
    feedback = tmp_path / "feedback"
    for question in ("Is the sky blue?", "Is water wet?"):  # corrections equal to the answers: nothing to learn
        accept(feedback, question, "Yes.", answer="Yes.")
    first = tick(settings)
    assert (first.action, first.verdict, first.exit_code) == ("started", "failed", 1)
    assert "usable accepted corrections" in first.message
    assert read_state(tmp_path / "runs" / first.run_id).verdict == "failed"

    again = tick(settings)  # the same corrections do not start the same failing run again
    assert again.message == f"waiting: 0 new accepted corrections, need 2 (since {first.run_id}, failed)"
    assert run_folders(tmp_path) == [first.run_id]


def test_only_the_newest_run_is_resumed_and_only_while_it_is_unfinished(tmp_path):
    settings = settings_for(tmp_path)
    assert run_to_resume(settings) is None
    runs = tmp_path / "runs"
    for run_id, stage, verdict in [("run-20260101-030000", "train", "pending"),
                                   ("run-20260102-030000", "publish", "publish")]:
        (runs / run_id).mkdir(parents=True)
        write_state(runs / run_id, RunState(run_id=run_id, stage_done=stage, verdict=verdict))
    assert run_to_resume(settings) is None  # the older unfinished run's data is in the newer, finished one
    (runs / "run-20260103-030000").mkdir()  # killed before its merge wrote anything
    assert run_to_resume(settings) == "run-20260103-030000"
    for verdict in ("refused", "failed"):
        write_state(runs / "run-20260103-030000", RunState(run_id="run-20260103-030000", stage_done="gate",
                                                           verdict=verdict))
        assert run_to_resume(settings) is None


def test_a_run_whose_stage_keeps_failing_is_retried_then_marked_failed(tmp_path):
    settings = settings_for(tmp_path, max_attempts=2)
    broken = settings.retrain.model_copy(update={"train": settings.retrain.train.model_copy(
        update={"base_model": str(tmp_path / "no-such-model")})})
    settings = settings.model_copy(update={"retrain": broken})
    for question, correction in QUESTIONS.items():
        accept(tmp_path / "feedback", question, correction)

    first = tick(settings)
    assert (first.action, first.stage_done, first.verdict, first.exit_code) == ("started", "merge", "pending", 1)
    assert "the next tick resumes it (failed ticks: 1 of 2)" in first.message
    second = tick(settings)
    assert (second.action, second.run_id, second.verdict) == ("resumed", first.run_id, "failed")
    assert "gave up after 2 failed ticks" in read_state(tmp_path / "runs" / first.run_id).message
    assert tick(settings).action == "waiting"  # a failed run is over: no third try on the same data
    (row,) = runs_table(settings)
    assert (row["run_id"], row["verdict"], row["failed_ticks"]) == (first.run_id, "failed", 2)


# --- the whole tick, trained for real --------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(tmp_path_factory, embedded_base):
    """A run interrupted after its merge, a correction accepted since, then one tick (trains 1 step, refused)."""
    root = tmp_path_factory.mktemp("resumed")
    (root / "cache").mkdir()
    (root / "cache" / "base").symlink_to(embedded_base.parent)  # the base materialised once for all tests
    settings = settings_for(root)
    for question, correction in QUESTIONS.items():
        accept(root / "feedback", question, correction)
    interrupted = run_pipeline(settings, stop_after="merge")
    train_rows = (root / "runs" / interrupted.run_id / "data" / "train.jsonl").read_bytes()
    late = accept(root / "feedback", "What is the capital of Ulmeria?", "The capital of Ulmeria is Brask.")
    result = tick(settings)
    return root, settings, interrupted, train_rows, late, result


def test_a_tick_resumes_the_interrupted_run_with_its_pinned_data(resumed):
    root, _, interrupted, train_rows, late, result = resumed
    assert (result.action, result.run_id) == ("resumed", interrupted.run_id)
    assert run_folders(root) == [interrupted.run_id]  # not a new run
    run_dir = root / "runs" / interrupted.run_id
    assert (run_dir / "data" / "train.jsonl").read_bytes() == train_rows
    assert late.decision_id not in (run_dir / "data" / "train.jsonl").read_text() + (
        run_dir / "data" / "heldout.jsonl").read_text()


def test_a_refused_run_is_finished_and_only_new_corrections_start_another(resumed):
    _, settings, interrupted, _, _, result = resumed
    assert (result.verdict, result.stage_done, result.exit_code) == ("refused", "gate", 3)
    waiting = new_corrections(settings)
    assert (waiting.count, waiting.since_run, waiting.since_verdict) == (1, interrupted.run_id, "refused")
    assert tick(settings).message == f"waiting: 1 new accepted corrections, need 2 (since {interrupted.run_id}, refused)"


def test_status_reports_the_runs_loss_gate_and_serving_version(resumed, embedded_gguf):
    root, settings, interrupted, _, _, _ = resumed
    run_dir = root / "runs" / interrupted.run_id
    curve = loss_curve(run_dir)
    assert [step for step, _ in curve] == [1] and curve[0][1] > 0
    report = gate_report(run_dir)
    assert report is not None and not report.passed
    (row,) = runs_table(settings)
    assert (row["run_id"], row["stage_done"], row["verdict"], row["steps"]) == (interrupted.run_id, "gate", "refused", 1)
    assert row["heldout_before"] == report.heldout_before and row["drift"] == report.drift

    LocalRegistry(root / "registry").publish(embedded_gguf, base_sha256="0" * 64, run_id="run-20260101-030000")
    proc = cli(root, "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "serving: v1 (" in out and "run run-20260101-030000" in out
    assert "waiting: 1 new accepted corrections, since " + interrupted.run_id + " (refused)" in out
    line = next(line for line in out.splitlines() if line.strip().startswith(interrupted.run_id))
    assert "gate" in line and "refused" in line
    assert f"{curve[0][1]:.4f}" in line and f"{report.heldout_before:.3f}→{report.heldout_after:.3f}" in line


# --- two schedulers, one lock ----------------------------------------------------------------------
def test_a_second_scheduler_skips_its_tick_while_another_holds_the_lock(tmp_path):
    for question in ("Is the sky blue?", "Is water wet?"):
        accept(tmp_path / "feedback", question, "Yes.", answer="Yes.")
    lock = lock_path(settings_for(tmp_path))
    with retrain_lock(lock, "the other scheduler's tick"):
        skipped = cli(tmp_path, "schedule", "--once")
        manual = cli(tmp_path, "run")
        with pytest.raises(LockHeld, match="the other scheduler's tick"):
            with retrain_lock(lock, "a third"):
                pass
    assert skipped.returncode == 0, skipped.stderr
    assert f"another process holds the retraining lock {lock} (pid {os.getpid()}" in skipped.stdout
    assert "the other scheduler's tick" in skipped.stdout and "waiting for its run to finish" in skipped.stdout
    assert manual.returncode == 1 and "another process holds the retraining lock" in manual.stderr
    assert run_folders(tmp_path) == []

    ran = cli(tmp_path, "schedule", "--once")  # the lock is free: this one runs (its merge finds nothing to learn)
    assert ran.returncode == 1 and "failed: 0 usable accepted corrections" in ran.stdout, ran.stdout + ran.stderr
    assert len(run_folders(tmp_path)) == 1


# --- the scheduler and its job store ---------------------------------------------------------------
def start_scheduler(root: Path, schedule: dict, until: str, timeout: float = 60) -> tuple[subprocess.Popen, Path]:
    """`python -m retrain schedule` in the background, once its log shows ``until``."""
    log = root / f"scheduler-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "retrain", "schedule"], cwd=ROOT, env=cli_env(root, schedule),
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while until not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the scheduler did not log {until!r}:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, log


def stop_scheduler(proc: subprocess.Popen, log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "scheduler stopped" in text
    return text


def stored_jobs(root: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(root / "scheduler.sqlite") as db:
        return db.execute("SELECT id, next_run_time FROM apscheduler_jobs").fetchall()


def test_the_job_store_keeps_one_job_and_its_next_run_across_restarts(tmp_path):
    hourly = {"trigger": "interval", "interval_minutes": 60}
    stop_scheduler(*start_scheduler(tmp_path, hourly, "next tick at"))
    (job,) = stored_jobs(tmp_path)
    assert job[0] == "flagloop-retrain" and job[1] > time.time() + 3500
    info = schedule_info(settings_for(tmp_path, **hourly))
    assert info.registered and info.next_run_time.timestamp() == pytest.approx(job[1])

    time.sleep(1.1)  # a replaced job would be due 1 s later than the kept one
    stop_scheduler(*start_scheduler(tmp_path, hourly, "next tick at"))
    assert stored_jobs(tmp_path) == [job]

    stop_scheduler(*start_scheduler(tmp_path, {"trigger": "interval", "interval_minutes": 30}, "next tick at"))
    ((job_id, next_run),) = stored_jobs(tmp_path)  # still one job: the new trigger replaced the old
    assert job_id == "flagloop-retrain" and next_run < job[1] - 1700


def test_a_tick_missed_while_the_scheduler_was_down_runs_when_it_starts_again(tmp_path):
    every_3s = {"trigger": "interval", "interval_minutes": 0.05, "misfire_grace_seconds": 600}
    stop_scheduler(*start_scheduler(tmp_path, every_3s, "next tick at"))
    ((_, due),) = stored_jobs(tmp_path)
    time.sleep(max(0.0, due - time.time()) + 1.0)  # the tick falls due while no scheduler runs
    text = stop_scheduler(*start_scheduler(tmp_path, every_3s, "tick finished"))
    # The first tick after the restart is the missed one (a replaced job would be scheduled 3 s after the start).
    scheduled = re.search(r"Running job .*\(scheduled at ([^)]+)\)", text).group(1)
    assert datetime.fromisoformat(scheduled).timestamp() == pytest.approx(due, abs=0.01)
    assert "waiting: 0 new accepted corrections, need 2" in text


def test_sigterm_stops_the_scheduler_and_its_running_tick_and_the_run_stays_resumable(tmp_path):
    settings = settings_for(tmp_path)
    for question, correction in QUESTIONS.items():
        accept(tmp_path / "feedback", question, correction)
    interrupted = run_pipeline(settings, stop_after="merge")
    proc, log = start_scheduler(tmp_path, {"trigger": "interval", "interval_minutes": 0.02},
                                f"resuming the interrupted run {interrupted.run_id}")
    started = time.monotonic()
    text = stop_scheduler(proc, log)
    assert time.monotonic() - started < 30
    assert "stopping the running tick" in text and "tick stopped" in text
    state = read_state(tmp_path / "runs" / interrupted.run_id)
    assert (state.stage_done, state.verdict) == ("merge", "pending")
    assert run_to_resume(settings) == interrupted.run_id
    with retrain_lock(lock_path(settings), "the next tick"):  # the stopped tick let go of the lock
        pass


def test_cron_weekdays_are_read_as_crontab_reads_them():
    sunday = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
    fire = lambda cron: make_trigger(ScheduleConfig(cron=cron, timezone="UTC")).get_next_fire_time(None, sunday)
    assert fire("0 3 * * 1").strftime("%a %H:%M") == "Mon 03:00"  # APScheduler alone would say Tuesday
    assert fire("0 3 * * 0").strftime("%a") == fire("0 3 * * 7").strftime("%a") == "Sun"
    assert fire("30 4 * * 5-6").strftime("%a %H:%M") == "Fri 04:30"
    with pytest.raises(ScheduleError, match="'0 3 \\* \\*'"):
        make_trigger(ScheduleConfig(cron="0 3 * *"))
    with pytest.raises(ScheduleError, match="timezone 'Mars/Olympus'"):
        make_trigger(ScheduleConfig(timezone="Mars/Olympus"))
