"""Dataset repos on the test Hub, driven by the real huggingface_hub 2.4 client: create, push, list, pull.

What the flag-folder sync will stand on: a private dataset repo, JSONL shards pushed by `upload_folder`
and by `CommitScheduler` (regular files; LFS for the large ones), listed and downloaded back, and what
the client does when the Hub fails in the middle of a push. The Hub is tests/hubserver.py on 127.0.0.1,
asking for a token; huggingface_hub runs with hf_xet off (the test Hub has no Xet storage), except in the
one test that checks the hf_xet path of `upload_folder` for regular files.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitScheduler, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

from feedback.store import FlagStore
from tests.records import make_flag

REPO = "flagloop/flags"
TOKEN = "hf_flagloopTESTtoken0123456789"
BIG = 11 * 1024 * 1024  # over the Hub's 10 MiB limit for regular files: preupload answers "lfs"


@pytest.fixture
def hub(hub_server):
    """The test Hub, asking for TOKEN."""
    hub_server.token = TOKEN
    return hub_server


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(token=TOKEN)


@pytest.fixture
def scheduled(hub, tmp_path):
    """Make CommitSchedulers that push a folder to REPO (every 10 minutes: tests trigger them); stopped after."""
    made = []

    def make(folder: Path, every: float = 10) -> CommitScheduler:
        scheduler = CommitScheduler(
            repo_id=REPO, folder_path=folder, every=every, repo_type="dataset", token=TOKEN, private=True
        )
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.stop()  # its thread pushes nothing more, nor at exit


def jsonl(n: int, start: int = 0) -> bytes:
    """n flag records as JSONL lines."""
    return b"".join((make_flag(flag_id=f"flag{start + i:06d}").model_dump_json() + "\n").encode() for i in range(n))


def big_jsonl(size: int) -> bytes:
    """A JSONL shard of at least `size` bytes: one record repeated under new ids."""
    line = make_flag(flag_id="big000000").model_dump_json()
    rows, total, i = [], 0, 0
    while total < size:
        row = line.replace("big000000", f"big{i:06d}") + "\n"
        rows.append(row)
        total += len(row)
        i += 1
    return "".join(rows).encode()


def write_folder(folder: Path, big: bool = True) -> dict[str, bytes]:
    """A feedback folder: small shards (regular files) and, if asked, one over 10 MiB; {path in repo: bytes}."""
    files = {
        "flags/flags-20250101-a.jsonl": jsonl(3, 0),
        "flags/flags-20250101-b.jsonl": jsonl(2, 100),
        "flags/2025/flags-20250102-c.jsonl": jsonl(1, 200),
    }
    if big:
        files["flags/flags-20250103-big.jsonl"] = big_jsonl(BIG)
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return files


def commit_lines(hub) -> list[list[dict]]:
    """The operation lines (header left out) of each commit POSTed so far."""
    return [r.ndjson()[1:] for r in hub.requests_to(f"/api/datasets/{REPO}/commit/", "POST")]


def ids_in(data: bytes) -> list[str]:
    return [json.loads(line)["flag_id"] for line in data.splitlines()]


# -- repos ----------------------------------------------------------------------------------------


def test_create_repo_makes_a_private_dataset_repo_and_answers_409_when_it_exists(hub, api):
    url = api.create_repo(REPO, repo_type="dataset", private=True, exist_ok=True)
    again = api.create_repo(REPO, repo_type="dataset", private=True, exist_ok=True)

    assert (url.repo_id, url.repo_type, again.repo_id) == (REPO, "dataset", REPO)
    assert [r.json()["visibility"] for r in hub.requests_to("/api/repos/create")] == ["private", "private"]
    info = api.dataset_info(REPO)
    assert info.private is True and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo(REPO, repo_type="dataset", exist_ok=False)
    assert raised.value.response.status_code == 409
    assert hub.repo(REPO, "dataset").private is True


def test_requests_without_the_token_are_refused_with_401(hub, api):
    api.create_repo(REPO, repo_type="dataset", private=True)

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi().list_repo_files(REPO, repo_type="dataset")  # no token anywhere: the fixture cleared HF_TOKEN
    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO, repo_type="dataset")

    assert anonymous.value.response.status_code == wrong.value.response.status_code == 401
    assert "authorization" not in hub.requests_to("/tree/main")[-1].headers
    assert api.list_repo_files(REPO, repo_type="dataset") == [".gitattributes"]  # nothing was committed


# -- upload_folder, listing, downloads --------------------------------------------------------------


@pytest.mark.parametrize("part_size", [None, 4 * 1024 * 1024], ids=["single-put", "multipart"])
def test_upload_folder_sends_small_shards_as_regular_files_and_the_big_one_through_lfs(
    hub, api, tmp_path, part_size
):
    hub.lfs_part_size = part_size
    api.create_repo(REPO, repo_type="dataset", private=True)
    local = write_folder(tmp_path / "feedback")

    info = api.upload_folder(folder_path=tmp_path / "feedback", repo_id=REPO, repo_type="dataset")

    assert info.oid == hub.repo(REPO, "dataset").branches["main"]
    remote = hub.files(REPO, "dataset")
    assert {p: remote[p] for p in local} == local
    (ops,) = commit_lines(hub)
    assert sorted(op["value"]["path"] for op in ops if op["key"] == "file") == sorted(
        p for p in local if "big" not in p
    )
    assert [(op["value"]["path"], op["value"]["oid"]) for op in ops if op["key"] == "lfsFile"] == [
        ("flags/flags-20250103-big.jsonl", hashlib.sha256(local["flags/flags-20250103-big.jsonl"]).hexdigest())
    ]
    puts = hub.requests_to("/lfs-upload/", "PUT")
    assert len(puts) == (1 if part_size is None else 3)  # 11 MiB in 4 MiB parts
    assert all("authorization" not in r.headers for r in puts)  # like a pre-signed storage URL
    assert hub.requests_to(".git/info/lfs/objects/batch")[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.fixture
def pushed(hub, api, tmp_path) -> dict[str, bytes]:
    """REPO with the write_folder files committed by upload_folder; {path: bytes} as uploaded."""
    api.create_repo(REPO, repo_type="dataset", private=True)
    local = write_folder(tmp_path / "feedback")
    api.upload_folder(folder_path=tmp_path / "feedback", repo_id=REPO, repo_type="dataset")
    return local


def test_tree_lists_folders_files_and_lfs_details_at_any_depth(hub, api, pushed):
    def tree(path=None, recursive=False):
        entries = api.list_repo_tree(REPO, path, recursive=recursive, repo_type="dataset")
        return {e.path: ("file" if isinstance(e, RepoFile) else "dir") for e in entries}

    assert tree() == {".gitattributes": "file", "flags": "dir"}
    assert tree("flags") == {
        "flags/2025": "dir", "flags/flags-20250101-a.jsonl": "file", "flags/flags-20250101-b.jsonl": "file",
        "flags/flags-20250103-big.jsonl": "file",
    }
    assert tree(recursive=True) == {".gitattributes": "file", "flags": "dir", "flags/2025": "dir"} | {
        p: "file" for p in pushed
    }
    assert sorted(api.list_repo_files(REPO, repo_type="dataset")) == sorted([".gitattributes", *pushed])
    (big,) = api.get_paths_info(REPO, ["flags/flags-20250103-big.jsonl"], repo_type="dataset")
    assert big.lfs.sha256 == hashlib.sha256(pushed[big.path]).hexdigest() and big.size == len(pushed[big.path])
    (small,) = api.get_paths_info(REPO, ["flags/flags-20250101-a.jsonl"], repo_type="dataset")
    assert small.lfs is None and small.size == len(pushed[small.path])
    assert api.file_exists(REPO, "flags/2025/flags-20250102-c.jsonl", repo_type="dataset")
    assert not api.file_exists(REPO, "flags/missing.jsonl", repo_type="dataset")
    with pytest.raises(HfHubHTTPError):
        list(api.list_repo_tree(REPO, "nowhere", repo_type="dataset"))

    hub.tree_page_size = 2  # the client follows the Link header page by page
    assert tree(recursive=True) == {".gitattributes": "file", "flags": "dir", "flags/2025": "dir"} | {
        p: "file" for p in pushed
    }
    assert any("cursor=" in r.path for r in hub.requests_to("/tree/main", "GET"))


def test_a_file_and_a_snapshot_download_give_the_uploaded_bytes_and_load_with_datasets(hub, pushed, tmp_path):
    import datasets

    one = hf_hub_download(REPO, "flags/flags-20250101-a.jsonl", repo_type="dataset", token=TOKEN)
    snapshot = Path(snapshot_download(REPO, repo_type="dataset", token=TOKEN))

    assert Path(one).read_bytes() == pushed["flags/flags-20250101-a.jsonl"]
    got = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert {p: got[p] for p in pushed} == pushed and set(got) == {".gitattributes", *pushed}
    assert snapshot.name == hub.repo(REPO, "dataset").branches["main"]
    rows = datasets.load_dataset(
        "json", data_files=sorted(str(p) for p in snapshot.rglob("*.jsonl")), split="train",
        cache_dir=str(tmp_path / "datasets-cache"),
    )
    assert rows.num_rows == sum(len(data.splitlines()) for data in pushed.values())
    assert set(rows["thumbs"]) == {"down"} and "flag000000" in rows["flag_id"]


def test_second_commit_keeps_the_first_commits_files_and_old_commits_stay_readable(hub, api, pushed):
    first = hub.repo(REPO, "dataset").branches["main"]
    path = "flags/flags-20250101-a.jsonl"
    grown, new = pushed[path] + jsonl(1, 300), jsonl(2, 400)

    api.upload_file(path_or_fileobj=grown, path_in_repo=path, repo_id=REPO, repo_type="dataset")
    second = api.upload_file(path_or_fileobj=new, path_in_repo="flags/new.jsonl", repo_id=REPO, repo_type="dataset")

    now = hub.files(REPO, "dataset")
    assert now[path] == grown and now["flags/new.jsonl"] == new
    assert {p: now[p] for p in pushed if p != path} == {p: d for p, d in pushed.items() if p != path}
    old = hf_hub_download(REPO, path, repo_type="dataset", revision=first, token=TOKEN)
    assert Path(old).read_bytes() == pushed[path]
    commits = api.list_repo_commits(REPO, repo_type="dataset")
    assert [c.commit_id for c in commits][0] == second.oid and commits[2].commit_id == first
    assert len({c.commit_id for c in commits}) == len(commits) == 4  # initial, folder, 2 uploads
    assert all(len(c.commit_id) == 40 for c in commits)


def test_commit_on_a_stale_parent_is_refused_with_412_and_changes_nothing(hub, api, pushed):
    stale = hub.repo(REPO, "dataset").branches["main"]
    api.upload_file(path_or_fileobj=b'{"a": 1}\n', path_in_repo="flags/x.jsonl", repo_id=REPO, repo_type="dataset")
    head = hub.repo(REPO, "dataset").branches["main"]

    with pytest.raises(HfHubHTTPError) as raised:
        api.upload_file(path_or_fileobj=b'{"b": 2}\n', path_in_repo="flags/y.jsonl", repo_id=REPO,
                        repo_type="dataset", parent_commit=stale)

    assert raised.value.response.status_code == 412
    assert hub.requests_to("/commit/main")[-1].ndjson()[0]["value"]["parentCommit"] == stale
    assert hub.repo(REPO, "dataset").branches["main"] == head
    assert "flags/y.jsonl" not in hub.files(REPO, "dataset")
    api.upload_file(path_or_fileobj=b'{"b": 2}\n', path_in_repo="flags/y.jsonl", repo_id=REPO,
                    repo_type="dataset", parent_commit=head)
    assert "flags/y.jsonl" in hub.files(REPO, "dataset")


def test_upload_folder_with_hf_xet_installed_commits_regular_files_and_retries_a_failed_commit(
    hub, api, tmp_path, monkeypatch, hub_client_waits
):
    # huggingface_hub's default with hf_xet: upload_folder's pipelined path, which POSTs the commit with
    # back-off (create_commit, which CommitScheduler uses, does not). Regular files need no Xet storage.
    pytest.importorskip("hf_xet")  # a dependency of huggingface_hub on x86_64 and arm64
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    api.create_repo(REPO, repo_type="dataset", private=True)
    local = write_folder(tmp_path / "feedback", big=False)
    hub.fail(500, times=1, methods=("POST",), path="/commit/")

    api.upload_folder(folder_path=tmp_path / "feedback", repo_id=REPO, repo_type="dataset")

    remote = hub.files(REPO, "dataset")
    assert {p: remote[p] for p in local} == local
    assert len(hub.requests_to("/commit/main", "POST")) == 2 and hub_client_waits == [1]
    assert len(hub.repo(REPO, "dataset").history()) == 2  # initial commit + one upload


# -- CommitScheduler ------------------------------------------------------------------------------


def first_push(scheduler: CommitScheduler):
    """Wait for the push the scheduler's thread starts with; return its result (None: nothing to push)."""
    deadline = time.monotonic() + 10
    while not hasattr(scheduler, "last_future") and time.monotonic() < deadline:
        time.sleep(0.01)
    return scheduler.last_future.result()


def scheduled_commits(hub) -> int:
    return sum(c.title == "Scheduled Commit" for c in hub.repo(REPO, "dataset").history())


def test_commit_scheduler_pushes_the_folder_then_only_new_or_changed_files(hub, scheduled, tmp_path):
    store = FlagStore(tmp_path / "feedback")
    for _ in range(3):
        store.save(make_flag())
    (tmp_path / "feedback" / "meta.json").write_text('{"schema": 1}\n')
    (shard,) = (tmp_path / "feedback" / "flags").iterdir()
    shard_in_repo = f"flags/{shard.name}"

    scheduler = scheduled(tmp_path / "feedback")

    assert first_push(scheduler) is not None
    assert scheduler.trigger().result() is None  # nothing changed: no commit
    assert scheduled_commits(hub) == 1
    assert hub.files(REPO, "dataset")[shard_in_repo] == shard.read_bytes()
    assert hub.repo(REPO, "dataset").private is True
    store.save(make_flag())
    (tmp_path / "feedback" / "notes.jsonl").write_text('{"note": 1}\n')

    info = scheduler.trigger().result()

    assert info is not None and scheduled_commits(hub) == 2
    assert sorted(op["value"]["path"] for op in commit_lines(hub)[-1]) == ["flags/" + shard.name, "notes.jsonl"]
    remote = hub.files(REPO, "dataset")
    assert remote[shard_in_repo] == shard.read_bytes() and len(ids_in(remote[shard_in_repo])) == 4
    assert scheduler.last_uploaded[shard.resolve()] == shard.stat().st_mtime
    store.close()


def test_commit_scheduler_on_a_short_timer_pushes_without_being_triggered(hub, scheduled, tmp_path):
    with pytest.raises(ValueError):
        CommitScheduler(repo_id=REPO, folder_path=tmp_path, every=0, repo_type="dataset", token=TOKEN)
    (tmp_path / "feedback").mkdir()
    scheduler = scheduled(tmp_path / "feedback", every=1 / 60)  # minutes: a push every second
    assert first_push(scheduler) is None  # the folder is empty
    data = jsonl(2)
    (tmp_path / "feedback" / "a.jsonl").write_bytes(data)
    written = time.monotonic()

    while hub.files(REPO, "dataset").get("a.jsonl") != data and time.monotonic() < written + 15:
        time.sleep(0.1)

    assert hub.files(REPO, "dataset").get("a.jsonl") == data  # pushed by the next tick, within ~1 s
    assert time.monotonic() - written < 5 and scheduled_commits(hub) == 1


def test_failed_scheduled_commit_fails_its_future_and_the_next_trigger_delivers_once(
    hub, scheduled, tmp_path, caplog
):
    store = FlagStore(tmp_path / "feedback")
    store.save(make_flag())
    scheduler = scheduled(tmp_path / "feedback")
    first_push(scheduler)
    (shard,) = (tmp_path / "feedback" / "flags").iterdir()
    pushed_mtime = scheduler.last_uploaded[shard.resolve()]
    store.save(make_flag())
    hub.fail(500, times=1, methods=("POST",), path="/commit/")

    with caplog.at_level(logging.ERROR, logger="huggingface_hub"):
        failed = scheduler.trigger()
        with pytest.raises(HfHubHTTPError) as raised:
            failed.result()

    assert raised.value.response.status_code == 500
    assert "Error while pushing to Hub" in caplog.text
    assert scheduler.last_uploaded[shard.resolve()] == pushed_mtime  # kept: the shard counts as changed still
    assert len(ids_in(hub.files(REPO, "dataset")[f"flags/{shard.name}"])) == 1

    assert scheduler.trigger().result() is not None

    remote = hub.files(REPO, "dataset")[f"flags/{shard.name}"]
    assert remote == shard.read_bytes()
    assert sorted(ids_in(remote)) == sorted(set(ids_in(remote))) and len(ids_in(remote)) == 2
    assert scheduled_commits(hub) == 2
    store.close()


def test_commit_whose_answer_is_lost_is_not_committed_again_by_the_next_trigger(hub, scheduled, tmp_path):
    (tmp_path / "feedback").mkdir()
    scheduler = scheduled(tmp_path / "feedback")
    first_push(scheduler)
    data = jsonl(2)
    (tmp_path / "feedback" / "a.jsonl").write_bytes(data)
    hub.lose(times=1, methods=("POST",), path="/commit/")  # the Hub commits, the answer never arrives

    with pytest.raises(httpx2.RemoteProtocolError):
        scheduler.trigger().result()
    assert scheduled_commits(hub) == 1  # it is on the Hub already

    scheduler.trigger().result()  # preupload gives the file's oid: unchanged, so no commit is sent

    assert scheduled_commits(hub) == 1
    assert hub.files(REPO, "dataset")["a.jsonl"] == data
    assert len(hub.requests_to("/commit/main", "POST")) == 1


@pytest.mark.parametrize(
    "endpoint, pushed", [("/preupload/", True), ("/commit/", False)], ids=["on-preupload", "on-commit"]
)
def test_429_with_retry_after_is_waited_out_on_preupload_but_fails_a_commit(
    hub, scheduled, tmp_path, hub_client_waits, endpoint, pushed
):
    (tmp_path / "feedback").mkdir()
    scheduler = scheduled(tmp_path / "feedback")
    first_push(scheduler)
    (tmp_path / "feedback" / "a.jsonl").write_bytes(jsonl(1))
    hub.fail(429, times=1, methods=("POST",), path=endpoint, retry_after=3)

    future = scheduler.trigger()

    if pushed:
        future.result()
        assert hub_client_waits == [4.0]  # Retry-After + 1 s
    else:
        with pytest.raises(HfHubHTTPError) as raised:
            future.result()
        assert raised.value.response.status_code == 429 and hub_client_waits == []
    assert ("a.jsonl" in hub.files(REPO, "dataset")) is pushed


def test_hung_commit_blocks_the_scheduler_until_the_connection_ends(hub, scheduled, tmp_path):
    # huggingface_hub's HTTP client has no time-out (timeout=None): a Hub that never answers holds the
    # scheduler's single worker, and every later trigger queues behind it.
    (tmp_path / "feedback").mkdir()
    scheduler = scheduled(tmp_path / "feedback")
    first_push(scheduler)
    data = jsonl(1)
    (tmp_path / "feedback" / "a.jsonl").write_bytes(data)
    hub.hang(times=1, methods=("POST",), path="/commit/")

    hung = scheduler.trigger()
    queued = scheduler.trigger()
    with pytest.raises(concurrent.futures.TimeoutError):
        hung.result(timeout=1.5)
    assert not queued.done()

    hub.reset()  # the server lets go: the connection closes without an answer

    assert isinstance(hung.exception(timeout=10), httpx2.RemoteProtocolError)
    assert queued.result(timeout=10) is not None
    assert hub.files(REPO, "dataset")["a.jsonl"] == data
