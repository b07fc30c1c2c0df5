"""Pull: bring a local feedback folder up to date from its Hub dataset repo, downloading only what it lacks.

    >>> result = pull_folder(HfApi(token=...), "me/flags", "data/feedback")
    >>> result.summary()
    'pulled 1000 records in 1 shard into data/feedback from me/flags at commit 3f2a9c1'

The dataset repo holds every pusher's local shards as part files (feedback/sync.py):
`flags/<stem>/<start>-<end>.jsonl` is bytes [start, end) of `flags/<stem>.jsonl`. A pull:

1. asks for the branch head (one HEAD request). When `hub_pull.json` (PullState) says the folder
   already holds everything of that commit, and no local shard is shorter than it was then, that is
   all: an idle pull is that one request;
2. lists `flags/` and `reviews/` at that commit (the shard folders, with their tree ids) and, only
   for a shard folder whose tree id changed since the last pull, its part files;
3. checks the parts a local shard already covers against their git blob id (or LFS sha256), with no
   download, downloads the others at that commit, and joins them onto the local bytes in order of
   `start` (overlaps skipped, gaps reported), complete lines only. The shard is then replaced
   atomically (feedback.files.write_atomic: written beside it, fsynced, renamed), so a reader sees
   it as it was or complete, never half-downloaded;
4. writes `hub_pull.json` with the commit once every shard is written; after a failure it records
   the error and keeps the last complete commit, so the next pull completes a pull cut short.

A local shard holding more than the Hub (this host's own lines, not pushed yet) is kept; one that
disagrees with the Hub is left as it is and reported. Each byte range of a shard lands once, at its
own offset: nothing is read twice. One pull at a time per folder (an flock on `.pull.lock`).
`python -m feedback pull --to FOLDER`, the scheduler's tick and the app's restore at start-up all
call `pull_folder`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import RemoteEntryNotFoundError

from feedback.files import exclusive_lock, leftover_temp_files, write_atomic
from feedback.sync import (
    FOLDERS,
    HTTP_TIMEOUT_S,
    dataset_head,
    describe_error,
    git_blob_id,
    parse_part,
    plural,
)
from schemas.hub import PulledShard, PullState

log = logging.getLogger(__name__)

STATE_FILE = "hub_pull.json"
LOCK_FILE = ".pull.lock"


class PullError(Exception):
    """A pull that did not complete: the message says why in one line; the folder is as consistent as before."""


@dataclass
class PullResult:
    """What a pull put in the local folder, and what it could not."""

    folder: Path
    repo: str
    commit: str
    idle: bool = False  # the folder already held everything of `commit`: nothing was listed or downloaded
    shards: dict[str, int] = field(default_factory=dict)  # local shard written -> complete lines added to it
    problems: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(self.shards.values())

    def summary(self) -> str:
        if not self.commit:
            return f"nothing to pull: the dataset repo {self.repo} does not exist yet"
        if self.idle:
            return f"nothing new: {self.folder} holds every record of {self.repo} at commit {self.commit[:7]}"
        return (f"pulled {plural(self.records, 'record')} in {plural(len(self.shards), 'shard')} into {self.folder} "
                f"from {self.repo} at commit {self.commit[:7]}")


# -- the state file --------------------------------------------------------------------------------


def read_pull_state(folder: str | Path) -> PullState | None:
    """The folder's `hub_pull.json`; None when it was never pulled into (or the file is unreadable, logged)."""
    path = Path(folder) / STATE_FILE
    try:
        return PullState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s): the next pull lists the whole dataset repo again", path, err)
        return None


def write_pull_state(folder: Path, state: PullState) -> None:
    write_atomic(Path(folder) / STATE_FILE, state.model_dump_json(indent=2).encode() + b"\n")


def local_path(folder: Path, key: str) -> Path:
    """The local shard of a shard folder `flags/<stem>` on the Hub."""
    return Path(folder) / f"{key}.jsonl"


def unpushed_shards(folder: str | Path, state: PullState | None) -> list[Path]:
    """Local shards with bytes past what the last pull found on the Hub: what this host has to push."""
    folder = Path(folder)
    known = state.shards if state is not None else {}
    out = []
    for sub in FOLDERS:
        for path in sorted((folder / sub).glob("*.jsonl")):
            pulled = known.get(f"{sub}/{path.stem}")
            if pulled is None or path.stat().st_size > pulled.bytes:
                out.append(path)
    return out


# -- pulling ---------------------------------------------------------------------------------------


def pull_folder(api: HfApi, repo_id: str, folder: str | Path, *, timeout_s: float = HTTP_TIMEOUT_S) -> PullResult:
    """Bring `folder` up to date from the dataset repo (see the module doc); PullError when it cannot.

    huggingface_hub retries each request that fails for a passing reason (5xx, 429, a time-out, a
    dropped connection: 5 times, 1 to 8 s apart); a pull then gives up and the next one starts over
    where this one stopped. The outcome, success or error, is written to `hub_pull.json`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / LOCK_FILE):
        clear_leftovers(folder)
        state = read_pull_state(folder)
        if state is not None and state.repo != repo_id:
            log.info("%s was pulled from %s before, now from %s: checking every shard", folder, state.repo, repo_id)
            state = None
        puller = _Puller(api, repo_id, folder, state, timeout_s)
        try:
            result = puller.pull()
        except PullError as err:
            write_pull_state(folder, _failed(state, repo_id, str(err)))
            raise
    if not result.idle:
        log.info("%s", result.summary())
    for problem in result.problems:
        log.warning("pull from %s: %s", repo_id, problem)
    return result


def _failed(state: PullState | None, repo_id: str, error: str) -> PullState:
    now = datetime.now(timezone.utc)
    if state is None:
        return PullState(repo=repo_id, attempted_at=now, error=error)
    return state.model_copy(update={"attempted_at": now, "error": error})


@dataclass
class _Part:
    start: int
    end: int
    path: str  # in the repo
    blob_id: str
    lfs_sha256: str | None

    def matches(self, data: bytes) -> bool:
        """Whether `data` (local bytes [start, end)) are this part's bytes, by the id the Hub lists."""
        if self.lfs_sha256 is not None:
            return hashlib.sha256(data).hexdigest() == self.lfs_sha256
        return git_blob_id(data) == self.blob_id


class _Puller:
    """One pull (see pull_folder): the Hub calls, each failure said in one line, and the shard-by-shard work."""

    def __init__(self, api, repo_id, folder, state, timeout_s):
        self.api, self.repo_id, self.folder, self.state = api, repo_id, folder, state
        self.timeout_s = timeout_s

    def pull(self) -> PullResult:
        head = self._call("find the dataset repo's head", self._head)
        if head is None:  # no such repo (yet): the app creates it with its first push
            result = PullResult(self.folder, self.repo_id, "", idle=True)
            result.problems.append(f"the dataset repo {self.repo_id} does not exist (yet): nothing to pull")
            return result
        if self._idle(head):
            write_pull_state(self.folder, self.state.model_copy(update={
                "attempted_at": datetime.now(timezone.utc), "error": None}))
            return PullResult(self.folder, self.repo_id, head, idle=True)
        result = PullResult(self.folder, self.repo_id, head)
        known = self.state.shards if self.state is not None else {}
        pulled: dict[str, PulledShard] = {}
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=self.folder) as tmp:
            for key, tree in self._shard_folders(head).items():
                before = known.get(key)
                if before is not None and before.tree == tree and _size(local_path(self.folder, key)) >= before.bytes:
                    pulled[key] = before  # nothing new in it since the last pull
                    continue
                hub_end = self._pull_shard(head, key, Path(tmp), result)
                if hub_end is not None:
                    pulled[key] = PulledShard(tree=tree, bytes=hub_end)
        now = datetime.now(timezone.utc)
        write_pull_state(self.folder, PullState(repo=self.repo_id, commit=head, pulled_at=now, shards=pulled,
                                                attempted_at=now, error=None))
        return result

    def _head(self) -> str | None:
        """The branch head; None when the repo does not exist (404 to a request the Hub accepted the token of)."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            return dataset_head(self.api, self.repo_id, self.timeout_s)[0]
        except RepositoryNotFoundError as err:
            if getattr(err.response, "status_code", None) == 404:
                return None
            raise

    def _idle(self, head: str) -> bool:
        state = self.state
        if state is None or state.commit != head:
            return False
        return all(_size(local_path(self.folder, key)) >= s.bytes for key, s in state.shards.items())

    def _shard_folders(self, head: str) -> dict[str, str]:
        """'flags/<stem>' -> tree id of every shard folder at `head`."""
        from huggingface_hub.hf_api import RepoFolder

        found = {}
        for sub in FOLDERS:
            entries = self._call(f"list {sub}/", lambda sub=sub: self._list(sub, head))
            for entry in entries:
                if isinstance(entry, RepoFolder) and entry.path.count("/") == 1:
                    found[entry.path] = entry.tree_id
        return found

    def _list(self, path: str, head: str) -> list:
        try:
            return list(self.api.list_repo_tree(self.repo_id, path, revision=head, repo_type="dataset"))
        except RemoteEntryNotFoundError:
            return []  # nothing pushed to that folder yet

    def _pull_shard(self, head: str, key: str, tmp: Path, result: PullResult) -> int | None:
        """Bring one local shard up to the Hub's parts; the Hub's end of it, or None when it was left alone."""
        from huggingface_hub.hf_api import RepoFile

        parts = []
        for entry in self._call(f"list {key}/", lambda: self._list(key, head)):
            parsed = parse_part(entry.path) if isinstance(entry, RepoFile) else None
            if parsed is not None:
                parts.append(_Part(parsed[2], parsed[3], entry.path, entry.blob_id,
                                   entry.lfs.sha256 if entry.lfs is not None else None))
        parts.sort(key=lambda p: (p.start, p.end))
        target = local_path(self.folder, key)
        local = target.read_bytes() if target.exists() else b""
        for part in parts:
            if part.end <= len(local) and not part.matches(local[part.start:part.end]):
                result.problems.append(f"{target} differs from the Hub's {key} (bytes {part.start}-{part.end}): "
                                       "left as it is")
                return None

        def download(part: _Part) -> bytes:
            path = self._call(f"download {part.path}", lambda: self.api.hf_hub_download(
                self.repo_id, part.path, repo_type="dataset", revision=head, local_dir=tmp))
            return Path(path).read_bytes()

        data, problems = join_parts(key, [(p.start, p.end, lambda p=p: download(p)) for p in parts], local)
        result.problems += problems
        if data is None:
            result.problems.append(f"{target} differs from the Hub's {key}: left as it is")
            return None
        data = data[: data.rfind(b"\n") + 1]  # whole lines only (parts always are)
        hub_end = max((p.end for p in parts), default=0)
        if len(data) > len(local):
            write_atomic(target, data)
            result.shards[str(target)] = data.count(b"\n", len(local))
        return hub_end

    def _call(self, what: str, call: Callable):
        """`call()` (huggingface_hub retries it as it sees fit); PullError saying what failed, in one line."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - one line saying why; the folder is as it was
            why = describe_error(err, self.repo_id, self.api.endpoint, self.timeout_s)
            raise PullError(f"pull from {self.repo_id} failed ({what}): {why}") from err


def join_parts(key: str, parts: list[tuple[int, int, Callable[[], bytes]]],
               local: bytes = b"") -> tuple[bytes | None, list[str]]:
    """The bytes of one shard: `local` (bytes already here), then each part past them in order of `start`.

    A part is read (`load()`) only when it reaches past what is there; overlaps are skipped, gaps
    reported. None when a part disagrees with the bytes it overlaps.
    """
    out, problems, pos = bytearray(local), [], len(local)
    for start, end, load in parts:
        if end <= pos:
            continue
        data = load()
        if len(data) != end - start:
            problems.append(f"{key}: part {start}-{end} holds {len(data)} bytes: skipped")
            continue
        if start > pos:
            problems.append(f"{key}: bytes {pos}-{start} are not on the Hub")
            pos = start
        elif bytes(out[start:pos]) != data[: pos - start]:
            return None, problems
        out += data[pos - start :]
        pos = end
    return bytes(out), problems


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def clear_leftovers(folder: Path) -> None:
    """Remove what a pull killed midway left: half-written shards and `.pull-*` download folders (lock held)."""
    for sub in FOLDERS:
        for tmp in leftover_temp_files(folder / sub):
            tmp.unlink(missing_ok=True)
    for tmp in folder.glob(".pull-*"):
        shutil.rmtree(tmp, ignore_errors=True)
