"""The training host follows the feedback dataset: each tick pushes its own decisions, then pulls everyone's.

Host A (the app) is a feedback folder pushed by the real FolderPusher; host B is the real tick
(`retrain.schedule.tick`, and `python -m retrain schedule --once` where it is killed) on a folder
of its own. They share nothing but the Hub-protocol server on 127.0.0.1.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from huggingface_hub import HfApi
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from feedback.pull import pull_folder, read_pull_state
from feedback.reviews import ReviewStore
from feedback.sync import FolderPusher
from retrain.follow import follow_feedback
from retrain.pipeline import read_manifest, run_pipeline
from retrain.schedule import tick
from schemas.review import ReviewDecision
from tests.conftest import ROOT
from tests.test_hub_sync import hub_ids
from tests.test_schedule import QUESTIONS, accept, cli_env, settings_for

REPO = "flagloop-tester/two-hosts-feedback"
TOKEN = "hf_followSECRETtoken0123456789ab"


@pytest.fixture
def hub(hub_server, hub_client_waits):
    hub_server.token = TOKEN
    yield hub_server
    set_client_factory(default_client_factory)  # the tick installs a time-out client: undo it


def host_b(root: Path, **schedule):
    settings = settings_for(root, **{"min_new_corrections": 5, **schedule})
    return settings.model_copy(update={"dataset_repo": REPO, "hub_token": SecretStr(TOKEN)})


def app_pushes(app: Path, *questions: str, action: str = "accept") -> list[ReviewDecision]:
    """Host A: flags with corrections decided by its reviewer, pushed to the dataset repo."""
    decisions = [accept(app, q, QUESTIONS[q], action=action) for q in questions]
    FolderPusher(HfApi(token=TOKEN), REPO, app).push()
    return decisions


def shards(root: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes()
            for sub in ("flags", "reviews") for p in sorted((root / sub).glob("*.jsonl"))}


def test_a_tick_pulls_the_apps_decisions_pushes_its_own_and_the_dataset_has_each_once(hub, tmp_path):
    app, b = tmp_path / "a" / "feedback", tmp_path / "b"
    settings = host_b(b)
    questions = list(QUESTIONS)
    accepted = app_pushes(app, *questions[:3])

    first = tick(settings)
    assert (first.action, first.new_corrections) == ("waiting", 3), first.message
    assert shards(b / "feedback") == shards(app)  # byte for byte what the app wrote

    # A reviewer on B's own review page rejects one of them: B pushes it at its next tick.
    reviews_b = ReviewStore(b / "feedback")
    rejected = reviews_b.append(ReviewDecision(
        flag_id=accepted[0].flag_id, flag_record_id=accepted[0].flag_record_id, action="reject", reviewer="bo"))
    reviews_b.close()
    (fourth,) = app_pushes(app, questions[3])
    second = tick(settings)
    assert (second.action, second.new_corrections) == ("waiting", 3), second.message  # 3 - 1 rejected + 1 new
    on_hub = hub_ids(hub, "reviews", REPO)
    expected = {d.decision_id for d in [*accepted, rejected, fourth]}
    assert set(on_hub) == expected and set(on_hub.values()) == {1}  # both sides' decisions, each once

    # A pulls too (its restore): it sees B's reject; pulling again changes nothing.
    pull_folder(HfApi(token=TOKEN), REPO, app)
    assert shards(app) == shards(b / "feedback")

    # An idle tick asks the Hub one small question and pushes nothing.
    before = len(hub.requests)
    idle = tick(settings)
    assert idle.action == "waiting" and idle.new_corrections == 3
    assert [(r.method, r.path.split("?")[0]) for r in hub.requests[before:]] == [
        ("HEAD", f"/datasets/{REPO}/resolve/main/README.md")]


@pytest.mark.parametrize("fault", ["503", "unreachable", "401"])
def test_the_hub_failing_during_the_tick_waits_says_why_in_one_line_and_the_next_tick_pulls(hub, tmp_path, fault):
    app, b = tmp_path / "a" / "feedback", tmp_path / "b"
    settings = host_b(b, min_new_corrections=2)
    app_pushes(app, *list(QUESTIONS)[:1])
    tick(settings)
    app_pushes(app, *list(QUESTIONS)[1:3])
    before = shards(b / "feedback")
    if fault == "503":
        hub.fail(503)
        why = "the Hub answered 503"
    elif fault == "401":
        settings = settings.model_copy(update={"hub_token": SecretStr("hf_wrong")})
        why = "(401"
    else:
        hub.stop()  # connections refused until it starts again, on the same port
        why = "cannot reach the Hub"

    down = tick(settings)

    assert down.action == "waiting" and down.exit_code == 1 and down.run_id is None
    assert why in down.message and "no run until a pull gets through" in down.message, down.message
    assert "the local copy is of commit" in down.message and "ago)" in down.message
    assert "\n" not in down.message and TOKEN not in down.message
    assert shards(b / "feedback") == before  # nothing lost, nothing half-written
    state = read_pull_state(b / "feedback")
    assert why in state.error
    status = subprocess.run([sys.executable, "-m", "retrain", "status"], cwd=ROOT, capture_output=True, text=True,
                            env=status_env(b, settings), timeout=120)
    assert status.returncode == 0, status.stderr
    (line,) = [ln for ln in status.stdout.splitlines() if ln.startswith("feedback:")]
    assert f"follows {REPO}" in line and "the last pull" in line and "FAILED" in line and why in line, line

    # With on_pull_failure = "train" the same tick goes on with the local copy.
    trains = tick(settings.model_copy(update={"retrain": settings.retrain.model_copy(update={
        "schedule": settings.retrain.schedule.model_copy(update={"on_pull_failure": "train"})})}))
    assert trains.message.startswith("waiting: 1 new accepted corrections"), trains.message

    hub.reset()
    if fault == "unreachable":
        hub.start()  # back, on the same port
    up = tick(host_b(b))  # (5 corrections needed: it only pulls)
    assert up.error is None and shards(b / "feedback") == shards(app)
    assert read_pull_state(b / "feedback").error is None


def status_env(root: Path, settings) -> dict:
    env = cli_env(root)
    env["FLAGLOOP_DATASET_REPO"] = settings.dataset_repo
    return env


def test_a_tick_killed_during_its_pull_is_completed_by_the_next_and_the_merge_pins_that_commit(hub, tmp_path):
    app, b = tmp_path / "a" / "feedback", tmp_path / "b"
    first_half = app_pushes(app, *list(QUESTIONS)[:2])
    # A second app process (a restart): its own shards.
    second_half = app_pushes(app, *list(QUESTIONS)[2:])
    flag_folders = sorted(p.stem for p in (app / "flags").glob("*.jsonl"))
    assert len(flag_folders) == 4  # one FlagStore per accept() call: four shards
    hub.hang(path=f"/resolve/.*/flags/{flag_folders[2]}/")  # the third shard's download never answers

    b.mkdir(parents=True)
    env = {**status_env(b, host_b(b)), "FLAGLOOP_HUB_TOKEN": TOKEN}
    child = subprocess.Popen([sys.executable, "-m", "retrain", "schedule", "--once"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not hub.requests_to(f"/flags/{flag_folders[2]}/"):
            assert time.monotonic() < deadline and child.poll() is None, child.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    pulled = sorted(p.stem for p in (b / "feedback" / "flags").glob("*.jsonl"))
    assert pulled == flag_folders[:2] and read_pull_state(b / "feedback") is None

    hub.reset()
    settings = host_b(b)
    done = tick(settings)
    assert (done.action, done.new_corrections) == ("waiting", 4), done.message
    assert shards(b / "feedback") == shards(app)
    head = hub.repo(REPO, "dataset").branches["main"]
    assert read_pull_state(b / "feedback").commit == head
    # A merge on B now reads every flag once, and pins the commit it was pulled to.
    state = run_pipeline(settings, run_id="run-20261207-000000", stop_after="merge")
    manifest = read_manifest(b / "runs" / state.run_id)
    assert manifest.dataset_repo == REPO and manifest.dataset_revision == head
    assert manifest.counts["flags"] == 4 and manifest.counts["accepted"] == 4
    assert sorted(manifest.flag_ids) == sorted(d.flag_id for d in [*first_half, *second_half])

    # More arrives and is pulled; the run, continued, still reads what its merge pinned.
    pinned = {f.path: (b / "runs" / state.run_id / f.path).read_bytes() for f in manifest.outputs}
    accept(app, "Is water wet?", "Yes, water makes things wet.")
    FolderPusher(HfApi(token=TOKEN), REPO, app).push()
    assert follow_feedback(settings).ok  # what a tick does first (this one would go on to resume the run)
    assert read_pull_state(b / "feedback").commit != manifest.dataset_revision
    again = run_pipeline(settings, run_id=state.run_id, stop_after="merge")
    assert again.stage_done == "merge" and read_manifest(b / "runs" / state.run_id) == manifest
    assert {p: (b / "runs" / state.run_id / p).read_bytes() for p in pinned} == pinned
