"""Restore: at start-up, bring the app's feedback folder back from its Hub dataset repo, in the background.

    >>> restore = Restore(HfApi(token=...), "me/flags", "data/feedback").start()
    >>> restore.line()        # for the review page while it runs; None once done
    'Restoring the flags and review decisions from the Hub dataset me/flags…'
    >>> restore.done.wait(60)

A Space's disk is empty after each restart, and the Hub is the durable copy: the first pull
(feedback/pull.py) brings every flag and decision back, so the review page shows them again. It
runs in its own thread so chatting starts at once; a failed attempt (the Hub down) is tried again
after 5, 10, 20, 40 s, then every minute, until one gets through. New records go to new shards
(their names carry a random token), so a restored shard is never one this process writes, and the
push that follows finds every restored line already on the Hub: nothing is pushed twice.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from huggingface_hub import HfApi

from feedback.pull import PullError, PullResult, pull_folder

log = logging.getLogger(__name__)

RETRY_WAITS_S = (5.0, 10.0, 20.0, 40.0, 60.0)  # then every 60 s


class Restore:
    """One background pull of the feedback folder, tried until it succeeds (see the module doc)."""

    def __init__(self, api: HfApi, repo_id: str, folder: str | Path, retry_waits: tuple[float, ...] = RETRY_WAITS_S):
        self.api = api
        self.repo_id = repo_id
        self.folder = Path(folder)
        self.retry_waits = retry_waits
        self.done = threading.Event()  # set once a pull got through
        self.result: PullResult | None = None
        self.error: str | None = None  # why the last attempt failed
        self.attempts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Restore":
        self._thread = threading.Thread(target=self._run, name="feedback-restore", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop retrying; an attempt under way ends with its request (its shards are whole either way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def line(self) -> str | None:
        """What the review page says while the restore has not got through; None once it has."""
        if self.done.is_set():
            return None
        text = f"Restoring the flags and review decisions from the Hub dataset {self.repo_id}…"
        if self.error:
            text += f" (attempt {self.attempts} failed: {self.error}; trying again)"
        return text

    def _run(self) -> None:
        log.info("restoring %s from the Hub dataset %s", self.folder, self.repo_id)
        waits = iter(self.retry_waits)
        while not self._stop.is_set():
            self.attempts += 1
            try:
                self.result = pull_folder(self.api, self.repo_id, self.folder)
            except PullError as err:
                self.error = str(err)
                wait = next(waits, self.retry_waits[-1] if self.retry_waits else 60.0)
                log.warning("restoring the feedback folder failed: %s; trying again in %g s", err, wait)
                self._stop.wait(wait)
                continue
            self.error = None
            self.done.set()
            log.info("restored the feedback folder: %s", self.result.summary())
            return
