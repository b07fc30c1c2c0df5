"""Review data and handlers: the decision store, the fast flag index, the table's filters, the plots'
data, who may review, and the review page's handlers called as plain functions (no browser)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import gradio as gr
import pytest
from pydantic import SecretStr

import feedback.store as store_mod
from feedback.plots import flags_per_day_by_reason, flags_per_model_version, status_share
from feedback.reader import latest_flags, shard_paths
from feedback.review_table import (
    NO_REASON,
    Filters,
    FlagIndex,
    filter_rows,
    next_pending,
    review_rows,
    table_view,
)
from feedback.reviews import ReviewStore, read_reviews, review_shard_paths
from feedback.store import FlagStore
from schemas.flag import ChatMessage
from schemas.review import ReviewDecision
from schemas.settings import Settings
from space.review import (
    SCREEN,
    ReviewApp,
    Reviewer,
    allowed,
    chat_message,
    check_password,
    current_reviewer,
    md_text,
    oauth_enabled,
)
from tests.records import MODEL, make_flag

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
FILTERS_ANY = ([], [], [], [], "", "")  # reasons, statuses, models, thumbs, start, end: no filter
PENDING = ([], ["pending"], [], [], "", "")


def decision(flag, action="accept", at=None, **kw) -> ReviewDecision:
    return ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action=action, reviewer="ana",
                          created_at=at or datetime.now(timezone.utc), **kw)


def flag_bytes(root) -> dict:
    return {p.name: p.read_bytes() for p in shard_paths(root)}


def rows_of(root, decisions=None):
    index = FlagIndex(root)
    index.refresh()
    return review_rows(index.frame(), decisions if decisions is not None else ReviewStore(root).latest())


# --- ReviewStore --------------------------------------------------------------------------------
def test_decision_is_on_disk_before_append_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    d = ReviewStore(tmp_path).append(decision(make_flag()))
    assert synced, "append returned without an fsync"
    assert [r.decision_id for r in read_reviews(tmp_path).decisions] == [d.decision_id]
    assert all(p.name.startswith("reviews-") for p in review_shard_paths(tmp_path))


def test_latest_decision_wins_and_survives_a_restart(tmp_path):
    flag = make_flag()
    store = ReviewStore(tmp_path)
    store.append(decision(flag, "accept", T0))
    store.append(decision(flag, "reject", T0 + timedelta(minutes=1)))
    store.append(decision(flag, "accept", T0 - timedelta(days=1)))  # late to arrive, but older: loses
    assert store.get(flag.flag_id).action == "reject"
    assert ReviewStore(tmp_path).get(flag.flag_id).action == "reject"
    assert len(read_reviews(tmp_path).decisions) == 3  # append-only: every decision stays


def test_decisions_never_touch_the_flag_shards(tmp_path):
    flags = FlagStore(tmp_path)
    flag = flags.save(make_flag())
    flags.close()
    before = flag_bytes(tmp_path)
    ReviewStore(tmp_path).append(decision(flag, "accept", correction="Shangdu."))
    assert flag_bytes(tmp_path) == before
    assert latest_flags(tmp_path).records[flag.flag_id] == flag


def test_a_torn_decision_line_is_reported_and_the_rest_read(tmp_path):
    store = ReviewStore(tmp_path)
    kept = store.append(decision(make_flag()))
    store.close()
    (shard,) = review_shard_paths(tmp_path)
    with open(shard, "ab") as f:
        f.write(decision(make_flag()).model_dump_json().encode()[:40])
    result = read_reviews(tmp_path)
    assert [d.decision_id for d in result.decisions] == [kept.decision_id]
    assert [(b.line, b.torn) for b in result.bad] == [(2, True)]


def test_refresh_sees_decisions_another_process_wrote_and_only_whole_lines(tmp_path):
    flag = make_flag()
    mine, theirs = ReviewStore(tmp_path), ReviewStore(tmp_path)
    mine.append(decision(flag, "accept", T0))
    theirs.append(decision(flag, "reject", T0 + timedelta(seconds=1)))
    assert mine.get(flag.flag_id).action == "accept"
    assert mine.refresh()[flag.flag_id].action == "reject"
    other = make_flag()
    line = (decision(other, "accept", T0).model_dump_json() + "\n").encode()
    shard = next(p for p in review_shard_paths(tmp_path) if p.read_bytes().count(b"\n") == 1
                 and b"reject" in p.read_bytes())
    with open(shard, "ab") as f:
        f.write(line[:20])  # being written
    assert other.flag_id not in mine.refresh()
    with open(shard, "ab") as f:
        f.write(line[20:])
    assert mine.refresh()[other.flag_id].action == "accept"


# --- the fast flag index ------------------------------------------------------------------------
def write_lines(path, *lines: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(b"".join(lines))


def test_fast_index_keeps_the_same_revisions_as_the_validating_reader(tmp_path):
    store = FlagStore(tmp_path, max_bytes=4096)  # several shards
    for i in range(12):
        store.save(make_flag(flag_id=f"f{i % 5}", comment=f"save {i}"))  # revisions 1..3 of five flags
    store.close()
    # Same revision twice: the later save time wins, whatever the timestamps' spelling.
    a = make_flag(flag_id="tie", revision=2, updated_at=datetime(2026, 1, 1, 0, 0, 5, tzinfo=timezone.utc))
    b = make_flag(flag_id="tie", revision=2, updated_at=datetime(2026, 1, 1, 0, 0, 5, 500000, tzinfo=timezone.utc))
    extra = tmp_path / "flags" / "flags-20260101-other-1-1.jsonl"
    unknown_reason = make_flag(flag_id="bad").model_dump_json().replace('"incorrect"', '"nope"')
    write_lines(extra, (b.model_dump_json() + "\n").encode(), (a.model_dump_json() + "\n").encode(),
                b'{"not": "a flag"}\n', (unknown_reason + "\n").encode(), b"   \n",
                make_flag(flag_id="torn").model_dump_json().encode()[:50])

    index = FlagIndex(tmp_path)
    index.refresh()
    slow = latest_flags(tmp_path)
    frame = index.frame()
    assert dict(zip(frame["flag_id"], frame["record_id"])) == {k: r.record_id for k, r in slow.records.items()}
    assert dict(zip(frame["flag_id"], frame["revision"])) == {k: r.revision for k, r in slow.records.items()}
    assert index.record("tie").record_id == b.record_id
    assert {(x.file, x.line) for x in index.bad} == {(x.file, x.line) for x in slow.bad if not x.torn}
    assert {x.line for x in index.bad} == {3, 4}


def test_index_refresh_reads_only_whole_appended_lines(tmp_path):
    shard = tmp_path / "flags" / "flags-20260101-h-1-1.jsonl"
    first, second = make_flag(), make_flag()
    write_lines(shard, (first.model_dump_json() + "\n").encode())
    index = FlagIndex(tmp_path)
    assert index.refresh() and len(index) == 1
    line = (second.model_dump_json() + "\n").encode()
    write_lines(shard, line[:30])  # a line being written
    assert not index.refresh() and len(index) == 1
    write_lines(shard, line[30:])
    assert index.refresh() and len(index) == 2
    assert not index.refresh()
    assert index.record(second.flag_id) == second


def test_index_reads_everything_again_when_shards_are_replaced(tmp_path):
    store = FlagStore(tmp_path)
    store.save(make_flag(flag_id="gone"))
    store.close()
    index = FlagIndex(tmp_path)
    index.refresh()
    for p in shard_paths(tmp_path):
        p.unlink()
    new = (make_flag(flag_id="new").model_dump_json() + "\n").encode()
    write_lines(tmp_path / "flags" / "flags-20260102-h-1-1.jsonl", new)
    index.refresh()
    assert index.frame()["flag_id"].tolist() == ["new"]


def test_table_texts_are_previews_of_the_question_answer_and_comment(tmp_path):
    flag = make_flag(conversation=[
        ChatMessage(role="user", content="first question"), ChatMessage(role="assistant", content="first answer"),
        ChatMessage(role="user", content="second\n\nquestion " + "x" * 200),
        ChatMessage(role="assistant", content="Paris."),
    ], comment="too\nshort")
    store = FlagStore(tmp_path)
    store.save(flag)
    index = FlagIndex(tmp_path)
    index.refresh()
    rows = review_rows(index.frame(), {})
    view = table_view(rows, index.texts([flag.flag_id]))
    row = view.iloc[0]
    assert row["question"].startswith("second question xx") and row["question"].endswith("…")
    assert len(row["question"]) == 80
    assert (row["answer"], row["comment"], row["status"]) == ("Paris.", "too short", "pending")
    assert row["reasons"] == "incorrect, hallucinated" and row["thumbs"] == "down"


# --- statuses and filters -----------------------------------------------------------------------
def test_status_is_the_latest_decision_on_the_revision_shown(tmp_path):
    store = FlagStore(tmp_path)
    accepted, rejected, untouched, changed = (store.save(make_flag(flag_id=n)) for n in ("acc", "rej", "none", "chg"))
    reviews = ReviewStore(tmp_path)
    reviews.append(decision(accepted, "reject", T0))
    reviews.append(decision(accepted, "accept", T0 + timedelta(hours=1)))
    reviews.append(decision(rejected, "reject", T0))
    reviews.append(decision(changed, "accept", T0))
    store.save(make_flag(flag_id="chg", comment="changed after the review"))  # revision 2
    rows = rows_of(tmp_path).set_index("flag_id")
    assert rows.loc["acc", "status"] == "accepted" and rows.loc["rej", "status"] == "rejected"
    assert rows.loc["none", "status"] == "pending" and rows.loc["chg", "status"] == "pending"
    assert rows["changed_since_review"].to_dict() == {"acc": False, "rej": False, "none": False, "chg": True}
    assert rows.loc["acc", "reviewer"] == "ana" and rows.loc["none", "reviewer"] == ""


@pytest.fixture
def varied(tmp_path):
    """Six flags differing in reason, thumbs, model version and day; one accepted, one rejected."""
    store = FlagStore(tmp_path)
    v2 = MODEL.model_copy(update={"version": "v2"})
    specs = {
        "a": dict(reasons=["incorrect"], thumbs="down", created_at=T0),
        "b": dict(reasons=["unsafe", "offensive"], thumbs="down", created_at=T0 + timedelta(days=1), model=v2),
        "c": dict(reasons=[], thumbs="up", created_at=T0 + timedelta(days=2)),
        "d": dict(reasons=["incorrect", "formatting"], thumbs=None, created_at=T0 + timedelta(days=2, hours=11),
                  model=v2),
        "e": dict(reasons=["other"], thumbs=None, created_at=T0 + timedelta(days=3)),
        "f": dict(reasons=[], thumbs="down", created_at=T0 + timedelta(days=5)),
    }
    flags = {k: store.save(make_flag(flag_id=k, updated_at=v["created_at"], **v)) for k, v in specs.items()}
    reviews = ReviewStore(tmp_path)
    reviews.append(decision(flags["a"], "accept"))
    reviews.append(decision(flags["b"], "reject"))
    return tmp_path, rows_of(tmp_path)


def kept(rows, **filters) -> set[str]:
    return set(filter_rows(rows, Filters.of(**filters))["flag_id"])


def test_each_filter_keeps_exactly_its_flags(varied):
    _, rows = varied
    assert kept(rows) == set("abcdef")
    assert kept(rows, reasons=["incorrect"]) == {"a", "d"}
    assert kept(rows, reasons=["unsafe", "other"]) == {"b", "e"}
    assert kept(rows, reasons=[NO_REASON]) == {"c", "f"}
    assert kept(rows, statuses=["pending"]) == set("cdef")
    assert kept(rows, statuses=["accepted", "rejected"]) == {"a", "b"}
    assert kept(rows, model_versions=["v2"]) == {"b", "d"}
    assert kept(rows, thumbs=["down"]) == {"a", "b", "f"}
    assert kept(rows, thumbs=["none", "up"]) == {"c", "d", "e"}


def test_date_range_includes_both_whole_utc_days(varied):
    _, rows = varied
    day = T0.date()
    assert kept(rows, start=day + timedelta(days=2), end=day + timedelta(days=2)) == {"c", "d"}
    assert kept(rows, start=str(day + timedelta(days=3))) == {"e", "f"}
    assert kept(rows, end=f"{day}") == {"a"}
    assert kept(rows, start=datetime.combine(day, datetime.min.time()).timestamp() + 86400) == set("bcdef")


def test_filters_combine(varied):
    _, rows = varied
    assert kept(rows, reasons=["incorrect"], statuses=["pending"], model_versions=["v2"], thumbs=["none"],
                start=T0.date(), end=T0.date() + timedelta(days=4)) == {"d"}


@pytest.mark.parametrize("given, message", [
    (dict(reasons=["bad-vibes"]), "unknown reason"),
    (dict(statuses=["maybe"]), "unknown status"),
    (dict(thumbs=["sideways"]), "unknown thumbs"),
    (dict(start="yesterday"), "YYYY-MM-DD"),
    (dict(start="2026-03-05", end="2026-03-01"), "after the end date"),
])
def test_bad_filter_values_are_refused_with_what_to_do(given, message):
    with pytest.raises(ValueError, match=message):
        Filters.of(**given)


def test_next_pending_goes_down_the_list_and_wraps(varied):
    _, rows = varied  # newest first: f e d c b a; a and b are decided
    assert next_pending(rows, None) == "f"
    assert next_pending(rows, "f") == "e"
    assert next_pending(rows, "c") == "f"  # nothing pending below c: back to the top
    assert next_pending(rows, "b") == "f"
    only = filter_rows(rows, Filters.of(reasons=["other"]))
    assert next_pending(only, "e") is None


# --- plots --------------------------------------------------------------------------------------
def test_plot_data_counts_flags_per_day_reason_status_and_model(varied):
    _, rows = varied
    per_day = flags_per_day_by_reason(rows)
    counts = {(r.day, r.reason): r.flags for r in per_day.itertuples()}
    day = lambda n: str(T0.date() + timedelta(days=n))  # noqa: E731
    assert counts == {
        (day(0), "incorrect"): 1, (day(1), "unsafe"): 1, (day(1), "offensive"): 1, (day(2), NO_REASON): 1,
        (day(2), "incorrect"): 1, (day(2), "formatting"): 1, (day(3), "other"): 1, (day(5), NO_REASON): 1,
    }
    share = status_share(rows).set_index("status")
    assert share["flags"].to_dict() == {"pending": 4, "accepted": 1, "rejected": 1}
    assert share.loc["pending", "share"] == pytest.approx(66.7)
    per_model = {(r.model, r.status): r.flags for r in flags_per_model_version(rows).itertuples()}
    plain = "m.gguf · 00000000"
    assert per_model == {("v2", "pending"): 1, ("v2", "rejected"): 1, (plain, "pending"): 3, (plain, "accepted"): 1}


def test_plots_of_no_flags_are_empty_frames(tmp_path):
    rows = rows_of(tmp_path)
    assert len(flags_per_day_by_reason(rows)) == 0 and list(flags_per_day_by_reason(rows)) == ["day", "reason", "flags"]
    assert status_share(rows)["flags"].tolist() == [0, 0, 0]
    assert len(flags_per_model_version(rows)) == 0


# --- who may review -----------------------------------------------------------------------------
def test_reviewers_and_allowlist_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLAGLOOP_REVIEWERS", '{"ana": "s3cret", "bo": "pw"}')
    monkeypatch.setenv("FLAGLOOP_REVIEWER_ALLOWLIST", "Ana-HF, bo ")
    s = Settings()
    assert s.reviewers["ana"].get_secret_value() == "s3cret" and set(s.reviewers) == {"ana", "bo"}
    assert s.reviewer_allowlist == ["Ana-HF", "bo"]
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    monkeypatch.setenv("FLAGLOOP_REVIEWER_ALLOWLIST", '["x", "y"]')
    assert Settings().reviewer_allowlist == ["x", "y"]


def test_password_check_accepts_only_the_configured_pair():
    reviewers = {"ana": SecretStr("s3cret")}
    assert check_password(reviewers, "ana", "s3cret") == Reviewer("ana", "password")
    assert check_password(reviewers, " ana ", "s3cret") == Reviewer("ana", "password")
    for user, pw in (("ana", "wrong"), ("ana", ""), ("ana", None), ("bo", "s3cret"), (None, None), ("", "")):
        assert check_password(reviewers, user, pw) is None


def test_allowlist_check_ignores_case_and_refuses_everyone_else():
    assert allowed("ana-hf", ["Ana-HF"]) and allowed("ANA-HF", ["ana-hf"])
    assert not allowed("mallory", ["Ana-HF"]) and not allowed(None, ["Ana-HF"]) and not allowed("", [""])
    assert not allowed("ana-hf", [])


def test_oauth_is_offered_only_on_a_space_with_an_allowlist():
    assert oauth_enabled(Settings(reviewer_allowlist=["ana"]), space_id="me/flagloop")
    assert not oauth_enabled(Settings(reviewer_allowlist=["ana"]), space_id=None)
    assert not oauth_enabled(Settings(), space_id="me/flagloop")


class Profile:
    def __init__(self, username):
        self.username = username


def test_the_session_reviewer_is_checked_again_on_every_call():
    s = Settings(reviewers={"ana": "pw"}, reviewer_allowlist=["hf-ana"])
    assert current_reviewer(Reviewer("ana", "password"), None, s) == Reviewer("ana", "password")
    assert current_reviewer(Reviewer("bo", "password"), None, s) is None  # not (or no longer) configured
    assert current_reviewer(Reviewer("hf-ana", "oauth"), Profile("hf-ana"), s) == Reviewer("hf-ana", "oauth")
    assert current_reviewer(Reviewer("hf-ana", "oauth"), None, s) is None  # logged out of Hugging Face
    assert current_reviewer(Reviewer("hf-ana", "oauth"), Profile("mallory"), s) is None
    assert current_reviewer(Reviewer("mallory", "oauth"), Profile("mallory"), s) is None
    for forged in (None, "ana", {"name": "ana", "via": "password"}):
        assert current_reviewer(forged, None, s) is None


# --- the page's handlers, without a browser -----------------------------------------------------
@pytest.fixture
def review(varied):
    root, _ = varied
    app = ReviewApp(Settings(feedback_dir=root, reviewers={"ana": "pw"}), page_rows=4)
    yield app
    app.close()


def screen(values) -> dict:
    assert len(values) == len(SCREEN)
    return dict(zip(SCREEN, values))


def logged_in(app, filters=PENDING) -> dict:
    return screen(app.login("ana", "pw", *filters))


def test_a_wrong_password_shows_no_flag(review):
    s = screen(review.login("ana", "nope", *FILTERS_ANY))
    assert s["reviewer"] is None and s["review_box"]["visible"] is False and s["login_box"]["visible"] is True
    assert len(s["table"]) == 0 and s["conversation"] == [] and s["current"] is None and s["answer"] == ""
    assert "Wrong username or password" in s["login_status"]


def test_logins_pause_after_repeated_wrong_passwords(varied):
    now = [1000.0]
    app = ReviewApp(Settings(feedback_dir=varied[0], reviewers={"ana": "pw"}), clock=lambda: now[0])
    for _ in range(5):
        assert "Wrong username or password" in screen(app.login("ana", "guess", *PENDING))["login_status"]
    s = screen(app.login("ana", "pw", *PENDING))  # even the right password, for a while
    assert s["reviewer"] is None and "Too many wrong passwords" in s["login_status"] and len(s["table"]) == 0
    now[0] += 301
    assert screen(app.login("ana", "pw", *PENDING))["reviewer"] == Reviewer("ana", "password")
    app.close()


def test_logout_empties_the_page(review):
    logged_in(review)
    s = screen(review.logout(Reviewer("ana", "password")))
    assert s["reviewer"] is None and s["review_box"]["visible"] is False and len(s["table"]) == 0
    assert s["conversation"] == [] and s["answer"] == "" and s["per_day"] is None


def test_login_shows_the_table_and_opens_the_newest_pending_flag(review):
    s = logged_in(review)
    assert s["reviewer"] == Reviewer("ana", "password") and s["review_box"]["visible"] is True
    assert s["table"]["flag"].tolist() == ["f", "e", "d", "c"]  # pending, newest first, page of 4
    assert "**4** of 6 flags match" in s["summary"]
    assert s["current"]["flag_id"] == "f" and s["answer"] == "It is Paris."
    assert s["correction"] == "The capital of Xanadu is Shangdu."
    assert [m["role"] for m in s["conversation"]] == ["user", "assistant"]
    assert sorted(s["models"]["choices"]) == ["m.gguf · 00000000", "v2"]
    assert s["share"].set_index("status")["flags"].to_dict() == {"pending": 4, "accepted": 1, "rejected": 1}


@pytest.mark.parametrize("forged", [None, "ana", {"name": "ana"}])
def test_every_handler_refuses_a_session_without_a_reviewer_login(review, forged):
    current = {"flag_id": "f", "record_id": "x", "baseline": ""}
    before = read_reviews(review.root).decisions
    calls = [
        lambda: review.refresh(forged, current, *FILTERS_ANY),
        lambda: review.show(forged, "f", *FILTERS_ANY),
        lambda: review.skip(forged, current, *FILTERS_ANY),
        lambda: review.accept(forged, current, "", "", *FILTERS_ANY),
        lambda: review.accept_edited(forged, current, "edited", "", *FILTERS_ANY),
        lambda: review.reject(forged, current, "", "", *FILTERS_ANY),
        lambda: review.select(forged, *FILTERS_ANY, gr.SelectData(None, {"index": [0, 0], "value": "f",
                                                                          "row_value": ["f"]})),
    ]
    for call in calls:
        with pytest.raises(gr.Error, match="Log in as a reviewer"):
            call()
    assert read_reviews(review.root).decisions == before
    s = screen(review.oauth_login(forged, *FILTERS_ANY, profile=None))  # the page load shows nothing either
    assert s["review_box"]["visible"] is False and len(s["table"]) == 0


def test_accept_reject_and_edit_then_accept_append_decisions_and_go_to_the_next_pending(review):
    before = flag_bytes(review.root)
    s = logged_in(review)
    me = s["reviewer"]
    f_record = s["current"]["record_id"]

    s = screen(review.accept(me, s["current"], s["correction"], "looks right", *PENDING))
    assert "Accepted" in s["status"] and s["current"]["flag_id"] == "e"
    assert "**3** of 6 flags match" in s["summary"] and "f" not in s["table"]["flag"].tolist()

    s = screen(review.reject(me, s["current"], s["correction"], "", *PENDING))
    assert "Rejected" in s["status"] and s["current"]["flag_id"] == "d"

    edited = "The capital of Xanadu is Shangdu (Xanadu), in Inner Mongolia."
    s = screen(review.accept_edited(me, s["current"], edited, "", *PENDING))
    assert "your correction" in s["status"] and s["current"]["flag_id"] == "c"

    latest = ReviewStore(review.root).latest()
    assert {k: d.action for k, d in latest.items()} == {"a": "accept", "b": "reject", "f": "accept", "e": "reject",
                                                       "d": "accept"}
    assert latest["f"].flag_record_id == f_record and latest["f"].correction is None
    assert latest["f"].note == "looks right" and latest["f"].reviewer == "ana"
    assert latest["e"].correction is None and latest["d"].correction == edited
    assert flag_bytes(review.root) == before  # decisions never edit a flag


def test_a_later_decision_replaces_the_earlier_one(review):
    me = logged_in(review)["reviewer"]
    s = screen(review.show(me, "a", *FILTERS_ANY))
    assert "accepted" in s["meta"]
    s = screen(review.reject(me, s["current"], s["correction"], "", *FILTERS_ANY))
    rows = rows_of(review.root).set_index("flag_id")
    assert rows.loc["a", "status"] == "rejected"
    assert len([d for d in read_reviews(review.root).decisions if d.flag_id == "a"]) == 2


def test_unsaved_edits_are_never_lost_or_silently_accepted(review):
    s = logged_in(review)
    me, current = s["reviewer"], s["current"]
    before = read_reviews(review.root).decisions
    with pytest.raises(gr.Error, match="Accept edited"):
        review.accept(me, current, "my unsaved edit", "", *PENDING)
    with pytest.raises(gr.Error, match="unchanged"):
        review.accept_edited(me, current, current["baseline"], "", *PENDING)
    with pytest.raises(gr.Error, match="limit"):
        review.accept_edited(me, current, "x" * 9000, "", *PENDING)
    assert read_reviews(review.root).decisions == before


def test_an_edited_correction_shows_as_the_flags_correction_afterwards(review):
    me = logged_in(review)["reviewer"]
    s = screen(review.show(me, "c", *FILTERS_ANY))
    s = screen(review.accept_edited(me, s["current"], "Better answer.", "", *FILTERS_ANY))
    s = screen(review.show(me, "c", *FILTERS_ANY))
    assert s["correction"] == "Better answer." and s["current"]["baseline"] == "Better answer."
    assert "with an edited correction" in s["meta"]
    s = screen(review.accept(me, s["current"], "Better answer.", "", *FILTERS_ANY))  # re-accepting keeps the edit
    assert ReviewStore(review.root).get("c").correction == "Better answer."


def test_skip_moves_on_without_deciding(review):
    s = logged_in(review)
    s = screen(review.skip(s["reviewer"], s["current"], *PENDING))
    assert s["current"]["flag_id"] == "e" and len(read_reviews(review.root).decisions) == 2


def test_flags_saved_after_login_appear_on_refresh(review):
    s = logged_in(review)
    store = FlagStore(review.root)
    store.save(make_flag(flag_id="late", created_at=T0 + timedelta(days=9), updated_at=T0 + timedelta(days=9)))
    s = screen(review.refresh(s["reviewer"], s["current"], *PENDING))
    assert s["table"]["flag"].tolist()[0] == "late" and s["current"]["flag_id"] == "f"


def test_reviewers_see_the_hub_sync_status_escaped(varied):
    line = "Hub sync to me/fb: 3 records pending; last error: <b>503</b> from https://hub"
    app = ReviewApp(Settings(feedback_dir=varied[0], reviewers={"ana": "pw"}), sync_status=lambda: line)
    s = screen(app.login("ana", "pw", *PENDING))
    assert "3 records pending" in s["sync"] and "<b>" not in s["sync"] and "&lt;b&gt;503" in s["sync"]
    assert screen(app.login("ana", "nope", *PENDING))["sync"] == ""  # nothing before login
    app.close()


def test_a_bad_filter_is_an_error_not_a_crash(review):
    s = logged_in(review)
    with pytest.raises(gr.Error, match="YYYY-MM-DD"):
        review.refresh(s["reviewer"], s["current"], [], [], [], [], "soon", "")


def test_user_text_is_escaped_for_every_place_that_renders_it():
    hostile = '<img src=x onerror=alert(1)> ![t](http://evil/x.png) [l](javascript:alert(1)) <script>x</script>'
    md = md_text(hostile)
    assert "<" not in md and ">" not in md and "](" not in md and "![" not in md and "http:" not in md
    assert "\\&" not in md  # an escaped entity would show as '&gt;' instead of '>'
    assert chat_message("user", hostile)["content"].startswith("&lt;img")
    assert "<" not in chat_message("assistant", hostile)["content"]
