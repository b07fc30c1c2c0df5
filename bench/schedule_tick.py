"""Scheduler tick: what one tick of `python -m retrain schedule` costs when it decides (goal: < 1 s with 100k flags).

Builds a feedback folder of realistic flags and review decisions with bench/merge.py's generator
(100k flags by default: about 110k flag lines and 99k decisions), merges it into a run folder that
is then marked published (the newest finished run, which a tick counts new corrections against),
plus older finished runs beside it. None of this is timed. Then it times ``retrain.schedule.tick``:

- ``idle``: nothing new since that run, so the tick only decides to wait (the path of almost every tick);
- ``cli``: the same idle tick as the scheduler really runs it, a child ``python -m retrain ... schedule
  --once`` (interpreter start and imports included; CPU is the child's);
- ``due``: after ``min_new_corrections`` + 5 new accepts were appended through the real ReviewStore,
  the tick up to the point where it starts a run (``run_to_end`` is replaced by a stand-in that
  returns at once: the run itself is not what this measures).

Each is timed ``--repeats`` times; it prints wall and CPU seconds per tick, then median and max, and
the parts of the decision (the review bytes the finished run's merge read, the accepts past them),
with the comparison by decision ids that the tick falls back on when it cannot use those bytes
(every decision validated, every row of the run read). CPU seconds are the steadier figure on a
machine other work shares.

    .venv/bin/python bench/schedule_tick.py                  # 100k flags, 5 ticks of each kind
    .venv/bin/python bench/schedule_tick.py --flags 20000 --repeats 3 --keep
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.merge import generate  # noqa: E402  the realistic flags and decisions of the merge bench
from feedback.reader import latest_flags  # noqa: E402
from feedback.reviews import ReviewStore, latest_decisions, read_reviews  # noqa: E402
from retrain import schedule  # noqa: E402
from retrain.merge import run_merge  # noqa: E402
from retrain.pipeline import write_state  # noqa: E402
from retrain.status import (  # noqa: E402
    accepted_decision_ids,
    accepts_past,
    new_corrections,
    pinned_review_shards,
    seen_decisions,
)
from schemas.review import ReviewDecision  # noqa: E402
from schemas.run import (  # noqa: E402
    BaseModelRef,
    MergeConfig,
    RetrainSettings,
    RunState,
    ScheduleConfig,
)
from schemas.settings import Settings  # noqa: E402

GOAL_S = 1.0
MIN_NEW = 10
# The merge pins the serving GGUF; the tick never reads it, so a stand-in saves hashing one.
BASE = BaseModelRef(path="/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", sha256="3f" * 32, quant="Q4_1")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(root: Path, n_flags: int, old_runs: int) -> Settings:
    """The feedback folder, the newest finished run (merged from it, published) and ``old_runs`` older ones."""
    feedback, runs = root / "feedback", root / "runs"
    lines, decisions = generate(feedback, n_flags)
    settings = Settings(feedback_dir=feedback, registry_dir=root / "registry",
                        retrain=RetrainSettings(runs_dir=str(runs), merge=MergeConfig(replay_source="none"),
                                                schedule=ScheduleConfig(min_new_corrections=MIN_NEW)))
    for k in range(old_runs):  # earlier runs leave their folders behind; only their state matters here
        old = runs / f"run-202601{k // 24 + 1:02d}-{k % 24:02d}0000"
        old.mkdir(parents=True)
        write_state(old, RunState(run_id=old.name, stage_done="publish", verdict="publish", version=f"v{k + 1}"))
    newest = runs / "run-20260301-030000"
    manifest = run_merge(settings, newest, base=BASE)
    write_state(newest, RunState(run_id=newest.name, stage_done="publish", verdict="publish",
                                 version=f"v{old_runs + 1}", message="published"))
    size = sum(p.stat().st_size for p in feedback.rglob("*.jsonl")) / 2**20
    print(f"feedback: {n_flags:,} flags ({lines:,} lines) and {decisions:,} decisions, {size:.0f} MiB; newest finished "
          f"run {newest.name}: {manifest.counts['train'] + manifest.counts['heldout']:,} correction rows, "
          f"{manifest.counts['left_out']:,} left out; {old_runs} older runs")
    return settings


def accept_new(settings: Settings, k: int) -> None:
    """Accept ``k`` flags nobody decided on yet, as the review page does (ReviewStore.append)."""
    decided = latest_decisions(read_reviews(settings.feedback_dir).decisions)
    pending = [f for fid, f in latest_flags(settings.feedback_dir).records.items() if fid not in decided][:k]
    store = ReviewStore(settings.feedback_dir)
    try:
        for flag in pending:
            store.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action="accept",
                                        reviewer="bench"))
    finally:
        store.close()


def time_ticks(settings: Settings, repeats: int, expect: str) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``repeats`` in-process ticks, each checked to end as ``expect``."""
    out = []
    for _ in range(repeats):
        t, cpu = time.perf_counter(), time.process_time()
        result = schedule.tick(settings)
        out.append((time.perf_counter() - t, time.process_time() - cpu))
        if result.action != expect:
            raise SystemExit(f"the tick did not end as {expect!r}: {result.action}: {result.message}")
    return out


def time_cli(settings: Settings, repeats: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``repeats`` child `python -m retrain ... schedule --once`, as the scheduler starts them."""
    cmd = [sys.executable, "-m", "retrain", "--feedback-dir", str(settings.feedback_dir), "--registry-dir",
           str(settings.registry_dir), "--runs-dir", settings.retrain.runs_dir, "schedule", "--once"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLAGLOOP_RETRAIN__SCHEDULE__MIN_NEW_CORRECTIONS": str(MIN_NEW)}
    out = []
    for _ in range(repeats):
        t, cpu = time.perf_counter(), children_cpu()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        out.append((time.perf_counter() - t, children_cpu() - cpu))
        if proc.returncode != 0 or "waiting" not in proc.stdout:
            raise SystemExit(f"the child tick did not wait (exit {proc.returncode}): {proc.stdout}{proc.stderr[-2000:]}")
    return out


def report(name: str, times: list[tuple[float, float]]) -> float:
    walls, cpus = [w for w, _ in times], [c for _, c in times]
    print(f"{name:5s} " + "  ".join(f"{w:.3f}/{c:.3f}" for w, c in times))
    print(f"{'':5s} wall median {statistics.median(walls):.3f} s, max {max(walls):.3f} s; "
          f"CPU median {statistics.median(cpus):.3f} s, max {max(cpus):.3f} s")
    return statistics.median(walls)


def parts(settings: Settings) -> None:
    """What the decision is made of, timed once each; and the comparison by decision ids that it falls
    back on (when the finished run's merge failed, or the review shards it read were rewritten since)."""
    feedback, since = Path(settings.feedback_dir), Path(settings.retrain.runs_dir) / "run-20260301-030000"
    pinned = pinned_review_shards(since, feedback)
    for name, fn in (("the review bytes the run read (manifest, sha256)", lambda: pinned_review_shards(since, feedback)),
                     ("the accepts past them", lambda: accepts_past(feedback, pinned)),
                     ("fallback: the ids the run saw (rows, merge report)", lambda: seen_decisions(since)),
                     ("fallback: the accepted ids (every decision validated)", lambda: accepted_decision_ids(feedback))):
        t, cpu = time.perf_counter(), time.process_time()
        got = fn()
        print(f"  {name}: {len(got):,} items, {time.perf_counter() - t:.3f} s wall, {time.process_time() - cpu:.3f} s CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flags", type=int, default=100_000, help="flags in the feedback folder (default 100000)")
    parser.add_argument("--repeats", type=int, default=5, help="ticks timed of each kind (default 5)")
    parser.add_argument("--old-runs", type=int, default=30, help="finished runs older than the newest (default 30)")
    parser.add_argument("--no-cli", action="store_true", help="skip the child-process ticks")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="    %(message)s")

    tmp = Path(tempfile.mkdtemp(prefix="bench-tick-", dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None))
    try:
        settings = build(tmp, args.flags, args.old_runs)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
              f"per tick: wall/CPU seconds")
        idle = report("idle", time_ticks(settings, args.repeats, "waiting"))
        if not args.no_cli:
            report("cli", time_cli(settings, args.repeats))
        parts(settings)

        accept_new(settings, MIN_NEW + 5)
        started = []

        def stand_in(settings, run_id, action):  # where the real tick would run the pipeline
            started.append(run_id)
            return schedule.TickResult(action, f"would start run {run_id}", run_id)

        real, schedule.run_to_end = schedule.run_to_end, stand_in
        try:
            due = report("due", time_ticks(settings, args.repeats, "started"))
        finally:
            schedule.run_to_end = real
        count = new_corrections(settings).count
        print(f"  due: {count} new accepted corrections (need {MIN_NEW}): {len(started)} runs would have started")
        worst = max(idle, due)
        print(f"{args.flags:,} flags: idle tick {idle:.3f} s, due tick {due:.3f} s (medians, in-process; "
              f"goal < {GOAL_S:.0f} s): {'OK' if worst < GOAL_S else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
