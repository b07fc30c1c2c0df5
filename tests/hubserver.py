"""A small Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client downloads from it and pushes to it.

    >>> with HubServer() as hub:
    ...     commit = hub.add_file("me/tiny", "model.gguf", b"GGUF...")
    ...     hub.fail(500, times=1)  # the next request answers 500, then it serves again
    ...     # with HF_ENDPOINT=hub.url: hf_hub_download("me/tiny", "model.gguf") -> .../snapshots/<commit>/model.gguf
    ...     hub.fail(500, times=2, methods=("POST",), path="/commit/")  # only the next two commits fail

It speaks the part of the Hub protocol that huggingface_hub 2.4 uses to download, list and push:

- downloads: HEAD and GET `/{repo}/resolve/{revision}/{path}` (dataset repos under `/datasets/`) answered
  directly (no CDN redirect, no Xet headers), with `X-Repo-Commit`, `ETag` (the git blob id of a regular
  file; the sha256 of an LFS file, also in `X-Linked-Etag`/`X-Linked-Size` as the Hub sends them) and
  `Content-Length`, `Range` requests for resumed downloads, and the Hub's error codes (`X-Error-Code`:
  RepoNotFound, RevisionNotFound, EntryNotFound);
- repos: `POST /api/repos/create` (409 with the repo's url when it exists, as `exist_ok=True` expects;
  a new repo gets the Hub's "initial commit" holding a `.gitattributes`), `GET /api/{models|datasets}/{id}`
  and `.../revision/{rev}` (repo_info: sha, private, siblings), `GET .../tree/{rev}[/{path}]` (list_repo_tree,
  `recursive`, paginated by a `Link` header), `POST .../paths-info/{rev}`, `GET .../commits/{rev}`, and
  `POST /api/validate-yaml` (sent before a README.md is committed; every card passes);
- commits: `POST .../preupload/{rev}` (the server decides "regular" or "lfs", like the Hub: a file of
  `lfs_min_size` bytes or more, a binary sample, or a path the repo's .gitattributes sends to LFS), then
  `POST .../commit/{rev}` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder; a `parentCommit`
  that is not the branch head answers 412); LFS content goes through `/{repo}.git/info/lfs/objects/batch`
  and the upload URLs it hands out, served here too (`/lfs-upload/...`, a single PUT, or parts and a
  completion POST when `lfs_part_size` is set) and, like pre-signed storage URLs, taken without a token.
  Every commit gets a new 40-hex sha and the history is kept, so any past commit sha is a revision.
- tags: `POST .../tag/{rev}` (create_tag; 409 when the tag exists) and `GET .../refs` (list_repo_refs);
  a tag is a revision wherever a branch is, and commits never move it.
- Spaces: a space repo is created only with an `sdk` (create_repo's space_sdk; 400 otherwise, as on the Hub),
  which space_info reports; `POST /api/spaces/{id}/secrets` and `.../variables` (add_space_secret,
  add_space_variable) and `GET .../variables` keep them in `Repo.secrets` / `Repo.variables`.

The client must take the legacy LFS path: `point_hub_client_at` turns hf_xet off (HF_HUB_DISABLE_XET), since
this server has no Xet storage. Everything is kept in memory: keep uploads to tens of MB.

Tokens: `HubServer(token="hf_x")` answers 401 to requests without `Authorization: Bearer hf_x` (RepoNotFound
when no token is sent, as the Hub hides private repos; "Invalid credentials" for a wrong one). Open by default.

Faults on demand: `fail(status)`, `hang()`, `drop()`, `cut(n)` and `lose()` make the next N requests (or all,
until `reset()`) answer an HTTP error (with `retry_after=` a Retry-After header), never answer, close the
connection without an answer, send only the first n bytes of a download, or do the work but lose the answer
(a commit made whose response never arrives). Each can be narrowed to some methods and to paths matching a
regular expression (`path="/commit/"`); faults stack, and the first that matches a request answers it.
Every request is logged in `requests` (method, path, headers, body), so tests can check what the client sent;
`files(repo_id, repo_type)`, `repo(...)` (branches, history, private) and `create_repo` look and set up directly.

The `hub_server` fixture starts one and points huggingface_hub at it; expose it to a test module with
`pytest_plugins = ["tests.hubserver"]` in tests/conftest.py, or import the fixture by name.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib
import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

CHUNK = 1 << 20
HANG_LIMIT_S = 120.0  # a hung request gives up (drops its connection) after this, so no test can hang forever
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub takes no regular (non-LFS) file of 10 MiB or more
TREE_PAGE_SIZE = 1000  # entries per page of a tree listing, as on the Hub
USER = "flagloop-tester"  # the namespace a repo created without an organization goes to

# The messages the Hub sends with its error codes, used when a test does not give its own.
DEFAULT_ERRORS = {
    400: (None, "Bad request"),
    401: (None, "Invalid credentials in Authorization header"),
    403: (None, "Forbidden"),
    404: ("RepoNotFound", "Repository not found"),
    412: (None, "A commit has happened since. Please refresh and try again."),
    429: (None, "Too many requests"),
    500: (None, "Internal Error - We're working hard to fix this as soon as possible!"),
    503: (None, "Service unavailable"),
}

# An abridged copy of the .gitattributes the Hub puts in a new repo's initial commit.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lz4", "*.msgpack",
        "*.npy", "*.npz", "*.onnx", "*.parquet", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar",
        "*.tgz", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


@dataclass
class RepoFile:
    """One file of a commit: its bytes in memory, or a path to stream it from (large GGUFs)."""

    size: int
    sha256: str
    data: bytes | None = None
    path: Path | None = None
    lfs: bool = False  # stored through LFS (the Hub's answer to preupload), else a regular git blob
    git_oid: str = ""  # the git blob id: of the content, or of the LFS pointer for an LFS file

    def read(self, start: int, end: int):
        """Yield the bytes [start, end) in chunks."""
        if self.data is not None:
            for i in range(start, end, CHUNK):
                yield self.data[i : min(i + CHUNK, end)]
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block

    def content(self) -> bytes:
        """All the bytes (for tests and small files)."""
        return b"".join(self.read(0, self.size))

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that stands for this content in git."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def client_oid(self) -> str:
        """The id huggingface_hub compares a local file with: sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def looks_lfs(size: int, sample: bytes, min_size: int = LFS_MIN_SIZE) -> bool:
    """Whether the Hub would store this content in LFS whatever its name: large, or binary (a NUL byte)."""
    return size >= min_size or b"\0" in sample[:512]


def repo_file(data: bytes | os.PathLike, lfs: bool | None = None) -> RepoFile:
    """A RepoFile for bytes or a local file, hashed; `lfs=None` decides by size and content (see looks_lfs)."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data)
        lfs = looks_lfs(len(data), data) if lfs is None else lfs
        file = RepoFile(len(data), hashlib.sha256(data).hexdigest(), data=data, lfs=lfs)
        file.git_oid = _git_blob_id(file.pointer if lfs else data)
        return file
    path = Path(data)
    size = path.stat().st_size
    with open(path, "rb") as f:
        lfs = looks_lfs(size, f.read(512)) if lfs is None else lfs
        f.seek(0)
        sha256 = hashlib.sha256()
        sha1 = None if lfs else hashlib.sha1(b"blob %d\0" % size)
        while block := f.read(CHUNK):
            sha256.update(block)
            if sha1 is not None:
                sha1.update(block)
    file = RepoFile(size, sha256.hexdigest(), path=path, lfs=lfs)
    file.git_oid = _git_blob_id(file.pointer) if lfs else sha1.hexdigest()
    return file


@dataclass
class Commit:
    """A commit's metadata: its files are in Repo.commits[sha]."""

    sha: str
    parent: str | None
    title: str
    message: str = ""
    date: str = ""


@dataclass
class Repo:
    """A repo's history: commits (sha -> {path: file}) and branches (name -> commit sha), its LFS objects."""

    repo_type: str
    repo_id: str
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> commit sha; commits never move a tag
    log: dict[str, Commit] = field(default_factory=dict)  # sha -> metadata, for every commit in `commits`
    lfs: dict[str, RepoFile] = field(default_factory=dict)  # sha256 -> content uploaded through LFS
    private: bool = False
    created_at: str = ""
    sdk: str | None = None  # a Space's SDK (gradio, docker, static, streamlit)
    secrets: dict[str, str] = field(default_factory=dict)  # a Space's secrets: name -> value (never listed back)
    variables: dict[str, str] = field(default_factory=dict)  # a Space's variables: name -> value

    def commit_of(self, revision: str) -> str | None:
        """The commit a branch name, a tag or a (full) commit sha points to, None if there is none."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.commits else None

    def history(self, revision: str = "main") -> list[Commit]:
        """The commits reachable from a revision, newest first."""
        sha, found = self.commit_of(revision), []
        while sha is not None:
            found.append(self.log[sha])
            sha = self.log[sha].parent
        return found

    def lfs_patterns(self, revision: str = "main") -> list[str]:
        """The patterns the branch's .gitattributes sends to LFS."""
        commit = self.commit_of(revision)
        attributes = self.commits[commit].get(".gitattributes") if commit else None
        if attributes is None:
            return []
        lines = attributes.content().decode(errors="replace").splitlines()
        return [line.split()[0] for line in lines if "filter=lfs" in line and not line.startswith("#")]


@dataclass
class Fault:
    """What the next requests get instead of an answer: an HTTP error, no answer (hang), or a closed connection."""

    kind: str  # status | hang | drop | cut | lose
    status: int = 500
    error_code: str | None = None
    message: str | None = None
    remaining: int | None = None  # None: every request until reset()
    methods: frozenset[str] | None = None  # None: every method
    cut_after: int = 0  # cut: bytes of the body sent before the connection is closed
    path: re.Pattern | None = None  # None: every path; else the URL paths (no query) it searches
    headers: dict[str, str] = field(default_factory=dict)  # status: extra headers (Retry-After)

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and (self.path is None or bool(self.path.search(path)))


@dataclass
class Request:
    """A request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self):
        return json.loads(self.body)

    def ndjson(self) -> list[dict]:
        """The body of a commit: one JSON object a line."""
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class Call:
    """One request as a route sees it: method, headers, parsed query and body."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, list[str]]
    body: bytes

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or ["false"])[-1].lower() in ("1", "true")

    def json(self):
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: RepoFile | None = None  # streamed instead of body, bytes [start, end)
    start: int = 0
    end: int = 0
    cut_after: int | None = None  # close the connection after this many body bytes (a download cut off)


@dataclass
class LfsUpload:
    """An LFS object the batch endpoint handed an upload URL for, not yet received."""

    repo: tuple[str, str]
    oid: str
    size: int
    part_size: int | None = None
    parts: dict[int, bytes] = field(default_factory=dict)


def error(status: int, message: str, code: str | None = None, **headers: str) -> Response:
    """An error the way the Hub sends it: X-Error-Code / X-Error-Message headers and a JSON body."""
    hdrs = {"Content-Type": "application/json", "X-Error-Message": message, **headers}
    if code:
        hdrs["X-Error-Code"] = code
    return Response(status, hdrs, json.dumps({"error": message}).encode())


def answer(payload, status: int = 200, content_type: str = "application/json", **headers: str) -> Response:
    """A JSON answer."""
    return Response(status, {"Content-Type": content_type, **headers}, json.dumps(payload).encode())


def _now() -> str:
    """The time as the Hub writes it: 2024-05-01T12:00:00.000Z."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


REPO_PREFIXES = {"datasets": "dataset", "spaces": "space"}
API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO = r"(?:(?P<prefix>datasets|spaces)/)?(?P<repo_id>[^/]+(?:/[^/]+)?)"
API = r"/api/(?P<kind>models|datasets|spaces)/(?P<repo_id>[^/]+(?:/[^/]+)?)"
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
# (method, path pattern, HubServer method name); the path is matched still %-encoded, the groups are decoded.
ROUTES = [
    ("HEAD", RESOLVE, "resolve"),
    ("GET", RESOLVE, "resolve"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo_route"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^{API}(?:/revision/(?P<revision>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^{API}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("POST", re.compile(rf"^{API}/paths-info/(?P<revision>[^/]+)$"), "paths_info"),
    ("GET", re.compile(rf"^{API}/commits/(?P<revision>[^/]+)$"), "list_commits"),
    ("POST", re.compile(rf"^{API}/tag/(?P<revision>[^/]+)$"), "create_tag_route"),
    ("GET", re.compile(rf"^{API}/refs$"), "list_refs"),
    ("POST", re.compile(r"^/api/spaces/(?P<repo_id>[^/]+/[^/]+)/(?P<what>secrets|variables)$"), "space_setting"),
    ("GET", re.compile(r"^/api/spaces/(?P<repo_id>[^/]+/[^/]+)/(?P<what>variables)$"), "space_setting"),
    ("POST", re.compile(rf"^{API}/preupload/(?P<revision>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^{API}/commit/(?P<revision>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<upload_id>[0-9a-f]{32})(?:/part/(?P<part>\d+))?$"), "lfs_put"),
    ("POST", re.compile(r"^/lfs-upload/(?P<upload_id>[0-9a-f]{32})$"), "lfs_complete"),
    ("POST", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})/(?P<repo_key>[^/]+)$"), "lfs_verify"),
]
PRESIGNED = "/lfs-upload/"  # upload URLs carry no token, like the Hub's pre-signed storage URLs
NOT_REPO_ROUTES = ("/api/repos/create", "/api/validate-yaml")
SPACE_SDKS = ("gradio", "docker", "static", "streamlit")


class HubServer:
    """An in-memory Hub serving and taking repo files over HTTP on a free loopback port, with faults on demand."""

    def __init__(self, host: str = "127.0.0.1", token: str | None = None):
        self.host = host
        self.token = token  # when set, every request but an upload URL must send `Authorization: Bearer <token>`
        self.lfs_min_size = LFS_MIN_SIZE  # preupload answers "lfs" from this size on
        self.lfs_part_size: int | None = None  # set: LFS objects larger than this are uploaded in parts
        self.tree_page_size = TREE_PAGE_SIZE
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self._faults: list[Fault] = []
        self._uploads: dict[str, LfsUpload] = {}
        self._lock = threading.Lock()
        self._unhang = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        """Listen on a free port and serve in a background thread."""
        httpd = ThreadingHTTPServer((self.host, self.port or 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._unhang = threading.Event()
        self._thread = threading.Thread(target=httpd.serve_forever, name=f"hub-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port; hung requests are let go. The repos are kept."""
        if self._httpd is None:
            return
        self._unhang.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
        self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content ----------------------------------------------------------------------------

    def add_file(
        self, repo_id: str, path_in_repo: str, data: bytes | os.PathLike, revision: str = "main", repo_type: str = "model"
    ) -> str:
        """Commit one file (bytes, or a local file to serve) on a branch; return the new commit's sha.

        The sha is derived from the repo, the parent commit, the path and the content, so the same
        sequence of add_file calls always gives the same commits. The repo is made if needed (no
        initial commit); the file is LFS if large or binary (see looks_lfs).
        """
        size = Path(data).stat().st_size if not isinstance(data, (bytes, bytearray)) else len(data)
        new = repo_file(data, lfs=True if size >= self.lfs_min_size else None)  # hashed outside the lock
        with self._lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id, created_at=_now()))
            parent = repo.branches.get(revision)
            seed = f"{repo_type}/{repo_id}\0{parent or ''}\0{path_in_repo}\0{new.sha256}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            if new.lfs:
                repo.lfs[new.sha256] = new
            files = {**(repo.commits[parent] if parent else {}), path_in_repo: new}
            self._record_commit(repo, revision, sha, parent, files, f"Upload {path_in_repo}")
            return sha

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Make an empty repo the way the Hub does (an initial commit with a .gitattributes); return that commit."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            return self._create_repo(repo_id, repo_type, private)

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> str:
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=private, created_at=_now())
        files = {".gitattributes": repo_file(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
        return self._new_commit(repo, "main", files, "initial commit")

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, RepoFile], title: str, message: str = "") -> str:
        """Record a commit on a branch (lock held) with a fresh sha; return it."""
        parent = repo.branches.get(branch)
        listing = "\n".join(f"{path} {file.git_oid}" for path, file in sorted(files.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\0{parent or ''}\0{len(repo.commits)}\0{title}\0{listing}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        self._record_commit(repo, branch, sha, parent, files, title, message)
        return sha

    @staticmethod
    def _record_commit(repo, branch, sha, parent, files, title, message="") -> None:
        repo.commits[sha] = files
        repo.log[sha] = Commit(sha, parent, title, message, _now())
        repo.branches[branch] = sha

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The repo, for tests to look into (KeyError if there is none)."""
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Every file of a revision with its bytes: what the repo holds, straight from the server's memory."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.commit_of(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: file.content() for path, file in repo.commits[commit].items()}

    # -- faults -----------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        times: int | None = None,
        message: str | None = None,
        error_code: str | None = None,
        methods: tuple[str, ...] | None = None,
        path: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `times` requests (all until reset() when None) with this HTTP error.

        `methods` and `path` (a regular expression searched in the URL path) narrow the requests it
        hits; `retry_after` adds a Retry-After header (seconds), as the Hub sends with a 429.
        """
        code, default = DEFAULT_ERRORS.get(status, (None, f"HTTP {status}"))
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        self._add_fault(
            Fault("status", status, error_code or code, message or default, times, _methods(methods),
                  path=_pattern(path), headers=headers)
        )

    def hang(self, times: int | None = None, methods: tuple[str, ...] | None = None, path: str | None = None) -> None:
        """Never answer the next `times` requests (until reset(), stop(), or HANG_LIMIT_S): a client time-out."""
        self._add_fault(Fault("hang", remaining=times, methods=_methods(methods), path=_pattern(path)))

    def drop(self, times: int | None = None, methods: tuple[str, ...] | None = None, path: str | None = None) -> None:
        """Close the connection of the next `times` requests without answering."""
        self._add_fault(Fault("drop", remaining=times, methods=_methods(methods), path=_pattern(path)))

    def lose(self, times: int | None = None, methods: tuple[str, ...] | None = None, path: str | None = None) -> None:
        """Do what the next `times` requests ask (a commit is made), then close without answering."""
        self._add_fault(Fault("lose", remaining=times, methods=_methods(methods), path=_pattern(path)))

    def cut(self, after_bytes: int, times: int | None = None, path: str | None = None) -> None:
        """Send only the first `after_bytes` of the next `times` GET bodies, then close: a download cut off."""
        self._add_fault(
            Fault("cut", remaining=times, methods=frozenset({"GET"}), cut_after=after_bytes, path=_pattern(path))
        )

    def reset(self) -> None:
        """Serve normally again, and let go of hung requests."""
        with self._lock:
            self._faults = []
            self._unhang.set()
            self._unhang = threading.Event()

    def _add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> tuple[Fault | None, threading.Event]:
        """The fault this request gets (if any), and the event that lets it go if it hangs."""
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, path):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault, self._unhang
            return None, self._unhang

    # -- requests ---------------------------------------------------------------------------

    def requests_to(self, path_part: str, method: str | None = None) -> list[Request]:
        """The logged requests whose path contains path_part (and of this method)."""
        with self._lock:
            return [r for r in self.requests if path_part in r.path and (method is None or r.method == method)]

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes = b"") -> Response | None:
        """Answer one request: a fault if one is set, else the route's response; None means no answer."""
        with self._lock:
            self.requests.append(Request(method, raw_path, headers, body))
        url = urlsplit(raw_path)
        fault, release = self._take_fault(method, url.path)
        if fault is not None:
            if fault.kind == "status":
                return error(fault.status, fault.message, fault.error_code, **fault.headers)
            if fault.kind == "hang":
                release.wait(HANG_LIMIT_S)
            if fault.kind in ("hang", "drop"):
                return None
        response = self._denied(url.path, headers) or self._route(
            Call(method, url.path, headers, parse_qs(url.query, keep_blank_values=True), body)
        )
        if fault is not None and fault.kind == "cut":
            response.cut_after = fault.cut_after
        if fault is not None and fault.kind == "lose":
            return None
        return response

    def _route(self, call: Call) -> Response:
        for route_method, pattern, name in ROUTES:
            if route_method == call.method and (m := pattern.match(call.path)):
                params = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                return getattr(self, name)(call, **params)
        return error(404, f"no route for {call.method} {call.path}")

    def _denied(self, path: str, headers: dict[str, str]) -> Response | None:
        """The 401 a request gets when the server wants a token and the request lacks it (None: let it in)."""
        if self.token is None or path.startswith(PRESIGNED):
            return None
        sent = headers.get("authorization")
        if sent is None:
            code = None if path in NOT_REPO_ROUTES else "RepoNotFound"  # how the Hub hides private repos
            return error(401, "Authentication required: no Authorization header was sent", code)
        if sent != f"Bearer {self.token}":
            return error(401, "Invalid credentials in Authorization header")
        return None

    def _repo(self, prefix: str | None, repo_id: str) -> Repo | None:
        with self._lock:
            return self.repos.get((REPO_PREFIXES.get(prefix, "model"), repo_id))

    def _api_repo(self, kind: str, repo_id: str) -> Repo | None:
        with self._lock:
            return self.repos.get((API_KINDS[kind], repo_id))

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- downloads --------------------------------------------------------------------------

    def resolve(self, call: Call, prefix, repo_id, revision, path) -> Response:
        """HEAD/GET /{repo}/resolve/{revision}/{path}: the file, with the headers hf_hub_download relies on."""
        repo = self._repo(prefix, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        commit = repo.commit_of(revision)
        if commit is None:
            return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        file = repo.commits[commit].get(path)
        if file is None:
            return error(404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit})
        hdrs = {
            "X-Repo-Commit": commit,
            "ETag": f'"{file.sha256 if file.lfs else file.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if file.lfs:
            hdrs.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)})
        start, end = 0, file.size
        status = 200
        if call.method == "GET" and (wanted := _parse_range(call.headers.get("range"), file.size)) is not None:
            start, end = wanted
            status = 206
            hdrs["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        return Response(status, hdrs, file=file, start=start, end=end)

    # -- repos ------------------------------------------------------------------------------

    def create_repo_route(self, call: Call) -> Response:
        """POST /api/repos/create: a new repo; 409 (with its url, which `exist_ok=True` reads) if it exists."""
        payload = call.json()
        if not isinstance(payload, dict) or not payload.get("name"):
            return error(400, "a repo needs a name")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            return error(400, f"invalid repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        sdk = payload.get("sdk")
        if repo_type == "space" and sdk not in SPACE_SDKS:
            return error(400, f"a Space needs an sdk, one of {', '.join(SPACE_SDKS)} (got {sdk!r})")
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                url = f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}"
                return answer({"error": f"You already created this {repo_type} repo", "url": url}, 409,
                              **{"X-Error-Message": f"You already created this {repo_type} repo"})
            self._create_repo(repo_id, repo_type, private)
            repo = self.repos[(repo_type, repo_id)]
            repo.sdk = sdk if repo_type == "space" else None
        return answer({"url": self._repo_url(repo), "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def validate_yaml(self, call: Call) -> Response:
        """POST /api/validate-yaml (sent before a README.md is committed): every card is taken."""
        return answer({"errors": [], "warnings": []})

    def repo_info(self, call: Call, kind, repo_id, revision=None) -> Response:
        """GET /api/{kind}/{repo_id}[/revision/{rev}]: model_info / dataset_info, siblings with sizes when ?blobs."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        with self._lock:
            commit = repo.commit_of(revision or "main")
            if commit is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = repo.commits[commit]
            siblings = [
                {"rfilename": path, **(_blob(file) if call.flag("blobs") else {})} for path, file in sorted(files.items())
            ]
            info = {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit, "private": repo.private, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "createdAt": repo.created_at,
                "lastModified": repo.log[commit].date, "siblings": siblings,
                "usedStorage": sum(file.size for file in files.values()),
            }
        if kind == "models":
            info["modelId"] = repo.repo_id
        if kind == "spaces":
            info["sdk"] = repo.sdk
        return answer(info)

    def space_setting(self, call: Call, repo_id, what) -> Response:
        """POST /api/spaces/{id}/secrets|variables ({key, value}): set one; GET .../variables: list them."""
        repo = self._api_repo("spaces", repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        store = repo.secrets if what == "secrets" else repo.variables
        if call.method == "POST":
            payload = call.json()
            key = payload.get("key") if isinstance(payload, dict) else None
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                return error(400, f"invalid {what[:-1]} name: {key!r}")
            if not isinstance(payload.get("value"), str):
                return error(400, f"{what[:-1]} {key} needs a string value")
            with self._lock:
                store[key] = payload["value"]
        if what == "secrets":
            return answer({})  # secret values are write-only
        with self._lock:
            return answer({k: {"value": v, "updatedAt": repo.created_at} for k, v in store.items()})

    def tree(self, call: Call, kind, repo_id, revision, path=None) -> Response:
        """GET /api/{kind}/{repo_id}/tree/{rev}[/{path}]: a folder's entries (all below it with ?recursive), paged."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        with self._lock:
            commit = repo.commit_of(revision)
            if commit is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            entries = _tree_entries(repo.commits[commit], path or "", call.flag("recursive"))
        if entries is None:
            return error(404, f"Entry not found: {path}", "EntryNotFound")
        start = int((call.query.get("cursor") or ["0"])[-1])
        page = entries[start : start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(entries):
            query = {k: v[-1] for k, v in call.query.items() if k != "cursor"}
            query["cursor"] = str(start + self.tree_page_size)
            headers["Link"] = f'<{self.url}{call.path}?{urlencode(query)}>; rel="next"'
        return answer(page, **headers)

    def paths_info(self, call: Call, kind, repo_id, revision) -> Response:
        """POST /api/{kind}/{repo_id}/paths-info/{rev} (form: paths=...): the entries of the paths that exist."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        form = parse_qs(call.body.decode(), keep_blank_values=True)
        with self._lock:
            commit = repo.commit_of(revision)
            if commit is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = repo.commits[commit]
            found = []
            for wanted in form.get("paths", []):
                wanted = wanted.strip("/")
                if wanted in files:
                    found.append(_file_entry(wanted, files[wanted]))
                elif any(p.startswith(wanted + "/") for p in files):
                    found.append(_dir_entry(files, wanted))
        return answer(found)

    def list_commits(self, call: Call, kind, repo_id, revision) -> Response:
        """GET /api/{kind}/{repo_id}/commits/{rev}: the history, newest first."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        with self._lock:
            if repo.commit_of(revision) is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            history = repo.history(revision)
        return answer([
            {"id": c.sha, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
            for c in history
        ])

    # -- tags ---------------------------------------------------------------------------------

    def create_tag_route(self, call: Call, kind, repo_id, revision) -> Response:
        """POST /api/{kind}/{repo_id}/tag/{rev} ({tag, message}): tag a revision; 409 if the tag exists."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        payload = call.json()
        tag = payload.get("tag") if isinstance(payload, dict) else None
        if not isinstance(tag, str) or not re.fullmatch(r"[\w.-]+", tag):
            return error(400, f"invalid tag name: {tag!r}")
        with self._lock:
            commit = repo.commit_of(revision)
            if commit is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if tag in repo.tags or tag in repo.branches:
                return error(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit
        return answer({"success": True})

    def list_refs(self, call: Call, kind, repo_id) -> Response:
        """GET /api/{kind}/{repo_id}/refs: branches and tags with the commits they point to."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        with self._lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())]
        return answer({"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    # -- commits ----------------------------------------------------------------------------

    def preupload(self, call: Call, kind, repo_id, revision) -> Response:
        """POST .../preupload/{rev}: for each file, "regular" or "lfs", and the oid of the file there now."""
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        payload = call.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
            return error(400, "preupload expects {files: [{path, size, sample}]}")
        with self._lock:
            commit = repo.commit_of(revision)
            if commit is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            current, patterns = repo.commits[commit], repo.lfs_patterns(revision)
        answers = []
        for item in payload["files"]:
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
            lfs = looks_lfs(size, sample, self.lfs_min_size) or _matches_any(path, patterns)
            there = current.get(path)
            answers.append({
                "path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                "oid": there.client_oid if there is not None else None,
            })
        return answer({"files": answers, "commitOid": commit})

    def commit(self, call: Call, kind, repo_id, revision) -> Response:
        """POST .../commit/{rev} (NDJSON): apply the file, lfsFile and deleted* lines to the branch head."""
        if call.flag("create_pr"):
            return error(400, "the test hub does not take pull requests")
        try:
            lines = [json.loads(line) for line in call.body.splitlines() if line.strip()]
        except ValueError:
            return error(400, "the commit body is not NDJSON")
        if not lines or lines[0].get("key") != "header":
            return error(400, "a commit starts with its header line")
        header = lines[0].get("value") or {}
        operations = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/") or path.split("/")[0] == ".git":
                return error(400, f"invalid path in commit: {path!r}")
            if key == "file":
                data = base64.b64decode(value.get("content", ""))
                if len(data) >= self.lfs_min_size:
                    return error(400, f"Your push was rejected because {path} is {len(data)} bytes: use LFS")
                operations.append((key, path, repo_file(data, lfs=False)))
            elif key == "lfsFile":
                operations.append((key, path, (value.get("oid"), value.get("size"))))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, path, None))
            else:
                return error(400, f"unknown commit operation {key!r}")
        repo = self._api_repo(kind, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        with self._lock:
            head = repo.branches.get(revision)
            if head is None:
                return error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent is not None and not (len(parent) >= 7 and head.startswith(parent)):
                return error(412, f"A commit has happened since. Please refresh and try again. (head is {head})")
            files = dict(repo.commits[head])
            for key, path, what in operations:
                if key == "file":
                    files[path] = what
                elif key == "lfsFile":
                    oid, size = what
                    stored = repo.lfs.get(oid or "")
                    if stored is None or (size is not None and size != stored.size):
                        return error(400, f"Your push was rejected: the LFS object {oid} for {path} was never uploaded")
                    files[path] = stored
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        return error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    folder = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(folder)]
                    if not doomed:
                        return error(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            sha = self._new_commit(repo, revision, files, header.get("summary") or "", header.get("description") or "")
            url = f"{self._repo_url(repo)}/commit/{sha}"
        return answer({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})

    # -- LFS --------------------------------------------------------------------------------

    def lfs_batch(self, call: Call, prefix, repo_id) -> Response:
        """POST /{repo}.git/info/lfs/objects/batch: where to upload each object not stored yet (git-lfs batch API)."""
        repo = self._repo(prefix, repo_id)
        if repo is None:
            return error(404, "Repository not found", "RepoNotFound")
        payload = call.json()
        if not isinstance(payload, dict) or payload.get("operation") != "upload":
            return error(400, "the test hub's LFS batch endpoint takes uploads only")
        objects, multipart = [], False
        key = (repo.repo_type, repo.repo_id)
        with self._lock:
            for obj in payload.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                    objects.append({"oid": str(oid), "size": int(size or 0),
                                    "error": {"code": 422, "message": "oid must be a sha256, size an integer"}})
                    continue
                if oid in repo.lfs:
                    objects.append({"oid": oid, "size": size})  # already stored: no actions, nothing to send
                    continue
                upload_id = uuid.uuid4().hex
                part_size = self.lfs_part_size if self.lfs_part_size and size > self.lfs_part_size else None
                self._uploads[upload_id] = LfsUpload(key, oid, size, part_size)
                href = f"{self.url}{PRESIGNED}{upload_id}"
                header: dict[str, str] = {}
                if part_size:
                    multipart = True
                    header["chunk_size"] = str(part_size)
                    for n in range(1, math.ceil(size / part_size) + 1):
                        header[f"{n:05d}"] = f"{href}/part/{n}"
                verify = f"{self.url}/lfs-verify/{oid}/{quote(f'{key[0]}:{key[1]}', safe='')}"
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": href, "header": header},
                    "verify": {"href": verify, "header": {}},
                }})
        body = {"transfer": "multipart" if multipart else "basic", "objects": objects, "hash_algo": "sha256"}
        return answer(body, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, call: Call, upload_id, part=None) -> Response:
        """PUT an upload URL: the whole object (basic transfer), or one part of it (multipart)."""
        with self._lock:
            upload = self._uploads.get(upload_id)
        if upload is None:
            return error(404, "no such upload (it was finished or never handed out)")
        if part is None:
            return self._store_lfs(upload_id, upload, call.body)
        n = int(part)
        if upload.part_size is None or not 1 <= n <= math.ceil(upload.size / upload.part_size):
            return error(400, f"no part {n} in this upload")
        with self._lock:
            upload.parts[n] = call.body
        return Response(200, {"ETag": f'"{hashlib.md5(call.body).hexdigest()}"'})

    def lfs_complete(self, call: Call, upload_id) -> Response:
        """POST an upload URL after its parts: {oid, parts: [{partNumber, etag}]} puts the object together."""
        with self._lock:
            upload = self._uploads.get(upload_id)
        if upload is None or upload.part_size is None:
            return error(404, "no such multipart upload")
        payload = call.json() or {}
        wanted = math.ceil(upload.size / upload.part_size)
        parts = payload.get("parts") or []
        if payload.get("oid") != upload.oid or [p.get("partNumber") for p in parts] != list(range(1, wanted + 1)):
            return error(400, "the completion names the wrong object or parts")
        for p in parts:
            data = upload.parts.get(p["partNumber"])
            if data is None or p.get("etag", "").strip('"') != hashlib.md5(data).hexdigest():
                return error(400, f"part {p['partNumber']} is missing or its etag does not match")
        return self._store_lfs(upload_id, upload, b"".join(upload.parts[n] for n in range(1, wanted + 1)))

    def _store_lfs(self, upload_id: str, upload: LfsUpload, data: bytes) -> Response:
        if len(data) != upload.size or hashlib.sha256(data).hexdigest() != upload.oid:
            return error(400, f"the uploaded content is not the object {upload.oid} of {upload.size} bytes")
        stored = repo_file(data, lfs=True)
        with self._lock:
            self.repos[upload.repo].lfs[upload.oid] = stored
            self._uploads.pop(upload_id, None)
        return Response(200)

    def lfs_verify(self, call: Call, oid, repo_key) -> Response:
        """POST the verify URL: 200 when the object is stored with the size the client says."""
        repo_type, _, repo_id = repo_key.partition(":")
        payload = call.json() or {}
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            stored = repo.lfs.get(oid) if repo is not None else None
        if stored is None or payload.get("oid") != oid or payload.get("size") != stored.size:
            return error(404, f"LFS object {oid} was not received")
        return answer({"message": "verified"})


def _methods(methods: tuple[str, ...] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods else None


def _pattern(path: str | None) -> re.Pattern | None:
    return re.compile(path) if path else None


def _matches_any(path: str, patterns: list[str]) -> bool:
    """Whether a .gitattributes pattern covers the path (a pattern without "/" matches the file name)."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p.lstrip("/")) for p in patterns)


def _blob(file: RepoFile) -> dict:
    """A sibling's extra fields in repo_info with ?blobs=true."""
    extra = {"size": file.size, "blobId": file.git_oid}
    if file.lfs:
        extra["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
    return extra


def _file_entry(path: str, file: RepoFile) -> dict:
    """A file as the tree and paths-info endpoints list it."""
    entry = {"type": "file", "oid": file.git_oid, "size": file.size, "path": path}
    if file.lfs:
        entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
    return entry


def _dir_entry(files: dict[str, RepoFile], folder: str) -> dict:
    """A folder as the tree and paths-info endpoints list it; its oid changes when anything below it does."""
    below = "\n".join(f"{p} {f.git_oid}" for p, f in sorted(files.items()) if p.startswith(folder + "/"))
    return {"type": "directory", "oid": hashlib.sha1(below.encode()).hexdigest(), "size": 0, "path": folder}


def _tree_entries(files: dict[str, RepoFile], folder: str, recursive: bool) -> list[dict] | None:
    """The entries of a folder ("" is the root): its files and folders, or everything below it; None if none."""
    folder = folder.strip("/")
    prefix = f"{folder}/" if folder else ""
    below = sorted(p for p in files if p.startswith(prefix))
    if folder and not below:
        return None
    folders: set[str] = set()
    entries = []
    for path in below:
        parts = path[len(prefix) :].split("/")
        if recursive:
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append(_file_entry(path, files[path]))
        elif len(parts) > 1:
            folders.add(prefix + parts[0])
        else:
            entries.append(_file_entry(path, files[path]))
    listed = [_dir_entry(files, f) for f in sorted(folders)] + entries
    return sorted(listed, key=lambda e: e["path"]) if recursive else listed


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=N-` or `bytes=N-M` as [start, end); None when absent or not understood (the whole file is sent)."""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", value or "")
    if not m:
        return None
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    return (start, end) if start < end else None


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a stopped server leaves no kept-alive connection answering."""

    server_version = "flagloop-test-hub/1"

    def log_message(self, format, *args) -> None:  # quiet: the request log is HubServer.requests
        pass

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked: read whole before answering, so no answer races it."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self, method: str) -> None:
        hub: HubServer = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = self._read_body()
        except (ConnectionError, ValueError):
            self.close_connection = True
            return
        answer = hub.handle(method, self.path, headers, body)
        if answer is None:
            self.close_connection = True
            return  # no status line: the client sees the connection close (or has timed out already)
        length = answer.end - answer.start if answer.file is not None else len(answer.body)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Request-Id", headers.get("x-amzn-trace-id") or str(uuid.uuid4()))
        self.end_headers()
        if method == "HEAD":
            return
        blocks = answer.file.read(answer.start, answer.end) if answer.file is not None else [answer.body]
        left = length if answer.cut_after is None else min(answer.cut_after, length)
        try:
            for block in blocks:
                if left <= 0:
                    break
                self.wfile.write(block[:left])
                left -= len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away mid-download
        if answer.cut_after is not None:
            self.close_connection = True


# -- pytest -----------------------------------------------------------------------------------

HUB_ENV_CLEARED = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT",
)


def point_hub_client_at(endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send this process's huggingface_hub to `endpoint`, with an empty cache under hf_home, no token, no Xet.

    huggingface_hub 2.4 reads its environment once, at import, into `huggingface_hub.constants`
    (ENDPOINT, the resolve-URL template, HF_HOME, the cache and token paths, offline mode), and the
    download code reads those constants at call time: so both the variables (for subprocesses) and the
    constants (for this process) are set. hf_xet is turned off (HF_HUB_DISABLE_XET): with it, uploads of
    LFS files go to Xet storage, which this test Hub does not have; without it they take the LFS protocol.
    """
    from huggingface_hub import constants

    hf_home = Path(hf_home)
    cache = hf_home / "hub"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in HUB_ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
        "HF_HUB_DOWNLOAD_TIMEOUT": constants.DEFAULT_DOWNLOAD_TIMEOUT,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    # read at import too, by the progress-bar module (the package exports a class of the same name)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)


class InstantWaits:
    """Stands in for `time` in huggingface_hub's retry loops: records each back-off wait instead of sleeping."""

    def __init__(self):
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


def skip_hub_client_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make huggingface_hub retry without waiting; return the list its waits are recorded in.

    huggingface_hub 2.4 gives up on an unreachable or failing Hub (with an empty cache) only after
    5 retries and 1+2+4+8+8 = 23 s of back-off, and resumes a broken download 5 times 1 s apart.
    The requests are all still made; only the sleeping between them is skipped.
    """
    import huggingface_hub.file_download
    import huggingface_hub.utils._http

    shim = InstantWaits()
    monkeypatch.setattr(huggingface_hub.utils._http, "time", shim)
    monkeypatch.setattr(huggingface_hub.file_download, "time", shim)
    return shim.waits


@pytest.fixture
def hub_client_waits(monkeypatch) -> list[float]:
    """huggingface_hub retries at once; the list holds the back-off waits it asked for (see skip_hub_client_waits)."""
    return skip_hub_client_waits(monkeypatch)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running HubServer, with huggingface_hub (env and constants) pointed at it and a fresh cache."""
    server = HubServer().start()
    point_hub_client_at(server.url, tmp_path / "hf_home", monkeypatch)
    yield server
    server.stop()
