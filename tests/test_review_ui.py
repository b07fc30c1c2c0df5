"""The review page in a real browser: headless Chromium (Debian's, through Playwright) against the real
app — the chat page of space.app.build_demo on the embedded model, with the review page mounted by
space.review.mount_review — served on 127.0.0.1 over a feedback folder filled with flags.

What is checked is what a reviewer (and a stranger) sees and does: nothing before logging in, the
keyboard flow that accepts, rejects and corrects, filters and row clicks, hostile user text shown
as text, and the endpoints refusing a session that never logged in.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from feedback.reader import shard_paths  # noqa: E402
from feedback.reviews import ReviewStore, read_reviews  # noqa: E402
from feedback.store import FlagStore  # noqa: E402
from schemas.flag import ChatMessage  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from tests.browser import bait_server, browser  # noqa: E402,F401 (fixtures)
from tests.records import make_flag  # noqa: E402

STEP_MS = 15_000
PASSWORD = "correct horse battery staple"
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=3)
SECRET = "SECRET-COMMENT"  # in every flag's comment: must never reach a page before login

expect.set_options(timeout=STEP_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_flags(root: Path) -> dict[str, object]:
    """Six flags, newest last: f5 (thumbs up) … f0; the newest pending one is f5."""
    store = FlagStore(root)
    flags = {}
    for i in range(6):
        at = T0 + timedelta(hours=i)
        flags[f"f{i}"] = store.save(make_flag(
            flag_id=f"f{i}", created_at=at, updated_at=at, thumbs="up" if i % 2 else "down",
            comment=f"{SECRET} {i}", correction=f"Correction {i}.",
        ))
    store.close()
    return flags


@pytest.fixture
def server(tmp_path):
    """The real chat app with the review page mounted, in this process, on a free loopback port."""
    from space.app import App, build_demo
    from space.model import load_model
    from space.review import ReviewApp, mount_review

    root = tmp_path / "feedback"
    flags = fill_flags(root)
    settings = Settings(feedback_dir=root, reviewers={"ana": PASSWORD}, n_threads=2)
    store = FlagStore(root)
    demo = build_demo(App(settings, load_model(settings), store))
    sync = {"line": "Hub sync to me/feedback: last push never, 6 records pending"}
    review = ReviewApp(settings, sync_status=lambda: sync["line"])
    mount_review(demo, review)
    demo.queue(default_concurrency_limit=None)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "flags": flags, "sync": sync}
    demo.close()
    review.close()
    store.close()


@pytest.fixture
def page(browser, tmp_path, request):
    failed_before = request.session.testsfailed
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    context.set_default_timeout(STEP_MS)
    page = context.new_page()
    yield page
    if request.session.testsfailed > failed_before:
        shot = tmp_path / "failure.png"
        page.screenshot(path=shot, full_page=True)
        print(f"screenshot of the failed page: {shot}")
    context.close()


def box(page, elem_id: str):
    """The text field of a Gradio Textbox by its elem_id."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def open_review(page, server) -> None:
    page.goto(server["url"] + "/review")
    expect(box(page, "review-username")).to_be_visible()


def log_in(page, password: str = PASSWORD) -> None:
    box(page, "review-username").fill("ana")
    box(page, "review-password").fill(password)
    box(page, "review-password").press("Enter")


def decisions(server) -> dict[str, list]:
    out: dict[str, list] = {}
    for d in read_reviews(server["root"]).decisions:
        out.setdefault(d.flag_id, []).append(d)
    return out


def flag_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shard_paths(root)}


# --- the tests --------------------------------------------------------------------------------
def test_nothing_of_the_flags_reaches_a_browser_before_login(page, server):
    open_review(page, server)
    expect(page.locator("#review-box")).to_have_count(0)
    assert SECRET not in page.content()
    for path in ("/", "/review", "/config", "/gradio_api/info"):
        with urllib.request.urlopen(server["url"] + path, timeout=10) as r:
            assert SECRET not in r.read().decode(), f"{path} shows flag text before login"

    log_in(page, password="guess")
    expect(page.locator("#review-login-status")).to_contain_text("Wrong username or password")
    expect(page.locator("#review-box")).to_have_count(0)
    assert SECRET not in page.content()

    page.goto(server["url"] + "/")  # the chat page: chat, and no review controls, no link to them
    expect(page.locator("#message textarea")).to_be_visible()
    expect(page.locator("#review-table, #review-username")).to_have_count(0)
    expect(page.get_by_role("link", name="Review")).to_have_count(0)
    assert SECRET not in page.content()


def test_reviewer_accepts_rejects_and_corrects_flags_with_the_keyboard(page, server):
    before = flag_bytes(server["root"])
    open_review(page, server)
    log_in(page)
    expect(page.locator("#review-summary")).to_contain_text("6 of 6 flags match")
    expect(page.locator("#review-meta")).to_contain_text("f5 · revision 1")
    expect(page.locator("#review-meta")).to_contain_text("model m.gguf · 00000000")  # escaped, shown as written
    expect(page.locator("#review-sync")).to_contain_text(server["sync"]["line"])
    expect(page.locator("#review-table")).to_contain_text("Question")
    expect(box(page, "review-password")).to_have_count(0)  # the login form is gone, password and all
    page.locator("#review-meta").click()  # focus on the page, not in a text field

    page.keyboard.press("a")
    expect(page.locator("#review-status")).to_contain_text("Accepted: flag f5")
    expect(page.locator("#review-meta")).to_contain_text("f4")
    expect(page.locator("#review-summary")).to_contain_text("5 of 6 flags match")

    page.keyboard.press("r")
    expect(page.locator("#review-status")).to_contain_text("Rejected: flag f4")
    expect(page.locator("#review-meta")).to_contain_text("f3")
    expect(box(page, "review-correction")).to_have_value("Correction 3.")

    page.keyboard.press("e")
    correction = box(page, "review-correction")
    expect(correction).to_be_focused()
    correction.fill("The capital of Xanadu is Shangdu.")
    correction.press("Control+Enter")
    expect(page.locator("#review-status")).to_contain_text("Accepted with your correction: flag f3")
    expect(page.locator("#review-meta")).to_contain_text("f2")

    page.locator("#review-meta").click()
    page.keyboard.press("n")
    expect(page.locator("#review-meta")).to_contain_text("f1")

    made = decisions(server)
    assert {k: [d.action for d in v] for k, v in made.items()} == {"f5": ["accept"], "f4": ["reject"], "f3": ["accept"]}
    assert made["f5"][0].correction is None and made["f5"][0].reviewer == "ana"
    assert made["f3"][0].correction == "The capital of Xanadu is Shangdu."
    assert made["f5"][0].flag_record_id == server["flags"]["f5"].record_id
    assert flag_bytes(server["root"]) == before  # decisions never edit a flag


def test_filters_narrow_the_table_and_a_row_click_opens_its_flag(page, server):
    ReviewStore(server["root"]).append(  # decided elsewhere before this reviewer logs in
        __import__("schemas.review", fromlist=["ReviewDecision"]).ReviewDecision(
            flag_id="f1", flag_record_id=server["flags"]["f1"].record_id, action="reject", reviewer="bo"))
    open_review(page, server)
    log_in(page)
    expect(page.locator("#review-summary")).to_contain_text("5 of 6 flags match")

    page.locator('#review-filter-thumbs input[name="up"]').check()
    expect(page.locator("#review-summary")).to_contain_text("2 of 6 flags match")  # f5, f3 (f1 is rejected)
    table = page.locator("#review-table")
    expect(table).to_contain_text("f3")
    expect(table).not_to_contain_text("f0")

    page.locator('#review-filter-status input[name="rejected"]').check()
    expect(page.locator("#review-summary")).to_contain_text("3 of 6 flags match")
    table.get_by_text("f1", exact=True).click()
    expect(page.locator("#review-meta")).to_contain_text("f1")
    expect(page.locator("#review-meta")).to_contain_text("rejected by bo")
    expect(box(page, "review-comment")).to_have_value(f"{SECRET} 1")

    box(page, "review-filter-start").fill("2001-02-30")
    box(page, "review-filter-start").press("Enter")
    expect(page.get_by_text("is not a date")).to_be_visible()


def hostile(bait_url: str, where: str) -> str:
    """Text that runs script or fetches ``bait_url`` if a page renders it instead of showing it."""
    return (f'<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> '
            f'![tracker]({bait_url}/{where}-md.png) <img src="{bait_url}/{where}-html.png"> '
            f'[click]({bait_url}/{where}-link) in the {where}')


def test_hostile_user_text_is_shown_as_text_and_loads_nothing(page, server, bait_server):
    at = datetime.now(timezone.utc)
    texts = {w: hostile(bait_server.url, w) for w in ("question", "answer", "comment", "correction", "system", "sync")}
    server["sync"]["line"] = texts["sync"]  # an error message from the Hub, say
    store = FlagStore(server["root"])
    store.save(make_flag(
        flag_id="evil", created_at=at, updated_at=at, system_prompt=texts["system"], comment=texts["comment"],
        correction=texts["correction"], conversation=[ChatMessage(role="user", content=texts["question"]),
                                                      ChatMessage(role="assistant", content=texts["answer"])],
    ))
    store.close()
    open_review(page, server)
    log_in(page)
    expect(page.locator("#review-meta")).to_contain_text("evil")  # the newest pending flag opens first

    expect(box(page, "review-comment")).to_have_value(texts["comment"])
    expect(box(page, "review-correction")).to_have_value(texts["correction"])
    expect(box(page, "review-answer")).to_have_value(texts["answer"])
    expect(box(page, "review-system-prompt")).to_have_value(texts["system"])
    conversation = page.locator("#review-conversation")
    expect(conversation).to_contain_text(texts["question"])
    expect(conversation).to_contain_text(texts["answer"])
    expect(page.locator("#review-table")).to_contain_text("<img src=x onerror=")
    expect(page.locator("#review-sync")).to_contain_text(texts["sync"])

    page.wait_for_function("[...document.images].every(img => img.complete)")
    page.wait_for_timeout(500)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert bait_server.paths == [], "the review page fetched URLs written in user text"
    box_html = page.locator("#review-box")
    assert box_html.locator("img, script").count() == 0
    assert box_html.locator(f'a[href^="{bait_server.url}"]').count() == 0


def sse_events(url: str, session_hash: str, timeout: float = 20) -> list[dict]:
    """The queue's server-sent events for ``session_hash`` until its event completes."""
    events = []
    with urllib.request.urlopen(f"{url}/gradio_api/queue/data?session_hash={session_hash}", timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if events[-1].get("msg") in ("process_completed", "close_stream", "unexpected_error"):
                    break
    return events


def call_without_login(url: str, fn_index: int, data: list) -> list[dict]:
    """Call a dependency the way the page's JavaScript does, from a fresh session that never logged in."""
    session = uuid.uuid4().hex[:11]
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}).encode()
    req = urllib.request.Request(f"{url}/gradio_api/queue/join", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    return sse_events(url, session)


def test_review_endpoints_refuse_a_session_that_never_logged_in(server):
    url = server["url"]
    with urllib.request.urlopen(f"{url}/config", timeout=10) as r:
        config = json.load(r)
    fns = {d["api_name"]: d for d in config["dependencies"] if d.get("api_name")}
    with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=10) as r:
        listed = json.dumps(json.load(r))
    for name in ("refresh", "accept", "reject", "select", "login"):
        assert name in fns and fns[name]["api_visibility"] == "private"
        assert f'"/{name}"' not in listed, f"/{name} is listed in the API page"

    flag = server["flags"]["f5"]
    current = {"flag_id": "f5", "record_id": flag.record_id, "baseline": "Correction 5."}
    filters = [[], ["pending"], [], [], "", ""]
    calls = {
        "refresh": [None, None, *filters],
        "accept": [None, current, "Correction 5.", "", *filters],
        "reject": [None, current, "", "", *filters],
    }
    for name, data in calls.items():
        events = call_without_login(url, fns[name]["id"], data)
        done = events[-1]
        assert done["msg"] == "process_completed" and done["success"] is False, (name, events)
        assert "Log in as a reviewer" in json.dumps(done), (name, done)
        assert SECRET not in json.dumps(events) and "Question" not in json.dumps(events), name
    assert read_reviews(server["root"]).decisions == []

    events = call_without_login(url, fns["login"]["id"], ["ana", "guess", *filters])
    assert events[-1]["success"] is True and SECRET not in json.dumps(events)
    assert re.search(r"Wrong username or password", json.dumps(events))
