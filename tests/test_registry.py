"""The model registry: versions are published whole or not at all, `current` only ever names a whole file.

Local: real files, fsync and rename; a real child process SIGKILLed in the middle of publishing.
Hub: tests/hubserver.py on 127.0.0.1, driven by the real huggingface_hub client, with faults injected.
The GGUFs are small real GGUF files written by the gguf package (a file type and one tensor of noise).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import gguf as gguf_pkg
import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

import retrain.registry as registry_module
from retrain.publish import REPORT, publish_version, rollback
from retrain.registry import HubRegistry, LocalRegistry, PublishError, RegistryError, gguf_quant
from schemas.registry import GateReport
from schemas.run import BaseModelRef, InputFile, RetrainSettings, RunManifest
from schemas.settings import Settings
from tests.conftest import ROOT

REPO = "flagloop-tester/model"
BASE_SHA = "b" * 64


def tiny_gguf(path: Path, seed: int, floats: int = 4096, file_type=gguf_pkg.LlamaFileType.MOSTLY_Q8_0) -> Path:
    """A real GGUF file: llama architecture, a file type, a name, and one tensor of noise (distinct per seed)."""
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    writer.add_file_type(int(file_type))
    writer.add_name(f"tiny-{seed}")
    writer.add_tensor("blob", np.random.default_rng(seed).standard_normal(floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ggufs(tmp_path) -> list[Path]:
    """Three distinct small GGUFs (the third quantized differently)."""
    folder = tmp_path / "exports"
    folder.mkdir()
    return [
        tiny_gguf(folder / "a.gguf", 1),
        tiny_gguf(folder / "b.gguf", 2),
        tiny_gguf(folder / "c.gguf", 3, file_type=gguf_pkg.LlamaFileType.MOSTLY_Q4_1),
    ]


@pytest.fixture
def local(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def assert_whole(registry: LocalRegistry) -> None:
    """Every listed version, and the current one, is a file with exactly the bytes its record says."""
    for version in registry.versions():
        path = registry.path_of(version)
        assert path.stat().st_size == version.bytes and sha256(path) == version.sha256, version.version
    current = registry.current_path()
    if current is not None:
        assert sha256(current) == registry.current().sha256


# -- local ------------------------------------------------------------------------------------------


def test_the_quant_is_read_from_the_gguf_header(ggufs):
    from space.model import EMBEDDED_FILE, embedded_model_path

    assert gguf_quant(embedded_model_path()) == EMBEDDED_FILE.rsplit(".", 2)[1]  # ...Q4_1.gguf
    assert [gguf_quant(p) for p in ggufs] == ["Q8_0", "Q8_0", "Q4_1"]


def test_each_publish_is_a_new_version_and_becomes_current(local, ggufs):
    assert local.current() is None and local.current_path() is None and local.versions() == []

    v1 = local.publish(ggufs[0], base_sha256=BASE_SHA, run_id="run-1", metrics={"loss": 1.5})
    assert (v1.version, v1.file, v1.quant, v1.sha256, v1.bytes) == (
        "v1", "a.gguf", "Q8_0", sha256(ggufs[0]), ggufs[0].stat().st_size)
    assert local.current() == v1
    assert local.current_path() == local.root / "versions" / "v1" / "a.gguf"
    assert json.loads((local.root / "current.json").read_text()) == {"version": "v1"}

    v2 = local.publish(ggufs[1], base_sha256=BASE_SHA, run_id="run-2")
    assert v2.version == "v2" and local.current() == v2
    assert local.current_path().read_bytes() == ggufs[1].read_bytes()
    assert [v.version for v in local.versions()] == ["v1", "v2"]
    assert local.get("v1") == v1 and local.get("v1").metrics == {"loss": 1.5}
    assert_whole(local)


def test_rollback_serves_an_older_version_and_the_next_publish_takes_a_new_number(local, ggufs):
    local.publish(ggufs[0], base_sha256=BASE_SHA)
    local.publish(ggufs[1], base_sha256=BASE_SHA)

    assert local.rollback("v1").version == "v1"
    assert local.current().version == "v1"
    assert local.current_path().read_bytes() == ggufs[0].read_bytes()

    v3 = local.publish(ggufs[2], base_sha256=BASE_SHA)
    assert v3.version == "v3" and v3.quant == "Q4_1" and local.current() == v3


def test_an_unknown_version_is_refused_with_the_known_ones_listed(local, ggufs):
    with pytest.raises(RegistryError, match=r"no version 'v1' .* the known versions are none yet"):
        local.rollback("v1")
    local.publish(ggufs[0], base_sha256=BASE_SHA)
    local.publish(ggufs[1], base_sha256=BASE_SHA)
    for wrong in ("v9", "latest", "../v1"):
        with pytest.raises(RegistryError, match=rf"no version '{re.escape(wrong)}' .* known versions are v1, v2"):
            local.rollback(wrong)
    assert local.current().version == "v2"


def test_a_publish_that_fails_midway_changes_nothing_and_burns_its_number(local, ggufs, monkeypatch):
    local.publish(ggufs[0], base_sha256=BASE_SHA)
    real_copy = registry_module.copy_and_hash

    def disk_full(src, dst):
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(fin.read(1000))  # part of the file is on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_module, "copy_and_hash", disk_full)
    with pytest.raises(OSError, match="No space left"):
        local.publish(ggufs[1], base_sha256=BASE_SHA)
    assert local.current().version == "v1" and [v.version for v in local.versions()] == ["v1"]
    leftovers = sorted(p.name for p in (local.root / "versions").iterdir())
    assert leftovers == [".v2.failed", "v1"]  # the half copy is gone; its number stays taken
    assert not any((local.root / "versions" / ".v2.failed").iterdir())

    monkeypatch.setattr(registry_module, "copy_and_hash", real_copy)
    v3 = local.publish(ggufs[1], base_sha256=BASE_SHA)
    assert v3.version == "v3" and local.current() == v3
    assert_whole(local)


def test_the_folder_of_a_killed_publish_is_never_a_version_and_its_number_is_not_reused(local, ggufs):
    local.publish(ggufs[0], base_sha256=BASE_SHA)
    # What a publish killed mid-copy leaves: its hidden folder with part of the file, and no version.json.
    half = local.root / "versions" / ".v2.tmp-somehost-4242"
    half.mkdir()
    (half / "b.gguf").write_bytes(ggufs[1].read_bytes()[:5000])

    assert [v.version for v in local.versions()] == ["v1"] and local.current().version == "v1"
    with pytest.raises(RegistryError, match="no version 'v2'"):
        local.rollback("v2")
    v3 = local.publish(ggufs[1], base_sha256=BASE_SHA)
    assert v3.version == "v3"
    assert not half.exists() and (local.root / "versions" / ".v2.failed").is_dir()  # bytes freed, number kept


PUBLISH_CHILD = """
import sys, time
from pathlib import Path
import space.model  # what publish imports, loaded before the clock starts
from retrain.registry import LocalRegistry
registry = LocalRegistry(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
version = registry.publish(Path(sys.argv[2]), base_sha256="b" * 64)
print(version.version, time.monotonic() - started, flush=True)
"""


def publish_in_child(root: Path, gguf: Path, kill_after: float | None) -> tuple[str | None, float]:
    """Publish `gguf` in a child process, SIGKILLed `kill_after` s into the publish; the version and time it printed."""
    child = subprocess.Popen([sys.executable, "-c", PUBLISH_CHILD, str(root), str(gguf)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # imports done: the clock starts with the publish
        child.stdin.write("go\n")
        child.stdin.flush()
        if kill_after is not None:
            time.sleep(kill_after)
            child.kill()
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0 or not out.strip():
        return None, 0.0
    version, seconds = out.split()
    return version, float(seconds)


def test_a_sigkill_during_publish_never_leaves_current_on_a_half_file(tmp_path, local):
    big = [tiny_gguf(tmp_path / f"big{i}.gguf", 10 + i, floats=8 << 20) for i in range(2)]  # 32 MiB each
    assert publish_in_child(local.root, big[0], kill_after=None)[0] == "v1"
    version, took = publish_in_child(local.root, big[1], kill_after=None)  # how long a whole publish takes
    assert version == "v2"

    killed = 0
    for i, fraction in enumerate((0.1, 0.3, 0.5, 0.7, 0.9, 1.3)):
        before = local.current()
        taken = max(int(m.group(1)) for p in (local.root / "versions").iterdir()
                    if (m := re.match(r"^\.?v(\d+)", p.name)))
        got, _ = publish_in_child(local.root, big[i % 2], kill_after=fraction * took)
        killed += got is None
        now = local.current()
        # Whatever the kill cut: current is the old version, or a new one (killed after the pointer moved) ...
        assert now == before or int(now.version[1:]) > taken
        if got is not None:
            assert now.version == got and int(got[1:]) > taken  # ... and a number is never given twice
        assert_whole(local)  # ... and every version, current included, is a whole file
    assert killed >= 3, f"only {killed} of 6 publishes were killed in flight (a publish took {took:.2f} s)"

    version, _ = publish_in_child(local.root, big[0], kill_after=None)  # the registry works on after the kills
    assert local.current().version == version and int(version[1:]) > taken
    assert not [p for p in (local.root / "versions").iterdir() if ".tmp-" in p.name]
    assert_whole(local)


# -- Hub --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def default_http_client():
    yield
    set_client_factory(default_client_factory)  # publish_version installs a time-out client: undo it


def manifest(run_id: str = "run-1") -> RunManifest:
    return RunManifest(
        run_id=run_id,
        base=BaseModelRef(path="/models/base.gguf", sha256=BASE_SHA, quant="Q4_1"),
        feedback_files=[InputFile(path="flags/a.jsonl", sha256="c" * 64, bytes=100)],
        flag_ids=["f1", "f2"],
        counts={"train": 2, "heldout": 1},
        settings=RetrainSettings(),
    )


GATE = GateReport(passed=True, reason="held-out up 0.30, drift 0.02", heldout_before=0.1, heldout_after=0.4, drift=0.02)


def publish_commits(hub_server) -> list[str]:
    return [c.title for c in hub_server.repo(REPO).history() if c.title.startswith("Publish")]


def test_a_hub_publish_is_one_commit_with_the_files_and_a_tag(hub_server, hub_client_waits, local, ggufs):
    hub = HubRegistry(REPO, retry_waits=())
    v1 = local.publish(ggufs[0], manifest=manifest(), base_sha256=BASE_SHA, run_id="run-1", gate=GATE,
                       metrics={"heldout_nll": 1.25})
    release = hub.publish(local.path_of(v1), v1, manifest=manifest())

    repo = hub_server.repo(REPO)
    assert repo.private and [c.title for c in repo.history()] == ["Publish v1", "initial commit"]
    assert repo.tags == {"v1": release.commit} and repo.branches["main"] == release.commit
    files = hub_server.files(REPO)
    assert files["versions/v1/a.gguf"] == ggufs[0].read_bytes()
    assert json.loads(files["current.json"]) == {"version": "v1"}
    assert json.loads(files["versions/v1/version.json"])["sha256"] == v1.sha256
    assert json.loads(files["versions/v1/manifest.json"])["run_id"] == "run-1"
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: gguf" in card and "- flagloop" in card and "- gguf" in card
    for shown in ("v1", v1.sha256, BASE_SHA, "heldout_nll", "1.25", GATE.reason, "| held-out corrections score | 0.1 | 0.4 |"):
        assert shown in card, shown

    v2 = local.publish(ggufs[1], base_sha256=BASE_SHA, run_id="run-2")
    second = hub.publish(local.path_of(v2), v2)
    assert publish_commits(hub_server) == ["Publish v2", "Publish v1"]
    assert hub_server.repo(REPO).tags == {"v1": release.commit, "v2": second.commit}
    # A tag keeps its version's bytes, whatever main says now.
    assert Path(hf_hub_download(REPO, "versions/v1/a.gguf", revision="v1")).read_bytes() == ggufs[0].read_bytes()
    assert json.loads(Path(hf_hub_download(REPO, "current.json", revision="v1")).read_text()) == {"version": "v1"}
    assert hub.current() == v2
    assert [v.version for v in hub.versions()] == ["v1", "v2"]
    refs = HfApi().list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": release.commit, "v2": second.commit}


def test_a_hub_rollback_is_a_commit_rewriting_current(hub_server, hub_client_waits, local, ggufs):
    hub = HubRegistry(REPO, retry_waits=())
    for gguf in ggufs[:2]:
        version = local.publish(gguf, base_sha256=BASE_SHA)
        hub.publish(local.path_of(version), version)

    release = hub.rollback("v1")
    assert hub.current().version == "v1"
    assert hub_server.repo(REPO).history()[0].title == "Serve v1 (rollback)"
    files = hub_server.files(REPO)
    assert json.loads(files["current.json"]) == {"version": "v1"} and "# flagloop-tester/model: v1" in files["README.md"].decode()
    assert release.commit == hub_server.repo(REPO).branches["main"]
    assert hub_server.files(REPO, revision="v2")["current.json"] == b'{"version": "v2"}\n'  # the tag did not move
    with pytest.raises(RegistryError, match=r"no version 'v7' in the Hub repo .* known versions are v1, v2"):
        hub.rollback("v7")


def test_a_hub_failing_for_a_while_is_retried_and_the_version_published(hub_server, hub_client_waits, local, ggufs):
    waits = []
    hub = HubRegistry(REPO, sleep=waits.append)
    version = local.publish(ggufs[0], base_sha256=BASE_SHA)
    hub_server.create_repo(REPO, private=True)
    hub_server.fail(500, times=2, methods=("POST",), path="/commit/")
    hub_server.fail(503, times=1, methods=("POST",), path="/tag/")

    release = hub.publish(local.path_of(version), version)
    assert waits == [1.0, 2.0, 1.0]  # two commit attempts failed, then one tag attempt
    assert publish_commits(hub_server) == ["Publish v1"] and hub_server.repo(REPO).tags == {"v1": release.commit}


def test_a_commit_whose_answer_was_lost_is_not_made_twice(hub_server, hub_client_waits, local, ggufs):
    waits = []
    hub = HubRegistry(REPO, sleep=waits.append)
    version = local.publish(ggufs[0], base_sha256=BASE_SHA)
    hub_server.create_repo(REPO, private=True)
    hub_server.lose(times=1, methods=("POST",), path="/commit/")  # the commit lands, its answer never comes

    release = hub.publish(local.path_of(version), version)
    assert waits == [1.0]
    assert publish_commits(hub_server) == ["Publish v1"]  # the retry found every file there: no second commit
    assert hub_server.repo(REPO).tags == {"v1": release.commit}


def test_another_file_under_a_version_name_the_hub_has_is_refused(hub_server, hub_client_waits, local, ggufs, tmp_path):
    hub = HubRegistry(REPO, retry_waits=())
    version = local.publish(ggufs[0], base_sha256=BASE_SHA)
    hub.publish(local.path_of(version), version)
    other = LocalRegistry(tmp_path / "other-registry").publish(ggufs[1], base_sha256=BASE_SHA)  # also "v1"
    with pytest.raises(PublishError, match="already has v1 with another file"):
        hub.publish(ggufs[1], other)
    assert publish_commits(hub_server) == ["Publish v1"]


def settings_for(tmp_path, repo: str | None) -> Settings:
    return Settings(feedback_dir=tmp_path / "feedback", registry_dir=tmp_path / "registry", registry_repo=repo)


def test_publish_with_the_hub_down_keeps_the_local_version_and_says_the_hub_lacks_it(
        hub_server, hub_client_waits, tmp_path, ggufs, monkeypatch):
    monkeypatch.setattr(registry_module, "RETRY_WAITS_S", (0.0, 0.0, 0.0))  # retried as usual, without the waits
    settings = settings_for(tmp_path, REPO)
    run_dir = tmp_path / "runs" / "run-1"
    hub_server.fail(503)  # every request, until reset

    with pytest.raises(PublishError) as caught:
        publish_version(settings, run_dir, ggufs[0], manifest(), GATE, {"steps": 3})
    message = str(caught.value)
    assert "v1 is published in the local registry" in message and f"NOT on the Hub repo {REPO}" in message
    assert "503" in message
    local = LocalRegistry(settings.registry_dir)
    assert local.current().version == "v1" and local.current().run_id == "run-1"
    assert json.loads((run_dir / REPORT).read_text())["hub"] is None
    assert (tmp_path / "registry" / "versions" / "v1" / "manifest.json").is_file()
    assert ("model", REPO) not in hub_server.repos

    hub_server.reset()  # the Hub is back: publishing the same run again pushes the same version
    version = publish_version(settings, run_dir, ggufs[0], manifest(), GATE, {"steps": 3})
    assert version.version == "v1" and [v.version for v in local.versions()] == ["v1"]
    report = json.loads((run_dir / REPORT).read_text())
    assert report["version"] == "v1" and report["hub"]["tag"] == "v1"
    assert hub_server.repo(REPO).tags["v1"] == report["hub"]["commit"]
    assert HubRegistry(REPO).current() == version


def test_publish_and_rollback_move_both_registries(hub_server, hub_client_waits, tmp_path, ggufs):
    settings = settings_for(tmp_path, REPO)
    first = publish_version(settings, tmp_path / "runs/r1", ggufs[0], manifest("r1"), GATE)
    second = publish_version(settings, tmp_path / "runs/r2", ggufs[1], manifest("r2"), GATE)
    assert (first.version, second.version) == ("v1", "v2")
    assert HubRegistry(REPO).current().version == "v2"

    assert rollback(settings, "v1").version == "v1"
    assert LocalRegistry(settings.registry_dir).current().version == "v1"
    assert HubRegistry(REPO).current().version == "v1"


def test_a_run_the_gate_refused_is_not_published(tmp_path, ggufs):
    refused = GATE.model_copy(update={"passed": False, "reason": "drift 0.9 > 0.5"})
    with pytest.raises(PublishError, match=r"did not pass the gate \(drift 0.9 > 0.5\)"):
        publish_version(settings_for(tmp_path, None), tmp_path / "run", ggufs[0], manifest(), refused)
    assert LocalRegistry(tmp_path / "registry").current() is None
