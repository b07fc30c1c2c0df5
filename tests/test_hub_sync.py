"""Hub sync of the feedback folder: every complete record reaches the Hub dataset exactly once, whatever the Hub does.

The Hub is tests/hubserver.py on 127.0.0.1 (asking for TOKEN), driven by the real huggingface_hub 2.4
client; the shards are written by the real FlagStore. A push's own back-off waits are recorded instead
of slept (`sleep=waits.append`), and so are huggingface_hub's (`hub_client_waits`); HTTP requests time
out after TIMEOUT_S. Exactly once is checked on what the Hub holds: every record_id of the local
shards, once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, HfApi, snapshot_download
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from feedback.reader import read_flags, shard_paths
from feedback.store import FlagStore
from feedback.sync import (
    FolderPusher,
    HubSync,
    SyncError,
    card_configs,
    install_http_timeout,
    parse_part,
    start_sync,
)
from schemas.review import ReviewDecision
from schemas.settings import Settings
from tests.records import make_flag

ROOT = Path(__file__).resolve().parent.parent
REPO = "flagloop-tester/feedback"
TOKEN = "hf_syncSECRETtoken0123456789abcdef"  # must never show up in a log, a status or a file
TIMEOUT_S = 1.5


@pytest.fixture(autouse=True)
def http_timeout():
    """huggingface_hub gives up on a request after TIMEOUT_S; its default client is back after the test."""
    install_http_timeout(TIMEOUT_S)
    yield
    set_client_factory(default_client_factory)


@pytest.fixture
def hub(hub_server):
    hub_server.token = TOKEN
    return hub_server


@pytest.fixture
def store(tmp_path):
    s = FlagStore(tmp_path / "feedback")
    yield s
    s.close()


def pusher_for(root: Path, waits: list | None = None, **options) -> FolderPusher:
    """A pusher of `root` to REPO whose back-off waits go into `waits` instead of sleeping."""
    sink = waits.append if waits is not None else (lambda seconds: None)
    return FolderPusher(HfApi(token=TOKEN), REPO, root, sleep=sink, timeout_s=TIMEOUT_S, **options)


def save(store: FlagStore, n: int) -> list[str]:
    """Save n new flags; their record ids."""
    return [store.save(make_flag()).record_id for _ in range(n)]


def write_reviews(root: Path, n: int, name: str = "reviews-20250101-host-1-1.jsonl") -> list[str]:
    """Append n ReviewDecision lines to a reviews shard; their decision ids."""
    folder = root / "reviews"
    folder.mkdir(parents=True, exist_ok=True)
    decisions = [
        ReviewDecision(flag_id=f"f{i}", flag_record_id=f"r{i}", action="accept", reviewer="ana") for i in range(n)
    ]
    with open(folder / name, "ab") as f:
        f.write("".join(d.model_dump_json() + "\n" for d in decisions).encode())
    return [d.decision_id for d in decisions]


def hub_ids(hub, folder: str = "flags", repo: str = REPO) -> Counter:
    """How many times each record id (decision id for reviews) is in the repo's part files."""
    key = "record_id" if folder == "flags" else "decision_id"
    ids = Counter()
    if ("dataset", repo) not in hub.repos:
        return ids
    for path, data in hub.files(repo, "dataset").items():
        parsed = parse_part(path)
        if parsed and parsed[0] == folder:
            ids.update(json.loads(line)[key] for line in data.splitlines())
    return ids


def downloaded_ids() -> Counter:
    """How many times each record id is in the repo as a client downloads it (snapshot_download)."""
    snapshot = Path(snapshot_download(REPO, repo_type="dataset", token=TOKEN))
    return Counter(json.loads(line)["record_id"] for part in snapshot.glob("flags/*/*.jsonl")
                   for line in part.read_bytes().splitlines())


def local_ids(root: Path) -> set[str]:
    return {r.record_id for r in read_flags(root).records}


def committed_paths(hub) -> list[str]:
    """Every path any commit POSTed so far wrote, in order (a path twice would be a rewrite)."""
    return [
        op["value"]["path"]
        for r in hub.requests_to(f"/api/datasets/{REPO}/commit/", "POST")
        for op in r.ndjson()[1:]
    ]


def joined(hub, folder: str, stem: str) -> bytes:
    """A shard as the Hub holds it: its parts joined in order."""
    files = hub.files(REPO, "dataset")
    parts = sorted((parse_part(p), d) for p, d in files.items() if p.startswith(f"{folder}/{stem}/"))
    return b"".join(d for _, d in parts)


def wait_until(condition, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- what a push sends ----------------------------------------------------------------------------


def test_first_push_creates_a_private_repo_with_a_dataset_card_and_sends_each_shard_whole(hub, store, tmp_path):
    root = tmp_path / "feedback"
    flags = save(store, 3)
    reviews = write_reviews(root, 2)
    pusher = pusher_for(root)

    result = pusher.push()

    assert result.records == {"flags": 3, "reviews": 2} and result.card_written
    assert hub.repo(REPO, "dataset").private is True
    assert [r.json()["visibility"] for r in hub.requests_to("/api/repos/create")] == ["private"]
    (shard,) = shard_paths(root)
    review_shard = root / "reviews" / "reviews-20250101-host-1-1.jsonl"
    files = hub.files(REPO, "dataset")
    assert sorted(files) == sorted([
        ".gitattributes", "README.md",
        f"flags/{shard.stem}/000000000000-{shard.stat().st_size:012d}.jsonl",
        f"reviews/{review_shard.stem}/000000000000-{review_shard.stat().st_size:012d}.jsonl",
    ])
    assert joined(hub, "flags", shard.stem) == shard.read_bytes()
    assert hub_ids(hub) == Counter(flags) and hub_ids(hub, "reviews") == Counter(reviews)
    assert DatasetCard(files["README.md"].decode()).data.configs == card_configs()
    status = pusher.status()
    assert (status.pending_records, status.pushed_records, status.last_error) == (0, 5, None)
    assert status.last_commit == hub.repo(REPO, "dataset").branches["main"] == result.commits[0]
    assert "pushed 3 flag records, 2 review records and the dataset card" in result.summary()


def test_each_push_adds_only_the_new_complete_lines_as_a_new_file_and_never_rewrites_one(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 2)
    pusher = pusher_for(root)
    pusher.push()
    first_commit = hub.repo(REPO, "dataset").branches["main"]
    # A second shard whose last line is still being written (or was cut by a crash): no "\n" yet.
    line1, line2 = (make_flag().model_dump_json().encode() + b"\n" for _ in range(2))
    other = root / "flags" / "flags-20250101-otherhost-7-1.jsonl"
    other.write_bytes(line1 + line2[:50])
    save(store, 1)

    assert pusher.status().pending_records == 2  # the torn line is not a record yet
    second = pusher.push()

    assert second.records["flags"] == 2
    assert joined(hub, "flags", other.stem) == line1  # not the torn half
    with open(other, "ab") as f:
        f.write(line2[50:])  # the write completes
    third = pusher.push()

    assert third.records["flags"] == 1
    assert joined(hub, "flags", other.stem) == other.read_bytes()
    (shard,) = [p for p in shard_paths(root) if p != other]
    assert joined(hub, "flags", shard.stem) == shard.read_bytes()
    paths = committed_paths(hub)
    assert len(paths) == len(set(paths))  # no file was ever written twice
    assert len([p for p in paths if p.startswith(f"flags/{shard.stem}/")]) == 2
    before = hub.files(REPO, "dataset", revision=first_commit)
    now = hub.files(REPO, "dataset")
    assert all(now[p] == data for p, data in before.items())  # what was pushed is still there, unchanged
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once


def test_nothing_new_commits_nothing_and_a_restarted_pusher_learns_what_the_hub_has(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 3)
    pusher_for(root).push()
    commits = len(hub.requests_to("/commit/main", "POST"))

    again = pusher_for(root).push()  # a new process: nothing in memory

    assert again.commits == [] and "nothing new to push" in again.summary()
    assert len(hub.requests_to("/commit/main", "POST")) == commits
    (shard,) = shard_paths(root)
    pushed_bytes = shard.stat().st_size
    new = save(store, 2)  # saved while no pusher ran (the app was restarting)
    restarted = pusher_for(root)

    result = restarted.push()

    assert result.records["flags"] == 2
    part = committed_paths(hub)[-1]
    assert parse_part(part)[2:] == (pushed_bytes, shard.stat().st_size)  # only the new lines went
    assert (restarted.status().pushed_records, restarted.status().pending_records) == (5, 0)
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once
    assert set(new) <= set(hub_ids(hub))


def test_a_backlog_larger_than_one_commit_goes_in_several_commits_of_one_push(hub, tmp_path):
    root = tmp_path / "feedback"
    small = FlagStore(root, max_bytes=1024)  # about one record a shard: six shards
    save(small, 6)
    small.close()
    assert len(shard_paths(root)) == 6

    result = pusher_for(root, max_commit_bytes=2000).push()

    commits = hub.requests_to("/commit/main", "POST")
    assert len(result.commits) == len(commits) >= 3 and result.records["flags"] == 6
    for commit in commits:
        parts = [parse_part(op["value"]["path"]) for op in commit.ndjson()[1:] if op["value"]["path"] != "README.md"]
        assert sum(end - start for _, _, start, end in parts) <= 2000 or len(parts) == 1
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once


# -- the dataset card ----------------------------------------------------------------------------------


def test_the_flags_and_reviews_configs_load_with_datasets_from_a_snapshot_and_from_the_hub(
    hub, store, tmp_path, monkeypatch
):
    import datasets

    from feedback.dataset import features_of, flag_features

    # datasets reads HF_ENDPOINT once, at import (which may have been in an earlier test).
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    root = tmp_path / "feedback"
    save(store, 2)
    pusher = pusher_for(root)
    pusher.push()
    save(store, 3)
    reviews = write_reviews(root, 2)
    pusher.push()  # two part files for the flag shard now
    snapshot = snapshot_download(REPO, repo_type="dataset", token=TOKEN)

    flags = datasets.load_dataset(snapshot, "flags", split="train", cache_dir=str(tmp_path / "ds-cache"))
    decisions = datasets.load_dataset(snapshot, "reviews", split="train", cache_dir=str(tmp_path / "ds-cache"))
    default = datasets.load_dataset(snapshot, split="train", cache_dir=str(tmp_path / "ds-cache"))
    from_hub = datasets.load_dataset(REPO, "flags", split="train", token=TOKEN, cache_dir=str(tmp_path / "hub-cache"))

    assert flags.num_rows == 5 and set(flags["record_id"]) == local_ids(root)
    assert flags.features == flag_features()  # from the card's dataset_info: timestamps, structs, lists
    assert flags[0]["created_at"].tzinfo is not None and flags[0]["conversation"][-1]["role"] == "assistant"
    assert set(decisions["decision_id"]) == set(reviews) and decisions.features == features_of(ReviewDecision)
    assert default.num_rows == 5  # "flags" is the default config
    assert set(from_hub["record_id"]) == local_ids(root) and from_hub.features == flag_features()


def test_an_edited_card_text_is_kept_and_configs_that_differ_are_put_back(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 1)
    pusher = pusher_for(root)
    pusher.push()
    ours = hub.files(REPO, "dataset")["README.md"].decode()
    hub.add_file(REPO, "README.md", (ours + "\nReviewed weekly by the team.\n").encode(), repo_type="dataset")
    save(store, 1)

    kept = pusher_for(root).push()

    assert not kept.card_written and committed_paths(hub).count("README.md") == 1  # the first push's
    assert hub.files(REPO, "dataset")["README.md"].decode().endswith("Reviewed weekly by the team.\n")
    hub.add_file(REPO, "README.md", b"---\nlicense: mit\n---\n# Our flags\n", repo_type="dataset")
    save(store, 1)

    fixed = pusher_for(root).push()

    card = DatasetCard(hub.files(REPO, "dataset")["README.md"].decode())
    assert fixed.card_written and card.data.configs == card_configs()
    assert committed_paths(hub).count("README.md") == 2
    assert card.data.license == "mit" and "# Our flags" in card.text


# -- failures: local saving goes on, the status says why, then everything arrives once ------------------


def stop_hub(hub):
    hub.stop()


def start_hub(hub):
    hub.start()


RETRIED = [1.0, 2.0]  # the push tried three times, with these waits between (retry_waits below)
FAILURES = {
    # name: (break the Hub, repair it, what the error says, the push's back-off waits)
    "unreachable": (stop_hub, start_hub, "cannot reach the Hub at http://127.0.0.1:", RETRIED),
    "500-on-commit": (lambda h: h.fail(500, methods=("POST",), path="/commit/"), lambda h: h.reset(),
                      "the Hub answered 500: Internal Error", RETRIED),
    "503-everywhere": (lambda h: h.fail(503), lambda h: h.reset(),
                       "the Hub answered 503: Service unavailable", RETRIED),
    "401-token-refused": (lambda h: setattr(h, "token", "hf_anotherTOKEN"), lambda h: setattr(h, "token", TOKEN),
                          "the Hub refused the token (401", []),
    "403-no-write-access": (lambda h: h.fail(403, methods=("POST",), path="/commit/"), lambda h: h.reset(),
                            f"the token may not write to {REPO} (403", []),
    "404-repo": (lambda h: h.fail(404, error_code="RepoNotFound"), lambda h: h.reset(),
                 f"dataset repo {REPO} not found (404) and it could not be created", []),
    "429-rate-limited": (lambda h: h.fail(429, methods=("POST",), path="/commit/", retry_after=2), lambda h: h.reset(),
                         "rate limited by the Hub (429), retry after 2 s", [2.0, 2.0]),  # Retry-After, when longer
    "hang": (lambda h: h.hang(methods=("POST",), path="/commit/"), lambda h: h.reset(),
             f"did not answer within {TIMEOUT_S:g} s", RETRIED),
    "dropped-connection": (lambda h: h.drop(methods=("POST",), path="/commit/"), lambda h: h.reset(),
                           "broke off without an answer", RETRIED),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_while_the_hub_fails_saving_goes_on_and_once_it_is_back_every_record_arrives_once(
    hub, store, tmp_path, hub_client_waits, failure
):
    break_hub, repair, says, backoff = FAILURES[failure]
    root = tmp_path / "feedback"
    save(store, 2)
    waits: list[float] = []
    pusher = pusher_for(root, waits, retry_waits=(1.0, 2.0))
    pusher.push()
    break_hub(hub)

    saved_meanwhile = save(store, 3)  # the app keeps saving
    (shard,) = shard_paths(root)
    local = shard.read_bytes()
    started = time.monotonic()
    with pytest.raises(SyncError) as failed:
        pusher.push()
    took = time.monotonic() - started

    assert says in str(failed.value)
    status = pusher.status()
    assert says in status.last_error and status.pending_records == 3 and status.pushed_records == 2
    assert shard.read_bytes() == local and local_ids(root) >= set(saved_meanwhile)  # the store is untouched
    assert waits == backoff  # [] where trying again cannot help: the tick fails at once
    assert took < 3 * TIMEOUT_S + 3  # a hung Hub does not hold the push

    repair(hub)
    pusher.push()

    assert pusher.status().last_error is None and pusher.status().pending_records == 0
    assert downloaded_ids() == Counter(local_ids(root))  # each record once


def test_a_tree_listing_that_never_answers_is_given_up_on_after_the_time_out_and_retried(
    hub, store, tmp_path, hub_client_waits
):
    # huggingface_hub lists trees with timeout=None, which would wait forever on its default client.
    root = tmp_path / "feedback"
    save(store, 2)
    hub.create_repo(REPO, "dataset", private=True)
    hub.hang(times=1, methods=("GET",), path="/tree/")
    started = time.monotonic()

    pusher_for(root).push()

    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 3
    assert hub_client_waits == [1]  # huggingface_hub's own retry of the listing, after the time-out
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once


def test_a_commit_whose_answer_is_lost_is_found_on_the_hub_and_not_sent_again(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 3)
    waits: list[float] = []

    def wait_while_a_flag_is_saved(seconds: float) -> None:
        waits.append(seconds)
        save(store, 1)  # so the retry's part would overlap the lost one if it started from memory

    pusher = FolderPusher(HfApi(token=TOKEN), REPO, tmp_path / "feedback", sleep=wait_while_a_flag_is_saved)
    hub.lose(times=1, methods=("POST",), path="/commit/")  # the Hub commits; the answer never arrives

    pusher.push()

    assert waits == [1.0]  # one failed attempt; the next listed the Hub and saw the lost commit's part
    (shard,) = shard_paths(root)
    first, second = [parse_part(p) for p in committed_paths(hub)[-2:]]
    assert first[3] == second[2] and second[3] == shard.stat().st_size  # the retry sent only the new line
    assert len(hub.requests_to("/commit/main", "POST")) == 2
    assert len(local_ids(root)) == 4
    assert downloaded_ids() == Counter(local_ids(root))  # each record once


def test_two_pushers_racing_on_one_folder_never_send_a_record_twice(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 2)
    waits: list[float] = []
    app, operator = pusher_for(root, waits), pusher_for(root)
    real_commit = app.api.create_commit

    def operator_pushes_first(**kwargs):
        # Between the app's listing and its commit, one more flag is saved and `python -m feedback push`
        # sends all three: the app's planned part (two lines) now overlaps what the Hub has.
        if not waits:
            save(store, 1)
            operator.push()
        return real_commit(**kwargs)

    app.api.create_commit = operator_pushes_first
    app.push()

    commits = hub.requests_to("/commit/main", "POST")
    assert len(commits) == 2 and waits == [1.0]  # the app's commit named a stale parent: 412, then nothing left
    assert all(r.ndjson()[0]["value"].get("parentCommit") for r in commits)
    assert len(local_ids(root)) == 3
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once


def test_a_deleted_repo_is_created_again_and_gets_every_record_once(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 2)
    pusher = pusher_for(root)
    pusher.push()
    del hub.repos[("dataset", REPO)]
    save(store, 1)

    pusher.push()

    assert hub.repo(REPO, "dataset").private is True
    assert hub_ids(hub) == Counter(local_ids(root))  # each record once
    assert pusher.status().pushed_records == 3


# -- the scheduler, as the app runs it ------------------------------------------------------------------


def test_hub_sync_pushes_on_its_timer_keeps_saving_while_the_hub_is_down_and_delivers_everything_once(
    hub, store, tmp_path
):
    root = tmp_path / "feedback"
    sync = HubSync(REPO, root, token=TOKEN, every=1 / 60, retry_waits=(0.05,), timeout_s=TIMEOUT_S)
    try:
        save(store, 2)
        wait_until(lambda: len(hub_ids(hub)) == 2, what="the first records on the Hub")
        hub.stop()
        save(store, 3)
        wait_until(lambda: "cannot reach the Hub" in (sync.status().last_error or ""), what="the error in the status")
        status = sync.status()
        assert status.pending_records == 3 and status.pushed_records == 2
        assert status.next_push_at is not None and "cannot reach the Hub" in status.line()

        hub.start()
        wait_until(lambda: len(hub_ids(hub)) == 5, what="the records saved while the Hub was down")
        wait_until(lambda: sync.status().last_error is None, what="the error to clear")
        assert downloaded_ids() == Counter(local_ids(root))  # each record once
        last = save(store, 1)

        assert sync.shutdown(timeout=10) is True  # the last push, on clean shutdown
        assert last[0] in hub_ids(hub)
        save(store, 1)
        time.sleep(2.5)
        assert len(hub_ids(hub)) == 6  # stopped: no more pushes
    finally:
        sync.stop()


def test_start_sync_needs_a_dataset_repo_and_a_token(hub, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("FLAGLOOP_CONFIG", raising=False)
    assert start_sync(Settings(feedback_dir=tmp_path)) is None
    with caplog.at_level(logging.WARNING, logger="feedback.sync"):
        assert start_sync(Settings(feedback_dir=tmp_path, dataset_repo=REPO)) is None
    assert "no Hub token is set" in caplog.text
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub's own token counts too
    sync = start_sync(Settings(feedback_dir=tmp_path, dataset_repo=REPO))
    try:
        assert isinstance(sync, HubSync) and sync.status().repo == REPO
        assert sync.shutdown(timeout=10)
        assert "README.md" in hub.files(REPO, "dataset")
    finally:
        if sync is not None:
            sync.stop()
    with pytest.raises(ValueError, match="must be 'owner/name'"):
        Settings(dataset_repo="feedback")


# -- secrets --------------------------------------------------------------------------------------------


def test_the_token_never_appears_in_logs_status_requests_or_files(hub, store, tmp_path, caplog, hub_client_waits):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its own level is WARNING otherwise
    root = tmp_path / "feedback"
    save(store, 2)
    pusher = pusher_for(root)
    pusher.push()
    hub.token = "hf_anotherTOKEN"
    with pytest.raises(SyncError) as refused:
        pusher.push()
    hub.token = TOKEN
    hub.fail(500, methods=("POST",), path="/commit/")
    save(store, 1)
    with pytest.raises(SyncError) as failed:
        pusher.push()
    hub.reset()
    pusher.push()
    sync = HubSync(REPO, root, token=TOKEN, every=10, retry_waits=(), timeout_s=TIMEOUT_S)
    sync.shutdown(timeout=10)

    said = [caplog.text, str(refused.value), str(failed.value), repr(pusher.status()), sync.status().line()]
    assert "401" in str(refused.value) and "authenticated: True" in caplog.text  # it did log, and did fail
    assert not any(TOKEN in text for text in said)
    assert not any(TOKEN.encode() in r.body for r in hub.requests)
    assert not any(TOKEN.encode() in data for data in hub.files(REPO, "dataset").values())
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)


# -- python -m feedback push | pull ---------------------------------------------------------------------


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FLAGLOOP_CONFIG"} | env
    return subprocess.run([sys.executable, "-m", "feedback", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def test_push_command_pushes_now_says_what_it_sent_and_exits_1_with_one_line_on_failure(hub, store, tmp_path):
    root = tmp_path / "feedback"
    save(store, 3)
    env = {"FLAGLOOP_DATASET_REPO": REPO, "FLAGLOOP_HUB_TOKEN": TOKEN}

    first = cli("--dir", str(root), "push", **env)
    again = cli("--dir", str(root), "push", **env)
    save(store, 1)
    hub.fail(403, methods=("POST",), path="/commit/")
    refused = cli("--dir", str(root), "push", **env)
    unset = cli("--dir", str(root), "push")

    assert first.returncode == 0, first.stderr
    assert f"pushed 3 flag records, 0 review records and the dataset card to {REPO} in commit" in first.stdout
    assert "0 records pending, 3 on the Hub" in first.stdout
    assert again.returncode == 0 and "nothing new to push" in again.stdout
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"flagloop: push to {REPO} failed: the token may not write to {REPO} (403: Forbidden): use a token with "
        "write access to it; the records stay in the local shards for a later push"
    ]
    assert unset.returncode == 2 and "FLAGLOOP_DATASET_REPO" in unset.stderr
    assert not any(TOKEN in out for p in (first, again, refused) for out in (p.stdout, p.stderr))
    assert len(hub_ids(hub)) == 3


def test_pull_command_puts_the_shards_back_together_for_the_reader(hub, store, tmp_path):
    from feedback.dataset import load_flags_dataset

    root, out = tmp_path / "feedback", tmp_path / "pulled"
    save(store, 2)
    pusher = pusher_for(root)
    pusher.push()
    save(store, 2)
    write_reviews(root, 3)
    pusher.push()
    env = {"FLAGLOOP_HUB_TOKEN": TOKEN}

    pulled = cli("pull", "--repo", REPO, "--to", str(out), **env)

    assert pulled.returncode == 0, pulled.stderr
    assert f"pulled 7 records in 2 shards into {out}" in pulled.stdout
    for local in [*shard_paths(root), *(root / "reviews").glob("*.jsonl")]:
        assert (out / local.parent.name / local.name).read_bytes() == local.read_bytes()
    assert local_ids(out) == local_ids(root) and not read_flags(out).bad
    assert load_flags_dataset(out).num_rows == 4

    save(store, 1)  # the local shard is now ahead of the Hub: a pull into it keeps it
    (shard,) = shard_paths(root)
    ahead = shard.read_bytes()
    into_live = cli("pull", "--repo", REPO, "--to", str(root), **env)
    assert into_live.returncode == 0 and shard.read_bytes() == ahead
    (out / "flags" / shard.name).write_bytes(b'{"something": "else"}\n')
    conflict = cli("pull", "--repo", REPO, "--to", str(out), **env)
    assert conflict.returncode == 1 and "differs from the Hub's" in conflict.stderr
    assert (out / "flags" / shard.name).read_bytes() == b'{"something": "else"}\n'
