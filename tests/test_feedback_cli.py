"""`python -m feedback stats|validate`: what an operator runs over the flag folder."""

import subprocess
import sys
from pathlib import Path

from feedback.reader import shard_paths
from feedback.store import FlagStore
from tests.records import make_flag

ROOT = Path(__file__).resolve().parent.parent


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feedback", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_validate_passes_clean_shards_and_reports_bad_rows_with_file_and_line(tmp_path):
    store = FlagStore(tmp_path)
    for _ in range(3):
        store.save(make_flag())
    store.close()
    ok = run("--dir", str(tmp_path), "validate")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3 rows checked, 0 bad" in ok.stderr

    shard = shard_paths(tmp_path)[0]
    good = make_flag().model_dump_json()
    with open(shard, "a") as f:
        f.write(good.replace('"incorrect"', '"bad-vibes"') + "\n")
        f.write(good[:40])
    bad = run("--dir", str(tmp_path), "validate")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert lines[0].startswith(f"{shard}:4: reasons/0: 'bad-vibes' is not one of")
    assert lines[1].startswith(f"{shard}:5: not JSON") and "torn last line" in lines[1]
    assert "5 rows checked, 2 bad" in bad.stderr


def test_stats_counts_the_latest_revision_of_each_flag(tmp_path):
    store = FlagStore(tmp_path)
    store.save(make_flag(flag_id="a", reasons=["unsafe"], comment="x"))
    store.save(make_flag(flag_id="a", reasons=["unsafe"], comment="y"))
    store.save(make_flag(flag_id="b", thumbs="up", reasons=[], correction=None))
    out = run("--dir", str(tmp_path), "stats")
    assert out.returncode == 0, out.stderr
    assert "flags: 2 (3 revisions written, 0 bad lines)" in out.stdout
    assert "with a correction: 1" in out.stdout
    assert "thumbs: down=1, up=1" in out.stdout or "thumbs: up=1, down=1" in out.stdout
    assert "reasons: unsafe=1" in out.stdout
