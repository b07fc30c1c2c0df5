"""Follow the feedback dataset: before a run, push this host's own decisions, then pull everyone else's.

    >>> follow = follow_feedback(settings)     # does nothing without settings.dataset_repo
    >>> follow.ok, follow.message
    (True, 'feedback: pulled 12 records in 1 shard into data/feedback from me/flags at commit 3f2a9c1')

The app (a Space) pushes its flags and review decisions to `dataset_repo`; the training host reads
them from its own `feedback_dir`, which this brings up to date first (feedback/pull.py: only what
the folder lacks, each shard replaced whole). Reviewers may also work on the training host's own
review page: its decisions are pushed here before the pull (feedback/sync.py: each line once), so
both sides' decisions end up in the dataset, once each.

When the Hub cannot be reached (or answers 5xx, or refuses the token), the outcome is one line, in
the log, in the tick's result and in `python -m retrain status` (read back from `hub_pull.json`), and
`retrain.schedule.on_pull_failure` decides:

- "wait" (the default): no run starts or continues; the next tick tries again. The safer choice:
  the local copy may lack a reviewer's later reject of a correction it holds as accepted, and
  a model trained on that would be published.
- "train": go on with the local copy, saying how old it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from schemas.hub import PullState

log = logging.getLogger(__name__)


@dataclass
class FeedbackFollow:
    """What bringing the feedback folder up to date did: ok, or the one line saying why not."""

    ok: bool  # the folder holds the dataset repo's newest commit (or there is no dataset repo to follow)
    message: str
    state: PullState | None = None


def follow_feedback(settings) -> FeedbackFollow:
    """Push this host's unpushed review and flag lines, then pull the dataset repo into `feedback_dir`."""
    from huggingface_hub import HfApi

    from feedback.pull import PullError, pull_folder, read_pull_state, unpushed_shards
    from feedback.sync import FolderPusher, SyncError, hub_token, install_http_timeout

    repo = settings.dataset_repo
    if repo is None:
        return FeedbackFollow(True, "feedback: the local folder only (no dataset_repo)")
    folder = Path(settings.feedback_dir)
    token = hub_token(settings)
    install_http_timeout()  # a Hub that never answers fails the pull instead of holding the tick forever
    api = HfApi(token=token, library_name="flagloop")
    if token is not None and unpushed_shards(folder, read_pull_state(folder)):
        try:
            pushed = FolderPusher(api, repo, folder).push()
            log.info("%s", pushed.summary())
        except SyncError as err:  # they stay in the local shards (and count for this host's merge): pushed next time
            log.warning("this host's own records were not pushed to %s: %s", repo, err)
    try:
        result = pull_folder(api, repo, folder)
    except PullError as err:
        state = read_pull_state(folder)
        message = f"{err}; {copy_age(state)}"
        log.error("%s", message)
        return FeedbackFollow(False, message, state)
    return FeedbackFollow(True, f"feedback: {result.summary()}", read_pull_state(folder))


def copy_age(state: PullState | None, now: datetime | None = None) -> str:
    """How old the local copy of the dataset repo is, in words."""
    if state is None or state.pulled_at is None:
        return "the local feedback folder was never pulled from the Hub"
    now = now or datetime.now(timezone.utc)
    return (f"the local copy is of commit {state.commit[:7]}, pulled {state.pulled_at:%Y-%m-%d %H:%M} UTC "
            f"({age(now - state.pulled_at)} ago)")


def age(delta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def pull_line(settings, now: datetime | None = None) -> str | None:
    """The status line of the feedback pull (for `retrain status`); None without a dataset repo."""
    from feedback.pull import read_pull_state

    if settings.dataset_repo is None:
        return None
    state = read_pull_state(settings.feedback_dir)
    if state is None or state.repo != settings.dataset_repo:
        return f"feedback: follows {settings.dataset_repo}, not pulled yet (the next tick pulls it)"
    line = f"feedback: follows {state.repo}; {copy_age(state, now)}"
    if state.error:
        when = f" at {state.attempted_at:%Y-%m-%d %H:%M} UTC" if state.attempted_at else ""
        line += f"; the last pull{when} FAILED: {state.error}"
    return line


def pulled_revision(settings) -> str | None:
    """The dataset repo's commit the feedback folder was last brought up to (the merge pins it); None if never."""
    from feedback.pull import read_pull_state

    if settings.dataset_repo is None:
        return None
    state = read_pull_state(settings.feedback_dir)
    return state.commit if state is not None and state.repo == settings.dataset_repo else None
