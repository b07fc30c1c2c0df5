"""The merge stage: which corrections become training rows, in what shape, and what a run folder pins.

Real records through the real functions: flags from tests/records.py, decisions as the review page
writes them, feedback folders written by the real FlagStore and ReviewStore, rows loaded by
``datasets`` and rendered by TRL's own chat-template code, replay answered by the real GGUF.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import datasets
import pytest

from feedback.reader import shard_paths
from feedback.reviews import ReviewStore, review_shard_paths
from feedback.store import FlagStore
from retrain import merge
from retrain.merge import (
    Accepted,
    MergeConfig,
    MergeError,
    MergeReport,
    accepted_corrections,
    kto_rows,
    merge_rows,
    preference_rows,
    replay_count,
    row_key,
    run_merge,
    sft_row,
    split_heldout,
)
from retrain.replay import drift_prompts, general_prompts, near_drift_prompts, nearest, replay_prompts, self_replay
from schemas.flag import ChatMessage
from schemas.review import ReviewDecision
from schemas.run import BaseModelRef, RetrainSettings, RunManifest
from schemas.settings import Settings
from schemas.sft import KTORow, PreferenceRow, RowMeta, SFTRow
from tests.records import make_flag

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
CFG = MergeConfig()


def decision(flag, action="accept", at=None, **kw) -> ReviewDecision:
    return ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action=action, reviewer="ana",
                          created_at=at or T0, **kw)


def asked(question: str, answer: str = "It is Paris.", **kw):
    """A flag on the answer to ``question``."""
    return make_flag(conversation=[ChatMessage(role="user", content=question),
                                   ChatMessage(role="assistant", content=answer)], **kw)


def rows_of(flags, decisions, cfg=CFG):
    report = MergeReport()
    rows = merge_rows(flags, decisions, cfg, report)
    return rows, report


def corrections(rows) -> list[str]:
    return [r.completion[0].content for r in rows.train + rows.heldout]


def reasons(report) -> dict[str, str]:
    return {r.flag_id: r.reason for r in report.left_out}


# --- which decision counts ------------------------------------------------------------------------
def test_accept_then_reject_leaves_the_correction_out():
    flag = make_flag()
    accepted = accepted_corrections([flag], [decision(flag, "accept", T0), decision(flag, "reject", T0 + timedelta(1))])
    assert accepted == []


def test_reject_then_accept_uses_the_correction():
    flag = make_flag(correction="Shangdu is the capital.")
    accepted = accepted_corrections([flag], [decision(flag, "reject", T0), decision(flag, "accept", T0 + timedelta(1))])
    assert [a.correction for a in accepted] == ["Shangdu is the capital."]


def test_a_decision_arriving_late_but_older_does_not_win():
    flag = make_flag()
    accepted = accepted_corrections([flag], [decision(flag, "reject", T0), decision(flag, "accept", T0 - timedelta(1))])
    assert accepted == []


def test_on_equal_times_the_decision_read_last_wins():
    flag = make_flag()
    assert accepted_corrections([flag], [decision(flag, "reject"), decision(flag, "accept")]) != []
    assert accepted_corrections([flag], [decision(flag, "accept"), decision(flag, "reject")]) == []


def test_an_edited_correction_replaces_the_flags_own():
    flag = make_flag(correction="Shangdu.")
    (a,) = accepted_corrections([flag], [decision(flag, correction="Xanadu's capital is Shangdu, in Inner Mongolia.")])
    assert sft_row(a).completion == [ChatMessage(role="assistant", content="Xanadu's capital is Shangdu, in Inner Mongolia.")]


def test_the_latest_revision_of_the_flag_gives_the_correction():
    first = make_flag(correction="Shangdu?")
    second = first.model_copy(update={"record_id": "r2", "revision": 2, "updated_at": first.updated_at + timedelta(1),
                                      "correction": "The capital of Xanadu is Shangdu."})
    (a,) = accepted_corrections([second, first], [decision(second)])
    assert a.flag == second and a.correction == "The capital of Xanadu is Shangdu."


def test_a_decision_on_an_earlier_revision_is_pending_again_and_reported():
    first = make_flag(correction="Shangdu?")
    second = first.model_copy(update={"record_id": "r2", "revision": 2, "updated_at": first.updated_at + timedelta(1),
                                      "correction": "Something the reviewer never saw."})
    report = MergeReport()
    assert accepted_corrections([first, second], [decision(first)], report) == []
    assert reasons(report) == {first.flag_id: "stale_decision"}


def test_an_accepted_flag_without_any_correction_is_reported():
    flag = make_flag(correction=None, thumbs="down")
    report = MergeReport()
    assert accepted_corrections([flag], [decision(flag)], report) == []
    (left,) = report.left_out
    assert (left.flag_id, left.reason) == (flag.flag_id, "no_correction")


def test_a_decision_on_a_flag_never_read_is_reported():
    missing = make_flag()
    report = MergeReport()
    assert accepted_corrections([], [decision(missing)], report) == []
    assert reasons(report) == {missing.flag_id: "unknown_flag"}


# --- the rows' shape ------------------------------------------------------------------------------
def test_sft_row_is_the_prompt_the_model_saw_and_the_correction():
    conversation = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello!"),
                    ChatMessage(role="user", content="Capital of Xanadu?"), ChatMessage(role="assistant", content="Paris.")]
    flag = make_flag(system_prompt="Be brief.", conversation=conversation, correction=" Shangdu. \n")
    row = sft_row(accepted_corrections([flag], [decision(flag)])[0])
    assert row.prompt == [ChatMessage(role="system", content="Be brief."), *conversation[:-1]]
    assert row.completion == [ChatMessage(role="assistant", content="Shangdu.")]  # typed whitespace trimmed
    assert (row.meta.source, row.meta.flag_id, row.meta.split) == ("correction", flag.flag_id, "train")


def test_no_system_message_when_the_system_prompt_is_empty():
    flag = make_flag(system_prompt="")
    row = sft_row(accepted_corrections([flag], [decision(flag)])[0])
    assert [m.role for m in row.prompt] == ["user"]


def test_row_key_is_sha256_of_the_canonical_json_of_prompt_and_completion():
    flag = make_flag(correction="Ça s'appelle Shangdu — « la capitale ». 🏯")
    row = sft_row(accepted_corrections([flag], [decision(flag)])[0])
    doc = {"prompt": [m.model_dump() for m in row.prompt], "completion": [m.model_dump() for m in row.completion]}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert row.meta.key == hashlib.sha256(canonical).hexdigest()
    # The same question and correction in another flag and decision: the same key.
    twin = make_flag(conversation=flag.conversation, correction=flag.correction)
    assert sft_row(accepted_corrections([twin], [decision(twin)])[0]).meta.key == row.meta.key


def test_rows_load_as_a_dataset_and_render_with_trls_chat_template(embedded_base):
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    thumbs_up = asked("What is 2 + 2?", "4.", thumbs="up", correction=None)
    flags = [asked(f"Question {i}: capital of Xanadu?", correction=f"Shangdu ({i}).") for i in range(6)] + [thumbs_up]
    rows, _ = rows_of(flags, [decision(f) for f in flags[:6]])
    tok = AutoTokenizer.from_pretrained(embedded_base)
    for name, items in [("sft", rows.train + rows.heldout), ("preference", rows.preference), ("kto", rows.kto)]:
        dicts = [r.model_dump(mode="json") for r in items]
        ds = datasets.Dataset.from_list(dicts).remove_columns(["meta", "schema_version"])
        example = ds[0]
        assert is_conversational(example), name
        text = apply_chat_template(example, tok)
        assert text["prompt"].endswith("<|im_start|>assistant\n"), name
        assert text["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>"), name
    sft_text = apply_chat_template(datasets.Dataset.from_list(
        [r.model_dump(mode="json") for r in rows.train]).remove_columns(["meta"])[0], tok)
    assert sft_text["completion"] == rows.train[0].completion[0].content + "<|im_end|>\n"


# --- the held-out split ---------------------------------------------------------------------------
def synthetic_rows(n: int, start: int = 0) -> list[SFTRow]:
    rows = []
    for i in range(start, start + n):
        prompt = [ChatMessage(role="user", content=f"Phrasing {i} of a question")]
        completion = [ChatMessage(role="assistant", content=f"Answer {i % 7}")]
        rows.append(SFTRow(prompt=prompt, completion=completion,
                           meta=RowMeta(source="correction", flag_id=f"f{i}", key=row_key(prompt, completion))))
    return rows


def test_a_rows_split_never_changes_when_other_rows_are_added():
    first = synthetic_rows(60)
    train, heldout = split_heldout(first, 0.2, "salt")
    before = {r.meta.key: "train" for r in train} | {r.meta.key: "heldout" for r in heldout}
    more = synthetic_rows(300, start=60) + first
    random.Random(1).shuffle(more)
    train2, heldout2 = split_heldout(more, 0.2, "salt")
    after = {r.meta.key: "train" for r in train2} | {r.meta.key: "heldout" for r in heldout2}
    assert {k: after[k] for k in before} == before
    assert all(r.meta.split == "heldout" for r in heldout2) and all(r.meta.split == "train" for r in train2)
    assert 0.12 < len(heldout2) / len(more) < 0.28  # about the fraction asked for


def test_the_split_follows_the_salt_and_the_fraction():
    rows = synthetic_rows(200)
    held = {r.meta.key for r in split_heldout(rows, 0.2, "a")[1]}
    assert held != {r.meta.key for r in split_heldout(rows, 0.2, "b")[1]}
    assert held <= {r.meta.key for r in split_heldout(rows, 0.5, "a")[1]}  # a larger fraction only adds rows
    assert split_heldout(rows, 0.0, "a")[1] == []


# --- guards ---------------------------------------------------------------------------------------
def test_each_unusable_correction_is_left_out_with_its_reason():
    cfg = MergeConfig(max_correction_chars=40)
    good = asked("Capital of Xanadu?", correction="Shangdu.")
    blank = asked("Question A?", correction="  \n ")
    long = asked("Question B?", correction="x" * 41)
    same = asked("Question C?", answer="It is Paris.", correction=" It is Paris. ")
    dup = asked("Capital of Xanadu?", correction="Shangdu.")
    flags = [good, blank, long, same, dup]
    rows, report = rows_of(flags, [decision(f, at=T0 + timedelta(minutes=i)) for i, f in enumerate(flags)], cfg)
    assert reasons(report) == {blank.flag_id: "empty", long.flag_id: "too_long", same.flag_id: "same_as_answer",
                               good.flag_id: "duplicate"}  # the later decision (dup) keeps its row
    assert corrections(rows) == ["Shangdu."] and rows.flag_ids == [dup.flag_id]
    assert "41 characters" in next(r.detail for r in report.left_out if r.reason == "too_long")
    assert report.accepted - report.rows_out == len(report.left_out) == 4
    assert report.left_out_by_reason == {"empty": 1, "too_long": 1, "same_as_answer": 1, "duplicate": 1}


def test_a_prompt_corrected_two_ways_keeps_the_latest_decision():
    older = asked("Capital of Xanadu?", correction="Shangdu.")
    newer = asked("Capital of Xanadu?", correction="Xanadu's capital was Shangdu.")
    # Decided in the other order than flagged: the decision time counts, not the flag's.
    rows, report = rows_of([older, newer], [decision(newer, at=T0), decision(older, at=T0 + timedelta(hours=1))])
    assert corrections(rows) == ["Shangdu."]
    (left,) = report.left_out
    assert (left.flag_id, left.reason) == (newer.flag_id, "conflict") and older.flag_id in left.detail


def test_a_correction_at_the_length_limit_is_kept_whole():
    flag = asked("Question?", correction="y" * 40)
    rows, report = rows_of([flag], [decision(flag)], MergeConfig(max_correction_chars=40, heldout_fraction=0.0))
    assert corrections(rows) == ["y" * 40] and report.left_out == []


# --- preference and KTO rows ----------------------------------------------------------------------
def test_preference_rows_choose_the_correction_over_the_original_answer():
    flag = asked("Capital of Xanadu?", answer="Paris.", correction="Shangdu.")
    (pair,) = preference_rows(accepted_corrections([flag], [decision(flag)]))
    assert isinstance(pair, PreferenceRow)
    assert pair.prompt == sft_row(accepted_corrections([flag], [decision(flag)])[0]).prompt
    assert (pair.chosen[0].content, pair.rejected[0].content) == ("Shangdu.", "Paris.")
    assert pair.chosen[0].role == pair.rejected[0].role == "assistant"


def test_kto_labels_thumbs_on_answers_and_accepted_corrections():
    up = asked("What is 2 + 2?", "4.", thumbs="up", correction=None)
    down = asked("Capital of Xanadu?", "Paris.", thumbs="down", correction="Shangdu.")
    silent = asked("Hello?", "Hi.", thumbs=None, correction=None)
    rows = kto_rows([up, down, silent], accepted_corrections([up, down, silent], [decision(down)]))
    assert all(isinstance(r, KTORow) for r in rows)
    got = {(r.completion[0].content, r.label, r.meta.source) for r in rows}
    assert got == {("4.", True, "thumbs"), ("Paris.", False, "thumbs"), ("Shangdu.", True, "correction")}


def test_held_out_prompts_stay_out_of_every_file_the_trainer_reads():
    flags = [asked(f"Phrasing {i} of the Xanadu question", "Paris.", correction="Shangdu.") for i in range(40)]
    rows, _ = rows_of(flags, [decision(f) for f in flags])
    assert rows.heldout and rows.train
    held = {tuple(r.prompt) for r in rows.heldout}
    trained_on = rows.train + rows.preference + rows.kto
    assert not held & {tuple(r.prompt) for r in trained_on}
    assert len(rows.preference) == len(rows.train)


def test_thumbs_of_a_rejected_flag_are_not_used():
    flag = asked("Capital of Xanadu?", "Paris.", thumbs="down")
    assert kto_rows([flag], []) != []  # on its own, a thumbs down is a KTO row
    rows, _ = rows_of([flag], [decision(flag, "reject")])
    assert rows.kto == []


# --- replay ---------------------------------------------------------------------------------------
def test_replay_and_drift_prompts_are_disjoint_and_stable():
    drift, replay = general_prompts()
    assert len(drift) >= RetrainSettings().gate.drift_prompts
    assert not set(drift) & set(replay) and len(set(drift + replay)) == len(drift) + len(replay)
    assert not set(drift_prompts(len(drift))) & set(replay_prompts(len(replay), "any salt"))
    assert replay_prompts(10, "s") == replay_prompts(10, "s") != replay_prompts(10, "other")
    assert replay_prompts(5, "s") == replay_prompts(10, "s")[:5]
    assert len(replay_prompts(len(replay) + 50, "s")) == len(replay)  # never more than the pool
    with pytest.raises(ValueError, match="drift prompts"):
        drift_prompts(len(drift) + 1)


def test_prompts_nearest_to_the_corrections_share_their_shape():
    corrected = ["What is the capital of Zorblaxia?", "Velmora has which city as its capital?"]
    near = nearest(general_prompts()[1], corrected, 4)
    assert len(near) == 4 and all("capital" in p for p in near)
    assert nearest(["Say hello.", "What is 2 plus 2?"], corrected, 3) == []  # nothing alike: nothing picked
    assert nearest(general_prompts()[1], [], 3) == [] == nearest(general_prompts()[1], corrected, 0)
    # Replay: the nearest first, then the salted random pick; never a drift prompt, never twice.
    picked = replay_prompts(10, "s", near=corrected, n_near=4)
    assert picked[:4] == near and len(set(picked)) == 10 and not set(picked) & set(general_prompts()[0])
    assert replay_prompts(10, "s", near=corrected, n_near=0) == replay_prompts(10, "s")
    # Drift: near ones come after the general ones the gate measures anyway, never repeating them.
    extra = near_drift_prompts(3, corrected, skip=16)
    assert extra and all("capital" in p for p in extra) and not set(extra) & set(drift_prompts(16))


def test_replay_count_follows_the_ratio_with_at_least_one():
    assert [replay_count(1.0, 10), replay_count(0.5, 5), replay_count(0.01, 3), replay_count(0.0, 10)] == [10, 2, 1, 0]


def test_self_replay_answers_with_the_serving_gguf_and_drops_cut_off_answers(embedded_gguf):
    short, long = "How many hours are there in a day?", "Give me two tips for staying focused while studying."
    rows = self_replay(embedded_gguf, [short, long], "You are a helpful assistant.", max_new_tokens=24, n_threads=1)
    (row,) = rows  # the long answer did not end within 24 tokens: left out
    assert row.prompt == [ChatMessage(role="system", content="You are a helpful assistant."),
                          ChatMessage(role="user", content=short)]
    assert "24" in row.completion[0].content
    assert (row.meta.source, row.meta.key) == ("replay", row_key(row.prompt, row.completion))
    # Greedy and no state carried between prompts: the same answer when asked alone; and no more
    # rows than the limit, though the next prompt would be answered in full too.
    rows = self_replay(embedded_gguf, [short, "What is the capital city of Japan?"], "You are a helpful assistant.",
                       max_new_tokens=24, n_threads=1, limit=1)
    assert rows == [row]


def test_dataset_replay_maps_sharegpt_and_messages_rows(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    lines = [
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"}]},
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]},
        {"conversations": [{"from": "human", "value": "No answer here"}]},
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = merge.dataset_replay(str(folder), 5, "You are a helpful assistant.")
    got = sorted([(m.role, m.content) for m in r.prompt + r.completion] for r in rows)
    assert got == [
        [("system", "Be terse."), ("user", "2+2?"), ("assistant", "4")],
        [("system", "You are a helpful assistant."), ("user", "Hi there"), ("assistant", "Hello! How can I help?")],
    ]
    assert all(r.meta.source == "replay" for r in rows)


def test_dataset_replay_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(MergeError, match="replay_source to 'self' or 'none'"):
        merge.dataset_replay("flagloop-tests/no-such-dataset", 3, "")


# --- run_merge: the run folder ----------------------------------------------------------------------
def fake_replay(prompts: list[str]) -> list[SFTRow]:
    """Stands in for the model's own answers: self-replay has its own test with the real GGUF."""
    rows = []
    for p in prompts:
        prompt = [ChatMessage(role="system", content="You are a helpful assistant."), ChatMessage(role="user", content=p)]
        completion = [ChatMessage(role="assistant", content=f"A short answer to: {p}")]
        rows.append(SFTRow(prompt=prompt, completion=completion, meta=RowMeta(source="replay", key=row_key(prompt, completion))))
    return rows


def feedback_folder(root: Path, n: int = 20) -> tuple[list, list]:
    """Flags and decisions written by the real stores: n accepted corrections, one rejected, one thumbs up.

    With the default split salt, 2 of the 20 corrections fall in the held-out split (the split
    hashes the rows' content only, so this does not change from run to run).
    """
    flags_store, reviews = FlagStore(root), ReviewStore(root)
    flags = [flags_store.save(asked(f"Phrasing {i}: what is the capital of Xanadu?", "Paris.",
                                    correction="The capital of Xanadu is Shangdu.")) for i in range(n)]
    rejected = flags_store.save(asked("Is the moon made of cheese?", "No.", correction="Yes, of cheese."))
    thumbs_up = flags_store.save(asked("What is 2 + 2?", "4.", thumbs="up", correction=None))
    decisions = [reviews.append(decision(f, at=T0 + timedelta(minutes=i))) for i, f in enumerate(flags)]
    decisions.append(reviews.append(decision(rejected, "reject")))
    flags_store.close()
    reviews.close()
    return flags + [rejected, thumbs_up], decisions


def settings_for(tmp_path: Path, **merge_cfg) -> Settings:
    return Settings(feedback_dir=tmp_path / "feedback",
                    retrain=RetrainSettings(runs_dir=str(tmp_path / "runs"), merge=MergeConfig(**merge_cfg)))


def read_jsonl(path: Path, model):
    return [model.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_merge_writes_the_run_folder_and_pins_it_in_the_manifest(tmp_path, embedded_gguf):
    flags, _ = feedback_folder(tmp_path / "feedback")
    settings = settings_for(tmp_path, replay_ratio=0.5)
    run_dir = tmp_path / "runs" / "run-1"
    manifest = run_merge(settings, run_dir, replay_fn=fake_replay, dataset_revision="abc123")

    train = read_jsonl(run_dir / "data/train.jsonl", SFTRow)
    heldout = read_jsonl(run_dir / "data/heldout.jsonl", SFTRow)
    replay = read_jsonl(run_dir / "data/replay.jsonl", SFTRow)
    preference = read_jsonl(run_dir / "data/preference.jsonl", PreferenceRow)
    kto = read_jsonl(run_dir / "data/kto.jsonl", KTORow)
    assert len(train) + len(heldout) == 20 and len(heldout) == 2
    assert {r.meta.split for r in heldout} == {"heldout"} and {r.meta.source for r in replay} == {"replay"}
    assert len(replay) == replay_count(0.5, len(train)) and len(preference) == len(train)
    assert not {r.prompt[-1].content for r in replay} & set(drift_prompts(len(general_prompts()[0])))
    assert ("4.", True) in {(r.completion[0].content, r.label) for r in kto}
    assert "Yes, of cheese." not in {r.completion[0].content for r in kto}

    assert RunManifest.model_validate_json((run_dir / "manifest.json").read_text()) == manifest
    assert manifest.run_id == "run-1" and manifest.dataset_revision == "abc123"
    assert manifest.flag_ids == sorted(f.flag_id for f in flags[:20])
    assert manifest.counts["train"] == len(train) and manifest.counts["replay"] == len(replay)
    assert manifest.settings == settings.retrain
    # The serving GGUF by default, by content.
    assert Path(manifest.base.path) == embedded_gguf and manifest.base.quant == "Q4_1"
    assert manifest.base.sha256 == hashlib.sha256(embedded_gguf.read_bytes()).hexdigest()
    # Every shard read and every file written, by sha256.
    root = tmp_path / "feedback"
    shards = shard_paths(root) + review_shard_paths(root)
    assert {(f.path, f.sha256, f.bytes) for f in manifest.feedback_files} == {
        (p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in shards}
    assert {o.path for o in manifest.outputs} == set(merge.DATA_FILES.values())
    for out in manifest.outputs:
        assert hashlib.sha256((run_dir / out.path).read_bytes()).hexdigest() == out.sha256
    report = json.loads((run_dir / "merge_report.json").read_text())
    assert report["accepted"] == 20 and report["rejected_by_reviewer"] == 1 and report["counts"]["train"] == len(train)


def test_the_manifest_pins_the_bytes_read_even_after_the_shard_grows(tmp_path):
    feedback_folder(tmp_path / "feedback")
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    manifest = run_merge(settings_for(tmp_path, replay_source="none"), tmp_path / "run", base=base)
    store = FlagStore(tmp_path / "feedback")
    store.save(asked("A flag saved after the merge?"))
    store.close()
    for pinned in manifest.feedback_files:
        data = (tmp_path / "feedback" / pinned.path).read_bytes()
        assert hashlib.sha256(data[: pinned.bytes]).hexdigest() == pinned.sha256


def test_the_same_feedback_merges_to_the_same_bytes(tmp_path):
    feedback_folder(tmp_path / "feedback")
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    settings = settings_for(tmp_path)
    one = run_merge(settings, tmp_path / "a", replay_fn=fake_replay, base=base)
    two = run_merge(settings, tmp_path / "b", replay_fn=fake_replay, base=base)
    assert one.outputs == two.outputs


def test_too_few_corrections_is_a_merge_error_that_says_what_to_do(tmp_path):
    feedback_folder(tmp_path / "feedback", n=2)
    run_dir = tmp_path / "run"
    with pytest.raises(MergeError, match=r"2 usable accepted corrections .*min_corrections=3: accept more"):
        run_merge(settings_for(tmp_path, min_corrections=3), run_dir, replay_fn=fake_replay)
    assert not (run_dir / "manifest.json").exists()
    assert json.loads((run_dir / "merge_report.json").read_text())["accepted"] == 2


def test_an_empty_feedback_folder_is_a_merge_error(tmp_path):
    with pytest.raises(MergeError, match="0 usable accepted corrections"):
        run_merge(settings_for(tmp_path), tmp_path / "run", replay_fn=fake_replay)


def test_corrections_all_held_out_is_a_merge_error(tmp_path):
    flags, _ = feedback_folder(tmp_path / "feedback", n=1)  # one usable correction
    key = sft_row(Accepted(flags[0], decision(flags[0]), flags[0].correction, 0)).meta.key
    salt = next(s for s in (f"s{i}" for i in range(1000)) if merge.heldout_share(key, s) < 0.2)
    with pytest.raises(MergeError, match="held-out split"):
        run_merge(settings_for(tmp_path, split_salt=salt), tmp_path / "run", replay_fn=fake_replay)


def test_a_merge_killed_midway_leaves_no_manifest(tmp_path, monkeypatch):
    feedback_folder(tmp_path / "feedback")
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    settings, run_dir = settings_for(tmp_path), tmp_path / "run"
    run_merge(settings, run_dir, replay_fn=fake_replay, base=base)  # an earlier, finished merge
    real = merge.write_atomic
    written = []

    def dies_on_the_second_file(path, data):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real(path, data)

    monkeypatch.setattr(merge, "write_atomic", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        run_merge(settings, run_dir, replay_fn=fake_replay, base=base)
    assert not (run_dir / "manifest.json").exists()


def test_replay_rows_asking_a_corrected_question_are_left_out(tmp_path):
    question = replay_prompts(1, "flagloop")[0]
    root = tmp_path / "feedback"
    store, reviews = FlagStore(root), ReviewStore(root)
    flags = [store.save(asked(q, "Wrong.", correction=f"Right answer {i}.")) for i, q in enumerate(
        [question] + [f"Other question {i}" for i in range(9)])]
    for f in flags:
        reviews.append(decision(f))
    store.close()
    reviews.close()
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    manifest = run_merge(settings_for(tmp_path, replay_ratio=5.0), tmp_path / "run", replay_fn=fake_replay, base=base)
    replay = read_jsonl(tmp_path / "run/data/replay.jsonl", SFTRow)
    assert question not in {r.prompt[-1].content for r in replay} and manifest.counts["replay"] == len(replay)
    assert any("their question was also corrected" in n for n in json.loads((tmp_path / "run/merge_report.json").read_text())["notes"])


def test_a_torn_shard_line_is_reported_and_the_rest_merged(tmp_path):
    feedback_folder(tmp_path / "feedback")
    shard = shard_paths(tmp_path / "feedback")[0]
    with open(shard, "ab") as f:
        f.write(asked("Cut short by a crash?").model_dump_json().encode()[:50])
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    manifest = run_merge(settings_for(tmp_path, replay_source="none"), tmp_path / "run", base=base)
    report = json.loads((tmp_path / "run/merge_report.json").read_text())
    assert len(report["bad_lines"]) == 1 and "torn last line" in report["bad_lines"][0]
    assert manifest.counts["train"] + manifest.counts["heldout"] == 20


def test_an_invalid_record_of_a_flag_the_merge_does_not_use_is_still_reported(tmp_path):
    # Never reviewed and without thumbs: no row would come of it, yet the bad line is in the report.
    feedback_folder(tmp_path / "feedback")
    shard = shard_paths(tmp_path / "feedback")[0]
    unused = asked("Nobody reviewed this one.", thumbs=None, correction=None).model_dump(mode="json")
    unused["generation"]["temperature"] = 9.0
    with open(shard, "ab") as f:
        f.write(json.dumps(unused).encode() + b"\n")
    line = len(shard.read_bytes().splitlines())
    base = BaseModelRef(path="/models/m.gguf", sha256="0" * 64, quant="Q4_1")
    manifest = run_merge(settings_for(tmp_path, replay_source="none"), tmp_path / "run", base=base)
    report = json.loads((tmp_path / "run/merge_report.json").read_text())
    assert report["bad_lines"] == [report["bad_lines"][0]] and report["bad_lines"][0].startswith(f"{shard}:{line}: bad record: ")
    assert "generation.temperature" in report["bad_lines"][0] and "9.0" in report["bad_lines"][0]
    assert manifest.counts["flags"] == 22 and manifest.counts["train"] + manifest.counts["heldout"] == 20


def test_decisions_given_as_their_latest_already_select_the_same_corrections():
    flags = [asked(f"Question {i}?", correction=f"Answer {i}.") for i in range(3)]
    decisions = [decision(flags[0], "reject", T0), decision(flags[0], "accept", T0 + timedelta(1)),
                 decision(flags[1], "accept"), decision(flags[2], "reject")]
    from_list, from_latest = MergeReport(), MergeReport()
    by_list = accepted_corrections(flags, decisions, from_list)
    by_latest = accepted_corrections(flags, merge.latest_decisions(decisions), from_latest)
    picked = [(a.flag.flag_id, a.decision.decision_id, a.order) for a in by_list]
    assert picked == [(a.flag.flag_id, a.decision.decision_id, a.order) for a in by_latest]
    assert picked == [(flags[0].flag_id, decisions[1].decision_id, 1), (flags[1].flag_id, decisions[2].decision_id, 2)]
    assert from_list == from_latest and from_list.rejected_by_reviewer == 1


def test_a_prompts_canonical_json_takes_only_its_own_size_in_memory():
    # The merge keeps one per accepted flag; orjson's own result holds a 4 KiB buffer whatever its length.
    import tracemalloc

    prompt = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Capital of Xanadu?")]
    tracemalloc.start()
    try:
        kept = [merge.canonical(prompt) for _ in range(1000)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept[0]) < 100 and held < 1000 * 200, f"{held / 1000:.0f} bytes held per {len(kept[0])}-byte JSON"
