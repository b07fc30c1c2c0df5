"""A small Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client downloads from it.

    >>> with HubServer() as hub:
    ...     commit = hub.add_file("me/tiny", "model.gguf", b"GGUF...")
    ...     hub.fail(500, times=1)  # the next request answers 500, then it serves again
    ...     # with HF_ENDPOINT=hub.url: hf_hub_download("me/tiny", "model.gguf") -> .../snapshots/<commit>/model.gguf

It speaks the part of the Hub protocol that `hf_hub_download` (huggingface_hub 2.4) uses: HEAD and GET
`/{repo_id}/resolve/{revision}/{path}` answered directly (no CDN redirect, no Xet headers), with the
`X-Repo-Commit`, `ETag` (the file's sha256, as the Hub gives LFS files) and `Content-Length` headers the
client needs, `Range` requests for resumed downloads, and the Hub's error codes (`X-Error-Code`:
RepoNotFound, RevisionNotFound, EntryNotFound). Dataset repos live under the `datasets/` prefix, so the
dataset endpoints (create repo, preupload, commit, tree listing) can be added later as more ROUTES.

Faults on demand: `fail(status)`, `hang()`, `drop()` and `cut(n)` make the next N requests (or all, until
`reset()`) answer an HTTP error, never answer, close the connection without an answer, or send only the
first n bytes of a download. Every request is logged in `requests`, so tests can check what the client
sent (its token, its retries, its Range header).

The `hub_server` fixture starts one and points huggingface_hub at it; expose it to a test module with
`pytest_plugins = ["tests.hubserver"]` in tests/conftest.py, or import the fixture by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHUNK = 1 << 20
HANG_LIMIT_S = 120.0  # a hung request gives up (drops its connection) after this, so no test can hang forever

# The messages the Hub sends with its error codes, used when a test does not give its own.
DEFAULT_ERRORS = {
    400: (None, "Bad request"),
    401: (None, "Invalid credentials in Authorization header"),
    403: (None, "Forbidden"),
    404: ("RepoNotFound", "Repository not found"),
    429: (None, "Too many requests"),
    500: (None, "Internal Error - We're working hard to fix this as soon as possible!"),
    503: (None, "Service unavailable"),
}


@dataclass
class RepoFile:
    """One file of a commit: its bytes in memory, or a path to stream it from (large GGUFs)."""

    size: int
    sha256: str
    data: bytes | None = None
    path: Path | None = None

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


def repo_file(data: bytes | os.PathLike) -> RepoFile:
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data)
        return RepoFile(len(data), hashlib.sha256(data).hexdigest(), data=data)
    path = Path(data)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return RepoFile(path.stat().st_size, h.hexdigest(), path=path)


@dataclass
class Repo:
    """A repo's history: commits (sha -> {path: file}) and branches (name -> commit sha)."""

    repo_type: str
    repo_id: str
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit_of(self, revision: str) -> str | None:
        """The commit a branch name or a (full) commit sha points to, None if there is none."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Fault:
    """What the next requests get instead of an answer: an HTTP error, no answer (hang), or a closed connection."""

    kind: str  # status | hang | drop | cut
    status: int = 500
    error_code: str | None = None
    message: str | None = None
    remaining: int | None = None  # None: every request until reset()
    methods: frozenset[str] | None = None  # None: every method
    cut_after: int = 0  # cut: bytes of the body sent before the connection is closed


@dataclass
class Request:
    """A request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: RepoFile | None = None  # streamed instead of body, bytes [start, end)
    start: int = 0
    end: int = 0
    cut_after: int | None = None  # close the connection after this many body bytes (a download cut off)


def error(status: int, message: str, code: str | None = None, **headers: str) -> Response:
    """An error the way the Hub sends it: X-Error-Code / X-Error-Message headers and a JSON body."""
    hdrs = {"Content-Type": "application/json", "X-Error-Message": message, **headers}
    if code:
        hdrs["X-Error-Code"] = code
    return Response(status, hdrs, json.dumps({"error": message}).encode())


REPO_PREFIXES = {"datasets": "dataset", "spaces": "space"}
REPO = r"(?:(?P<prefix>datasets|spaces)/)?(?P<repo_id>[^/]+(?:/[^/]+)?)"
# (method, path pattern, HubServer method name). Dataset endpoints (POST /api/repos/create,
# /api/datasets/{id}/preupload/{rev}, /api/datasets/{id}/commit/{rev}, GET .../tree/{rev}) go here later.
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
ROUTES = [
    ("HEAD", RESOLVE, "resolve"),
    ("GET", RESOLVE, "resolve"),
]


class HubServer:
    """An in-memory Hub serving repo files over HTTP on a free loopback port, with faults on demand."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self._fault: Fault | None = None
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
        sequence of add_file calls always gives the same commits.
        """
        new = repo_file(data)  # hashed outside the lock: a GGUF takes a moment
        with self._lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
            parent = repo.branches.get(revision)
            seed = f"{repo_type}/{repo_id}\0{parent or ''}\0{path_in_repo}\0{new.sha256}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = {**(repo.commits[parent] if parent else {}), path_in_repo: new}
            repo.branches[revision] = sha
            return sha

    # -- faults -----------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        times: int | None = None,
        message: str | None = None,
        error_code: str | None = None,
        methods: tuple[str, ...] | None = None,
    ) -> None:
        """Answer the next `times` requests (all until reset() when None) with this HTTP error."""
        code, default = DEFAULT_ERRORS.get(status, (None, f"HTTP {status}"))
        self._set_fault(Fault("status", status, error_code or code, message or default, times, _methods(methods)))

    def hang(self, times: int | None = None, methods: tuple[str, ...] | None = None) -> None:
        """Never answer the next `times` requests (until reset(), stop(), or HANG_LIMIT_S): a client time-out."""
        self._set_fault(Fault("hang", remaining=times, methods=_methods(methods)))

    def drop(self, times: int | None = None, methods: tuple[str, ...] | None = None) -> None:
        """Close the connection of the next `times` requests without answering."""
        self._set_fault(Fault("drop", remaining=times, methods=_methods(methods)))

    def cut(self, after_bytes: int, times: int | None = None) -> None:
        """Send only the first `after_bytes` of the next `times` GET bodies, then close: a download cut off."""
        self._set_fault(Fault("cut", remaining=times, methods=frozenset({"GET"}), cut_after=after_bytes))

    def reset(self) -> None:
        """Serve normally again, and let go of hung requests."""
        with self._lock:
            self._fault = None
            self._unhang.set()
            self._unhang = threading.Event()

    def _set_fault(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault

    def _take_fault(self, method: str) -> tuple[Fault | None, threading.Event]:
        """The fault this request gets (if any), and the event that lets it go if it hangs."""
        with self._lock:
            fault = self._fault
            if fault is None or (fault.methods is not None and method not in fault.methods):
                return None, self._unhang
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
            return fault, self._unhang

    # -- requests ---------------------------------------------------------------------------

    def requests_to(self, path_part: str, method: str | None = None) -> list[Request]:
        """The logged requests whose path contains path_part (and of this method)."""
        with self._lock:
            return [r for r in self.requests if path_part in r.path and (method is None or r.method == method)]

    def handle(self, method: str, raw_path: str, headers: dict[str, str]) -> Response | None:
        """Answer one request: a fault if one is set, else the route's response; None means no answer."""
        with self._lock:
            self.requests.append(Request(method, raw_path, headers))
        fault, release = self._take_fault(method)
        if fault is not None:
            if fault.kind == "status":
                return error(fault.status, fault.message, fault.error_code)
            if fault.kind == "hang":
                release.wait(HANG_LIMIT_S)
            if fault.kind != "cut":
                return None
        path = urlsplit(raw_path).path
        for route_method, pattern, name in ROUTES:
            if route_method == method and (m := pattern.match(path)):
                params = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                response = getattr(self, name)(method, headers, **params)
                if fault is not None and fault.kind == "cut":
                    response.cut_after = fault.cut_after
                return response
        return error(404, f"no route for {method} {path}")

    def _repo(self, prefix: str | None, repo_id: str) -> Repo | None:
        with self._lock:
            return self.repos.get((REPO_PREFIXES.get(prefix, "model"), repo_id))

    def resolve(self, method: str, headers: dict[str, str], prefix, repo_id, revision, path) -> Response:
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
            "ETag": f'"{file.sha256}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end = 0, file.size
        status = 200
        if method == "GET" and (wanted := _parse_range(headers.get("range"), file.size)) is not None:
            start, end = wanted
            status = 206
            hdrs["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        return Response(status, hdrs, file=file, start=start, end=end)


def _methods(methods: tuple[str, ...] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods else None


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

    def _answer(self, method: str) -> None:
        hub: HubServer = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = hub.handle(method, self.path, headers)
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
    """Send this process's huggingface_hub to `endpoint`, with an empty cache under hf_home and no token.

    huggingface_hub 2.4 reads its environment once, at import, into `huggingface_hub.constants`
    (ENDPOINT, the resolve-URL template, HF_HOME, the cache and token paths, offline mode), and the
    download code reads those constants at call time: so both the variables (for subprocesses) and the
    constants (for this process) are set.
    """
    from huggingface_hub import constants

    hf_home = Path(hf_home)
    cache = hf_home / "hub"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
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
        "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
        "HF_HUB_DOWNLOAD_TIMEOUT": constants.DEFAULT_DOWNLOAD_TIMEOUT,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)


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
