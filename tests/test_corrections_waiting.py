"""Counting the accepted corrections that wait for a run: what every scheduler tick decides on.

Real stores write the feedback and the real merge makes the finished run the count is taken
against. ``new_corrections`` counts the accepts past the review bytes that run's merge read (its
manifest pins them); the definition is the latest accepts whose decision id that run never saw
(``accepted_decision_ids - seen_decisions``). The two must agree, case by case.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from feedback.reviews import ReviewStore, review_shard_paths
from feedback.store import FlagStore
from retrain.merge import run_merge
from retrain.pipeline import write_state
from retrain.status import (
    ACCEPTED_FILE,
    accepted_decision_ids,
    accepts_past,
    new_corrections,
    pinned_review_shards,
    seen_decisions,
)
from schemas.flag import ChatMessage
from schemas.review import ReviewDecision
from schemas.run import BaseModelRef, MergeConfig, RetrainSettings, RunState
from schemas.settings import Settings
from tests.records import make_flag

BASE = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")


def decide(store: ReviewStore, flag, action: str = "accept", **kw) -> ReviewDecision:
    return store.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action=action,
                                       reviewer="ana", **kw))


@pytest.fixture
def finished(tmp_path):
    """Six flags (four accepted, one rejected, one undecided) merged by a run that then published;
    the review store stays open, so that its next decisions go on in the shard that run read."""
    feedback = tmp_path / "feedback"
    settings = Settings(feedback_dir=feedback, retrain=RetrainSettings(
        runs_dir=str(tmp_path / "runs"), merge=MergeConfig(replay_source="none", heldout_fraction=0.0)))
    flags_store, reviews = FlagStore(feedback), ReviewStore(feedback)
    flags = [flags_store.save(make_flag(
        conversation=[ChatMessage(role="user", content=f"Question {i}?"), ChatMessage(role="assistant", content="No.")],
        correction=f"Answer {i}.")) for i in range(6)]
    flags_store.close()
    for flag in flags[:4]:
        decide(reviews, flag)
    decide(reviews, flags[4], "reject")
    run = Path(settings.retrain.runs_dir) / "run-20260301-030000"
    run_merge(settings, run, base=BASE)
    write_state(run, RunState(run_id=run.name, stage_done="publish", verdict="publish", version="v1"))
    yield settings, run, flags, reviews
    reviews.close()


def by_decision_ids(settings: Settings, run: Path) -> int:
    return len(accepted_decision_ids(settings.feedback_dir) - seen_decisions(run))


def test_the_count_of_new_accepts_agrees_with_the_decision_ids_the_run_saw(finished, tmp_path):
    settings, run, flags, reviews = finished
    assert set(pinned_review_shards(run, settings.feedback_dir)) == {
        p.relative_to(settings.feedback_dir).as_posix() for p in review_shard_paths(settings.feedback_dir)}
    other = ReviewStore(settings.feedback_dir)  # a shard the run never read
    steps = [
        ("nothing since the run", lambda: None, 0),
        ("the undecided flag accepted", lambda: decide(reviews, flags[5]), 1),
        ("an accepted flag's correction edited", lambda: decide(reviews, flags[0], correction="Answer 0, edited."), 2),
        ("an accepted flag rejected", lambda: decide(reviews, flags[1], "reject"), 2),
        ("a late accept dated before the flag's decision",
         lambda: decide(reviews, flags[2], created_at=reviews.get(flags[2].flag_id).created_at - timedelta(days=1)), 2),
        ("the rejected flag accepted, in another shard", lambda: decide(other, flags[4]), 3),
        ("the flag accepted since rejected, in that shard", lambda: decide(other, flags[5], "reject"), 2),
    ]
    try:
        for what, step, expected in steps:
            step()
            assert (new_corrections(settings).count, by_decision_ids(settings, run)) == (expected, expected), what
    finally:
        other.close()


def test_a_torn_line_past_the_bytes_the_run_read_is_not_counted(finished):
    settings, run, flags, reviews = finished
    decide(reviews, flags[5])
    shard = review_shard_paths(settings.feedback_dir)[0]
    with open(shard, "ab") as f:
        line = ReviewDecision(flag_id=flags[4].flag_id, flag_record_id=flags[4].record_id, action="accept",
                              reviewer="ana").model_dump_json().encode()
        f.write(line[: len(line) // 2])  # a writer killed mid-line
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 1


def test_when_the_shards_the_run_read_changed_the_count_compares_decision_ids(finished):
    settings, run, flags, reviews = finished
    decide(reviews, flags[5])
    shard = review_shard_paths(settings.feedback_dir)[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))  # rewritten: the same decisions, reordered
    assert pinned_review_shards(run, settings.feedback_dir) is None
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 1


def test_an_invalid_decision_past_the_bytes_the_run_read_is_not_trusted(finished):
    settings, run, flags, reviews = finished
    shard = settings.feedback_dir / "reviews" / "reviews-written-elsewhere.jsonl"  # a shard the run never read
    bad = ReviewDecision(flag_id=flags[0].flag_id, flag_record_id=flags[0].record_id, action="reject",
                         reviewer="ana").model_dump(mode="json")
    bad["correction"] = "A rejected flag has no correction."  # valid JSON, not a valid ReviewDecision
    with open(shard, "ab") as f:
        f.write(json.dumps(bad).encode() + b"\n")
    decide(reviews, flags[5])
    assert accepts_past(settings.feedback_dir, pinned_review_shards(run, settings.feedback_dir)) is None
    # As the merge will: the bad line is skipped, flag 0 stays accepted (and seen); flag 5 is new.
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 1


def test_the_accepts_a_run_that_failed_after_its_merge_had_are_not_new(finished):
    settings, run, flags, reviews = finished
    late = decide(reviews, flags[5])
    (run / ACCEPTED_FILE).write_text(json.dumps({"decision_ids": [late.decision_id]}))  # as mark_failed writes it
    write_state(run, RunState(run_id=run.name, stage_done="merge", verdict="failed", message="train failed"))
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 0
    decide(reviews, flags[4])
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 1


def test_a_decision_the_run_read_torn_and_completed_since_is_new(finished):
    settings, run, flags, _ = finished
    shard = settings.feedback_dir / "reviews" / "reviews-synced.jsonl"
    line = ReviewDecision(flag_id=flags[5].flag_id, flag_record_id=flags[5].record_id, action="accept",
                          reviewer="bo").model_dump_json().encode() + b"\n"
    shard.write_bytes(line[:40])  # half written when the run's merge read it
    run_merge(settings, run, base=BASE)
    write_state(run, RunState(run_id=run.name, stage_done="publish", verdict="publish", version="v1"))
    assert "torn last line" in json.loads((run / "merge_report.json").read_text())["bad_lines"][0]
    shard.write_bytes(line)
    assert new_corrections(settings).count == by_decision_ids(settings, run) == 1
