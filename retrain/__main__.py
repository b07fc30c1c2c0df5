"""Retraining commands: `python -m retrain run|merge|train|gate|export|publish|versions|rollback`.

A stage command runs one run up to and including that stage (earlier stages it has not done yet
first); `run` runs them all. Without --run-id, `run` and `merge` start a new run; the other stages
continue the latest run. Settings come from FLAGLOOP_* variables or flagloop.toml, as for the app.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

STAGE_COMMANDS = ("merge", "train", "gate", "export", "publish")


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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
    from retrain.merge import MergeError
    from retrain.pipeline import run_pipeline
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
        state = run_pipeline(settings, run_id=run_id, stop_after=stop_after)
    except (MergeError, ModelError) as err:
        print(f"flagloop: {err}", file=sys.stderr)
        return 1
    print(f"{state.run_id}: {state.stage_done} done, verdict {state.verdict}"
          + (f", version {state.version}" if state.version else "") + (f" — {state.message}" if state.message else ""))
    return 3 if state.verdict == "refused" else 0


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


if __name__ == "__main__":
    sys.exit(main())
