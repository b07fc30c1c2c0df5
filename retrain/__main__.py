"""Retraining commands: `python -m retrain run|merge|train|gate|refit|export|publish|versions|rollback|schedule|status`.

A stage command runs one run up to and including that stage (earlier stages it has not done yet
first); `run` runs them all. Without --run-id, `run` and `merge` start a new run; the other stages
continue the latest run. `schedule` retrains on a schedule (retrain/schedule.py); `status` shows the
schedule, the last runs, the version served and the corrections waiting. One run at a time per host:
every command that runs stages holds the retraining lock (retrain/lock.py). Settings come from
FLAGLOOP_* variables or flagloop.toml, as for the app.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

STAGE_COMMANDS = ("merge", "train", "gate", "refit", "export", "publish")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain", description="Turn accepted corrections into a new model version.")
    parser.add_argument("--feedback-dir", help="feedback folder with flags/ and reviews/ (default data/feedback)")
    parser.add_argument("--registry-dir", help="local model registry (default data/registry)")
    parser.add_argument("--runs-dir", help="folder of run folders (default data/runs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGE_COMMANDS):
        cmd = sub.add_parser(name, help="all stages" if name == "run" else f"the run up to {name}")
        cmd.add_argument("--run-id", help="the run to continue (default: a new run for run/merge, else the latest)")
    sub.add_parser("versions", help="list the registry's versions and which one is current")
    back = sub.add_parser("rollback", help="make an older version current")
    back.add_argument("version", help="e.g. v2")
    sched = sub.add_parser("schedule", help="retrain on a schedule: resume an interrupted run, else start one "
                                            "when enough new accepted corrections wait")
    sched.add_argument("--once", action="store_true", help="run one tick now and exit (tests, or a crontab line)")
    status = sub.add_parser("status", help="the schedule, the last runs, the version served, the corrections waiting")
    status.add_argument("--runs", type=int, default=10, metavar="N", help="how many of the last runs to show (default 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per Hub request

    from pydantic import ValidationError

    from schemas.errors import describe
    from schemas.settings import Settings

    try:
        settings = load_settings(Settings, args)
    except ValidationError as err:
        print(f"flagloop: invalid settings: {describe(err, prefix='FLAGLOOP_')}", file=sys.stderr)
        return 2

    if args.command == "versions":
        return show_versions(settings)
    if args.command == "schedule":
        return schedule_command(settings, args)
    if args.command == "status":
        return show_status(settings, args.runs)
    if args.command == "rollback":
        from retrain.publish import rollback
        from retrain.registry import RegistryError

        try:
            version = rollback(settings, args.version)
        except RegistryError as err:
            print(f"flagloop: {err}", file=sys.stderr)
            return 1
        print(f"{version.version} is current ({version.file}, {version.quant})")
        return 0
    return run_command(settings, args)


def load_settings(Settings, args):
    overrides = {}
    if args.feedback_dir:
        overrides["feedback_dir"] = args.feedback_dir
    if args.registry_dir:
        overrides["registry_dir"] = args.registry_dir
    settings = Settings(**overrides)
    if args.runs_dir:
        retrain = settings.retrain.model_copy(update={"runs_dir": args.runs_dir})
        settings = settings.model_copy(update={"retrain": retrain})
    return settings


def latest_run(settings) -> str | None:
    runs = sorted(p.name for p in Path(settings.retrain.runs_dir).glob("run-*") if p.is_dir())
    return runs[-1] if runs else None


def run_command(settings, args) -> int:
    from retrain.lock import LockHeld, lock_path, retrain_lock
    from retrain.merge import MergeError
    from retrain.pipeline import run_pipeline
    from retrain.registry import RegistryError
    from space.model import ModelError

    run_id = args.run_id
    if run_id is None and args.command not in ("run", "merge"):
        run_id = latest_run(settings)
        if run_id is None:
            print(f"flagloop: no run in {settings.retrain.runs_dir}: start one with `python -m retrain run`",
                  file=sys.stderr)
            return 1
    stop_after = None if args.command == "run" else args.command
    try:
        with retrain_lock(lock_path(settings), f"python -m retrain {args.command}"):
            if args.command in ("run", "merge") and not follow_or_refuse(settings):
                return 1
            state = run_pipeline(settings, run_id=run_id, stop_after=stop_after)
    except LockHeld as err:
        print(f"flagloop: {err}: try again when its run has finished", file=sys.stderr)
        return 1
    except (MergeError, ModelError, RegistryError) as err:  # RegistryError: says where the version is, if anywhere
        print(f"flagloop: {err}", file=sys.stderr)
        return 1
    print(f"{state.run_id}: {state.stage_done} done, verdict {state.verdict}"
          + (f", version {state.version}" if state.version else "") + (f" — {state.message}" if state.message else ""))
    return 3 if state.verdict == "refused" else 0


def follow_or_refuse(settings) -> bool:
    """Bring the feedback folder up to date from the dataset repo; False (one line said) when that failed
    and retrain.schedule.on_pull_failure is 'wait'."""
    from retrain.follow import follow_feedback

    follow = follow_feedback(settings)
    if follow.ok:
        return True
    if settings.retrain.schedule.on_pull_failure == "wait":
        print(f"flagloop: {follow.message}: not starting a run on it; try again when the Hub answers, or set "
              "FLAGLOOP_RETRAIN__SCHEDULE__ON_PULL_FAILURE=train to train on the local copy", file=sys.stderr)
        return False
    print(f"flagloop: {follow.message}: training on the local copy (retrain.schedule.on_pull_failure = 'train')",
          file=sys.stderr)
    return True


def show_versions(settings) -> int:
    from retrain.registry import LocalRegistry

    registry = LocalRegistry(settings.registry_dir)
    current = registry.current()
    versions = registry.versions()
    if not versions:
        print(f"no versions in {settings.registry_dir}: the app serves the configured model")
        return 0
    for v in versions:
        mark = "*" if current and v.version == current.version else " "
        verdict = v.gate.reason if v.gate else ""
        print(f"{mark} {v.version}  {v.created_at:%Y-%m-%d %H:%M}  {v.quant}  {v.sha256[:12]}  {v.run_id or ''}  {verdict}")
    return 0


def global_args(args) -> list[str]:
    """The global options given, as arguments for a child `python -m retrain` (paths made absolute)."""
    out = []
    for flag, value in (("--feedback-dir", args.feedback_dir), ("--registry-dir", args.registry_dir),
                        ("--runs-dir", args.runs_dir)):
        if value:
            out += [flag, str(Path(value).resolve())]
    return out + (["--verbose"] if args.verbose else [])


def schedule_command(settings, args) -> int:
    from retrain.schedule import ScheduleError, make_trigger, serve, tick

    if args.once:
        # SIGTERM (the scheduler stopping) unwinds the tick like Ctrl-C: the lock is let go, the run stays resumable.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        result = tick(settings)
        print(result.message)
        return result.exit_code
    try:
        make_trigger(settings.retrain.schedule)
    except ScheduleError as err:
        print(f"flagloop: {err}", file=sys.stderr)
        return 2
    serve(settings, global_args(args))
    return 0


def show_status(settings, runs: int) -> int:
    from retrain.registry import RegistryError
    from retrain.follow import pull_line
    from retrain.schedule import run_to_resume
    from retrain.status import new_corrections, run_summaries, schedule_info, serving_version

    info = schedule_info(settings)
    print(f"schedule: {info.trigger}, a run when {info.min_new_corrections} new accepted corrections wait")
    if not info.registered:
        print(f"  no scheduler has registered its job in {info.jobstore} yet: start `python -m retrain schedule`")
    else:
        when = f"{info.next_run_time:%Y-%m-%d %H:%M %Z}" if info.next_run_time else "none (paused)"
        if info.next_run_time and info.next_run_time.timestamp() < time.time() - 60:
            when += " (overdue: is the scheduler running?)"
        print(f"  job store {info.jobstore}: {info.registered_trigger}, next run {when}")
    where = f"the Hub repo {settings.registry_repo}" if settings.registry_repo else str(settings.registry_dir)
    try:
        if settings.registry_repo:  # what the app follows
            from retrain.publish import hub_registry

            version = hub_registry(settings).current()
        else:
            version = serving_version(settings)
    except RegistryError as err:
        print(f"serving: the registry cannot be read: {err}")
    else:
        print(f"serving: {version.version} ({version.file}, {version.quant}, run {version.run_id or '-'}, "
              f"published {version.created_at:%Y-%m-%d %H:%M}) from {where}" if version
              else f"serving: the configured model (nothing published in {where})")
    pulled = pull_line(settings)
    if pulled:
        print(pulled)
    new = new_corrections(settings)
    since = f"since {new.since_run} ({new.since_verdict})" if new.since_run else "no run finished yet"
    print(f"waiting: {new.count} new accepted corrections, {since}; a run starts at {new.needed}")
    unfinished = run_to_resume(settings)
    if unfinished:
        print(f"unfinished: {unfinished}: the next tick (or `python -m retrain run --run-id {unfinished}`) continues it")
    rows = run_summaries(settings, runs)
    if not rows:
        print(f"runs: none in {settings.retrain.runs_dir}")
        return 0
    print(f"runs (newest first, in {settings.retrain.runs_dir}):")
    print(f"  {'run':<20} {'stage':<7} {'verdict':<8} {'version':<7} {'steps':>5} {'loss':>7}  "
          f"{'held-out LL before→after':<24} {'drift':>6}  message")
    for r in rows:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        heldout = (f"{r.heldout_before:.3f}→{r.heldout_after:.3f}" if r.heldout_before is not None else "-")
        drift = f"{r.drift:.3f}" if r.drift is not None else "-"
        message = r.message if len(r.message) <= 100 else r.message[:99] + "…"
        if r.failed_ticks and not r.finished:
            message += f" [failed ticks: {r.failed_ticks}, last: {r.last_error}]"
        print(f"  {r.run_id:<20} {r.stage_done:<7} {r.verdict:<8} {r.version or '-':<7} "
              f"{r.steps if r.steps is not None else '-':>5} {loss:>7}  {heldout:<24} {drift:>6}  {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
