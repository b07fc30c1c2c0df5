"""The served GGUF from a Hub model repo: downloaded by the real huggingface_hub client from a local Hub.

The Hub is tests/hubserver.py on 127.0.0.1; the client, its cache and its retries are huggingface_hub's own.
Where huggingface_hub 2.4 retries before giving up (Hub answering 500 or unreachable, with an empty cache:
23 s of back-off; a download cut off: 5 resumes 1 s apart), `hub_client_waits` skips its sleeping.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.settings import Settings
from space.model import ModelError, embedded_model_path, load_model, resolve_model
from tests.hubserver import HubServer, point_hub_client_at

ROOT = Path(__file__).resolve().parent.parent
REPO = "flagloop/smollm2-gguf"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SECRET = "hf_SECRETtoken0123456789abcdef"  # a token value that must never be printed


@pytest.fixture(scope="module")
def gguf_sha256() -> str:
    with open(embedded_model_path(), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_settings(tmp_path: Path, repo: str = REPO, file: str = FILE, revision: str | None = None) -> Settings:
    return Settings(
        model_path=None, model_repo=repo, model_file=file, model_revision=revision,
        n_threads=2, feedback_dir=tmp_path / "feedback",
    )


def publish_gguf(hub: HubServer) -> str:
    """Put the embedded GGUF on the test Hub; return the commit sha."""
    return hub.add_file(REPO, FILE, embedded_model_path())


def test_model_downloads_from_the_hub_and_is_identified_by_commit(hub_server, tmp_path, gguf_sha256):
    commit = publish_gguf(hub_server)

    served = load_model(hub_settings(tmp_path))

    identity = served.identity
    assert (identity.source, identity.repo, identity.revision) == ("hub", REPO, commit)
    assert identity.sha256 == gguf_sha256
    assert identity.quant == "Q4_1"
    assert identity.file == FILE
    assert Path(identity.path).is_relative_to(tmp_path / "hf_home" / "hub")  # the fixture's fresh cache
    assert served.llama.n_ctx() > 0
    assert [r.method for r in hub_server.requests_to(f"/{REPO}/resolve/main/{FILE}")] == ["HEAD", "GET"]


@pytest.mark.parametrize("outage", ["stopped", "500", "401", "timeout"])
def test_second_load_uses_the_cache_when_the_hub_is_down(hub_server, tmp_path, gguf_sha256, outage, monkeypatch):
    # huggingface_hub 2.4: when the HEAD call fails with a connection error, a time-out or any HTTP error
    # other than "revision/file not found", the file the branch last pointed to in the cache is served.
    from huggingface_hub import constants

    commit = publish_gguf(hub_server)
    first = load_model(hub_settings(tmp_path)).identity
    if outage == "stopped":
        hub_server.stop()
    elif outage == "timeout":
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # what HF_HUB_ETAG_TIMEOUT=1 sets at import
        hub_server.hang()
    else:
        hub_server.fail(int(outage))
    asked = len(hub_server.requests)

    second = load_model(hub_settings(tmp_path)).identity

    assert (second.source, second.revision, second.sha256) == ("hub", commit, gguf_sha256)
    assert second.path == first.path
    assert len(hub_server.requests) == asked + (0 if outage == "stopped" else 1)  # one HEAD, no download


def test_pinned_commit_in_the_cache_loads_without_asking_the_hub(hub_server, tmp_path):
    commit = hub_server.add_file(REPO, FILE, b"GGUF pinned bytes")
    first = resolve_model(hub_settings(tmp_path, revision=commit))
    asked = len(hub_server.requests)

    again = resolve_model(hub_settings(tmp_path, revision=commit))

    assert again.revision == first.revision == commit
    assert again.path.read_bytes() == b"GGUF pinned bytes"
    assert len(hub_server.requests) == asked


def test_new_commit_on_the_branch_is_downloaded_and_identified(hub_server, tmp_path):
    old = hub_server.add_file(REPO, FILE, b"GGUF old")
    assert resolve_model(hub_settings(tmp_path)).revision == old
    new = hub_server.add_file(REPO, FILE, b"GGUF new")

    file = resolve_model(hub_settings(tmp_path))

    assert new != old
    assert (file.revision, file.path.read_bytes()) == (new, b"GGUF new")


def test_revision_is_the_commit_even_when_the_cache_lives_under_a_snapshots_folder(hub_server, tmp_path, monkeypatch):
    point_hub_client_at(hub_server.url, tmp_path / "snapshots" / "hf_home", monkeypatch)
    commit = hub_server.add_file(REPO, FILE, b"GGUF bytes")

    assert resolve_model(hub_settings(tmp_path)).revision == commit


@pytest.mark.parametrize("fault", ["500", "timeout"])
def test_one_failed_hub_answer_is_retried_and_the_download_succeeds(hub_server, tmp_path, fault, monkeypatch):
    from huggingface_hub import constants

    commit = hub_server.add_file(REPO, FILE, b"GGUF retried")
    if fault == "timeout":
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        hub_server.hang(times=1)
    else:
        hub_server.fail(500, times=1)

    file = resolve_model(hub_settings(tmp_path))

    assert (file.revision, file.path.read_bytes()) == (commit, b"GGUF retried")
    assert [r.method for r in hub_server.requests] == ["HEAD", "HEAD", "GET"]


def test_download_cut_off_midway_is_resumed_and_complete(hub_server, hub_client_waits, tmp_path, gguf_sha256):
    commit = publish_gguf(hub_server)
    hub_server.cut(after_bytes=30_000_000, times=1)

    identity = load_model(hub_settings(tmp_path)).identity

    assert (identity.revision, identity.sha256) == (commit, gguf_sha256)
    first, resumed = hub_server.requests_to(FILE, "GET")
    assert "range" not in first.headers
    # huggingface_hub keeps what it wrote (whole 10 MiB chunks) and asks for the rest
    resumed_at = int(resumed.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 30_000_000


# (settings overrides, what the server does, words the message must hold besides the repo and the file)
HUB_ERRORS = [
    pytest.param({"file": "missing.gguf"}, None, ["FLAGLOOP_MODEL_FILE"], id="missing-file"),
    pytest.param({"repo": "flagloop/no-such-repo"}, None, ["FLAGLOOP_MODEL_REPO"], id="missing-repo"),
    pytest.param(
        {"revision": "no-such-branch"}, None, ["no-such-branch", "FLAGLOOP_MODEL_REVISION"], id="missing-revision"
    ),
    pytest.param({}, "401", ["HF_TOKEN"], id="401"),
    pytest.param({}, "500", ["FLAGLOOP_MODEL_PATH"], id="500-empty-cache"),
    pytest.param({}, "stop", ["FLAGLOOP_MODEL_PATH"], id="unreachable-empty-cache"),
]


@pytest.mark.parametrize("overrides, server, advice", HUB_ERRORS)
def test_hub_errors_raise_model_error_naming_repo_file_and_what_to_do(
    hub_server, hub_client_waits, tmp_path, monkeypatch, caplog, overrides, server, advice
):
    publish_gguf(hub_server)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    settings = hub_settings(tmp_path, **overrides)
    if server == "stop":
        hub_server.stop()
    elif server:
        hub_server.fail(int(server))

    with caplog.at_level(logging.DEBUG), pytest.raises(ModelError) as raised:
        load_model(settings)

    message = str(raised.value)
    assert settings.model_repo in message and settings.model_file in message
    for word in advice:
        assert word in message
    if server != "stop":  # the token was sent, so it could have leaked
        assert hub_server.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in message and SECRET not in caplog.text
    if server in ("500", "stop"):
        assert hub_client_waits, "huggingface_hub gave up without retrying"


def test_model_error_is_one_line(hub_server, tmp_path):
    publish_gguf(hub_server)
    with pytest.raises(ModelError) as raised:
        load_model(hub_settings(tmp_path, file="missing.gguf"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("server, cause", [("500", "500"), ("stop", "Connection refused")])
def test_model_error_says_why_the_hub_failed(hub_server, hub_client_waits, tmp_path, server, cause):
    publish_gguf(hub_server)
    if server == "stop":
        hub_server.stop()
    else:
        hub_server.fail(int(server))
    with pytest.raises(ModelError) as raised:
        load_model(hub_settings(tmp_path))
    assert cause in str(raised.value) and hub_server.url in str(raised.value)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_connection_dropped_by_the_hub_raises_model_error(hub_server, hub_client_waits, tmp_path, method):
    # huggingface_hub 2.4 re-raises httpx2.RemoteProtocolError as is: on HEAD at once, on GET after 5 resumes.
    publish_gguf(hub_server)
    hub_server.drop(methods=(method,))
    with pytest.raises(ModelError, match=FILE):
        load_model(hub_settings(tmp_path))


@pytest.mark.parametrize("repo, file", [("flagloop/x/y", FILE), ("flagloop/x", "../escape.gguf")])
def test_invalid_repo_id_or_file_name_raises_model_error(hub_server, tmp_path, repo, file):
    with pytest.raises(ModelError, match="FLAGLOOP_MODEL"):
        load_model(hub_settings(tmp_path, repo=repo, file=file))


def test_cli_exits_2_with_a_clear_error_when_the_hub_file_is_missing(hub_server, tmp_path):
    publish_gguf(hub_server)
    env = {
        **os.environ,
        "FLAGLOOP_MODEL_REPO": REPO, "FLAGLOOP_MODEL_FILE": "missing.gguf", "HF_TOKEN": SECRET,
        "FLAGLOOP_CONFIG": str(tmp_path / "none.toml"), "GRADIO_ANALYTICS_ENABLED": "False",
    }  # HF_ENDPOINT and HF_HOME come from the hub_server fixture
    env.pop("FLAGLOOP_MODEL_PATH", None)

    done = subprocess.run(
        [sys.executable, "-m", "space", "--port", "0", "--feedback-dir", str(tmp_path / "feedback")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    stderr = "\n" + done.stderr
    assert stderr.count("\nflagloop: ") == 1, done.stderr
    error = stderr[stderr.index("\nflagloop: ") :]  # the error is the last thing printed
    assert REPO in error and "missing.gguf" in error and "FLAGLOOP_MODEL_FILE" in error
    assert SECRET not in done.stderr + done.stdout
    assert hub_server.requests_to("/missing.gguf", "HEAD"), "the app did not ask the test Hub"
