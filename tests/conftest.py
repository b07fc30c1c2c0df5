"""Shared fixtures: a real flagloop app process on 127.0.0.1, and sample records."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.hubserver"]  # the hub_server fixture: a Hub-protocol server on 127.0.0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str
    proc: subprocess.Popen
    feedback_dir: Path
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def start_app(feedback_dir: Path, log: Path, extra_env: dict | None = None, timeout: float = 90) -> RunningApp:
    """Start `python -m space` on a free loopback port and wait until it serves its page."""
    port = free_port()
    # Its own (empty) model registry unless the test gives one: never the checkout's data/registry.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "FLAGLOOP_N_THREADS": "2",
           "FLAGLOOP_REGISTRY_DIR": str(Path(feedback_dir).parent / "registry"), **(extra_env or {})}
    env.pop("FLAGLOOP_CONFIG", None)
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "space", "--port", str(port), "--feedback-dir", str(feedback_dir)],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return RunningApp(url, proc, feedback_dir, log)
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"app did not start in {timeout}s:\n{log.read_text()}")
    except BaseException:  # also Ctrl-C: never leave the app running
        proc.kill()
        raise


@pytest.fixture
def app_server(tmp_path):
    """A running app with its own empty feedback folder; killed after the test."""
    app = start_app(tmp_path / "feedback", tmp_path / "app.log")
    yield app
    app.kill()


# Materialising the embedded GGUF as safetensors takes ~30 s: once per machine, in an ignored folder.
BASE_CACHE = ROOT / ".cache" / "base"


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    from space.model import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_base(embedded_gguf) -> Path:
    """The embedded model as a plain HF folder (float32 safetensors + tokenizer + chat template)."""
    from retrain.base import materialise

    return materialise(embedded_gguf, BASE_CACHE)
