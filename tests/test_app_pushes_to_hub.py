"""The running app pushes its flags to the Hub dataset repo, on its timer and once more when stopped."""

import json
import signal
import time

from gradio_client import Client

from tests.conftest import start_app

REPO = "flagloop/app-feedback"
TOKEN = "hf_appSECRETtoken0123456789"


def records_on_hub(hub) -> list[dict]:
    try:
        files = hub.files(REPO, "dataset")
    except KeyError:
        return []
    return [
        json.loads(line)
        for path, data in files.items()
        if path.startswith("flags/") and path.endswith(".jsonl")
        for line in data.decode().splitlines()
    ]


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_flags_reach_the_hub_on_the_timer_and_on_sigterm(hub_server, tmp_path):
    hub_server.token = TOKEN
    app = start_app(
        tmp_path / "feedback",
        tmp_path / "app.log",
        extra_env={
            "FLAGLOOP_DATASET_REPO": REPO,
            "FLAGLOOP_HUB_TOKEN": TOKEN,
            "FLAGLOOP_PUSH_EVERY_MINUTES": "0.05",  # 3 s: the SIGTERM below comes before the next tick
        },
    )
    try:
        client = Client(app.url, verbose=False)
        client.predict("Name a fruit.", "", 0.0, 0.9, 6, 1, api_name="/chat")
        client.predict(1, ["incorrect"], "first", "A banana.", "👎 down", api_name="/flag")
        assert wait_for(lambda: [r["comment"] for r in records_on_hub(hub_server)] == ["first"]), app.log.read_text()
        assert hub_server.repo(REPO, "dataset").private

        client.predict(1, ["incorrect"], "second", "A banana.", "👎 down", api_name="/flag")
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(60) == 0
    finally:
        app.kill()
    on_hub = records_on_hub(hub_server)
    assert sorted(r["comment"] for r in on_hub) == ["first", "second"]  # each once, the last by the final push
    assert len({r["record_id"] for r in on_hub}) == 2
    assert TOKEN not in app.log.read_text()
