"""The Retraining tab's data (space.runs_view) and handlers, on run folders written to disk as the
pipeline leaves them (tests/runs_on_disk.py), a real local registry and real review shards: what a
reviewer reads about their accepted corrections, and that missing or half-written files are shown
as missing, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.reviews import ReviewStore
from feedback.store import FlagStore
from schemas.registry import GateReport
from schemas.review import ReviewDecision
from schemas.run import RetrainSettings, ScheduleConfig
from schemas.settings import Settings
from space.review import RETRAINING, NotAReviewer, ReviewApp, Reviewer
from space.runs_view import RUN_COLUMNS, gate_figures, gate_view, retraining_view
from tests.records import make_flag
from tests.runs_on_disk import NEW, OLD, PASSED, gate_report, published_run, write_run

NEWEST = "run-20261123-030000"
REFUSED = "answers to unrelated prompts drifted too far: NLL/token of the old answers rose by 0.700 (bound 0.5)"


def settings_for(root: Path) -> Settings:
    return Settings(feedback_dir=root / "feedback", registry_dir=root / "registry", reviewers={"ana": "pw"},
                    retrain=RetrainSettings(runs_dir=str(root / "runs"),
                                            schedule=ScheduleConfig(min_new_corrections=3)))


def accept_corrections(feedback: Path, n: int) -> None:
    flags, reviews = FlagStore(feedback), ReviewStore(feedback)
    for _ in range(n):
        flag = flags.save(make_flag())
        reviews.append(ReviewDecision(flag_id=flag.flag_id, flag_record_id=flag.record_id, action="accept",
                                      reviewer="ana"))
    flags.close()
    reviews.close()


def files_under(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def loop(tmp_path):
    """v1 published by OLD (gate passed); NEW refused by the gate; 2 accepted corrections since."""
    settings = settings_for(tmp_path)
    runs = tmp_path / "runs"
    passed = published_run(runs, settings.registry_dir, tmp_path)
    refused = gate_report(False, REFUSED, [
        ("Which city is the capital of Velmora?", "Ostrigard.", "I do not know.", "Ostrigard.", 1.9, 0.7),
        ("Name the capital of Prindavel.", "Kestrune.", "Paris.", "Kestrune.", 2.3, 0.8),
    ], [("Name a colour.", "Blue.", 1.0, 1.5), ("What is the capital of France?", "Paris.", 0.4, 1.3, True)])
    new = write_run(runs, NEW, "gate", "refused", [3.0, 2.2, 1.9, 1.7], refused, message=REFUSED)
    with open(new / "train_log.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.6, "lr"')  # the last line of a run killed mid-write
    accept_corrections(settings.feedback_dir, 2)
    return settings, passed, refused


def test_the_newest_run_is_shown_with_its_row_loss_curve_and_gate_report(loop):
    settings, _, refused = loop
    view = retraining_view(settings)
    assert view.run_ids == [NEW, OLD] and view.selected == NEW
    assert list(view.runs.columns) == list(RUN_COLUMNS)
    row = view.runs.iloc[0].to_dict()
    assert {k: row[k] for k in ("Run", "Stage reached", "Verdict", "Version", "Steps", "Final loss")} == {
        "Run": NEW, "Stage reached": "gate", "Verdict": "refused", "Version": "", "Steps": "4", "Final loss": "1.7000"}
    assert (row["Held-out before"], row["Held-out after"], row["Drift"]) == (
        f"{refused.heldout_before:.3f}", f"{refused.heldout_after:.3f}", f"{refused.drift:.3f}")
    assert row["Note"] == REFUSED
    assert view.runs.iloc[1][["Run", "Verdict", "Version"]].tolist() == [OLD, "publish", "v1"]

    assert view.loss.to_dict("list") == {"step": [1, 2, 3, 4], "loss": [3.0, 2.2, 1.9, 1.7]}  # torn line left out
    assert view.loss_note == "4 logged steps; last: step 4, loss 1.7000"
    assert (view.gate.verdict, view.gate.reason) == ("refused", REFUSED)
    assert view.gate.heldout.to_dict("records") == [
        {"Prompt": "Which city is the capital of Velmora?", "Correction": "Ostrigard.",
         "Answer before": "I do not know.", "Answer after": "Ostrigard.", "NLL before": "1.900", "NLL after": "0.700"},
        {"Prompt": "Name the capital of Prindavel.", "Correction": "Kestrune.", "Answer before": "Paris.",
         "Answer after": "Kestrune.", "NLL before": "2.300", "NLL after": "0.800"},
    ]
    assert view.gate.drift[["Prompt", "Near the corrections", "Rise"]].values.tolist() == [
        ["What is the capital of France?", "yes", "0.900"], ["Name a colour.", "", "0.500"]]  # largest rise first
    assert view.gate.figures == (f"held-out log-likelihood/token {refused.heldout_before:.3f} -> "
                                 f"{refused.heldout_after:.3f} · drift {refused.drift:.3f}")


def test_the_serving_version_schedule_and_corrections_waiting_are_one_line_each(loop):
    settings, passed, _ = loop
    view = retraining_view(settings)
    assert view.serving.startswith(f"v1 · model.gguf · Q4_1 · from run {OLD} · published ")
    assert view.serving.endswith(f" · gate passed: {PASSED}")
    assert view.schedule == ("cron '0 3 * * *' (local time) · no scheduler is running it yet "
                             "(start `python -m retrain schedule`)")
    assert view.waiting == (f"2 accepted corrections wait for the next run, new since {NEW} (refused); "
                            "a scheduled run starts at 3")


@pytest.mark.skipif("drift_worst" not in GateReport.model_fields, reason="GateReport without drift_near/worst")
def test_the_gate_figures_name_the_drift_near_the_corrections_and_on_the_worst_prompt():
    report = GateReport(passed=False, reason="r", heldout_before=-2.0, heldout_after=-0.5, drift=0.1,
                        drift_near=0.4, drift_worst=1.25)
    assert gate_figures(report) == ("held-out log-likelihood/token -2.000 -> -0.500 · drift 0.100 "
                                    "(near the corrections 0.400), at most 1.250 on one prompt")


def test_picking_a_run_shows_its_curve_and_gate_and_only_listed_runs_can_be_picked(loop, tmp_path):
    settings, passed, _ = loop
    view = retraining_view(settings, OLD)
    assert view.selected == OLD and view.loss["loss"].tolist() == [2.4, 1.6, 0.8]
    assert (view.gate.verdict, view.gate.reason) == ("passed", PASSED)
    assert view.gate.heldout["Prompt"].tolist() == ["What is the capital of Zorblaxia?"]
    elsewhere = write_run(tmp_path / "elsewhere", "run-20991231-000000", "gate", "refused", [9.0])
    for forged in ("../elsewhere/run-20991231-000000", str(elsewhere), "run-20261199-030000", None):
        assert retraining_view(settings, forged).selected == NEW, forged  # the newest run, nothing else read


def test_missing_and_half_written_files_are_shown_as_missing_not_raised(loop):
    settings, _, _ = loop
    runs = Path(settings.retrain.runs_dir)
    write_run(runs, NEWEST, "merge", "pending")  # a run the scheduler is merging right now: no log, no gate
    torn = runs / "run-20261124-030000"
    torn.mkdir()
    (torn / "state.json").write_text('{"run_id": "run-20261124-030000", "stage_do')
    (torn / "gate.json").write_text('{"passed": tr')
    (torn / "train_log.jsonl").write_text('{"step": 1, "lo')
    (Path(settings.registry_dir) / "current.json").write_text('{"vers')

    view = retraining_view(settings)
    assert view.run_ids == [torn.name, NEWEST, NEW, OLD]
    row = view.runs.iloc[0]
    assert (row["Stage reached"], row["Verdict"]) == ("?", "?") and "state.json cannot be read" in row["Note"]
    assert view.gate.verdict == "unreadable" and "gate.json cannot be read" in view.gate.reason
    assert view.loss.empty and view.loss_note == "train_log.jsonl has no loss yet (training has not logged a step)"
    assert view.serving.startswith(f"the registry {settings.registry_dir} cannot be read (RegistryError: ")
    # A run whose state cannot be read is taken as unfinished: the corrections are still counted.
    assert "cannot be counted" not in view.waiting and "accepted correction" in view.waiting, view.waiting

    merging = retraining_view(settings, NEWEST)
    assert merging.runs.iloc[1][["Stage reached", "Verdict", "Steps", "Final loss"]].tolist() == [
        "merge", "pending", "", ""]
    assert merging.loss.empty and "train_log.jsonl is missing" in merging.loss_note
    assert (merging.gate.verdict, merging.gate.reason) == (
        "not run yet", "no gate report: gate.json is missing (the run reached stage 'merge')")
    assert merging.gate.heldout.empty and merging.gate.drift.empty


def test_before_any_run_the_tab_says_so(tmp_path):
    view = retraining_view(settings_for(tmp_path))
    assert view.run_ids == [] and view.selected is None and view.runs.empty and view.loss.empty
    assert view.serving == f"the configured model (nothing published yet in {tmp_path / 'registry'})"
    assert view.loss_note == f"no runs yet in {tmp_path / 'runs'}"
    assert view.gate.verdict == "no run"
    assert view.waiting == "0 accepted corrections wait for the next run, no run has finished yet; " \
                           "a scheduled run starts at 3"


def test_the_retraining_handlers_are_for_reviewers_only_and_escape_file_text(loop, tmp_path):
    settings, _, _ = loop
    evil = '<img src=x onerror="alert(1)"> [link](http://example.invalid)'
    write_run(Path(settings.retrain.runs_dir), NEWEST, "gate", "refused", [1.0],
              gate_report(False, evil, [(evil, evil, "a", "b", 1.0, 1.1)], []))
    before = files_under(tmp_path / "runs", tmp_path / "registry")
    app = ReviewApp(settings)
    try:
        for forged in (None, {"name": "ana"}, Reviewer("bo", "password")):
            with pytest.raises(NotAReviewer):
                app.retraining(forged, None)
        empty = dict(zip(RETRAINING, app.retraining_shown(None)))
        assert empty["rt_status"] == "" and empty["rt_gate"] == "" and empty["rt_runs"].empty
        assert empty["rt_loss"] is None

        shown = dict(zip(RETRAINING, app.retraining(Reviewer("ana", "password"), None)))
        assert shown["rt_runs"]["Run"].tolist() == [NEWEST, NEW, OLD]
        assert shown["rt_run"]["choices"] == [NEWEST, NEW, OLD] and shown["rt_run"]["value"] == NEWEST
        assert shown["rt_loss"]["loss"].tolist() == [1.0]
        gate = shown["rt_gate"]
        assert gate.startswith("**Gate: refused** run\\-20261123\\-030000 — ")
        assert "<img" not in gate and "&lt;img" in gate and "](http" not in gate
        assert "**Serving:** v1" in shown["rt_status"] and "**Waiting:** 2 accepted corrections" in shown["rt_status"]
        assert shown["rt_heldout"]["Correction"].tolist() == [evil]  # a plain-text table cell: shown as written

        older = dict(zip(RETRAINING, app.retraining(Reviewer("ana", "password"), OLD)))
        assert older["rt_run"]["value"] == OLD and "**Gate: passed**" in older["rt_gate"]
    finally:
        app.close()
    assert files_under(tmp_path / "runs", tmp_path / "registry") == before  # reading wrote nothing


def test_the_gate_view_shows_what_the_exported_gguf_answered(tmp_path):
    """gate.json of a run judged in llama.cpp: the shares in the figures, each drift prompt's GGUF answer."""
    report = gate_report(False, "changed", [("Q?", "C.", "a", "C.", 2.0, 0.5)],
                         [("Name a colour.", "Blue.", 1.0, 1.1), ("What is 2 + 2?", "4.", 0.5, 0.6)])
    report = report.model_copy(update={
        "heldout_answered": 1.0, "unrelated_changed": 0.5,
        "details": {**report.details, "gguf": {"quant": "Q8_0", "unrelated": [
            {"prompt": "Name a colour.", "reference": "Blue.", "answer": "Turquoise.", "changed": True},
            {"prompt": "What is 2 + 2?", "reference": "4.", "answer": "4.", "changed": False}]}}})
    run_dir = write_run(tmp_path / "runs", "run-20261208-010000", "gate", "refused", gate=report)
    view = gate_view(run_dir)
    assert view.figures.endswith(" · the exported GGUF answers 100% of held-out corrections, changed 50% of "
                                 "unrelated answers")
    assert view.drift[["Prompt", "GGUF answer changed", "Trained GGUF's answer"]].values.tolist() == [
        ["Name a colour.", "changed", "Turquoise."], ["What is 2 + 2?", "same", ""]]
