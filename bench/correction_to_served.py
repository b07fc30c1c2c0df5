"""Time from accepted corrections to the app serving a model that gives them: the real scheduler, the real app.

Starts, on fresh temporary folders, the real app (`python -m space`, polling the model registry
every --poll seconds) and the real scheduler (`python -m retrain schedule`) with the default
daily schedule shortened to an interval of --interval-minutes (default 1) and
`min_new_corrections` 1. Then, at t = 0, the corrections arrive: the fictional-fact flags of
tests/test_retrain_loop.py, each with a correction a reviewer accepted (the same retraining
settings as that test: 40 steps), written into the app's feedback folder by the real stores. It
then watches, every second, without touching either process:

  on the Hub      (--two-hosts) every accepted decision is in the dataset repo (the app's push)
  run started     a run folder appears (the first tick after t = 0, or after they are on the Hub)
  <stage> done    the run's state.json reaches each stage
  published       the registry's current version is the new one (local current.json, or the Hub's)
  served          the app answers a held-out phrasing with the corrected fact, asked through
                  /chat the way its web page asks, every --ask seconds once the version is published

and prints that timeline. The interval sets how long the corrections wait for a tick: on average
half of it, at most all of it (the default schedule's daily cron: up to a day).

--two-hosts: the app and the scheduler share nothing but a Hub (tests/hubserver.py on 127.0.0.1,
with a token), as a Space and a training host do: the app pushes its feedback to a dataset repo
every --push-minutes (the app's default is 5) and follows a Hub registry repo; the scheduler's
tick pulls the dataset repo and publishes there.

    .venv/bin/python bench/correction_to_served.py
    .venv/bin/python bench/correction_to_served.py --two-hosts --push-minutes 1
    .venv/bin/python bench/correction_to_served.py --interval-minutes 2 --keep /tmp/c2s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

STAGES = ("merge", "train", "gate", "export", "publish")
DATASET = "flagloop-bench/c2s-feedback"
REGISTRY = "flagloop-bench/c2s-model"


def write_config(root: Path, args, repos: str = "") -> Path:
    """One config for the scheduler: the loop test's retraining settings, the schedule shortened."""
    from tests.test_retrain_loop import loop_config

    config = root / "flagloop.toml"
    config.write_text(repos + loop_config(root, args.threads, args.max_steps) + f"""
[retrain.schedule]
trigger = "interval"
interval_minutes = {args.interval_minutes}
min_new_corrections = 1
""")
    return config


def run_state(runs: Path) -> tuple[str | None, dict | None]:
    """The newest run's id and state.json (None while it has none)."""
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("run-")) if runs.is_dir() else []
    if not folders:
        return None, None
    try:
        return folders[-1].name, json.loads((folders[-1] / "state.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return folders[-1].name, None


def current_version(registry: Path) -> str | None:
    try:
        return json.loads((registry / "current.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def decisions_on_hub(hub) -> int:
    from feedback.sync import parse_part

    if ("dataset", DATASET) not in hub.repos:
        return 0
    return sum(data.count(b"\n") for path, data in hub.files(DATASET, "dataset").items()
               if (parsed := parse_part(path)) and parsed[0] == "reviews")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval-minutes", type=float, default=1.0, help="the shortened schedule (default 1 minute)")
    p.add_argument("--poll", type=float, default=2.0, help="the app's registry poll, seconds (default 2)")
    p.add_argument("--ask", type=float, default=3.0, help="seconds between questions to the app once published")
    p.add_argument("--max-steps", type=int, default=40, help="training steps (default 40, as the loop test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--two-hosts", action="store_true", help="app and scheduler share only a Hub (see the doc)")
    p.add_argument("--push-minutes", type=float, default=5.0, help="--two-hosts: the app's push interval (default 5)")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    p.add_argument("--keep", type=Path, help="keep the folders here instead of a temporary folder")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops both processes

    from chat_overhead import BrowserLikeClient, assistant_text
    from hub_push import TOKEN, EnvPatch

    from schemas.sft import SFTRow
    from tests.conftest import BASE_CACHE, start_app
    from tests.hubserver import HubServer, point_hub_client_at
    from tests.test_retrain_loop import FACTS, PHRASINGS, SYSTEM, flagged_corrections

    root = Path(args.keep or tempfile.mkdtemp(prefix="flagloop-c2s-"))
    root.mkdir(parents=True, exist_ok=True)
    a, b = (root / "a", root / "b") if args.two_hosts else (root, root)
    for folder in (a, b):
        folder.mkdir(exist_ok=True)
    hub = HubServer(token=TOKEN).start() if args.two_hosts else None
    app_env = {"FLAGLOOP_REGISTRY_DIR": str(a / "registry"), "FLAGLOOP_REGISTRY_POLL_SECONDS": str(args.poll),
               "FLAGLOOP_N_THREADS": str(args.threads)}
    sched_env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGLOOP_")}
    repos = ""
    if hub is not None:
        point_hub_client_at(hub.url, root / "bench-hf", EnvPatch())
        hub_env = {"FLAGLOOP_HUB_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": hub.url}
        app_env |= hub_env | {"HF_HOME": str(a / "hf"), "FLAGLOOP_DATASET_REPO": DATASET,
                              "FLAGLOOP_REGISTRY_REPO": REGISTRY, "FLAGLOOP_PUSH_EVERY_MINUTES": str(args.push_minutes)}
        sched_env |= hub_env | {"HF_HOME": str(b / "hf")}
        repos = f'dataset_repo = "{DATASET}"\nregistry_repo = "{REGISTRY}"\n'
    sched_env["FLAGLOOP_CONFIG"] = str(write_config(b, args, repos))
    if BASE_CACHE.is_dir():  # the materialised base the tests share (else the run makes it: ~30 s more)
        (b / "cache").mkdir(exist_ok=True)
        (b / "cache" / "base").symlink_to(BASE_CACHE)

    def published() -> bool:
        if hub is not None:
            return "v1" in hub.repo(REGISTRY).tags if ("model", REGISTRY) in hub.repos else False
        return current_version(b / "registry") is not None

    app = sched = None
    timeline: list[tuple[str, float]] = []
    try:
        app = start_app(a / "feedback", a / "app.log", extra_env=app_env, timeout=180)
        sched = subprocess.Popen([sys.executable, "-m", "retrain", "schedule"], cwd=ROOT, env=sched_env,
                                 stdout=open(b / "schedule.log", "wb"), stderr=subprocess.STDOUT)
        client = BrowserLikeClient(app.url)
        print(f"app {app.url}, scheduler every {args.interval_minutes:g} min, registry poll {args.poll:g} s"
              + (f", two hosts sharing the Hub {hub.url}, app push every {args.push_minutes:g} min"
                 if hub is not None else "") + f"; folders in {root}", flush=True)

        t0 = time.perf_counter()
        flagged_corrections(a / "feedback")
        wanted = len(FACTS) * len(PHRASINGS)
        timeline.append(("corrections accepted", 0.0))
        print(f"{'corrections accepted':<22} {0.0:>8.1f} s", flush=True)
        seen, question, fact, last_ask = set(), None, None, 0.0
        while time.perf_counter() - t0 < args.timeout:
            now = time.perf_counter() - t0
            run_id, state = run_state(b / "runs")
            events = []
            if hub is not None and decisions_on_hub(hub) >= wanted:
                events.append("on the Hub")
            if run_id and "run started" not in seen:
                events.append("run started")
            done = state.get("stage_done") if state else None
            for stage in STAGES[: STAGES.index(done) + 1] if done in STAGES else ():
                events.append(f"{stage} done")
            if state and state.get("verdict") in ("refused", "failed"):
                print(f"the run ended {state['verdict']}: {state.get('message')}")
                return 1
            if published():
                events.append("published")
            for event in events:
                if event not in seen:
                    seen.add(event)
                    timeline.append((event, now))
                    print(f"{event:<22} {now:>8.1f} s", flush=True)
            if "published" in seen and now - last_ask >= args.ask:
                if question is None:
                    row = SFTRow.model_validate_json(
                        (b / "runs" / run_id / "data" / "heldout.jsonl").read_text().splitlines()[0])
                    question = row.prompt[-1].content
                    fact = next(c for c in FACTS.values() if c in row.completion[0].content)
                last_ask = now
                client.call("clear")
                _, _, final = client.call("chat", question, SYSTEM, 0.0, 0.95, 32, 0)
                answer = assistant_text(final)
                if fact in answer:
                    now = time.perf_counter() - t0
                    timeline.append(("served", now))
                    print(f"{'served':<22} {now:>8.1f} s   {question!r} -> {answer[:80]!r}", flush=True)
                    break
            if sched.poll() is not None:
                print(f"the scheduler exited with {sched.returncode}: see {b / 'schedule.log'}")
                return 1
            time.sleep(1.0)
        else:
            print(f"not served within {args.timeout:.0f} s")
            return 1
    finally:
        if sched is not None and sched.poll() is None:
            sched.send_signal(signal.SIGTERM)
            try:
                sched.wait(60)
            except subprocess.TimeoutExpired:
                sched.kill()
        if app is not None:
            app.kill()
        if hub is not None:
            hub.stop()
    stamps = dict(timeline)
    print()
    if hub is not None:
        print(f"pushed by the app          {stamps['on the Hub']:>8.1f} s   (push every {args.push_minutes:g} min)")
        print(f"then waiting for a tick    {stamps['run started'] - stamps['on the Hub']:>8.1f} s   "
              f"(interval {args.interval_minutes:g} min; the tick's pull included)")
    else:
        print(f"waiting for a tick        {stamps['run started']:>8.1f} s   (interval {args.interval_minutes:g} min)")
    print(f"the run, merge to publish {stamps['published'] - stamps['run started']:>8.1f} s")
    print(f"published to served       {stamps['served'] - stamps['published']:>8.1f} s   (registry poll {args.poll:g} s, "
          + ("download from the Hub, " if hub is not None else "") + "load, swap, and the question's own answer)")
    print(f"accepted to served        {stamps['served']:>8.1f} s")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
