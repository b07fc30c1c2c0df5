"""Two hosts, one Hub: the app on one machine, the scheduled retraining on another, sharing only the Hub.

Host A is the real app (`python -m space`, a Space's set-up: `dataset_repo` and `registry_repo`, a disk
of its own, an HF cache of its own). Host B is the real scheduler (`python -m retrain schedule`, its
daily cron shortened to a few seconds) on folders of its own. They have nothing in common but
HF_ENDPOINT: the Hub-protocol server on 127.0.0.1, which wants a token (the repos are private).

Through A's HTTP API a user chats and flags wrong answers with corrections (the fictional facts of
tests/test_retrain_loop.py, with its retraining settings); a reviewer accepts them on A's review page
(real Chromium); A pushes. B's tick pulls them, trains, gates, exports and publishes v2 to the Hub
registry, whose v1 is the embedded model. A, without a restart, swaps to v2 and answers the held-out
phrasings (never flagged) with the corrected facts; its flags name the Hub repo, v2 and the file's
sha256. `python -m retrain rollback v1` on B (whose own registry never had v1) moves A back. Then A
restarts on an empty disk and an empty HF cache: its review page shows every earlier flag and its
decision again, nothing is pushed twice, and it serves v1 from the Hub without being told which file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from feedback.reader import latest_flags  # noqa: E402
from retrain.registry import HubRegistry  # noqa: E402
from schemas.registry import ModelVersion  # noqa: E402
from space.model import embedded_model_path, sha256_of  # noqa: E402
from tests.browser import browser  # noqa: E402,F401 (fixture)
from tests.conftest import ROOT, start_app  # noqa: E402
from tests.hubserver import HubServer, point_hub_client_at  # noqa: E402
from tests.test_hub_sync import hub_ids  # noqa: E402
from tests.test_app_end_to_end import flag, new_client, text_of  # noqa: E402
from tests.test_retrain_loop import FACTS, NEVER_FLAGGED, SYSTEM, loop_config  # noqa: E402
from tests.test_retrain_loop import FLAGGED as FLAGGED_PHRASINGS  # noqa: E402

DATASET = "flagloop-tester/loop-feedback"
REGISTRY = "flagloop-tester/loop-model"
TOKEN = "hf_twoHostsSECRETtoken0123456789"
PASSWORD = "correct horse battery staple"
FLAGGED = [(phrasing.format(c=country), f"The capital of {country} is {capital}.")
           for country, capital in FACTS.items() for phrasing in FLAGGED_PHRASINGS]
# Asked of the served model: the published version is refit on every flagged phrasing.
UNFLAGGED_QUESTIONS = [(phrasing.format(c=country), f"The capital of {country} is {capital}.")
               for country, capital in FACTS.items() for phrasing in NEVER_FLAGGED]
STEP_MS = 20_000

expect.set_options(timeout=STEP_MS)


def hub_env(hub: HubServer, hf_home: Path) -> dict:
    """What a host knows of the Hub: its address, the token, and its own HF cache."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "FLAGLOOP_HUB_TOKEN": TOKEN}


def start_a(hub: HubServer, root: Path):
    """Host A: the app as a Space runs it, on an empty folder of its own."""
    root.mkdir(parents=True)
    return start_app(root / "feedback", root / "app.log", timeout=180, extra_env={
        **hub_env(hub, root / "hf"), "FLAGLOOP_DATASET_REPO": DATASET, "FLAGLOOP_REGISTRY_REPO": REGISTRY,
        "FLAGLOOP_PUSH_EVERY_MINUTES": "0.05", "FLAGLOOP_REGISTRY_POLL_SECONDS": "1",
        "FLAGLOOP_REVIEWERS": json.dumps({"ana": PASSWORD}), "FLAGLOOP_REGISTRY_DIR": str(root / "registry"),
    })


def b_env(hub: HubServer, root: Path, embedded_base: Path) -> dict:
    """Host B's environment: its flagloop.toml (the loop test's settings, both repos, a short schedule)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "flagloop.toml"
    if not config.exists():
        config.write_text(f'dataset_repo = "{DATASET}"\nregistry_repo = "{REGISTRY}"\n' + loop_config(root) + f"""
[retrain.schedule]
trigger = "interval"
interval_minutes = 0.1
min_new_corrections = {len(FLAGGED)}
""")
        (root / "cache").mkdir()
        (root / "cache" / "base").symlink_to(embedded_base.parent)  # the materialised base the tests share
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAGLOOP_", "HF_"))}
    return {**env, **hub_env(hub, root / "hf"), "FLAGLOOP_CONFIG": str(config)}


def wait_for(what: str, predicate, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")
        time.sleep(0.5)
    return found


def in_log(app, text: str, after: int = 0) -> bool:
    return text in app.log.read_text(errors="replace")[after:]


def ask(app, question: str) -> tuple[str, object]:
    """Ask A as its web page does (greedy); the answer and the client (to flag it)."""
    client = new_client(app)
    chatbot = client.predict(question, SYSTEM, 0.0, 0.95, 32, 0, api_name="/chat")
    return text_of(chatbot[-1]), client


def model_of_flag(app, client) -> object:
    """Flag the answer just given (thumbs up) and read back which model the record says gave it."""
    flag_id = flag(client, 1, thumbs="👍 up")[0]
    return latest_flags(app.feedback_dir).records[flag_id].model


def review_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    context.set_default_timeout(STEP_MS)
    page = context.new_page()
    page.goto(url + "review")
    field = page.locator("#review-username textarea, #review-username input").first
    expect(field).to_be_visible()
    field.fill("ana")
    password = page.locator("#review-password textarea, #review-password input").first
    password.fill(PASSWORD)
    password.press("Enter")
    return context, page


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The Hub the two hosts share, its registry's v1 the embedded model (published as the training host would)."""
    server = HubServer(token=TOKEN).start()
    with pytest.MonkeyPatch.context() as mp:
        point_hub_client_at(server.url, tmp_path_factory.mktemp("seed-hf"), mp)
        gguf = embedded_model_path()
        HubRegistry(REGISTRY, token=TOKEN).publish(gguf, ModelVersion(
            version="v1", file=gguf.name, sha256=sha256_of(gguf), bytes=gguf.stat().st_size, quant="Q4_1",
            base_sha256=sha256_of(gguf), run_id=None))
        yield server
    server.stop()


@pytest.fixture(scope="module")
def loop(hub, browser, tmp_path_factory, embedded_base):
    """A's flags accepted on A, trained on B, served on A; then rolled back on B. What each step saw."""
    root = tmp_path_factory.mktemp("two-hosts")
    a = start_a(hub, root / "a")
    sched_log = open(root / "b-schedule.log", "wb")
    b = subprocess.Popen([sys.executable, "-m", "retrain", "schedule"], cwd=ROOT, env=b_env(hub, root / "b", embedded_base),
                         stdout=sched_log, stderr=subprocess.STDOUT)
    seen: dict = {"root": root, "a": a}
    try:
        seen["started_log"] = a.log.read_text(errors="replace")
        for question, correction in FLAGGED:  # a user flags each wrong answer with the right one
            _, client = ask(a, question)
            flag(client, 1, reasons=["incorrect"], comment="made up", correction=correction, thumbs="👎 down")

        context, page = review_page(browser, a.url)  # a reviewer accepts every correction, with the keyboard
        total = len(FLAGGED)
        expect(page.locator("#review-summary")).to_contain_text(f"{total} of {total} flags match")
        for i in range(len(FLAGGED)):
            page.locator("#review-meta").click()
            page.keyboard.press("a")
            expect(page.locator("#review-summary")).to_contain_text(f"· {total - 1 - i} pending")
        context.close()
        seen["accepted_at"] = time.monotonic()

        wait_for("B publishes v2 on the Hub", lambda: "v2" in hub.repo(REGISTRY).tags, 1200, root / "b-schedule.log")
        wait_for("A serves v2", lambda: in_log(a, "now serving v2"), 300, a.log)
        seen["served_at"] = time.monotonic()
        run_dir = next((root / "b" / "runs").iterdir())
        seen["run_dir"] = run_dir
        seen["answers"] = []
        for question, correction in UNFLAGGED_QUESTIONS:
            answer, client = ask(a, question)
            seen["answers"].append((question, correction, answer))
        seen["v2_model"] = model_of_flag(a, client)
        seen["b_status"] = subprocess.run([sys.executable, "-m", "retrain", "status"], cwd=ROOT, capture_output=True,
                                          text=True, env=b_env(hub, root / "b", embedded_base), timeout=120)

        mark = len(a.log.read_text(errors="replace"))
        seen["rollback"] = subprocess.run([sys.executable, "-m", "retrain", "rollback", "v1"], cwd=ROOT,
                                          capture_output=True, text=True, env=b_env(hub, root / "b", embedded_base),
                                          timeout=120)
        wait_for("A serves v1 again", lambda: in_log(a, "now serving v1", mark), 120, a.log)
        seen["v1_model"] = model_of_flag(a, ask(a, "Say hello.")[1])
        a.proc.send_signal(signal.SIGTERM)  # a Space stopping: its last push, then it exits
        seen["a_exit"] = a.proc.wait(90)
        seen["a_log"] = a.log.read_text(errors="replace")
        seen["b_log"] = (root / "b-schedule.log").read_text(errors="replace")
        yield seen
    finally:
        a.kill()
        if b.poll() is None:
            b.send_signal(signal.SIGTERM)
            try:
                b.wait(60)
            except subprocess.TimeoutExpired:
                b.kill()


def test_corrections_accepted_on_the_app_are_trained_on_the_other_host_and_served_by_the_app(loop, hub):
    on_hub = HubRegistry(REGISTRY, token=TOKEN)
    # At start-up A downloaded the Hub registry's current version into its HF cache and served it.
    assert re.search(rf"serving {re.escape(str(loop['root'] / 'a' / 'hf'))}\S*/versions/v1/\S+\.gguf as v1 \(Q4_1",
                     loop["started_log"]), loop["started_log"][-3000:]
    manifest = json.loads((loop["run_dir"] / "manifest.json").read_text())
    assert manifest["dataset_repo"] == DATASET and re.fullmatch(r"[0-9a-f]{40}", manifest["dataset_revision"])
    assert manifest["counts"]["accepted"] == len(FLAGGED) and len(manifest["flag_ids"]) == len(FLAGGED)

    answers = loop["answers"]
    learned = [(q, a) for q, correction, a in answers if correction.rsplit(" ", 1)[1].rstrip(".") in a]
    assert len(learned) >= 0.75 * len(answers), answers  # as the one-host loop test: phrasings never flagged
    v2 = loop["v2_model"]
    published = hub.files(REGISTRY, revision="v2")
    assert (v2.source, v2.repo, v2.version, v2.revision) == ("hub", REGISTRY, "v2", hub.repo(REGISTRY).tags["v2"])
    assert v2.sha256 == json.loads(published["versions/v2/version.json"])["sha256"] == sha256_of(Path(v2.path))
    assert hashlib.sha256(published[f"versions/v2/{v2.file}"]).hexdigest() == v2.sha256
    status = loop["b_status"].stdout
    assert loop["b_status"].returncode == 0 and f"feedback: follows {DATASET}" in status, status
    assert "serving: v2 (" in status and f"from the Hub repo {REGISTRY}" in status, status

    assert loop["rollback"].returncode == 0, loop["rollback"].stderr
    assert loop["rollback"].stdout.startswith("v1 is current")
    back = loop["v1_model"]
    assert (back.repo, back.version, back.sha256) == (REGISTRY, "v1", sha256_of(embedded_model_path()))
    assert on_hub.current().version == "v1"
    assert TOKEN not in loop["a_log"] and TOKEN not in loop["b_log"]
    print(f"accepted on A -> served on A from B's model: {loop['served_at'] - loop['accepted_at']:.0f} s")


def test_the_app_restarted_on_an_empty_disk_shows_every_flag_and_decision_and_serves_the_hub_version(
        loop, hub, browser):
    assert loop["a_exit"] == 0
    flags_before, decisions_before = hub_ids(hub, "flags", DATASET), hub_ids(hub, "reviews", DATASET)
    assert len(decisions_before) == len(FLAGGED) and set(decisions_before.values()) == {1}
    fresh = start_a(hub, loop["root"] / "a-restarted")  # no feedback folder, no HF cache, no local registry
    try:
        wait_for("A restores its feedback folder", lambda: in_log(fresh, "restored the feedback folder"), 120, fresh.log)
        total = len({r for r in flags_before})  # every saved line is one flag here (none was saved twice)
        pending = total - len(FLAGGED)  # the thumbs-up flags of the identity checks have no decision
        context, page = review_page(browser, fresh.url)
        # The page opens on the pending flags: only the two never decided.
        expect(page.locator("#review-summary")).to_contain_text(f"{pending} of {total} flags match · {pending} pending")
        page.locator('#review-filter-status input[name="accepted"]').check()
        page.locator('#review-filter-status input[name="pending"]').uncheck()
        expect(page.locator("#review-summary")).to_contain_text(f"{len(FLAGGED)} of {total} flags match · 0 pending")
        expect(page.locator("#review-table")).to_contain_text("capital of Zorblaxia")
        expect(page.locator("#review-table")).to_contain_text("accepted")
        page.goto(fresh.url)
        expect(page.locator("#model-card")).to_contain_text("version v1")
        expect(page.locator("#model-card")).to_contain_text(REGISTRY)
        context.close()
        served = model_of_flag(fresh, ask(fresh, "Say hello.")[1])
        assert (served.source, served.repo, served.version) == ("hub", REGISTRY, "v1")
        restored = latest_flags(fresh.feedback_dir).records
        assert len(restored) == total + 1  # every earlier flag, and the one just saved
        # Its pushes send the new flag only: nothing restored goes to the Hub a second time.
        wait_for("A pushes its new flag", lambda: len(hub_ids(hub, "flags", DATASET)) == len(flags_before) + 1, 60,
                 fresh.log)
        time.sleep(4)  # one more push interval
        assert set(hub_ids(hub, "flags", DATASET).values()) == {1}
        assert hub_ids(hub, "reviews", DATASET) == decisions_before
    finally:
        fresh.kill()
