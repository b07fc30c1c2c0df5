"""Hub sync: push the feedback folder to a Hub dataset repo, every complete record exactly once.

    >>> sync = start_sync(settings)     # None unless FLAGLOOP_DATASET_REPO (and a token) are set
    >>> sync.status().line()
    'Hub sync to me/flags: last push 2025-05-01 12:00:03 UTC (commit 3f2a9c1), 0 records pending, 42 on the Hub, ...'
    >>> sync.shutdown()                 # a last push, then the timer stops

`HubSync` is a `huggingface_hub.CommitScheduler` (its timer thread, `trigger()`, `stop()`, the push at
exit) whose `push_to_hub` never rewrites what is on the Hub. For each local shard
(`<feedback_dir>/flags/*.jsonl`, `<feedback_dir>/reviews/*.jsonl`) a push uploads only the bytes from
what the Hub already has up to the shard's last complete line, as a new file:

    flags/<shard stem>/<start:012d>-<end:012d>.jsonl      bytes [start, end) of flags/<shard stem>.jsonl

What the Hub already has is read from the Hub at each push (the largest `end` among a shard's part
files, listed at the branch head the commit then names as its parent), not from local memory: a
commit whose answer was lost, a crash, a restart, or a second pusher (`python -m feedback push`
while the app runs) never sends a record twice, and records saved while the Hub was down go with
the first push that gets through. The torn last line of a shard (a write still going on, or cut by
a crash) is never pushed. The first push also writes README.md, a dataset card whose `configs`
make `datasets.load_dataset(repo, "flags")` (and "reviews") and the Hub's viewer work.

A push retries a failed attempt (5xx, 429, 412, time-outs, a dropped connection) after 1, 2 and 4 s,
listing the Hub again each time; then the tick fails, the status says why, and the next tick tries
again. The local shards are the source of truth throughout: nothing here writes to them.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import httpx2
from huggingface_hub import CommitOperationAdd, CommitScheduler, DatasetCard, HfApi, get_token, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import set_client_factory

log = logging.getLogger(__name__)

FOLDERS = ("flags", "reviews")  # local subfolders of shards, and the folders (and configs) on the Hub
PART = re.compile(r"^(\d{12})-(\d{12})\.jsonl$")
HTTP_TIMEOUT_S = 60.0  # no answer for this long: the request fails (huggingface_hub's client waits forever)
RETRY_WAITS_S = (1.0, 2.0, 4.0)  # waits before the 2nd, 3rd and 4th attempt of one push
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After fails the tick instead of holding the push
MAX_COMMIT_BYTES = 64 * 1024 * 1024  # a larger backlog goes in several commits of one push
TRANSIENT_STATUS = (408, 409, 412, 429, 500, 502, 503, 504)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class SyncStatus:
    """Where the sync stands, for reviewers and logs: what is pushed, what waits, what went wrong."""

    repo: str
    last_push_at: datetime | None = None  # when a commit of ours last landed
    last_commit: str | None = None  # its sha
    pending_records: int = 0  # complete lines of the local shards not known to be on the Hub
    pushed_records: int = 0  # complete lines of the local shards known to be on the Hub
    last_error: str | None = None  # why the last push failed; None once a push succeeds
    next_push_at: datetime | None = None  # the timer's next tick (None outside HubSync)

    def line(self) -> str:
        """One line saying all of it, e.g. for a log or a status box."""
        when = self.last_push_at.strftime("%Y-%m-%d %H:%M:%S UTC") if self.last_push_at else "never"
        commit = f" (commit {self.last_commit[:7]})" if self.last_commit else ""
        text = (f"Hub sync to {self.repo}: last push {when}{commit}, {plural(self.pending_records, 'record')} pending, "
                f"{self.pushed_records} on the Hub")
        if self.next_push_at:
            text += f", next push {self.next_push_at.strftime('%H:%M:%S UTC')}"
        if self.last_error:
            text += f"; last error: {self.last_error}"
        return text


@dataclass
class PushResult:
    """What one push sent: records per folder, and the commits it made."""

    repo: str
    records: dict[str, int] = field(default_factory=lambda: {folder: 0 for folder in FOLDERS})
    commits: list[str] = field(default_factory=list)
    card_written: bool = False

    def summary(self) -> str:
        if not self.commits:
            return f"nothing new to push: {self.repo} has every complete record of the local shards"
        counts = ", ".join(plural(n, f"{folder[:-1]} record") for folder, n in self.records.items())
        card = " and the dataset card" if self.card_written else ""
        shas = ", ".join(sha[:7] for sha in self.commits)
        return f"pushed {counts}{card} to {self.repo} in {'commits' if len(self.commits) > 1 else 'commit'} {shas}"


class SyncError(Exception):
    """A push that did not get through: the message says why in one line, without the token."""


# -- the Hub's layout ---------------------------------------------------------------------------


def part_path(folder: str, stem: str, start: int, end: int) -> str:
    """Where bytes [start, end) of the local shard `<folder>/<stem>.jsonl` go on the Hub."""
    return f"{folder}/{stem}/{start:012d}-{end:012d}.jsonl"


def parse_part(path: str) -> tuple[str, str, int, int] | None:
    """(folder, stem, start, end) of a part file's path on the Hub; None for any other file."""
    pieces = path.split("/")
    if len(pieces) != 3 or pieces[0] not in FOLDERS or not (m := PART.match(pieces[2])):
        return None
    return pieces[0], pieces[1], int(m.group(1)), int(m.group(2))


def dataset_card(repo_id: str) -> str:
    """The README.md of the dataset repo: `configs` for datasets and the viewer, features from the schemas."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from huggingface_hub import DatasetCardData

    from feedback.dataset import features_of, flag_features
    from schemas.review import ReviewDecision

    data = DatasetCardData(configs=card_configs())
    DatasetInfosDict({
        "flags": DatasetInfo(features=flag_features(), config_name="flags"),
        "reviews": DatasetInfo(features=features_of(ReviewDecision), config_name="reviews"),
    }).to_dataset_card_data(data)
    body = f"""# flagloop feedback

Flags (`FlagRecord`) and review decisions (`ReviewDecision`) saved by a flagloop app, pushed as they come.

```python
from datasets import load_dataset

flags = load_dataset("{repo_id}", "flags", split="train")      # every saved revision of every flag
reviews = load_dataset("{repo_id}", "reviews", split="train")  # every review decision
```

A flag saved again becomes a new line with the same `flag_id` and the next `revision`: the highest
revision wins. A flag's latest review decision (by `created_at`) wins.

Each file `flags/<shard>/<start>-<end>.jsonl` holds bytes `start` to `end` of one local JSONL shard,
whole lines only; files are added, never rewritten. `python -m feedback pull --to FOLDER` puts the
shards back together.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def card_configs() -> list[dict]:
    """The `configs` of the card: `flags` (the default) and `reviews`, one train split each."""
    return [
        {"config_name": "flags", "default": True, "data_files": [{"split": "train", "path": "flags/**/*.jsonl"}]},
        {"config_name": "reviews", "data_files": [{"split": "train", "path": "reviews/**/*.jsonl"}]},
    ]


def git_blob_id(data: bytes) -> str:
    """The id the Hub gives a regular file (its ETag, and `blob_id` in listings): git's blob sha1."""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def dataset_head(api: HfApi, repo_id: str, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[str, str | None]:
    """The dataset repo's branch head and its README.md's ETag (None: no card), from one small HEAD request.

    RepositoryNotFoundError when the repo does not exist (or the token may not see it).
    """
    url = hf_hub_url(repo_id, "README.md", repo_type="dataset", endpoint=api.endpoint)
    try:
        meta = api.get_hf_file_metadata(url=url, timeout=timeout_s)
        return meta.commit_hash, meta.etag
    except RemoteEntryNotFoundError as err:
        head = err.response.headers.get("X-Repo-Commit")
        return head or api.repo_info(repo_id, repo_type="dataset").sha, None


# -- HTTP: a time-out, and errors in one line ------------------------------------------------------


class _TimeoutClient(httpx2.Client):
    """huggingface_hub's HTTP client with a time-out on every request, also those that pass timeout=None."""

    def build_request(self, *args, timeout=httpx2.USE_CLIENT_DEFAULT, **kwargs):
        # huggingface_hub passes timeout=None explicitly (tree listings), which would turn the default off.
        return super().build_request(*args, timeout=httpx2.USE_CLIENT_DEFAULT if timeout is None else timeout, **kwargs)


def install_http_timeout(seconds: float = HTTP_TIMEOUT_S) -> None:
    """Make this process's huggingface_hub give up on a request that gets no answer for `seconds`.

    huggingface_hub 2.4 shares one httpx2 client built with timeout=None, so a Hub that accepts a
    connection and never answers holds the push (and the scheduler's only worker) forever.
    `set_client_factory` is its documented way to change the client; ours is the default one
    (the same request hook, redirects followed) with a time-out. Requests that set their own
    time-out (downloads: 10 s) keep it.
    """
    from huggingface_hub.utils._http import hf_request_event_hook

    timeout = httpx2.Timeout(seconds, connect=min(seconds, 10.0))
    set_client_factory(
        lambda: _TimeoutClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=timeout)
    )


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def retry_after_s(err: BaseException) -> float | None:
    """The Retry-After (seconds) the Hub sent with a 429 or 503, if any."""
    response = getattr(err, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def is_transient(err: BaseException) -> bool:
    """Whether trying again soon may work: network trouble, time-outs, 5xx, 429, a commit race (412)."""
    if isinstance(err, httpx2.TransportError):
        return True
    return isinstance(err, HfHubHTTPError) and _status_code(err) in TRANSIENT_STATUS


def describe_error(err: BaseException, repo_id: str, endpoint: str, timeout_s: float) -> str:
    """One line saying what went wrong and what to do, for logs and the status."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        err = err.__cause__  # a download that found the Hub failing and nothing in the cache: say why it failed
    status = _status_code(err)
    server = ""
    if isinstance(err, HfHubHTTPError):
        server = (err.server_message or "").strip().splitlines()[0] if err.server_message else ""
    said = f": {server}" if server else ""
    if isinstance(err, httpx2.TimeoutException):
        return f"the Hub at {endpoint} did not answer within {timeout_s:g} s"
    if isinstance(err, httpx2.ConnectError):
        return f"cannot reach the Hub at {endpoint} ({_first_line(err) or 'connection refused'})"
    if isinstance(err, httpx2.TransportError):
        return f"the connection to the Hub at {endpoint} broke off without an answer ({type(err).__name__})"
    if isinstance(err, RepositoryNotFoundError) and status == 401:
        return (f"dataset repo {repo_id} is private or missing and no valid token was sent (401): "
                "set FLAGLOOP_HUB_TOKEN or HF_TOKEN to a token with write access")
    if isinstance(err, RepositoryNotFoundError):
        return (f"dataset repo {repo_id} not found ({status}) and it could not be created: check "
                "FLAGLOOP_DATASET_REPO and that the token may create and write to it")
    if status == 401:
        return f"the Hub refused the token (401{said}): set FLAGLOOP_HUB_TOKEN or HF_TOKEN to a valid write token"
    if status == 403:
        return f"the token may not write to {repo_id} (403{said}): use a token with write access to it"
    if status == 429:
        wait = retry_after_s(err)
        return f"rate limited by the Hub (429){f', retry after {wait:g} s' if wait is not None else ''}"
    if status == 412:
        return "another commit landed on the dataset repo meanwhile (412)"
    if status is not None:
        return f"the Hub answered {status}{said}"
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class HubCallError(Exception):
    """A Hub call that failed for good (after its retries): the message is one line; `__cause__` is the last error."""


def retrying(
    call: Callable,
    describe: Callable[[BaseException], str],
    *,
    what: str,
    waits: tuple[float, ...] = RETRY_WAITS_S,
    sleep: Callable[[float], object] = time.sleep,
    cancelled: threading.Event | None = None,
    on_retry: Callable[[str], None] | None = None,
    passthrough: tuple[type[BaseException], ...] = (),
):
    """`call()`, tried again after each of `waits` while it fails for a passing reason (`is_transient`).

    A Retry-After the Hub sends lengthens the wait (one over MAX_RETRY_AFTER_S gives up at once).
    Gives up with HubCallError(describe(last error)) when the waits are used up, at once for any
    other error, or when `cancelled` is set; errors of the `passthrough` types go through untouched.
    """
    pending = iter(waits)
    attempt = 1
    while True:
        try:
            return call()
        except passthrough:
            raise
        except Exception as err:  # noqa: BLE001 - every failure is described, then retried or raised
            message = describe(err)
            wait = next(pending, None) if is_transient(err) else None
            hinted = retry_after_s(err)
            if hinted is not None and wait is not None:
                wait = max(wait, hinted) if hinted <= MAX_RETRY_AFTER_S else None
            if wait is None or (cancelled is not None and cancelled.is_set()):
                raise HubCallError(message) from err
            log.warning("%s failed (attempt %d of %d): %s; trying again in %g s", what, attempt, len(waits) + 1,
                        message, wait)
            if on_retry is not None:
                on_retry(message)
            sleep(wait)
            if cancelled is not None and cancelled.is_set():
                raise HubCallError(message) from err
            attempt += 1


# -- the local shards ------------------------------------------------------------------------------


@dataclass
class _Shard:
    """One local shard: how far its complete lines go, and how much of it the Hub is known to have."""

    folder: str
    path: Path
    scanned: int = 0  # bytes read so far
    complete: int = 0  # end of the last complete line ("\n") among them
    lines: int = 0  # complete lines in [0, complete)
    hub_end: int | None = None  # bytes [0, hub_end) are on the Hub; None: not known yet
    hub_lines: int = 0  # complete lines in [0, hub_end)

    @property
    def key(self) -> str:
        """Its folder on the Hub."""
        return f"{self.folder}/{self.path.stem}"

    @property
    def pending(self) -> int:
        return max(self.lines - self.hub_lines, 0)

    def refresh(self) -> None:
        """Read what was appended since the last look (only complete lines count)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.complete)
                tail = f.read()
        except FileNotFoundError:
            return  # removed by hand since the scan: the next scan drops it
        last = tail.rfind(b"\n")
        if last >= 0:
            self.lines += tail.count(b"\n", 0, last + 1)
            self.complete += last + 1
        self.scanned = self.complete + len(tail)

    def read(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def learn_hub_end(self, end: int) -> None:
        """Record that the Hub has bytes [0, end), counting the lines that makes."""
        known = self.hub_end or 0
        if end == self.hub_end:
            return
        if end > known:
            self.hub_lines += self.read(known, end).count(b"\n")
        else:  # the Hub has less than we thought (repo deleted and made again): count afresh
            self.hub_lines = self.read(0, end).count(b"\n")
        self.hub_end = end


@dataclass
class _Part:
    shard: _Shard
    start: int
    end: int
    data: bytes

    @property
    def path_in_repo(self) -> str:
        return part_path(self.shard.folder, self.shard.path.stem, self.start, self.end)


# -- pushing ---------------------------------------------------------------------------------------


class FolderPusher:
    """Pushes the new complete lines of a feedback folder's shards to a Hub dataset repo, each once.

        >>> pusher = FolderPusher(HfApi(token=...), "me/flags", "data/feedback")
        >>> pusher.push().summary()
        'pushed 3 flag records, 0 review records and the dataset card to me/flags in commit 3f2a9c1'

    Not thread-safe for two pushes at once (HubSync runs one at a time); `status()` may be called
    from any thread.
    """

    def __init__(
        self,
        api: HfApi,
        repo_id: str,
        root: str | Path,
        retry_waits: tuple[float, ...] = RETRY_WAITS_S,
        sleep: Callable[[float], None] | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
        max_commit_bytes: int = MAX_COMMIT_BYTES,
    ):
        self.api = api
        self.repo_id = repo_id
        self.root = Path(root)
        self.retry_waits = tuple(retry_waits)
        self.timeout_s = timeout_s
        self.max_commit_bytes = max_commit_bytes
        self.cancelled = threading.Event()  # set: no more attempts or waits (shutdown)
        self._sleep = sleep or self.cancelled.wait
        self._shards: dict[Path, _Shard] = {}
        self._lock = threading.Lock()  # guards the shards' counters and the status
        self._status = SyncStatus(repo_id)
        self._card_ok_etag: str | None = None  # a README.md on the Hub already checked and left as it is

    # -- public --------------------------------------------------------------------------------

    def push(self) -> PushResult:
        """Send every complete line the Hub lacks; raise SyncError (status updated) if it cannot."""
        result = PushResult(self.repo_id)
        try:
            while self._push_batch(result):
                pass
        except SyncError as err:
            with self._lock:
                self._status.last_error = str(err)
            log.error("push to %s failed: %s; the records stay in the local shards for a later push", self.repo_id, err)
            raise
        with self._lock:
            self._status.last_error = None
        if result.commits:
            log.info("%s", result.summary())
        return result

    def status(self) -> SyncStatus:
        """The sync's state now; pending records are counted from the shards as they are."""
        with self._lock:
            for shard in self._scan():
                shard.refresh()
            shards = list(self._shards.values())
            return replace(
                self._status,
                pending_records=sum(s.pending for s in shards),
                pushed_records=sum(s.hub_lines for s in shards),
            )

    # -- one batch, with retries -----------------------------------------------------------------

    def _push_batch(self, result: PushResult) -> bool:
        """Commit one batch of new parts, retrying transient failures; True if more is left to send."""

        def retrying_soon(message: str) -> None:
            with self._lock:
                self._status.last_error = message

        try:
            return retrying(
                lambda: self._attempt(result), self._describe, what=f"push to {self.repo_id}", waits=self.retry_waits,
                sleep=self._sleep, cancelled=self.cancelled, on_retry=retrying_soon,
            )
        except HubCallError as err:
            raise SyncError(str(err)) from err.__cause__

    def _describe(self, err: BaseException) -> str:
        return self._redact(describe_error(err, self.repo_id, self.api.endpoint, self.timeout_s))

    def _attempt(self, result: PushResult) -> bool:
        head, card_etag = self._head()
        operations: list[CommitOperationAdd] = []
        card = self._card_update(head, card_etag)
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        parts, more = self._plan(head)
        operations += [CommitOperationAdd(path_in_repo=p.path_in_repo, path_or_fileobj=p.data) for p in parts]
        if not operations:
            return False
        counts = {folder: sum(p.data.count(b"\n") for p in parts if p.shard.folder == folder) for folder in FOLDERS}
        info = self.api.create_commit(
            repo_id=self.repo_id,
            repo_type="dataset",
            operations=operations,
            commit_message=f"Add {counts['flags']} flag and {counts['reviews']} review records",
            commit_description=f"Pushed by flagloop from {socket.gethostname()}.",
            parent_commit=head,  # a commit since our listing (another pusher) fails with 412: we list again
        )
        with self._lock:
            for part in parts:
                part.shard.learn_hub_end(part.end)
        if info.oid == head:
            # huggingface_hub found every file already there, byte for byte (another pusher sent the
            # same lines), and made no commit.
            return more
        with self._lock:
            self._status.last_commit = info.oid
            self._status.last_push_at = _now()
        if card is not None:
            self._card_ok_etag = git_blob_id(card.encode())
            result.card_written = True
        for folder, n in counts.items():
            result.records[folder] += n
        result.commits.append(info.oid)
        return more

    # -- what the Hub has ------------------------------------------------------------------------

    def _head(self, create: bool = True) -> tuple[str, str | None]:
        """The branch head and README.md's ETag (None: no card), from one HEAD request; makes the repo if missing."""
        try:
            return dataset_head(self.api, self.repo_id, self.timeout_s)
        except RepositoryNotFoundError:
            if not create:
                raise
        self.api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
        log.info("created the private dataset repo %s", self.repo_id)
        with self._lock:
            for shard in self._shards.values():
                shard.hub_end, shard.hub_lines = None, 0  # a repo made (again) holds nothing of ours
        return self._head(create=False)

    def _hub_end(self, head: str, shard: _Shard) -> int:
        """How many bytes of the shard the Hub has: the largest `end` among its part files at `head`."""
        try:
            entries = list(self.api.list_repo_tree(self.repo_id, shard.key, revision=head, repo_type="dataset"))
        except RemoteEntryNotFoundError:
            return 0
        return max((parsed[3] for e in entries if (parsed := parse_part(e.path))), default=0)

    def _card_update(self, head: str, etag: str | None) -> str | None:
        """The README.md to commit: ours when there is none; the Hub's with our configs when they differ."""
        ours = dataset_card(self.repo_id)
        if etag is None:
            return ours
        if etag in (git_blob_id(ours.encode()), self._card_ok_etag):
            return None
        path = self.api.hf_hub_download(self.repo_id, "README.md", repo_type="dataset", revision=head)
        theirs = DatasetCard(Path(path).read_text(encoding="utf-8"), ignore_metadata_errors=True)
        wanted = DatasetCard(ours).data
        if theirs.data.get("configs") == wanted.get("configs") and theirs.data.get("dataset_info") == wanted.get(
            "dataset_info"
        ):
            self._card_ok_etag = etag  # someone edited the text: leave it
            return None
        theirs.data.configs = wanted.get("configs")
        theirs.data.dataset_info = wanted.get("dataset_info")
        return str(theirs)

    # -- what to send ----------------------------------------------------------------------------

    def _scan(self) -> list[_Shard]:
        """The local shards (lock held), oldest name first; new ones are added to what we track."""
        for folder in FOLDERS:
            for path in sorted((self.root / folder).glob("*.jsonl")):
                if path.is_file() and path not in self._shards:
                    self._shards[path] = _Shard(folder, path)
        for path in [p for p in self._shards if not p.exists()]:
            del self._shards[path]  # removed by hand: nothing left to push from it
        return list(self._shards.values())

    def _plan(self, head: str) -> tuple[list[_Part], bool]:
        """The new parts to commit, up to max_commit_bytes; and whether more are left after them."""
        with self._lock:
            shards = self._scan()
            for shard in shards:
                shard.refresh()
        parts: list[_Part] = []
        size, more = 0, False
        for shard in shards:
            if shard.hub_end is not None and shard.hub_end >= shard.complete:
                continue  # the Hub had all of it at the last look, and it only grows
            end = self._hub_end(head, shard)
            with self._lock:
                shard.learn_hub_end(end)
            if end > shard.complete:
                log.warning("the Hub has %d bytes of %s but the local shard only %d: not pushing it",
                            end, shard.key, shard.complete)
                continue
            if end == shard.complete:
                continue
            if parts and size + (shard.complete - end) > self.max_commit_bytes:
                more = True
                break
            data = shard.read(end, shard.complete)
            parts.append(_Part(shard, end, end + len(data), data))
            size += len(data)
        return parts, more

    def _redact(self, text: str) -> str:
        """Never let the token into a message (if a server ever echoed it back)."""
        token = self.api.token if isinstance(self.api.token, str) else get_token()
        return text.replace(token, "hf_***") if token else text


# -- the scheduler ---------------------------------------------------------------------------------


class HubSync(CommitScheduler):
    """Pushes the feedback folder to a Hub dataset repo every `every` minutes, and once more at shutdown.

        >>> sync = HubSync("me/flags", "data/feedback", token="hf_...", every=5)
        >>> sync.trigger().result()   # push now; a PushResult
        >>> sync.status()             # SyncStatus
        >>> sync.shutdown()           # last push (waits up to 30 s), then stop the timer

    The first push starts at once, in the scheduler's thread, so constructing one never waits for
    the Hub; the repo is created (private) by the first push that reaches it.
    """

    def __init__(self, repo_id: str, folder: str | Path, *, token: str | None = None, every: float = 5.0, **options):
        api = HfApi(token=token, library_name="flagloop")
        # Set before CommitScheduler.__init__, which starts the thread that pushes at once.
        self.pusher = FolderPusher(api, repo_id, folder, **options)
        self._next_push_at: datetime | None = None
        # CommitScheduler.__init__ creates the repo before starting its timer: with the Hub down the
        # app could not start. Its own HfApi (used for its worker thread) only names the repo; the
        # pusher creates it on the first push that gets through.
        runner = HfApi(token=token, library_name="flagloop")
        runner.create_repo = lambda **_: RepoUrl(f"{runner.endpoint}/datasets/{repo_id}", endpoint=runner.endpoint)
        log.info("pushing %s to the Hub dataset %s every %g minutes", Path(folder), repo_id, every)
        super().__init__(repo_id=repo_id, folder_path=folder, every=every, repo_type="dataset", hf_api=runner)

    def push_to_hub(self) -> PushResult:  # called by CommitScheduler, one at a time, in its worker thread
        return self.pusher.push()

    def trigger(self):
        if threading.current_thread() is getattr(self, "_scheduler_thread", None):
            self._next_push_at = _now() + timedelta(minutes=self.every)
        return super().trigger()

    def status(self) -> SyncStatus:
        """The pusher's status, with the timer's next tick."""
        return replace(self.pusher.status(), next_push_at=self._next_push_at)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Push what is left (waiting at most `timeout` s), then stop the timer; True if that push succeeded.

        Whatever does not get through stays in the local shards and goes with the next start's push.
        """
        future = self.trigger()
        try:
            future.result(timeout=timeout)
            return True
        except FutureTimeout:
            log.warning("the last push to %s did not finish within %g s: stopping it", self.pusher.repo_id, timeout)
            return False
        except Exception:  # noqa: BLE001 - already logged and in the status
            return False
        finally:
            self.pusher.cancelled.set()  # no more retries; a request in flight ends within its time-out
            self.stop()
            self._next_push_at = None


def hub_token(settings) -> str | None:
    """The token to push with: FLAGLOOP_HUB_TOKEN, else huggingface_hub's own (HF_TOKEN, `hf auth login`)."""
    if settings.hub_token is not None:
        return settings.hub_token.get_secret_value()
    return get_token()


def start_sync(settings) -> HubSync | None:
    """Start pushing `settings.feedback_dir` to `settings.dataset_repo`; None when no repo or no token is set."""
    if settings.dataset_repo is None:
        return None
    token = hub_token(settings)
    if token is None:
        log.warning("FLAGLOOP_DATASET_REPO is %s but no Hub token is set (FLAGLOOP_HUB_TOKEN, HF_TOKEN or "
                    "`hf auth login`): flags stay in the local folder only", settings.dataset_repo)
        return None
    install_http_timeout()
    return HubSync(settings.dataset_repo, settings.feedback_dir, token=token, every=settings.push_every_minutes)
