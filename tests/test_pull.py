"""feedback.pull: a feedback folder brought up to date from the dataset repo, downloading only what it lacks.

Real huggingface_hub client, the Hub-protocol server on 127.0.0.1; the shards are pushed by the real
FolderPusher, as the app pushes them.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from feedback.files import leftover_temp_files
from feedback.pull import STATE_FILE, PullError, pull_folder, read_pull_state, unpushed_shards
from feedback.reader import read_flags, shard_paths
from feedback.store import FlagStore
from feedback.sync import FolderPusher, install_http_timeout
from tests.test_hub_sync import REPO, TOKEN, pusher_for, save, write_reviews

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def http_timeout():
    install_http_timeout(5.0)
    yield
    set_client_factory(default_client_factory)


@pytest.fixture
def hub(hub_server, hub_client_waits):
    hub_server.token = TOKEN
    return hub_server


def api() -> HfApi:
    return HfApi(token=TOKEN)


def source_shards(root: Path) -> dict[str, bytes]:
    """'flags/<name>' -> bytes of every shard of a feedback folder."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes()
            for sub in ("flags", "reviews") for p in sorted((root / sub).glob("*.jsonl"))}


def pushed_folder(tmp_path: Path) -> tuple[Path, FlagStore]:
    """A feedback folder with flags in two shards and review decisions, all pushed."""
    root = tmp_path / "app"
    first = FlagStore(root)
    save(first, 3)
    first.close()
    store = FlagStore(root)  # a second process's shard
    save(store, 2)
    write_reviews(root, 4)
    pusher_for(root).push()
    return root, store


def test_a_pull_rebuilds_every_shard_byte_for_byte_and_an_idle_pull_is_one_small_request(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    to = tmp_path / "host"

    first = pull_folder(api(), REPO, to)

    assert source_shards(to) == source_shards(root)
    assert first.records == 9 and len(first.shards) == 3 and not first.problems and not first.idle
    assert {r.record_id for r in read_flags(to).records} == {r.record_id for r in read_flags(root).records}
    state = read_pull_state(to)
    assert state.commit == first.commit and state.error is None and set(state.shards) == {
        f"{p.parent.name}/{p.stem}" for p in [*shard_paths(root), *(root / "reviews").glob("*.jsonl")]}
    assert not unpushed_shards(to, state)  # nothing here the Hub lacks

    before = len(hub.requests)
    idle = pull_folder(api(), REPO, to)
    made = hub.requests[before:]
    assert idle.idle and idle.records == 0
    assert [(r.method, r.path.split("?")[0]) for r in made] == [("HEAD", f"/datasets/{REPO}/resolve/main/README.md")]
    assert source_shards(to) == source_shards(root)
    store.close()


def test_after_new_pushes_only_the_new_parts_are_downloaded(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    to = tmp_path / "host"
    pull_folder(api(), REPO, to)
    save(store, 5)  # appended to a shard the host already has
    write_reviews(root, 2, name="reviews-20250102-other-9-1.jsonl")  # a new shard
    pusher_for(root).push()
    new_parts = {p for p in hub.files(REPO, "dataset") if p.count("/") == 2} - {
        p for p in hub.files(REPO, "dataset", revision=read_pull_state(to).commit) if p.count("/") == 2}

    before = len(hub.requests)
    second = pull_folder(api(), REPO, to)

    downloads = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests[before:]
                 if r.method == "GET" and "/resolve/" in r.path}
    assert downloads == new_parts and len(new_parts) == 2
    assert second.records == 7 and len(second.shards) == 2
    assert source_shards(to) == source_shards(root)
    listed = [r.path.split("?")[0] for r in hub.requests[before:] if "/tree/" in r.path]
    assert len(listed) == 4  # flags/, reviews/, and only the two shard folders that changed
    store.close()


def test_a_shard_ahead_of_the_hub_is_kept_and_one_that_differs_is_left_alone_and_reported(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    pushed = source_shards(root)
    save(store, 1)  # the live shard is now ahead of the Hub
    ahead = source_shards(root)
    (grown,) = [name for name in ahead if ahead[name] != pushed[name]]

    into_live = pull_folder(api(), REPO, root)  # the app's own folder: nothing of it changes
    assert source_shards(root) == ahead and not into_live.problems and into_live.records == 0
    assert [f"flags/{p.name}" for p in unpushed_shards(root, read_pull_state(root))] == [grown]

    to = tmp_path / "host"
    pull_folder(api(), REPO, to)
    victim = shard_paths(to)[0]
    victim.write_bytes(b'{"something": "else"}\n')  # shorter than pulled: the next pull looks again
    again = pull_folder(api(), REPO, to)
    assert victim.read_bytes() == b'{"something": "else"}\n'
    assert any("differs from the Hub's" in p and victim.name in p for p in again.problems)
    store.close()


def test_the_hub_down_leaves_the_folder_as_it_was_says_why_and_the_next_pull_completes(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    to = tmp_path / "host"
    pull_folder(api(), REPO, to)
    good = read_pull_state(to)
    save(store, 4)
    pusher_for(root).push()
    before = source_shards(to)

    hub.fail(503, path="/resolve/.*/flags/")  # listings answer, every shard download fails
    with pytest.raises(PullError) as caught:
        pull_folder(api(), REPO, to)
    assert "503" in str(caught.value) and str(caught.value).startswith(f"pull from {REPO} failed (download flags/")
    assert source_shards(to) == before  # nothing half-written
    failed = read_pull_state(to)
    assert (failed.commit, failed.pulled_at) == (good.commit, good.pulled_at) and "503" in failed.error
    assert not leftover_temp_files(to / "flags") and not list(to.glob(".pull-*"))

    hub.reset()
    done = pull_folder(api(), REPO, to)
    assert done.records == 4 and source_shards(to) == source_shards(root)
    assert read_pull_state(to).error is None
    store.close()


def test_a_pull_killed_midway_is_completed_by_the_next_one_with_every_line_once(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    stems = sorted(p.stem for p in shard_paths(root))
    to = tmp_path / "host"
    hub.hang(path=f"/resolve/.*/flags/{stems[1]}/")  # the second shard's download never answers
    env = {"HF_TOKEN": TOKEN}
    child = subprocess.Popen([sys.executable, "-m", "feedback", "pull", "--repo", REPO, "--to", str(to)], cwd=ROOT,
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not hub.requests_to(f"/flags/{stems[1]}/"):
            assert time.monotonic() < deadline and child.poll() is None, child.stdout.read() if child.poll() else ""
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert (to / "flags" / f"{stems[0]}.jsonl").read_bytes() == (root / "flags" / f"{stems[0]}.jsonl").read_bytes()
    assert not (to / "flags" / f"{stems[1]}.jsonl").exists()
    assert read_pull_state(to) is None  # no pull completed

    hub.reset()
    done = pull_folder(api(), REPO, to)
    assert source_shards(to) == source_shards(root)
    cut = (root / "flags" / f"{stems[1]}.jsonl").read_bytes().count(b"\n")
    assert done.records == cut + 4  # the shard the kill cut, and the reviews: the first shard was not read again
    assert not list(to.glob(".pull-*")) and not leftover_temp_files(to / "flags")
    ids = [r.record_id for r in read_flags(to).records]
    assert len(ids) == len(set(ids)) == 5
    store.close()


def test_the_state_file_is_a_pull_state_and_a_pull_from_another_repo_checks_every_shard(hub, tmp_path):
    root, store = pushed_folder(tmp_path)
    to = tmp_path / "host"
    pull_folder(api(), REPO, to)
    data = json.loads((to / STATE_FILE).read_text())
    assert data["schema_version"] == 1 and data["repo"] == REPO
    other = "flagloop-tester/other"
    FolderPusher(HfApi(token=TOKEN), other, root).push()
    moved = pull_folder(api(), other, to)
    assert not moved.idle and moved.records == 0 and read_pull_state(to).repo == other
    store.close()


# -- the app's restore at start-up -----------------------------------------------------------------------


def test_the_restore_retries_while_the_hub_is_down_says_so_and_completes_when_it_is_back(hub, tmp_path):
    from feedback.restore import Restore
    from space.__main__ import hub_lines

    root, store = pushed_folder(tmp_path)
    fresh = tmp_path / "space-restarted"
    hub.fail(503)
    restore = Restore(api(), REPO, fresh, retry_waits=(0.05,)).start()
    try:
        deadline = time.monotonic() + 30
        while restore.attempts < 2:
            assert time.monotonic() < deadline, restore.line()
            time.sleep(0.02)
        line = hub_lines(None, restore)
        assert line.startswith(f"Restoring the flags and review decisions from the Hub dataset {REPO}…")
        assert "failed" in line and "503" in line and not restore.done.is_set()
        assert source_shards(fresh) == {}

        hub.reset()
        assert restore.done.wait(30), restore.line()
    finally:
        restore.stop()
    assert restore.line() is None and restore.result.records == 9
    assert source_shards(fresh) == source_shards(root)
    assert hub_lines(None, restore) == f"Restored the feedback folder from the Hub dataset {REPO}"
    store.close()


def test_new_shards_never_take_the_name_of_a_restored_one(hub, tmp_path):
    """A container restarts with the same host name and pid: the random token keeps the names apart."""
    root, store = pushed_folder(tmp_path)
    store.close()
    names = {p.name for p in shard_paths(root)}
    again = FlagStore(root)  # the same process (host, pid) writing again
    save(again, 1)
    again.close()
    assert len({p.name for p in shard_paths(root)} - names) == 1
    assert all(re.fullmatch(r"flags-\d{8}-.+-\d+-[0-9a-f]{6}-\d+\.jsonl", n) for n in names)
