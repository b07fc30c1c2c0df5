"""The review page's Retraining tab in a real browser: headless Chromium (tests/browser.py) against the
real app (space.app.build_demo on the embedded model, the review page mounted) over run folders written
to disk as the pipeline leaves them (tests/runs_on_disk.py), and a local registry serving v1.

What is checked is what a reviewer sees: the runs table, the newest run's loss curve and gate report,
another run on a row click, and the corrections in gate.json shown as text, loading nothing.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from schemas.run import RetrainSettings  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from tests.browser import bait_server, browser  # noqa: E402,F401 (fixtures)
from tests.runs_on_disk import NEW, OLD, PASSED, gate_report, published_run, write_run  # noqa: E402
from tests.test_review_ui import box, call_without_login, free_port, page  # noqa: E402,F401 (page: a fixture)

STEP_MS = 15_000
PASSWORD = "correct horse battery staple"
REFUSED = "held-out corrections did not improve enough: NLL/token 1.700 -> 1.650 (gain 0.050, needed > 0.1)"

expect.set_options(timeout=STEP_MS)


def hostile(bait_url: str, where: str) -> str:
    """Text that runs script or fetches ``bait_url`` if a page renders it instead of showing it."""
    return (f'<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> '
            f'![tracker]({bait_url}/{where}-md.png) <img src="{bait_url}/{where}-html.png"> in the {where}')


@pytest.fixture
def server(tmp_path, bait_server):
    """The real app with the review page, over two runs (v1 published by the older) and a registry."""
    from feedback.store import FlagStore
    from space.app import App, build_demo
    from space.model import load_model
    from space.review import ReviewApp, mount_review

    runs = tmp_path / "runs"
    settings = Settings(feedback_dir=tmp_path / "feedback", registry_dir=tmp_path / "registry", n_threads=2,
                        reviewers={"ana": PASSWORD}, retrain=RetrainSettings(runs_dir=str(runs)))
    published_run(runs, settings.registry_dir, tmp_path)
    refused = gate_report(False, REFUSED, [
        (hostile(bait_server.url, "prompt"), hostile(bait_server.url, "correction"), "I do not know.",
         "Quenthar, I think.", 1.7, 1.65),
    ], [("Name a colour.", "Blue.", 1.0, 1.3)])
    write_run(runs, NEW, "gate", "refused", [3.0, 2.2, 1.9, 1.7], refused, message=REFUSED)

    store = FlagStore(settings.feedback_dir)
    demo = build_demo(App(settings, load_model(settings), store))
    review = ReviewApp(settings)
    mount_review(demo, review)
    demo.queue(default_concurrency_limit=None)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}", "bait": bait_server}
    demo.close()
    review.close()
    store.close()


def test_a_reviewer_sees_the_runs_loss_curve_and_gate_report_of_the_retraining_loop(page, server):
    page.goto(server["url"] + "/review")
    box(page, "review-username").fill("ana")
    box(page, "review-password").fill(PASSWORD)
    box(page, "review-password").press("Enter")
    expect(page.locator("#review-whoami")).to_contain_text("Reviewing as")
    page.get_by_role("tab", name="Retraining").click()

    status = page.locator("#review-rt-status")
    expect(status).to_contain_text(f"Serving: v1 · model.gguf · Q4_1 · from run {OLD}")
    expect(status).to_contain_text("gate passed")
    expect(status).to_contain_text("0 accepted corrections wait for the next run")
    runs = page.locator("#review-rt-runs")
    expect(runs).to_contain_text(NEW)
    expect(runs).to_contain_text("refused")
    expect(runs).to_contain_text("1.7000")  # the newest run's last loss
    expect(runs).to_contain_text(OLD)

    gate = page.locator("#review-rt-gate")  # the newest run is shown first
    expect(gate).to_contain_text("Gate: refused")
    expect(gate).to_contain_text(REFUSED)
    expect(page.locator("#review-rt-loss-note")).to_contain_text("4 logged steps; last: step 4, loss 1.7000")
    expect(page.locator("#review-rt-loss canvas, #review-rt-loss svg").first).to_be_visible()
    heldout = page.locator("#review-rt-heldout")
    expect(heldout).to_contain_text("<img src=x onerror=")  # the correction, as text
    expect(heldout).to_contain_text("Quenthar, I think.")
    expect(page.locator("#review-rt-drift")).to_contain_text("0.300")  # the rise of the drift prompt's NLL

    runs.get_by_text(OLD, exact=True).click()
    expect(gate).to_contain_text("Gate: passed")
    expect(gate).to_contain_text(PASSED)
    expect(page.locator("#review-rt-loss-note")).to_contain_text("3 logged steps; last: step 3, loss 0.8000")
    expect(heldout).to_contain_text("What is the capital of Zorblaxia?")

    page.locator("#review-rt-run input").click()  # the run picker: back to the newest run
    page.get_by_role("option", name=NEW).click()
    expect(gate).to_contain_text("Gate: refused")

    page.wait_for_function("[...document.images].every(img => img.complete)")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert server["bait"].paths == [], "the Retraining tab fetched URLs written in a correction"
    assert page.locator("#review-box").locator("img, script").count() == 0


def test_the_retraining_endpoint_refuses_a_session_that_never_logged_in(server):
    with urllib.request.urlopen(f"{server['url']}/config", timeout=10) as r:
        fns = {d["api_name"]: d for d in json.load(r)["dependencies"] if d.get("api_name")}
    for name in ("retraining", "retraining_select", "retraining_shown"):
        assert fns[name]["api_visibility"] == "private", name
    events = call_without_login(server["url"], fns["retraining"]["id"], [None, None])
    assert events[-1]["msg"] == "process_completed" and events[-1]["success"] is False, events
    assert "Log in as a reviewer" in json.dumps(events[-1])
    assert REFUSED not in json.dumps(events) and "Zorblaxia" not in json.dumps(events)
