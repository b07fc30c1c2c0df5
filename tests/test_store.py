"""FlagStore and the shard reader: durable appends, revisions, rotation, torn lines."""

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import feedback.store as store_mod
from feedback.dataset import flag_features, load_flags_dataset
from feedback.reader import latest_flags, read_flags, shard_paths
from feedback.store import FlagStore
from tests.records import make_flag

ROOT = Path(__file__).resolve().parent.parent


def lines_on_disk(root) -> list[dict]:
    return [json.loads(line) for p in shard_paths(root) for line in p.read_text().splitlines() if line]


def test_saved_record_is_on_disk_before_save_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = FlagStore(tmp_path)
    rec = store.save(make_flag())
    assert synced, "save returned without an fsync"
    assert [r["record_id"] for r in lines_on_disk(tmp_path)] == [rec.record_id]


def test_resaving_an_unchanged_flag_writes_nothing(tmp_path):
    store = FlagStore(tmp_path)
    first = store.save(make_flag(flag_id="f1"))
    again = store.save(make_flag(flag_id="f1", comment=first.comment))
    assert again.record_id == first.record_id
    assert len(lines_on_disk(tmp_path)) == 1


def test_changed_resave_is_the_next_revision_and_keeps_created_at(tmp_path):
    store = FlagStore(tmp_path)
    first = store.save(make_flag(flag_id="f1", comment="one"))
    second = store.save(make_flag(flag_id="f1", comment="two"))
    assert (first.revision, second.revision) == (1, 2)
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    latest = latest_flags(tmp_path).records
    assert list(latest) == ["f1"] and latest["f1"].comment == "two"
    assert len(read_flags(tmp_path).records) == 2  # append-only: both revisions stay


def test_revisions_continue_after_a_restart(tmp_path):
    FlagStore(tmp_path).save(make_flag(flag_id="f1", comment="one"))
    store = FlagStore(tmp_path)
    assert store.save(make_flag(flag_id="f1", comment="one")).revision == 1  # unchanged: nothing new
    assert store.save(make_flag(flag_id="f1", comment="two")).revision == 2


def test_torn_last_line_is_reported_and_nothing_else_is_lost(tmp_path):
    store = FlagStore(tmp_path)
    kept = [store.save(make_flag()) for _ in range(3)]
    store.close()
    shard = shard_paths(tmp_path)[0]
    whole = make_flag().model_dump_json().encode()
    with open(shard, "ab") as f:
        f.write(whole[: len(whole) // 2])  # a crash mid-write
    result = read_flags(tmp_path)
    assert [r.record_id for r in result.records] == [r.record_id for r in kept]
    assert len(result.bad) == 1 and result.bad[0].torn and result.bad[0].line == 4
    assert f"{shard}:4: torn last line" in str(result.bad[0])


def test_a_bad_line_in_the_middle_is_reported_with_file_and_line(tmp_path):
    store = FlagStore(tmp_path)
    store.save(make_flag())
    store.close()
    shard = shard_paths(tmp_path)[0]
    with open(shard, "ab") as f:
        f.write(b'{"not": "a flag"}\n' + make_flag().model_dump_json().encode() + b"\n")
    result = read_flags(tmp_path)
    assert len(result.records) == 2
    assert [(b.line, b.torn) for b in result.bad] == [(2, False)]


@pytest.mark.parametrize("field", ["comment", "correction", "system_prompt", "conversation"])
@pytest.mark.parametrize("broken", [b"\\ud800", b"\\udfff", b"\xff"])
def test_text_that_is_not_utf8_in_a_shard_line_is_a_bad_line(tmp_path, field, broken):
    # Records read from JSON skip check_text (schemas.flag.Text): the JSON parser must refuse these.
    store = FlagStore(tmp_path)
    store.save(make_flag())
    store.close()
    line = make_flag(comment="MARK", correction="MARK", system_prompt="MARK",
                     conversation=[{"role": "assistant", "content": "MARK"}]).model_dump_json().encode()
    key = {"conversation": b'"content":"MARK"'}.get(field, f'"{field}":"MARK"'.encode())
    assert line.count(key) == 1
    with open(shard_paths(tmp_path)[0], "ab") as f:
        f.write(line.replace(key, key.replace(b"MARK", b"a" + broken + b"b")) + b"\n")
    result = read_flags(tmp_path)
    assert len(result.records) == 1
    assert [(b.line, b.torn) for b in result.bad] == [(2, False)]


def test_shards_rotate_by_size(tmp_path):
    store = FlagStore(tmp_path, max_bytes=4096)
    saved = [store.save(make_flag()) for _ in range(12)]
    store.close()
    paths = shard_paths(tmp_path)
    assert len(paths) > 1
    assert all(p.stat().st_size <= 4096 for p in paths)
    assert sorted(r.record_id for r in read_flags(tmp_path).records) == sorted(r.record_id for r in saved)


def test_shards_rotate_when_the_utc_day_changes(tmp_path, monkeypatch):
    store = FlagStore(tmp_path)
    store.save(make_flag())
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)

    class Tomorrow(datetime):
        @classmethod
        def now(cls, tz=None):
            return tomorrow

    monkeypatch.setattr(store_mod, "datetime", Tomorrow)
    store.save(make_flag())
    names = [p.name for p in shard_paths(tmp_path)]
    assert len(names) == 2 and any(tomorrow.strftime("%Y%m%d") in n for n in names)


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    store = FlagStore(tmp_path)
    acked: list[str] = []
    lock = threading.Lock()

    def writer():
        for _ in range(25):
            rec = store.save(make_flag())
            with lock:
                acked.append(rec.record_id)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = read_flags(tmp_path)
    on_disk = [r.record_id for r in result.records]
    assert not result.bad
    assert sorted(on_disk) == sorted(acked) and len(set(on_disk)) == 400


def test_two_processes_write_separate_shards(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from feedback.store import FlagStore;"
        "from tests.records import make_flag; s = FlagStore(sys.argv[1]);"
        "[s.save(make_flag(flag_id=f'{sys.argv[3]}-{i}')) for i in range(20)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(ROOT), name]) for name in "ab"]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert len(shard_paths(tmp_path)) == 2
    result = read_flags(tmp_path)
    assert len(result.records) == 40 and not result.bad


def test_unwritable_feedback_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="FLAGLOOP_FEEDBACK_DIR"):
        FlagStore(blocker / "feedback")


def test_flags_load_as_a_dataset_with_the_schema_features(tmp_path):
    store = FlagStore(tmp_path)
    store.save(make_flag(flag_id="a", comment="first"))
    store.save(make_flag(flag_id="a", comment="second"))
    store.save(make_flag(flag_id="b", thumbs=None, correction=None, reasons=[]))
    ds = load_flags_dataset(tmp_path)
    assert ds.features == flag_features()
    assert sorted(ds["flag_id"]) == ["a", "b"]
    row = {r["flag_id"]: r for r in ds}["a"]
    assert row["comment"] == "second" and row["revision"] == 2
    assert row["conversation"][-1] == {"role": "assistant", "content": "It is Paris."}
    assert row["model"]["quant"] == "Q4_1" and row["generation"]["top_p"] == 0.9
    assert len(load_flags_dataset(tmp_path, latest=False)) == 3


def test_an_empty_store_loads_as_an_empty_dataset_with_features(tmp_path):
    ds = load_flags_dataset(tmp_path)
    assert len(ds) == 0 and ds.features == flag_features()


def test_a_failed_fsync_leaves_rotated_shards_for_the_next_one(tmp_path, monkeypatch):
    store = FlagStore(tmp_path, max_bytes=4096)
    store.save(make_flag())
    real_fsync = os.fsync
    calls, failed = [], []

    def failing_once(fd):
        calls.append(fd)
        if not failed:
            failed.append(fd)
            raise OSError(5, "I/O error")
        return real_fsync(fd)

    while len(shard_paths(tmp_path)) < 2:  # rotate: the first shard waits, retired, for its fsync
        with store._writer.lock:
            store._writer.write(make_flag().model_dump_json().encode() + b"\n")
    retired_fd = store._writer._retired[0].fileno()
    monkeypatch.setattr(store_mod.os, "fsync", failing_once)
    with pytest.raises(OSError):
        store.save(make_flag())
    assert failed == [retired_fd]
    calls.clear()
    store.save(make_flag())
    assert retired_fd in calls, "the rotated shard whose fsync failed was never fsynced again"
