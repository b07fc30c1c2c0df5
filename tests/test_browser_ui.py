"""Browser tests: a real headless Chromium, driven by Playwright, against the real app and model.

They check what a person sees and does: chat, flag from the panel or the thumbs buttons, the
records that land on disk, that hostile text is shown as text, and that clearing starts afresh.
Chromium is Debian's (`make browser`); Playwright's own browser download is never used.
"""

from __future__ import annotations

import re

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

from feedback.reader import latest_flags, shard_paths  # noqa: E402
from schemas.flag import GenerationSettings  # noqa: E402
from tests.browser import CHROMIUM, bait_server, browser  # noqa: E402,F401 (fixtures)

MAX_NEW_TOKENS = 16  # short answers keep each turn well under a second on 2 CPU threads
SEED = 11  # a fixed seed: the same prompt gets the same answer on every run
ANSWER_MS = 60_000  # the longest an answer may take (a slow, busy machine)
STEP_MS = 10_000  # the longest any other step may take
PROMPT = "What is the capital of France?"

BOT = '#chatbot [data-testid="bot"]'
USER = '#chatbot [data-testid="user"]'
ANSWER_PICKER = "#flag-answer input"
COMMENT = "#flag-comment textarea"
CORRECTION = "#flag-correction textarea"
STATUS = "#flag-status"
THUMBS_DOWN = '#flag-thumbs input[value="👎 down"]'
THUMBS_NONE = '#flag-thumbs input[value="none"]'

# The save confirmations, loosely: their wording may change, their meaning may not.
SAVED_FIRST = re.compile(r"Saved\b.*answer #1")
UPDATED_SECOND = re.compile(r"Updated\b.*revision 2")

expect.set_options(timeout=STEP_MS)


@pytest.fixture
def page(browser, app_server, tmp_path, request):
    """The app's page, loaded; a screenshot lands in tmp_path if the test fails."""
    failed_before = request.session.testsfailed
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    context.set_default_timeout(STEP_MS)
    page = context.new_page()
    page.goto(app_server.url)
    expect(page.locator("#message textarea")).to_be_visible()
    yield page
    if request.session.testsfailed > failed_before:
        shot = tmp_path / "failure.png"
        page.screenshot(path=shot, full_page=True)
        print(f"screenshot of the failed page: {shot}; app log: {app_server.log}")
    context.close()


# --- what a user does ------------------------------------------------------------------------
def set_generation(page, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = SEED) -> None:
    """Open the Generation accordion and type the max-new-tokens and seed values."""
    page.get_by_role("button", name="Generation").click()
    tokens = page.locator('input[aria-label="number input for Max new tokens"]')
    seed_box = page.locator('input[aria-label="Seed (-1: random)"]')
    # The accordion mounts its fields when it is first opened, and each field's binding then writes
    # its initial value into it: a value typed in before that is overwritten (a flag then recorded
    # max_new_tokens 256; 4 of 30 page loads did so here). Their initial values showing means the
    # bindings ran.
    defaults = GenerationSettings()
    expect(tokens).to_have_value(str(defaults.max_new_tokens))
    expect(seed_box).to_have_value(str(defaults.seed))
    tokens.fill(str(max_new_tokens))
    tokens.press("Enter")
    seed_box.fill(str(seed))
    seed_box.press("Tab")


def chat(page, text: str) -> str:
    """Send the first message of a conversation with Enter; wait for the whole streamed answer.

    Returns the answer as the flag panel's correction box shows it (the model's exact text).
    """
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(BOT)).to_have_count(1, timeout=ANSWER_MS)
    expect(page.locator(BOT)).not_to_have_text("", timeout=ANSWER_MS)
    # The stream's last update empties the textbox and points the flag panel at the new answer.
    expect(page.locator(ANSWER_PICKER)).to_have_value(re.compile(r"^#1 · "), timeout=ANSWER_MS)
    expect(box).to_have_value("")
    return page.locator(CORRECTION).input_value()


def words(text: str) -> str:
    """The words of ``text``, ignoring markdown punctuation and spacing (for shown-vs-stored checks)."""
    return " ".join(re.findall(r"\w+", text))


def flags_on_disk(app_server):
    """(latest revision of each flag, number of lines written) in the app's feedback folder."""
    latest = latest_flags(app_server.feedback_dir)
    assert not latest.bad, latest.bad
    lines = sum(len(p.read_bytes().splitlines()) for p in shard_paths(app_server.feedback_dir))
    return latest.records, lines


# --- the tests ------------------------------------------------------------------------------
def test_user_chats_and_flags_an_answer_in_the_browser(page, app_server):
    set_generation(page)
    answer = chat(page, PROMPT)
    assert answer.strip(), "the model's answer is empty"
    assert words(page.locator(BOT).inner_text()) == words(answer)

    page.locator('#flag-reasons input[name="incorrect"]').check()
    page.locator('#flag-reasons input[name="incomplete"]').check()
    page.locator(COMMENT).fill("It never names the city.")
    correction = "The capital of France is Paris."
    page.locator(CORRECTION).fill(correction)
    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_have_text(SAVED_FIRST)

    records, lines = flags_on_disk(app_server)
    assert lines == 1
    (record,) = records.values()
    assert record.reasons == ["incorrect", "incomplete"]
    assert record.comment == "It never names the city."
    assert record.correction == correction
    assert record.answer == answer
    assert record.conversation[0].content == PROMPT
    assert record.thumbs is None
    assert record.revision == 1
    assert record.generation.max_new_tokens == MAX_NEW_TOKENS and record.generation.seed == SEED
    assert record.flag_id in page.locator(STATUS).inner_text()

    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_contain_text("nothing changed")
    records, lines = flags_on_disk(app_server)
    assert lines == 1 and list(records.values())[0].record_id == record.record_id


def test_thumbs_down_on_a_message_saves_a_flag(page, app_server):
    set_generation(page)
    answer = chat(page, PROMPT)
    expect(page.locator(THUMBS_NONE)).to_be_checked()

    page.locator("#chatbot .bot-row + .message-buttons").get_by_role("button", name="Dislike").click()
    expect(page.locator(STATUS)).to_have_text(SAVED_FIRST)
    expect(page.locator(THUMBS_DOWN)).to_be_checked()
    expect(page.locator('#chatbot button[aria-label="Disliked"]')).to_have_count(1)
    records, lines = flags_on_disk(app_server)
    assert lines == 1
    (first,) = records.values()
    assert first.thumbs == "down" and first.reasons == [] and first.answer == answer

    page.locator('#flag-reasons input[name="unhelpful"]').check()
    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_have_text(UPDATED_SECOND)
    records, lines = flags_on_disk(app_server)
    assert lines == 2
    (second,) = records.values()
    assert second.flag_id == first.flag_id and second.revision == 2
    assert second.thumbs == "down"
    assert second.reasons == ["unhelpful"]
    assert second.correction is None  # the prefilled answer, unedited, is not a correction


def hostile_text(bait_url: str, where: str) -> str:
    """Text that runs script or fetches ``bait_url`` if a page renders it instead of showing it."""
    return (
        f'<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> '
        f"![tracker]({bait_url}/{where}-markdown.png) "
        f'<img src="{bait_url}/{where}-html.png"> in the {where}'
    )


def test_user_html_is_shown_escaped_and_never_runs(page, app_server, bait_server):
    set_generation(page)
    message = hostile_text(bait_server.url, "message")
    chat(page, message)
    comment = hostile_text(bait_server.url, "comment")
    correction = hostile_text(bait_server.url, "correction")
    page.locator(COMMENT).fill(comment)
    page.locator(CORRECTION).fill(correction)
    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_have_text(SAVED_FIRST)

    # Reload the panel from the store: blank the comment, then pick the answer again.
    page.locator(COMMENT).fill("")
    page.locator(ANSWER_PICKER).click()
    page.locator('[data-testid="dropdown-option"]').first.click()
    expect(page.locator(STATUS)).to_have_text(re.compile(r"saved flag\b.*revision 1"))
    expect(page.locator(COMMENT)).to_have_value(comment)
    expect(page.locator(CORRECTION)).to_have_value(correction)

    page.wait_for_function("[...document.images].every(img => img.complete)")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert bait_server.paths == [], "the page fetched URLs written in user text"
    assert page.locator(f"{USER} img, {USER} script").count() == 0
    expect(page.locator(USER)).to_contain_text(message)

    (record,) = flags_on_disk(app_server)[0].values()
    assert record.conversation[0].content == message
    assert record.comment == comment and record.correction == correction


def assert_chat_and_panel_empty(page) -> None:
    """Nothing of the previous conversation is left on the page."""
    expect(page.locator(f"{USER}, {BOT}")).to_have_count(0)
    expect(page.locator(ANSWER_PICKER)).to_have_value("")
    expect(page.locator(COMMENT)).to_have_value("")
    expect(page.locator(CORRECTION)).to_have_value("")
    expect(page.locator('#flag-reasons input:checked')).to_have_count(0)
    expect(page.locator(THUMBS_NONE)).to_be_checked()
    expect(page.locator(STATUS)).to_have_text("")
    expect(page.locator('#chatbot button[aria-label="Disliked"], #chatbot button[aria-label="Liked"]')).to_have_count(0)


def assert_next_turn_starts_a_new_conversation(page, app_server) -> None:
    """The server forgot the old turns too: the next answer is #1 of a new conversation."""
    page.locator("#flag-save").click()
    expect(page.get_by_text("Pick an answer to flag first")).to_be_visible()
    chat(page, "Name a colour.")
    expect(page.locator(USER)).to_have_count(1)
    expect(page.locator(USER)).to_have_text("Name a colour.")
    page.locator(ANSWER_PICKER).click()
    expect(page.locator('[data-testid="dropdown-option"]')).to_have_count(1)
    page.keyboard.press("Escape")
    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_have_text(SAVED_FIRST)
    records, _ = flags_on_disk(app_server)
    conversations = {r.conversation_id for r in records.values()}
    assert len(records) == 2 and len(conversations) == 2
    newest = max(records.values(), key=lambda r: r.created_at)
    assert [(m.role, m.content) for m in newest.conversation][:1] == [("user", "Name a colour.")]
    assert len(newest.conversation) == 2  # the cleared turns are not in the new flag either


def flag_first_answer(page) -> None:
    """Chat once and save a flag on the answer, so there is something to clear."""
    set_generation(page)
    chat(page, PROMPT)
    page.locator('#flag-reasons input[name="other"]').check()
    page.locator(COMMENT).fill("before clearing")
    page.locator("#flag-save").click()
    expect(page.locator(STATUS)).to_have_text(SAVED_FIRST)


def test_clear_conversation_empties_the_chat_and_the_flag_panel(page, app_server):
    flag_first_answer(page)
    page.locator("#clear").click()
    assert_chat_and_panel_empty(page)
    assert_next_turn_starts_a_new_conversation(page, app_server)


def test_chatbot_trash_icon_clears_the_conversation_like_the_clear_button(page, app_server):
    flag_first_answer(page)
    page.locator("#chatbot").get_by_role("button", name="Clear").click()
    assert_chat_and_panel_empty(page)
    assert_next_turn_starts_a_new_conversation(page, app_server)
