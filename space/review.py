"""The review page: reviewers go through the flags and accept, reject or correct them.

Mounted as its own page of the app's Blocks (``/review``), so chat users never load it, and it
shows nothing until a reviewer logs in:

- locally, with a username and password from ``Settings.reviewers`` (``FLAGLOOP_REVIEWERS``);
- on a Hugging Face Space with OAuth enabled, with ``gr.LoginButton``, if the username is in
  ``Settings.reviewer_allowlist`` (``FLAGLOOP_REVIEWER_ALLOWLIST``).

A successful login is the only thing that puts a ``Reviewer`` in the session's ``gr.State``
(which lives on the server: a client cannot set it), and every handler checks it again
(``current_reviewer``) before reading or writing anything, so calling the endpoints directly
without logging in gets an error and no data. The endpoints are also private (not in the API
page, not callable by gradio_client). The app's chat users keep using the app without a login.

    with gr.Blocks() as demo:                 # the chat page (space.app.build_demo)
        ...
    mount_review(demo, ReviewApp(settings))   # adds /review

Two tabs: **Flags** (the table, one flag, accept/reject/correct, plots) and **Retraining** (what the
accepted corrections did: the version served, the schedule and the corrections waiting, the runs,
and one run's loss curve and gate report; data from ``space.runs_view``).

Handlers are plain methods returning the whole screen as a list in ``SCREEN`` order, so tests
call them without a browser. Everything users typed is shown as text: in text boxes, in a
Chatbot with escaped content and no markdown, in the table's plain-text cells, and escaped in
the one Markdown line of details; the Retraining tab's file text (gate.json holds corrections)
the same way, in plain-text table cells and escaped Markdown.
"""

from __future__ import annotations

import hmac
import html
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import gradio as gr
import pandas as pd
from pydantic import SecretStr, ValidationError

from feedback.plots import flags_per_day_by_reason, flags_per_model_version, status_share
from feedback.review_table import (
    NO_REASON,
    STATUSES,
    TABLE_COLUMNS,
    THUMBS,
    Filters,
    FlagIndex,
    filter_rows,
    model_versions,
    next_pending,
    review_rows,
    table_view,
)
from feedback.reviews import ReviewStore
from schemas.errors import describe
from schemas.flag import REASONS, FlagRecord
from schemas.review import ReviewDecision
from schemas.settings import Settings
from space.runs_view import DRIFT_COLUMNS, HELDOUT_COLUMNS, RUN_COLUMNS, RetrainingView, empty_frame, retraining_view

log = logging.getLogger(__name__)

PAGE_ROWS = 200  # rows the table shows at once; filters narrow the rest
MAX_FAILED_LOGINS = 5  # wrong passwords in a row for one reviewer name before logins are paused …
LOCKOUT_S = 300  # … for this long
LOGIN_TTL_S = 8 * 3600  # a reviewer's login lasts this long in an open page
STATUS_COLORS = {"pending": "#9ca3af", "accepted": "#16a34a", "rejected": "#dc2626"}

# Everything a handler returns, in this order (the components build_review_tab wires them to).
SCREEN = (
    "reviewer", "login_box", "review_box", "whoami", "login_status",
    "table", "summary", "models", "per_day", "share", "per_model",
    "current", "conversation", "system_prompt", "meta", "comment", "answer", "correction", "note",
    "status", "sync",
)
# What the Retraining tab's handlers return, in this order (its components, built by build_retraining_tab).
RETRAINING = ("rt_status", "rt_runs", "rt_run", "rt_loss", "rt_loss_note", "rt_gate", "rt_heldout", "rt_drift")


# --- who may review -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reviewer:
    """A logged-in reviewer, as the session's state holds it."""

    name: str
    via: Literal["password", "oauth"]


_DUMMY = SecretStr("not-a-password")


def check_password(reviewers: dict[str, SecretStr], username: str | None, password: str | None) -> Reviewer | None:
    """The reviewer these credentials belong to, or None; compared in constant time."""
    username, password = (username or "").strip(), password or ""
    secret = reviewers.get(username)
    ok = hmac.compare_digest((secret or _DUMMY).get_secret_value().encode(), password.encode())
    return Reviewer(username, "password") if secret is not None and ok and password else None


def allowed(username: str | None, allowlist: list[str]) -> bool:
    """Whether a Hugging Face username is on the reviewer allow-list (usernames are case-insensitive)."""
    if not username:
        return False
    return username.casefold() in {name.casefold() for name in allowlist}


def oauth_enabled(settings: Settings, space_id: str | None) -> bool:
    """Whether to offer 'Sign in with Hugging Face': only on a Space, and only with an allow-list.

    Off a Space, Gradio's LoginButton logs in as whoever owns the machine's HF token; that is
    no reviewer check, so it is never offered there.
    """
    return bool(space_id) and bool(settings.reviewer_allowlist)


def current_reviewer(state, profile, settings: Settings) -> Reviewer | None:
    """The session's reviewer, checked again now against the settings (and the OAuth session)."""
    if not isinstance(state, Reviewer):
        return None
    if state.via == "password":
        return state if state.name in settings.reviewers else None
    username = getattr(profile, "username", None)
    if username == state.name and allowed(username, settings.reviewer_allowlist):
        return state
    return None


class NotAReviewer(gr.Error):
    """Raised by every review handler when the session has no reviewer login."""

    def __init__(self):
        super().__init__("Log in as a reviewer first: this page shows flags to reviewers only.")


# --- showing user text safely -------------------------------------------------------------------
# Markdown punctuation to backslash (`<`, `>` and `&` are HTML-escaped instead; `:` and `@` so no autolink).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:@])")


def md_text(text: str) -> str:
    """``text`` for a Markdown component: HTML-escaped and markdown punctuation backslashed, so it
    renders as the same characters and never as a link, image or tag."""
    return html.escape(_MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split())), quote=True)


def chat_message(role: str, text: str) -> dict:
    """A conversation turn for the review Chatbot: escaped, and the Chatbot renders no markdown."""
    return {"role": role, "content": html.escape(text, quote=False)}


def flag_default_correction(record: FlagRecord) -> str:
    """What the correction box starts from for a flag: the user's correction, else the answer."""
    return record.correction if record.correction is not None else record.answer


def shown_correction(record: FlagRecord, decision: ReviewDecision | None) -> str:
    """The correction as it stands: a reviewer's edit accepted on this revision, else the flag's."""
    if decision is not None and decision.flag_record_id == record.record_id and decision.correction is not None:
        return decision.correction
    return flag_default_correction(record)


def describe_flag(record: FlagRecord, decision: ReviewDecision | None, model: str) -> str:
    """The flag's details as one escaped Markdown paragraph."""
    parts = [
        f"**Flag** {md_text(record.flag_id)} · revision {record.revision}",
        f"created {record.created_at:%Y-%m-%d %H:%M} UTC",
        f"model {md_text(model)}",
        f"thumbs {md_text(record.thumbs or 'none')}",
        f"reasons: {md_text(', '.join(record.reasons) or NO_REASON)}",
    ]
    if decision is None:
        parts.append("**pending**")
    else:
        what = "accepted" if decision.action == "accept" else "rejected"
        edited = " with an edited correction" if decision.correction is not None else ""
        stale = " — on an earlier revision: pending again" if decision.flag_record_id != record.record_id else ""
        parts.append(f"**{what}**{edited} by {md_text(decision.reviewer)} "
                     f"on {decision.created_at:%Y-%m-%d %H:%M}{stale}")
    return " · ".join(parts)


# --- the page's data and handlers ---------------------------------------------------------------
class ReviewApp:
    """The review page's shared parts (settings, the flag index, the decisions) and its handlers."""

    def __init__(self, settings: Settings, feedback_dir: str | Path | None = None, space_id: str | None = None,
                 page_rows: int = PAGE_ROWS, clock=time.monotonic, sync_status: Callable[[], str] | None = None):
        """``space_id``: the Hugging Face Space this runs in (default: the SPACE_ID variable Spaces set).
        ``sync_status``: a one-line status of the Hub sync to show reviewers (e.g. ``lambda: sync.status().line()``).
        """
        self.sync_status = sync_status
        self.settings = settings
        self.root = Path(feedback_dir or settings.feedback_dir)
        self.index = FlagIndex(self.root)
        self.reviews = ReviewStore(self.root, max_bytes=settings.shard_max_bytes)
        self.oauth = oauth_enabled(settings, space_id if space_id is not None else os.environ.get("SPACE_ID"))
        self.page_rows = page_rows
        self.clock = clock
        self._lock = threading.Lock()  # the index is read by one handler at a time
        self._failures: dict[str, list[float]] = {}  # reviewer name -> times of recent wrong passwords

    def close(self) -> None:
        self.reviews.close()

    # data -------------------------------------------------------------------------------------
    def rows(self) -> pd.DataFrame:
        """Every flag's latest revision with its review status, flags saved since included."""
        with self._lock:
            self.index.refresh()
            return review_rows(self.index.frame(), self.reviews.refresh())

    def _require(self, state, profile) -> Reviewer:
        reviewer = current_reviewer(state, profile, self.settings)
        if reviewer is None:
            log.warning("review request without a reviewer login refused")
            raise NotAReviewer()
        return reviewer

    @staticmethod
    def _filters(reasons, statuses, models, thumbs, start, end) -> Filters:
        try:
            return Filters.of(reasons, statuses, models, thumbs, start, end)
        except ValueError as err:
            raise gr.Error(f"Filter not applied: {err}.") from None

    def _screen(self, reviewer: Reviewer | None, filters: Filters | None = None, flag_id: str | None = None,
                status: str = "", rows: pd.DataFrame | None = None) -> list:
        """The whole screen: logged out (everything empty and hidden), or the table, plots and one flag."""
        if reviewer is None:
            return self._logged_out(status)
        rows = self.rows() if rows is None else rows
        kept = filter_rows(rows, filters or Filters())
        shown = kept["flag_id"].head(self.page_rows).tolist()
        with self._lock:
            texts = self.index.texts(shown)
        table = table_view(kept, texts, self.page_rows)
        pending = int((kept["status"] == "pending").sum())
        summary = (f"**{len(kept):,}** of {len(rows):,} flags match · **{pending:,}** pending"
                   + (f" · showing the newest {len(shown):,}" if len(kept) > len(shown) else ""))
        screen = {
            "reviewer": reviewer,
            "login_box": gr.update(visible=False),
            "review_box": gr.update(visible=True),
            "whoami": f"Reviewing as **{md_text(reviewer.name)}**",
            "login_status": "",
            "table": table,
            "summary": summary,
            "models": gr.update(choices=model_versions(rows)),
            "per_day": flags_per_day_by_reason(rows),
            "share": status_share(rows),
            "per_model": flags_per_model_version(rows),
            "status": status,
            "sync": self._sync_line(),
            **self._detail(flag_id, rows),
        }
        return [screen[name] for name in SCREEN]

    def _detail(self, flag_id: str | None, rows: pd.DataFrame) -> dict:
        if flag_id is None:
            return {"current": None, "conversation": [], "system_prompt": "", "meta": "", "comment": "",
                    "answer": "", "correction": "", "note": ""}
        with self._lock:
            record = self.index.record(flag_id)
        decision = self.reviews.get(flag_id)
        model = str(rows.loc[rows["flag_id"] == flag_id, "model_version"].iloc[0])
        correction = shown_correction(record, decision)
        return {
            "current": {"flag_id": flag_id, "record_id": record.record_id, "baseline": correction},
            "conversation": [chat_message(m.role, m.content) for m in record.conversation],
            "system_prompt": record.system_prompt,
            "meta": describe_flag(record, decision, model),
            "comment": record.comment,
            "answer": record.answer,
            "correction": correction,
            "note": "",
        }

    def _logged_out(self, message: str = "") -> list:
        screen = {
            "reviewer": None, "login_box": gr.update(visible=True), "review_box": gr.update(visible=False),
            "whoami": "", "login_status": message, "table": pd.DataFrame(columns=list(TABLE_COLUMNS.values())),
            "summary": "", "models": gr.update(choices=[], value=[]), "per_day": None, "share": None,
            "per_model": None, "status": "", "sync": "",
            **self._detail(None, pd.DataFrame()),
        }
        return [screen[name] for name in SCREEN]

    def _sync_line(self) -> str:
        if self.sync_status is None:
            return ""
        try:
            return f"🔄 {md_text(self.sync_status())}"
        except Exception as err:  # the status is a courtesy: never let it break the page
            log.exception("the Hub sync status failed")
            return f"🔄 Hub sync status unavailable ({md_text(type(err).__name__)})"

    def _first(self, rows: pd.DataFrame, filters: Filters) -> str | None:
        return next_pending(filter_rows(rows, filters), None)

    # handlers ---------------------------------------------------------------------------------
    def login(self, username, password, reasons, statuses, models, thumbs, start, end) -> list:
        """Log in with a username and password from the settings; show the first pending flag."""
        name, now = (username or "").strip()[:64], self.clock()
        with self._lock:
            recent = [t for t in self._failures.pop(name, []) if now - t < LOCKOUT_S]
            if recent:
                self._failures[name] = recent
        if len(recent) >= MAX_FAILED_LOGINS:
            log.warning("review login for %r refused: too many wrong passwords", name)
            return self._logged_out(f"❌ Too many wrong passwords for {md_text(name)}: try again in "
                                    f"{int(LOCKOUT_S - (now - recent[0])) // 60 + 1} minutes.")
        reviewer = check_password(self.settings.reviewers, username, password)
        if reviewer is None:
            log.warning("failed review login for %r", name)
            if name in self.settings.reviewers:  # only real names are worth guarding (and memory stays bounded)
                with self._lock:
                    self._failures.setdefault(name, []).append(now)
            return self._logged_out("❌ Wrong username or password.")
        with self._lock:
            self._failures.pop(name, None)
        log.info("reviewer %s logged in", reviewer.name)
        return self._open(reviewer, reasons, statuses, models, thumbs, start, end)

    def oauth_login(self, state, reasons, statuses, models, thumbs, start, end,
                    profile: gr.OAuthProfile | None = None) -> list:
        """On page load: a Hugging Face user on the allow-list becomes this page's reviewer."""
        if not self.oauth or profile is None:
            return self._screen(current_reviewer(state, profile, self.settings))
        if not allowed(profile.username, self.settings.reviewer_allowlist):
            return self._logged_out(f"❌ {md_text(profile.username)} is not on the reviewer allow-list.")
        return self._open(Reviewer(profile.username, "oauth"), reasons, statuses, models, thumbs, start, end)

    def _open(self, reviewer: Reviewer, reasons, statuses, models, thumbs, start, end) -> list:
        filters = self._filters(reasons, statuses, models, thumbs, start, end)
        rows = self.rows()
        return self._screen(reviewer, filters, self._first(rows, filters), rows=rows)

    def logout(self, state) -> list:
        """Forget the reviewer and empty the page."""
        if isinstance(state, Reviewer):
            log.info("reviewer %s logged out", state.name)
        return self._logged_out("Logged out.")

    def refresh(self, state, current, reasons, statuses, models, thumbs, start, end,
                profile: gr.OAuthProfile | None = None) -> list:
        """Read the flags and decisions saved since (other processes' too) and apply the filters."""
        reviewer = self._require(state, profile)
        filters = self._filters(reasons, statuses, models, thumbs, start, end)
        rows = self.rows()
        kept = filter_rows(rows, filters)
        flag_id = (current or {}).get("flag_id")
        if flag_id not in set(kept["flag_id"]):
            flag_id = next_pending(kept, None)
        return self._screen(reviewer, filters, flag_id, rows=rows)

    def show(self, state, flag_id, reasons, statuses, models, thumbs, start, end,
             profile: gr.OAuthProfile | None = None) -> list:
        """Open one flag: its conversation, answer and correction."""
        reviewer = self._require(state, profile)
        filters = self._filters(reasons, statuses, models, thumbs, start, end)
        rows = self.rows()
        if flag_id not in set(rows["flag_id"]):
            raise gr.Error(f"There is no flag {flag_id!r}.")
        return self._screen(reviewer, filters, flag_id, rows=rows)

    def select(self, state, reasons, statuses, models, thumbs, start, end, evt: gr.SelectData,
               profile: gr.OAuthProfile | None = None) -> list:
        """A click on a table row opens that flag."""
        row = evt.row_value or []
        return self.show(state, row[0] if row else None, reasons, statuses, models, thumbs, start, end, profile)

    def skip(self, state, current, reasons, statuses, models, thumbs, start, end,
             profile: gr.OAuthProfile | None = None) -> list:
        """Go to the next pending flag without deciding this one."""
        reviewer = self._require(state, profile)
        filters = self._filters(reasons, statuses, models, thumbs, start, end)
        rows = self.rows()
        flag_id = next_pending(filter_rows(rows, filters), (current or {}).get("flag_id"))
        status = "" if flag_id else "No other pending flag in this view."
        return self._screen(reviewer, filters, flag_id or (current or {}).get("flag_id"), status, rows=rows)

    def accept(self, state, current, correction, note, reasons, statuses, models, thumbs, start, end,
               profile: gr.OAuthProfile | None = None) -> list:
        """Accept the flag as it stands (its correction, or an earlier reviewer's edit)."""
        return self._decide("accept", state, current, correction, note, (reasons, statuses, models, thumbs, start, end),
                            profile)

    def accept_edited(self, state, current, correction, note, reasons, statuses, models, thumbs, start, end,
                      profile: gr.OAuthProfile | None = None) -> list:
        """Accept the flag with the correction as the reviewer edited it."""
        return self._decide("edit", state, current, correction, note, (reasons, statuses, models, thumbs, start, end),
                            profile)

    def reject(self, state, current, correction, note, reasons, statuses, models, thumbs, start, end,
               profile: gr.OAuthProfile | None = None) -> list:
        """Reject the flag: it will not become training data."""
        return self._decide("reject", state, current, correction, note, (reasons, statuses, models, thumbs, start, end),
                            profile)

    # the Retraining tab ------------------------------------------------------------------------
    def retraining(self, state, run_id, profile: gr.OAuthProfile | None = None) -> list:
        """The Retraining tab: the serving version, the schedule, the runs, and one run's loss and gate report."""
        self._require(state, profile)
        return self._retraining(retraining_view(self.settings, run_id))

    def retraining_select(self, state, evt: gr.SelectData, profile: gr.OAuthProfile | None = None) -> list:
        """A click on a row of the runs table shows that run."""
        row = evt.row_value or []
        return self.retraining(state, row[0] if row else None, profile)

    def retraining_shown(self, state, profile: gr.OAuthProfile | None = None) -> list:
        """After a login or a logout: the tab with the newest run for a reviewer, else empty."""
        if current_reviewer(state, profile, self.settings) is None:
            return self._retraining(None)
        return self._retraining(retraining_view(self.settings))

    @staticmethod
    def _retraining(view: RetrainingView | None) -> list:
        """The tab's components from a view (None: logged out, everything empty); file text escaped."""
        if view is None:
            parts = {"rt_status": "", "rt_runs": empty_frame(RUN_COLUMNS), "rt_run": gr.update(choices=[], value=None),
                     "rt_loss": None, "rt_loss_note": "", "rt_gate": "", "rt_heldout": empty_frame(HELDOUT_COLUMNS),
                     "rt_drift": empty_frame(DRIFT_COLUMNS)}
            return [parts[name] for name in RETRAINING]
        gate = view.gate
        run = md_text(view.selected or "")
        parts = {
            "rt_status": "\n\n".join([
                f"**Serving:** {md_text(view.serving)}",
                f"**Schedule:** {md_text(view.schedule)}",
                f"**Waiting:** {md_text(view.waiting)}",
                f"**Runs** in {md_text(view.runs_dir)}: {len(view.run_ids):,} shown, newest first",
            ]),
            "rt_runs": view.runs,
            "rt_run": gr.update(choices=view.run_ids, value=view.selected),
            "rt_loss": view.loss,
            "rt_loss_note": f"**Training loss** {run} · {md_text(view.loss_note)}",
            "rt_gate": "\n\n".join([f"**Gate: {md_text(gate.verdict)}** {run} — {md_text(gate.reason)}",
                                     *(md_text(text) for text in (gate.figures, gate.measure) if text)]),
            "rt_heldout": gate.heldout,
            "rt_drift": gate.drift,
        }
        return [parts[name] for name in RETRAINING]

    def _decide(self, how: str, state, current, correction, note, filter_values, profile) -> list:
        reviewer = self._require(state, profile)
        filters = self._filters(*filter_values)
        if not current or not current.get("flag_id"):
            raise gr.Error("Pick a flag first: click a row of the table.")
        flag_id, correction, note = current["flag_id"], correction or "", (note or "").strip()
        edited = correction != current["baseline"]
        if how == "accept" and edited:
            raise gr.Error("You edited the correction: press 'Accept edited' (Ctrl+Enter) to keep your edit, "
                           "or put it back as it was.")
        if how == "edit" and not edited:
            raise gr.Error("The correction is unchanged: edit it first, or press 'Accept'.")
        limit = self.settings.max_comment_chars
        for name, text in (("correction", correction), ("note", note)):
            if len(text) > limit:
                raise gr.Error(f"The {name} is {len(text):,} characters long and the limit is {limit:,}: shorten it.")
        with self._lock:
            record = self.index.record(flag_id)
        if how == "reject":
            decided = None
        else:
            decided = correction if correction != flag_default_correction(record) else None
        rows = self.rows()
        after = next_pending(filter_rows(rows, filters), flag_id)  # where to go next, from where we are
        try:
            decision = ReviewDecision(
                flag_id=flag_id, flag_record_id=current["record_id"], action="reject" if how == "reject" else "accept",
                correction=decided, note=note, reviewer=reviewer.name,
            )
        except ValidationError as err:
            raise gr.Error(f"Decision not saved: {describe(err)}.") from None
        try:
            self.reviews.append(decision)
        except OSError as err:
            log.exception("saving the decision on %s failed", flag_id)
            raise gr.Error(f"Decision NOT saved: the feedback folder could not be written ({err}). "
                           "Try again.") from None
        log.info("reviewer %s: %s flag %s", reviewer.name, decision.action, flag_id)
        word = {"accept": "Accepted", "edit": "Accepted with your correction", "reject": "Rejected"}[how]
        rows = self.rows()
        left = int((filter_rows(rows, filters)["status"] == "pending").sum())
        status = f"✅ {word}: flag {md_text(flag_id)}. {left:,} pending left in this view."
        if after is None:
            status += " Nothing left to review here."
        return self._screen(reviewer, filters, after, status, rows=rows)


# --- the page -----------------------------------------------------------------------------------
KEYS_JS = """
() => {
  if (window.__flagloopReviewKeys) return;
  window.__flagloopReviewKeys = true;
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.isContentEditable);
    const click = (id) => {
      const b = document.getElementById(id);
      if (b && !b.disabled) { e.preventDefault(); b.click(); }
    };
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && t && t.closest && t.closest("#review-correction")) {
      return click("review-accept-edited");
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "a") click("review-accept");
    else if (e.key === "r") click("review-reject");
    else if (e.key === "n" || e.key === "j") click("review-next");
    else if (e.key === "e") {
      const box = document.querySelector("#review-correction textarea");
      if (box) { e.preventDefault(); box.focus(); }
    }
  });
}
"""

KEYS_HELP = ("Keys: **a** accept · **r** reject · **n** next pending · **e** edit the correction, then "
             "**Ctrl+Enter** accept edited · **Tab** moves between controls")


def build_review_tab(app: ReviewApp, page: gr.Blocks | None = None) -> dict:
    """Build the review page's components and events inside the current Blocks (or route) context.

    ``page`` is the Blocks (or route) the components are in, for the page-load events (keyboard
    shortcuts, OAuth sign-in). Returns the components by name (SCREEN's names and the controls).
    """
    s = app.settings
    reviewer = gr.State(None, time_to_live=LOGIN_TTL_S)
    current = gr.State(None, time_to_live=LOGIN_TTL_S)
    gr.Markdown("## flagloop — review flags")
    with gr.Column(visible=True, elem_id="review-login-box") as login_box:
        if s.reviewers:
            username = gr.Textbox(label="Reviewer", elem_id="review-username", autofocus=True)
            password = gr.Textbox(label="Password", type="password", elem_id="review-password")
            login_btn = gr.Button("Log in", variant="primary", elem_id="review-login")
        else:
            username = password = login_btn = None
        if app.oauth:
            gr.LoginButton()
        if not s.reviewers and not app.oauth:
            gr.Markdown("No reviewers are configured: set FLAGLOOP_REVIEWERS (e.g. `{\"ana\": \"a password\"}`), "
                        "or FLAGLOOP_REVIEWER_ALLOWLIST on a Space with Hugging Face OAuth.")
        login_status = gr.Markdown(elem_id="review-login-status")
    with gr.Column(visible=False, elem_id="review-box") as review_box:
        with gr.Row():
            whoami = gr.Markdown(elem_id="review-whoami")
            sync = gr.Markdown(elem_id="review-sync")
            refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="review-refresh")
            logout_btn = gr.Button("Log out", size="sm", scale=0, elem_id="review-logout")
        with gr.Tabs(elem_id="review-tabs"):
            with gr.Tab("Flags", id="flags", elem_id="review-tab-flags"):
                with gr.Row():
                    f_reasons = gr.Dropdown([*REASONS, NO_REASON], value=[], multiselect=True,
                                            label="Reason (any of)", elem_id="review-filter-reasons")
                    f_status = gr.CheckboxGroup(list(STATUSES), value=["pending"], label="Status",
                                                elem_id="review-filter-status")
                    f_models = gr.Dropdown([], value=[], multiselect=True, label="Model version",
                                           elem_id="review-filter-models")
                    f_thumbs = gr.CheckboxGroup(list(THUMBS), value=[], label="Thumbs",
                                                elem_id="review-filter-thumbs")
                    f_start = gr.Textbox(label="From (UTC day)", placeholder="YYYY-MM-DD",
                                         elem_id="review-filter-start")
                    f_end = gr.Textbox(label="To (UTC day)", placeholder="YYYY-MM-DD", elem_id="review-filter-end")
                summary = gr.Markdown(elem_id="review-summary")
                table = gr.Dataframe(
                    headers=list(TABLE_COLUMNS.values()), datatype="str", interactive=False, wrap=False,
                    max_height=360, elem_id="review-table", label="Flags (click a row to open it)",
                )
                status = gr.Markdown(elem_id="review-status")
                gr.Markdown(KEYS_HELP)
                meta = gr.Markdown(elem_id="review-meta")
                with gr.Row():
                    with gr.Column(scale=1):
                        conversation = gr.Chatbot(label="Conversation", height=360, render_markdown=False,
                                                  elem_id="review-conversation", feedback_options=None,
                                                  buttons=["copy"])
                        system_prompt = gr.Textbox(label="System prompt", interactive=False, lines=1, max_lines=4,
                                                   elem_id="review-system-prompt")
                        comment = gr.Textbox(label="User's comment", interactive=False, lines=2,
                                             elem_id="review-comment")
                    with gr.Column(scale=1):
                        answer = gr.Textbox(label="Original answer", interactive=False, lines=6,
                                            elem_id="review-answer")
                        correction = gr.Textbox(label="Correction (edit it, then 'Accept edited')", lines=6,
                                                elem_id="review-correction")
                        note = gr.Textbox(label="Reviewer's note (optional)", lines=1, elem_id="review-note")
                        with gr.Row():
                            accept_btn = gr.Button("Accept (a)", variant="primary", elem_id="review-accept")
                            edit_btn = gr.Button("Accept edited (Ctrl+Enter)", elem_id="review-accept-edited")
                            reject_btn = gr.Button("Reject (r)", variant="stop", elem_id="review-reject")
                            next_btn = gr.Button("Next pending (n)", elem_id="review-next")
                with gr.Accordion("At a glance: all flags", open=True):
                    with gr.Row():
                        per_day = gr.BarPlot(x="day", y="flags", color="reason", title="Flags per day by reason",
                                             elem_id="review-plot-day", height=260)
                        share = gr.BarPlot(x="status", y="flags", color="status", title="Status",
                                           color_map=STATUS_COLORS, elem_id="review-plot-share", height=260)
                        per_model = gr.BarPlot(x="model", y="flags", color="status", title="Flags per model version",
                                               color_map=STATUS_COLORS, elem_id="review-plot-model", height=260)
            with gr.Tab("Retraining", id="retraining", elem_id="review-tab-retraining") as retraining_tab:
                rt = build_retraining_tab()

    parts = {
        "reviewer": reviewer, "login_box": login_box, "review_box": review_box, "whoami": whoami,
        "login_status": login_status, "table": table, "summary": summary, "models": f_models, "per_day": per_day,
        "share": share, "per_model": per_model, "current": current, "conversation": conversation,
        "system_prompt": system_prompt, "meta": meta, "comment": comment, "answer": answer,
        "correction": correction, "note": note, "status": status, "sync": sync,
    }
    screen = [parts[name] for name in SCREEN]
    rt_screen = [rt[name] for name in RETRAINING]
    filters = [f_reasons, f_status, f_models, f_thumbs, f_start, f_end]
    private = dict(api_visibility="private", concurrency_limit=None)
    if login_btn is not None:
        for trigger in (login_btn.click, password.submit):
            trigger(app.login, [username, password, *filters], screen, **private).then(
                lambda: "", None, password, api_visibility="private",  # never keep the password in the page
            ).then(app.retraining_shown, [reviewer], rt_screen, **private)
    logout_btn.click(app.logout, [reviewer], screen, **private).then(
        app.retraining_shown, [reviewer], rt_screen, **private)
    refresh_btn.click(app.refresh, [reviewer, current, *filters], screen, **private)
    for f in (f_reasons, f_status, f_models, f_thumbs):
        f.input(app.refresh, [reviewer, current, *filters], screen, **private)
    for f in (f_start, f_end):
        f.submit(app.refresh, [reviewer, current, *filters], screen, **private)
        f.blur(app.refresh, [reviewer, current, *filters], screen, **private)
    table.select(app.select, [reviewer, *filters], screen, **private)
    decide = [reviewer, current, correction, note, *filters]
    accept_btn.click(app.accept, decide, screen, **private)
    edit_btn.click(app.accept_edited, decide, screen, **private)
    reject_btn.click(app.reject, decide, screen, **private)
    next_btn.click(app.skip, [reviewer, current, *filters], screen, **private)
    for trigger in (retraining_tab.select, rt["refresh"].click, rt["rt_run"].input):  # opening the tab reads afresh
        trigger(app.retraining, [reviewer, rt["rt_run"]], rt_screen, **private)
    rt["rt_runs"].select(app.retraining_select, [reviewer], rt_screen, **private)
    if page is not None:
        page.load(fn=None, inputs=None, outputs=None, js=KEYS_JS, api_visibility="private")
        if app.oauth:
            page.load(app.oauth_login, [reviewer, *filters], screen, **private).then(
                app.retraining_shown, [reviewer], rt_screen, **private)
    return {**parts, **rt, "username": username, "password": password, "filters": filters}


def build_retraining_tab() -> dict:
    """The Retraining tab's components (RETRAINING's names, and its refresh button); build_review_tab wires them."""
    status = gr.Markdown(elem_id="review-rt-status")
    with gr.Row():
        run = gr.Dropdown([], value=None, label="Run shown below (or click a row of the table)",
                          elem_id="review-rt-run", scale=4)
        refresh = gr.Button("Refresh runs", size="sm", scale=0, elem_id="review-rt-refresh")
    runs = gr.Dataframe(
        headers=list(RUN_COLUMNS), datatype="str", interactive=False, wrap=False, max_height=300,
        elem_id="review-rt-runs", label="Runs, newest first (held-out: log-likelihood per token, higher is better; "
        "drift: rise of NLL per token of the old answers)",
    )
    with gr.Row():
        with gr.Column(scale=1):
            loss = gr.LinePlot(x="step", y="loss", title="Training loss", elem_id="review-rt-loss", height=280)
            loss_note = gr.Markdown(elem_id="review-rt-loss-note")
        with gr.Column(scale=1):
            gate = gr.Markdown(elem_id="review-rt-gate")
    heldout = gr.Dataframe(
        headers=list(HELDOUT_COLUMNS), datatype="str", interactive=False, wrap=True, max_height=360,
        elem_id="review-rt-heldout",
        label="Held-out corrections, before vs after training (NLL per token: lower is better)",
    )
    drift = gr.Dataframe(
        headers=list(DRIFT_COLUMNS), datatype="str", interactive=False, wrap=True, max_height=360,
        elem_id="review-rt-drift",
        label="Drift prompts: the base model's own answers, before vs after (a rise: forgotten)",
    )
    return {"rt_status": status, "rt_runs": runs, "rt_run": run, "rt_loss": loss, "rt_loss_note": loss_note,
            "rt_gate": gate, "rt_heldout": heldout, "rt_drift": drift, "refresh": refresh}


def mount_review(demo: gr.Blocks, app: ReviewApp, path: str = "review", show_in_navbar: bool = False) -> dict:
    """Add the review page to ``demo`` at ``/<path>`` (call it after the ``with gr.Blocks()`` block).

    Hidden from the navbar by default: chat users have no reason to go there; reviewers know the address.
    (Gradio still draws a navbar with a lone 'Home' link on every page of a multipage app, and
    gr.Navbar(visible=False) does not hide it in Gradio 6: gradio-app/gradio#12532.)
    """
    with demo.route("Review", f"/{path}", show_in_navbar=show_in_navbar) as page:
        return build_review_tab(app, page)
