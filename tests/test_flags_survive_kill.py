"""Durability: a flag the app confirmed is on disk even when the app is SIGKILLed mid-burst.

Several clients save revisions of their flag as fast as they can; the app is killed once about a
hundred saves were confirmed. Every confirmed (flag_id, revision) must then be on disk exactly
once with the comment that was sent, the shards must read back (at most a torn last line each),
and a new app process on the same folder must append to a shard of its own.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from gradio_client import Client

from feedback.dataset import flag_features, load_flags_dataset
from feedback.reader import read_flags, shard_paths
from tests.conftest import RunningApp, start_app

CLIENTS = 6
TARGET_ACKS = 100
BURST_DEADLINE_S = 60


def new_client(app: RunningApp) -> Client:
    """A client with its own session on the running app; short timeouts so a dead app ends it."""
    return Client(app.url, verbose=False, analytics_enabled=False, download_files=False,
                  httpx_kwargs={"timeout": 10})


def parse_confirmation(confirmation: str) -> tuple[str, int]:
    """(flag_id, revision) from a save's confirmation; fails on anything but a new revision."""
    found = re.search(
        r"(?:Saved: flag on answer #\d+ \(revision (1)\)|Updated \(revision (\d+)\): flag on answer #\d+) — id `([0-9a-f]+)`",
        confirmation,
    )
    assert found, f"not a confirmation of a new revision: {confirmation!r}"
    return found.group(3), int(found.group(1) or found.group(2))


class Burst:
    """Clients that each chat once, then, all together, save new revisions of one flag until told to stop."""

    def __init__(self, app: RunningApp, clients: int):
        self.app = app
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acks: list[tuple[str, int, str]] = []  # (flag_id, revision, comment), confirmed saves only
        self.errors: list[str] = []
        self.ready = threading.Barrier(clients)  # the burst starts once every client has its answer
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        try:
            client = new_client(self.app)
            client.predict(f"Say one word. ({i})", "", 0, 0.9, 4, 7, api_name="/chat")
            self.ready.wait(timeout=120)
            n = 0
            while not self.stop.is_set():
                n += 1
                comment = f"client {i} save {n}"
                confirmation = client.predict(1, ["other"], comment, "", "👎 down", api_name="/flag")
                flag_id, revision = parse_confirmation(confirmation)
                with self.lock:
                    self.acks.append((flag_id, revision, comment))
        except Exception as err:  # expected once the app is killed
            with self.lock:
                self.errors.append(f"client {i}: {type(err).__name__}: {err}")

    def wait_for_acks(self, count: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while len(self.acks) < count:
            assert time.monotonic() < deadline, f"only {len(self.acks)} saves confirmed in {deadline_s}s: {self.errors}"
            assert any(t.is_alive() for t in self.threads), f"every client stopped early: {self.errors}"
            time.sleep(0.005)

    def join(self, timeout_s: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a client hung after the app was killed"


def check_shards(feedback_dir) -> dict[tuple[str, int], object]:
    """Read every shard back; assert it is whole but for a torn last line; return records by (flag, revision)."""
    result = read_flags(feedback_dir)
    assert all(bad.torn for bad in result.bad), f"bad lines that are not a torn end: {result.bad}"
    torn_per_shard = Counter(bad.file for bad in result.bad)
    assert all(n == 1 for n in torn_per_shard.values()), f"more than one torn line in a shard: {torn_per_shard}"
    record_ids = Counter(r.record_id for r in result.records)
    assert [k for k, n in record_ids.items() if n > 1] == [], "a record_id was written twice"
    keys = Counter((r.flag_id, r.revision) for r in result.records)
    assert [k for k, n in keys.items() if n > 1] == [], "a (flag_id, revision) was written twice"
    return {(r.flag_id, r.revision): r for r in result.records}


def test_every_acknowledged_flag_survives_sigkill_during_a_burst(tmp_path):
    feedback = tmp_path / "feedback"
    first = start_app(feedback, tmp_path / "app1.log")
    burst = Burst(first, CLIENTS)
    try:
        burst.start()
        burst.wait_for_acks(TARGET_ACKS, BURST_DEADLINE_S)
        first.kill()
        assert first.proc.returncode == -9, "the app was not killed by SIGKILL"
        burst.join(30)
    finally:
        first.kill()

    acks = list(burst.acks)
    assert len(acks) >= TARGET_ACKS
    assert len({flag_id for flag_id, _, _ in acks}) == CLIENTS, "each client should revise its own flag"
    assert len(burst.errors) == CLIENTS, f"every client should end on the dead app: {burst.errors}"

    on_disk = check_shards(feedback)
    missing = [(f, r) for f, r, _ in acks if (f, r) not in on_disk]
    assert missing == [], f"{len(missing)} of {len(acks)} confirmed saves are not on disk: {missing[:5]}"
    wrong = [(f, r, c, on_disk[f, r].comment) for f, r, c in acks if on_disk[f, r].comment != c]
    assert wrong == [], f"confirmed saves stored with another comment: {wrong[:5]}"
    for flag_id in {f for f, _ in on_disk}:
        revisions = sorted(r for f, r in on_disk if f == flag_id)
        assert revisions == list(range(1, len(revisions) + 1)), f"flag {flag_id} has gaps: {revisions}"

    dataset = load_flags_dataset(feedback)
    assert dataset.features == flag_features()
    assert dataset.num_rows == CLIENTS
    assert load_flags_dataset(feedback, latest=False).num_rows == len(on_disk)

    # A new process on the same folder keeps the old shards and appends to a shard of its own.
    shards_before = {p: p.read_bytes() for p in shard_paths(feedback)}
    second = start_app(feedback, tmp_path / "app2.log")
    try:
        client = new_client(second)
        client.predict("Say one word.", "", 0, 0.9, 4, 7, api_name="/chat")
        flag_id, revision = parse_confirmation(
            client.predict(1, ["incorrect"], "after the restart", "", "none", api_name="/flag")
        )
    finally:
        second.kill()
    assert revision == 1

    new_shards = [p for p in shard_paths(feedback) if p not in shards_before]
    assert len(new_shards) == 1 and f"-{second.proc.pid}-" in new_shards[0].name, new_shards
    assert all(p.read_bytes() == data for p, data in shards_before.items()), "the new process rewrote an old shard"
    assert flag_id in new_shards[0].read_text("utf-8")

    after = check_shards(feedback)
    assert set(on_disk) <= set(after) and (flag_id, 1) in after
    assert after[flag_id, 1].comment == "after the restart"
    assert load_flags_dataset(feedback).num_rows == CLIENTS + 1
    assert load_flags_dataset(feedback, latest=False).num_rows == len(on_disk) + 1
