"""Shared by the browser tests: Debian's headless Chromium through Playwright, with no stray processes,
and a loopback server that counts requests (anything hostile text makes a browser fetch is a leak)."""

from __future__ import annotations

import ctypes
import http.server
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("FLAGLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    """Adopt orphaned descendants (chromium's zygotes outlive its main process) so none escape the check."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def chromium_descendants() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of the chromium processes below this test process, zombies included."""
    procs: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited while we looked
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            procs[int(entry.name)] = (int(ppid), state, name)
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return {pid: procs[pid][:2] for pid in mine if pid in procs and "chrom" in procs[pid][2]}


def wait_chromium_gone(timeout: float = 10) -> dict[int, tuple[int, str]]:
    """Reap the chromium processes that exited; return those still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = chromium_descendants()
        for pid, (ppid, state) in left.items():
            if ppid == os.getpid() and state == "Z":
                os.waitpid(pid, os.WNOHANG)
        left = chromium_descendants()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium for this module; checked gone (no stray processes) afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's chromium (`make browser`)")
    set_subreaper(True)
    pw = sync_api.sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        assert chromium_descendants(), "the chromium check does not see the browser it launched"
        yield chromium
        chromium.close()
    finally:
        pw.stop()
        left = wait_chromium_gone()
        set_subreaper(False)
    assert not left, f"chromium processes {left} (pid: (parent, state)) outlived the browser"


class CountingServer:
    """A loopback HTTP server that records every path requested from it."""

    def __init__(self):
        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bait_server():
    """A loopback server that hostile text points at: any request to it is a leak."""
    server = CountingServer()
    yield server
    server.close()
