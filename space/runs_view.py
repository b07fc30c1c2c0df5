"""What the review page's Retraining tab shows: the loop's status (retrain/status.py) as lines and tables.

    >>> view = retraining_view(settings)            # the newest run selected
    >>> view.serving
    'v2 · model.gguf · Q4_1 · from run run-20261124-030000 · published 2026-11-24 03:41 UTC'
    >>> view.runs.iloc[0]["Run"], view.selected, view.loss.tail(1).to_dict("records")
    ('run-20261124-030000', 'run-20261124-030000', [{'step': 60, 'loss': 0.41}])

Plain functions of the settings and the run folders, the same ones `python -m retrain status` reads.
Reading never changes anything, and never raises over a missing or half-written file (a run being
written while a reviewer looks, a crash): each part says what it could not read instead.

The text here is raw, and some of it is user text (gate.json holds the held-out prompts and the
corrections): the page shows it escaped (``space.review``), in plain-text table cells or ``md_text``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from retrain.status import (
    describe_schedule,
    list_runs,
    loss_curve,
    new_corrections,
    run_summary,
    schedule_info,
    serving_version,
)
from schemas.registry import GateReport

log = logging.getLogger(__name__)

RUN_ROWS = 50  # newest runs in the table (and the run picker)
RUN_COLUMNS = ("Run", "Stage reached", "Verdict", "Version", "Steps", "Final loss", "Held-out before",
               "Held-out after", "Drift", "Updated (UTC)", "Note")
HELDOUT_COLUMNS = ("Prompt", "Correction", "Answer before", "Answer after", "NLL before", "NLL after")
DRIFT_COLUMNS = ("Prompt", "Base model's answer", "Near the corrections", "NLL before", "NLL after", "Rise",
                 "GGUF answer changed", "Trained GGUF's answer")
NOTE_CHARS = 160  # a run's message in the table; the gate report below has the whole reason


def _problem(err: BaseException) -> str:
    """An exception in one line, for a reviewer."""
    text = str(err).split("For further information visit")[0]  # pydantic's link to its docs: noise here
    return f"{type(err).__name__}: {' '.join(text.split())[:300]}"


def _num(value, digits: int = 3) -> str:
    """A figure as table text; '' for none (and the value as it is when it is not a number)."""
    if value is None:
        return ""
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M}" if at is not None else ""


def empty_frame(columns) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str) for c in columns})


# --- the serving version, the schedule, the corrections waiting ----------------------------------
def serving_line(settings) -> str:
    """The version the registry serves, where it came from, and its gate verdict, in one line.

    With `registry_repo` (the app follows the Hub): its current version as the app's HF cache last
    saw it, without a request, so the tab opens at once even when the Hub is down.
    """
    where = f"the Hub registry {settings.registry_repo}" if settings.registry_repo else str(settings.registry_dir)
    try:
        if settings.registry_repo:
            from retrain.registry import HubRegistry

            version = HubRegistry(settings.registry_repo).cached_current()
        else:
            version = serving_version(settings)
    except Exception as err:  # a half-written current.json or version.json: say so, the rest of the tab still shows
        log.warning("the registry %s cannot be read: %s", where, err)
        return f"the registry {where} cannot be read ({_problem(err)})"
    if version is None:
        return f"the configured model (nothing published yet in {where})"
    parts = [version.version, version.file, version.quant,
             f"from run {version.run_id}" if version.run_id else "not from a run",
             f"published {version.created_at:%Y-%m-%d %H:%M} UTC"]
    if version.gate is not None:
        parts.append(f"gate {'passed' if version.gate.passed else 'refused'}: {version.gate.reason}")
    return " · ".join(parts)


def schedule_line(settings) -> str:
    """When the scheduler ticks, and whether one registered its job (and when it runs next)."""
    try:
        info = schedule_info(settings)
    except Exception as err:
        log.warning("the scheduler's job store cannot be read: %s", err)
        return f"{describe_schedule(settings.retrain.schedule)} · the job store cannot be read ({_problem(err)})"
    if not info.registered:
        return f"{info.trigger} · no scheduler is running it yet (start `python -m retrain schedule`)"
    when = f"{info.next_run_time:%Y-%m-%d %H:%M %Z}" if info.next_run_time else "none (paused)"
    return f"{info.trigger} · next run {when}"


def waiting_line(settings) -> str:
    """How many accepted corrections the next run would learn, and how many it takes to start one."""
    try:
        new = new_corrections(settings)
    except Exception as err:  # a run folder being written, a torn review shard: the count is a courtesy
        log.warning("counting the new accepted corrections failed: %s", err)
        return f"the accepted corrections waiting cannot be counted ({_problem(err)})"
    since = f"new since {new.since_run} ({new.since_verdict})" if new.since_run else "no run has finished yet"
    return f"{new.count} accepted corrections wait for the next run, {since}; a scheduled run starts at {new.needed}"


# --- the runs ------------------------------------------------------------------------------------
def run_row(run_dir: Path) -> dict:
    """One run as a row of the runs table (plain text cells)."""
    try:
        s = run_summary(run_dir)
    except Exception as err:  # e.g. a file of the run that is not readable at all
        log.warning("run %s cannot be read: %s", run_dir, err)
        return {**{c: "" for c in RUN_COLUMNS}, "Run": run_dir.name, "Stage reached": "?", "Verdict": "?",
                "Note": f"cannot be read ({_problem(err)})"}
    note = " ".join(s.message.split())
    note = note if len(note) <= NOTE_CHARS else note[: NOTE_CHARS - 1] + "…"
    if s.failed_ticks and not s.finished:
        note += f" [failed ticks: {s.failed_ticks}, last: {s.last_error}]"
    return {
        "Run": s.run_id, "Stage reached": s.stage_done, "Verdict": s.verdict, "Version": s.version or "",
        "Steps": "" if s.steps is None else str(s.steps), "Final loss": _num(s.final_loss, 4),
        "Held-out before": _num(s.heldout_before), "Held-out after": _num(s.heldout_after),
        "Drift": _num(s.drift), "Updated (UTC)": _when(s.updated_at), "Note": note,
    }


def runs_frame(runs: list[Path]) -> pd.DataFrame:
    """The runs table, a row per run in the order given."""
    if not runs:
        return empty_frame(RUN_COLUMNS)
    return pd.DataFrame([run_row(r) for r in runs], columns=list(RUN_COLUMNS))


def loss_frame(run_dir: Path) -> tuple[pd.DataFrame, str]:
    """The run's training loss per step (columns step, loss, for a line plot) and a line about it."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype=float)}), (
            "no training log yet (train_log.jsonl is missing: the train stage has not started)")
    try:
        curve = loss_curve(run_dir)
    except Exception as err:
        log.warning("%s cannot be read: %s", path, err)
        curve, note = [], f"train_log.jsonl cannot be read ({_problem(err)})"
    else:
        note = (f"{len(curve)} logged steps; last: step {curve[-1][0]}, loss {curve[-1][1]:.4f}" if curve
                else "train_log.jsonl has no loss yet (training has not logged a step)")
    frame = pd.DataFrame({"step": pd.Series([s for s, _ in curve], dtype="int64"),
                          "loss": pd.Series([v for _, v in curve], dtype=float)})
    return frame, note


@dataclass
class GateView:
    """A run's gate report as the tab shows it: the verdict and reason, and a row per measured prompt."""

    verdict: str  # "passed", "refused", or what is missing ("not run yet", "unreadable")
    reason: str
    figures: str = ""  # the report's measures in one line
    measure: str = ""  # what they mean
    heldout: pd.DataFrame = field(default_factory=lambda: empty_frame(HELDOUT_COLUMNS))
    drift: pd.DataFrame = field(default_factory=lambda: empty_frame(DRIFT_COLUMNS))


def _rows(details: dict, key: str) -> list[dict]:
    rows = details.get(key) if isinstance(details, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _text(value) -> str:
    return "" if value is None else str(value)


def heldout_frame(details: dict) -> pd.DataFrame:
    """Held-out corrections, before vs after: prompt, correction, greedy answers, NLL per token."""
    rows = [{"Prompt": _text(r.get("prompt")), "Correction": _text(r.get("correction")),
             "Answer before": _text(r.get("answer_before")), "Answer after": _text(r.get("answer_after")),
             "NLL before": _num(r.get("nll_before")), "NLL after": _num(r.get("nll_after"))}
            for r in _rows(details, "heldout")]
    return pd.DataFrame(rows, columns=list(HELDOUT_COLUMNS)) if rows else empty_frame(HELDOUT_COLUMNS)


def drift_frame(details: dict) -> pd.DataFrame:
    """Drift prompts: the base model's own answer and how much less likely the trained model finds it,
    largest rise first (the answer most likely to have flipped)."""
    gguf = details.get("gguf") if isinstance(details.get("gguf"), dict) else {}
    served = {u.get("prompt"): u for u in _rows(gguf, "unrelated")}  # the exported file's answers (newer reports)
    rows = []
    for r in _rows(details, "drift"):
        before, after = r.get("nll_before"), r.get("nll_after")
        answer = served.get(r.get("prompt"), {})
        rise = after - before if isinstance(before, (int, float)) and isinstance(after, (int, float)) else None
        rows.append((rise if rise is not None else float("-inf"), {
            "Prompt": _text(r.get("prompt")), "Base model's answer": _text(r.get("answer")),
            "Near the corrections": "yes" if r.get("near") else "", "NLL before": _num(before),
            "NLL after": _num(after), "Rise": _num(rise),
            "GGUF answer changed": {True: "changed", False: "same"}.get(answer.get("changed"), ""),
            "Trained GGUF's answer": _text(answer.get("answer")) if answer.get("changed") else ""}))
    rows.sort(key=lambda pair: -pair[0])
    return pd.DataFrame([row for _, row in rows], columns=list(DRIFT_COLUMNS)) if rows else empty_frame(DRIFT_COLUMNS)


def gate_figures(report: GateReport) -> str:
    """The gate's measures in one line: held-out log-likelihood before -> after, and the drift."""
    line = (f"held-out log-likelihood/token {report.heldout_before:.3f} -> {report.heldout_after:.3f}"
            f" · drift {report.drift:.3f}")
    near, worst = getattr(report, "drift_near", None), getattr(report, "drift_worst", None)  # newer reports only
    if near is not None:
        line += f" (near the corrections {near:.3f})"
    if worst is not None:
        line += f", at most {worst:.3f} on one prompt"
    answered, changed = getattr(report, "heldout_answered", None), getattr(report, "unrelated_changed", None)
    if answered is not None:
        line += f" · the exported GGUF answers {answered:.0%} of held-out corrections"
    if changed is not None:
        line += f", changed {changed:.0%} of unrelated answers"
    return line


def gate_view(run_dir: Path, stage_done: str | None = None) -> GateView:
    """The run's gate.json for people; what is missing when the gate has not run or its file is unreadable."""
    path = Path(run_dir) / "gate.json"
    if not path.exists():
        reached = f" (the run reached stage '{stage_done}')" if stage_done else ""
        return GateView("not run yet", f"no gate report: gate.json is missing{reached}")
    try:
        report = GateReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as err:  # written by hand, or a copy cut short
        log.warning("%s cannot be read: %s", path, err)
        return GateView("unreadable", f"gate.json cannot be read ({_problem(err)}): run the gate stage again")
    return GateView(
        verdict="passed" if report.passed else "refused", reason=report.reason, figures=gate_figures(report),
        measure=_text(report.details.get("measure")),
        heldout=heldout_frame(report.details), drift=drift_frame(report.details),
    )


# --- the whole tab -------------------------------------------------------------------------------
@dataclass
class RetrainingView:
    """Everything the Retraining tab shows, for one selected run."""

    serving: str
    schedule: str
    waiting: str
    runs_dir: Path
    runs: pd.DataFrame
    run_ids: list[str]  # newest first, as in the table
    selected: str | None  # None: no run yet
    loss: pd.DataFrame
    loss_note: str
    gate: GateView


def retraining_view(settings, selected: str | None = None, limit: int = RUN_ROWS) -> RetrainingView:
    """The Retraining tab for ``selected`` (a run id among the newest ``limit``; else the newest run).

    ``selected`` comes from the page: only an id of a listed run folder is used, so it names no other path.
    """
    runs_dir = Path(settings.retrain.runs_dir)
    try:
        runs = list_runs(runs_dir)[::-1][:limit]
    except OSError as err:
        log.warning("the runs folder %s cannot be listed: %s", runs_dir, err)
        runs = []
    ids = [r.name for r in runs]
    pick = selected if selected in ids else (ids[0] if ids else None)
    table = runs_frame(runs)
    if pick is None:
        loss, note = loss_frame(runs_dir / "-")  # an empty curve
        note = f"no runs yet in {runs_dir}"
        gate = GateView("no run", "no runs yet: a run starts when enough accepted corrections wait")
    else:
        run_dir = runs_dir / pick
        loss, note = loss_frame(run_dir)
        stage = table.loc[table["Run"] == pick, "Stage reached"].iloc[0]
        gate = gate_view(run_dir, stage)
    return RetrainingView(
        serving=serving_line(settings), schedule=schedule_line(settings), waiting=waiting_line(settings),
        runs_dir=runs_dir, runs=table, run_ids=ids, selected=pick, loss=loss, loss_note=note, gate=gate,
    )
